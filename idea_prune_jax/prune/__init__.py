"""The pure public pruning core: structure, masks, importance, schedules, prune_optimizer, the KD
loss, errors. Imports jax, optax and numpy only, and nothing from the rest of the package."""
