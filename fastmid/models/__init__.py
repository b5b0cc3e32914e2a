"""Model loading, family layout tables, the band plan and its execution policy."""
