"""`prune_optimizer`: gradual structured pruning added to any optax optimizer in one line.

    tx = prune_optimizer(optax.adamw(1e-3), structure.llama_ffn(), schedule)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)   # params are required
    params = optax.apply_updates(params, updates)

The state (`PruneState`) holds the masks, the importance state (`state.importance`; its per-neuron
scores are `importance.scores(state.importance, kind, ...)`), the schedule's step count and the
inner optimizer's state. Each update:
  1. updates the importance state from the grads it is given (no extra forward or backward pass;
     'activation' takes `activations=` as an extra argument, {unit: [n_layers, width]});
  2. on the schedule's refresh steps, keeps the top-k(t) alive neurons per layer (k is traced:
     one compilation for the whole run; pruned neurons never return);
  3. runs the inner optimizer and returns updates after which every pruned slice of the params
     is exactly 0 (`masks.zero_pruned`), so AdamW momentum or weight decay cannot revive one.
Because the params stay masked, the forward pass needs no masks: gradients w.r.t. pruned slices
are exactly 0 already. At the end of the window, `masks.shrink(params, state.masks, s)` and
`masks.shrink(state, state.masks, s)` give a smaller model and a state that keeps training it
(`PruneState.shrink_units` slices the state's own masks and importance).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from idea_prune_jax.prune import importance
from idea_prune_jax.prune import masks as masks_lib
from idea_prune_jax.prune.errors import PruneError
from idea_prune_jax.prune.schedules import PruneSchedule
from idea_prune_jax.prune.structure import Structure


class PruneState(NamedTuple):
  count: jax.Array  # int32: the step the schedule reads (the trainer starts it at its global step)
  masks: Any  # {unit: float32 0/1 [n_layers, width]}
  importance: Any  # `importance.init`'s state {field: {unit: [n_layers, width]}}
  inner: Any  # the wrapped optimizer's state

  def shrink_units(self, take):
    """This state with its per-unit masks and importance state sliced by `take`; `masks.shrink`
    calls it (the inner state's moments are params-shaped and sliced by the structure)."""
    return self._replace(masks=take(self.masks),
                         importance={f: take(v) for f, v in self.importance.items()})


def prune_optimizer(inner: optax.GradientTransformation, structure: Structure,
                    schedule: PruneSchedule | dict[str, PruneSchedule], score: str = 'platon',
                    *, beta1: float = 0.85,
                    beta2: float = 0.95) -> optax.GradientTransformationExtraArgs:
  """`inner` with masks, importance scores and the width schedule in its state; see the module.

  schedule: one for every unit, or {unit name: schedule} (each axis its own widths, and window)."""
  if score not in importance.KINDS:
    raise PruneError(f"prune_optimizer: unknown score {score!r}; use one of "
                     f"{', '.join(importance.KINDS)}")
  names = [u.name for u in structure]
  schedules = schedule if isinstance(schedule, dict) else {n: schedule for n in names}
  if sorted(schedules) != sorted(names):
    raise PruneError(f'prune_optimizer: schedules for units {sorted(schedules)}, the structure '
                     f'has {sorted(names)}; give one schedule per unit')
  for sched in schedules.values():
    if not isinstance(sched, PruneSchedule):
      raise PruneError(f'prune_optimizer: schedule must be a schedules.PruneSchedule, got '
                       f'{type(sched).__name__}')
  for name, beta in (('beta1', beta1), ('beta2', beta2)):
    if not 0 <= beta < 1:
      raise PruneError(f'prune_optimizer: {name}={beta} must lie in [0, 1)')
  inner = optax.with_extra_args_support(inner)

  def init(params):
    unit_masks = masks_lib.init(params, structure)
    for name, mask in unit_masks.items():
      width = mask.shape[-1]
      if width != schedules[name].width_enlarged:
        raise PruneError(f"unit '{name}' has width {width} in params but the schedule's "
                         f'width_enlarged={schedules[name].width_enlarged}; build the schedule for '
                         'the model you prune')
    return PruneState(jnp.zeros((), jnp.int32), unit_masks, importance.init(unit_masks, score),
                      inner.init(params))

  def update(grads, state: PruneState, params=None, *, activations=None, **extra):
    if params is None:
      raise PruneError('prune_optimizer: update(grads, state, params) needs params (scores are '
                       'params x grads; pruned slices are zeroed from them)')
    importance_state = importance.update(state.importance, score, params=params, grads=grads,
                                         activations=activations, structure=structure,
                                         beta1=beta1, beta2=beta2)
    step = state.count
    refreshing = {n: sched.is_refresh(step) for n, sched in schedules.items()}

    def refresh():
      scores = importance.scores(importance_state, score, params=params, structure=structure)
      new = masks_lib.refresh(state.masks, scores,
                              {n: sched.keep_k(step) for n, sched in schedules.items()})
      return {n: jnp.where(refreshing[n], new[n], state.masks[n]) for n in new}

    any_refresh = jnp.any(jnp.stack(list(refreshing.values())))
    new_masks = jax.lax.cond(any_refresh, refresh, lambda: state.masks)
    updates, inner_state = inner.update(grads, state.inner, params, **extra)
    updates = masks_lib.zero_pruned(updates, params, new_masks, structure)
    return updates, PruneState(step + 1, new_masks, importance_state, inner_state)

  return optax.GradientTransformationExtraArgs(init, update)


def find(opt_state) -> PruneState | None:
  """The PruneState inside an optimizer state (the state itself, or nested in a chain), or None."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PruneState))
           if isinstance(s, PruneState)]
  return found[0] if found else None
