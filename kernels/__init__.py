"""fastmid.kernels: fused Triton ops with torch references.

Dispatch: the Triton path runs on CUDA tensors when Triton is importable; everywhere else the
torch reference runs. ``FASTMID_KERNELS=off`` forces the reference everywhere.
"""
