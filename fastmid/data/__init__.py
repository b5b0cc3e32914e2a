"""SFT data: formats, chat-template tokenization with labels, collation, built-in sets."""
