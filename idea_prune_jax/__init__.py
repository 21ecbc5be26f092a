"""IDEA Prune in JAX: enlarge, prune FFN neurons gradually inside one cosine, shrink, recover.

The public pruning API is pure functions over params pytrees (Linen dicts or NNX States):
`structure` (what a prunable neuron is), `masks`, `importance`, `schedules` and `distill`.
"""

from idea_prune_jax import importance, masks, schedules, structure

__all__ = ['distill', 'importance', 'masks', 'schedules', 'structure']


def __getattr__(name):
  # distill builds on the trainer's TrainState; import it only when asked for.
  if name == 'distill':
    import importlib
    return importlib.import_module('idea_prune_jax.distill')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
