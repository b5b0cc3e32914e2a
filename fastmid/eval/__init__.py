"""Evaluation: GSM8K-style exact match and loss/perplexity."""
