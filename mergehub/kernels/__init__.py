"""Fused Triton kernels for merging and decompress-and-apply, with torch references."""
