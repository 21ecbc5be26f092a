"""IDEA Prune in JAX: enlarge, prune FFN neurons gradually inside one cosine, shrink, recover.

The public pruning API is pure functions over params pytrees (Linen dicts or NNX States), and
imports only jax, optax and numpy: `structure` (what a prunable neuron is), `masks`,
`importance`, `schedules` (the width schedule), `distill` (the KD loss) and `prune_optimizer`
(all of it as one optax GradientTransformation); they live in `idea_prune_jax/prune/` and are
re-exported here. Submodules load on first use.
"""

import importlib

__all__ = ['PruneError', 'PruneSchedule', 'distill', 'importance', 'masks', 'prune_optimizer',
           'schedules', 'structure']

_ATTRS = {'prune_optimizer': 'prune_optax', 'PruneState': 'prune_optax',
          'PruneSchedule': 'schedules', 'PruneError': 'errors'}


def __getattr__(name):
  # Lazy, so `import idea_prune_jax.prune.masks` loads the pure core only, never the trainer.
  if name in _ATTRS:
    return getattr(importlib.import_module(f'idea_prune_jax.prune.{_ATTRS[name]}'), name)
  if name in ('distill', 'importance', 'masks', 'schedules', 'structure', 'errors',
              'prune_optax'):
    return importlib.import_module(f'idea_prune_jax.prune.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
