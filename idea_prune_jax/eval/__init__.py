"""Perplexity and generation, the sharded scorer, the lm-eval model."""
