"""Triton attention kernels and their PyTorch references (no transformers import here)."""
