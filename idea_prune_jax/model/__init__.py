"""The LLaMA-style decoder and its attention kernels."""
