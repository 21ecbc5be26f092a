"""The pure public pruning core: structure, masks, importance, schedules, prune_optimizer, the KD
loss (and the chunked scan it shares with the trainer's LM loss), errors. Imports jax, optax and
numpy only, and nothing from the rest of the package."""
