"""Orbax checkpoints; dense and Hugging Face exports."""
