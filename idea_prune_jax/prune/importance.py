"""Neuron importance: score state and its per-step update, pure and jit-able.

Used inside the compiled train step from what it already has (params, grads, sown activations):
no extra forward or backward pass. For neuron j of a unit (its coupled slices, see `structure`):

  s_j    = || concat_slices (W ⊙ G)[.., j, ..] ||_2               sensitivity (coupled_norm)
  Ibar_j <- β1·Ibar_j + (1 − β1)·s_j
  U_j    <- β2·U_j    + (1 − β2)·|s_j − Ibar_j|                   with the NEW Ibar_j

  kind              state        score
  'platon'          ibar, u      Ibar·U          (default; PLATON, Zhang et al. 2022)
  'sensitivity_ema' ibar         Ibar
  'magnitude'       (none)       || concat_slices W[.., j, ..] ||_2 of the current params
  'activation'      act          act <- β1·act + (1 − β1)·mean|h_j|   (h: FFN hidden activation)

Two things, two names: the importance state (`init`, `update`: {field: {name: [n_layers, width]}},
carried as `PruneState.importance`) and the scores (`scores(state, kind)`: {name: [n_layers,
width]}, what `masks.refresh` ranks). Both are shaped like the masks, so they shard like the FFN
axis they describe. Zero-initialised, no bias correction (as in PLATON).
"""

from typing import Any

import jax
import jax.numpy as jnp

from idea_prune_jax.prune.errors import PruneError
from idea_prune_jax.prune.structure import Structure, locate

KINDS = ('platon', 'sensitivity_ema', 'magnitude', 'activation')
_STATE_FIELDS = {'platon': ('ibar', 'u'), 'sensitivity_ema': ('ibar',), 'magnitude': (),
                 'activation': ('act',)}


def check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise PruneError(f"unknown importance kind {kind!r}; use one of {', '.join(KINDS)}")


def coupled_norm(tree_a: Any, tree_b: Any, structure: Structure) -> dict[str, jax.Array]:
  """name -> mask-shaped float32: s_j = sqrt(sum over the unit's slices of (A⊙B)[j]²).

  (params, grads): sensitivity; (params, None): the L2 norm of the weights themselves.
  """
  leaves_a, _, matches, _ = locate(tree_a, structure, one_leaf_per_slice=True, what='params')
  leaves_b = leaves_a
  if tree_b is not None:
    leaves_b, _, matches_b, _ = locate(tree_b, structure, one_leaf_per_slice=True, what='grads')
    if [(m.path, m.unit.name) for m in matches_b] != [(m.path, m.unit.name) for m in matches]:
      raise PruneError('grads and params hold the units at different paths: '
                       f'{[m.path for m in matches_b]} vs {[m.path for m in matches]}')
  sumsq = {}
  for m in matches:
    a = leaves_a[m.index].astype(jnp.float32)
    prod = a if tree_b is None else a * leaves_b[m.index].astype(jnp.float32)
    kept_axes = (m.neuron_axis,) if m.layer_axis is None else (m.layer_axis, m.neuron_axis)
    sq = jnp.sum(prod * prod, axis=tuple(i for i in range(prod.ndim) if i not in kept_axes))
    if m.layer_axis is not None and m.neuron_axis < m.layer_axis:
      sq = sq.T  # always [layers, neurons]
    # The axis is [groups, width, inner]: a neuron's entries are summed, groups kept apart.
    sq = sq.reshape(sq.shape[:-1] + (m.unit.groups, m.width, m.inner)).sum(-1)
    if m.unit.groups == 1:
      sq = sq[..., 0, :]
    sumsq[m.unit.name] = sumsq.get(m.unit.name, 0.0) + sq
  return {name: jnp.sqrt(v) for name, v in sumsq.items()}


def init(masks: dict[str, jax.Array], kind: str = 'platon') -> dict[str, dict[str, jax.Array]]:
  """The zero importance state {field: {name: [n_layers, width]}} for `kind` ({} for magnitude)."""
  check_kind(kind)
  return {f: {name: jnp.zeros(jnp.shape(m), jnp.float32) for name, m in masks.items()}
          for f in _STATE_FIELDS[kind]}


def _ema(old, new, beta):
  return beta * old + (1.0 - beta) * new


def update(state, kind: str = 'platon', *, params=None, grads=None, activations=None,
           structure: Structure | None = None, beta1: float = 0.85, beta2: float = 0.95):
  """One step of the importance state; see the module docstring for the formulas.

  platon / sensitivity_ema need params, grads (w.r.t. the unmasked params) and structure;
  activation needs `activations`: an array [n_layers, width] (one unit) or a dict name -> array;
  magnitude has no state and returns `state` unchanged.
  """
  check_kind(kind)
  if kind == 'magnitude':
    return state
  if kind == 'activation':
    if activations is None:
      raise PruneError("importance kind 'activation' needs activations=")
    if not isinstance(activations, dict):
      names = list(state['act'])
      if len(names) != 1:
        raise PruneError(f'activations must be a dict name -> array for units {names}')
      activations = {names[0]: activations}
    new = {}
    for name, act in state['act'].items():
      if name not in activations:
        raise PruneError(f"activations have no unit '{name}' (they have {sorted(activations)})")
      a = jnp.asarray(activations[name], jnp.float32)
      if a.shape != act.shape:
        raise PruneError(f"activations of unit '{name}' have shape {a.shape}, want {act.shape} "
                         '([n_layers, width], the mean |h| of each neuron)')
      new[name] = _ema(act, a, beta1)
    return {'act': new}
  if params is None or grads is None or structure is None:
    raise PruneError(f'importance kind {kind!r} needs params=, grads= and structure=')
  s = coupled_norm(params, grads, structure)
  ibar = {name: _ema(state['ibar'][name], s[name], beta1) for name in state['ibar']}
  if kind == 'sensitivity_ema':
    return {'ibar': ibar}
  # The uncertainty measures |s − Ibar| against the Ibar just updated with this step's s,
  # as PLATON does (its U^(t) uses Ibar^(t), not Ibar^(t-1)).
  u = {name: _ema(state['u'][name], jnp.abs(s[name] - ibar[name]), beta2) for name in state['u']}
  return {'ibar': ibar, 'u': u}


def scores(state, kind: str = 'platon', *, params=None,
           structure: Structure | None = None) -> dict[str, jax.Array]:
  """The scores of an importance state: name -> [n_layers, width] float32; higher means more
  important (kept longer)."""
  check_kind(kind)
  if kind == 'platon':
    return {name: state['ibar'][name] * state['u'][name] for name in state['ibar']}
  if kind == 'sensitivity_ema':
    return dict(state['ibar'])
  if kind == 'activation':
    return dict(state['act'])
  if params is None or structure is None:
    raise PruneError("importance kind 'magnitude' needs params= and structure=")
  return coupled_norm(params, None, structure)
