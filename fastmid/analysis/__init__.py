"""Layer-wise analysis: streaming CKA, weight change, entropy, gradient norms, band advice."""
