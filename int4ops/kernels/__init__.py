"""Backends of the W4A16 matmul: Triton kernels and the CUDA library loader."""
