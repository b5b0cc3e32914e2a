"""fastmid: Mid-Block tuning (full-rank SFT of the middle band of decoder layers) and layer-wise
analysis of where fine-tuning changes a model (arXiv 2604.11838)."""

__version__ = "0.1.0"
