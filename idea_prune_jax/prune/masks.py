"""Neuron masks as pure pytree transforms: init, apply, refresh (exact top-k), widths, shrink.

Masks are a dict unit name -> float32 0/1 array [n_layers, width] ([width] for an unstacked unit),
built from a `structure.Structure`. No model code knows about pruning: the forward pass sees
`apply(params, masks, structure)`, so gradients w.r.t. pruned slices are exactly zero.

A training step keeps pruned slices at exactly 0 AFTER the optimizer update (`zero_pruned` on the
updates; `prune_optimizer` does it for you). Zero gradients alone are not enough: AdamW's momentum
from before a neuron was pruned keeps moving it (and decoupled weight decay of a nonzero value is
nonzero), which would revive it.

`refresh` runs inside jit with a traced `keep_k` (no recompile as k moves); `shrink` and
`kept_indices` run outside jit on concrete masks and slice the kept neurons out of any pytree
shaped like params (params, grads, optax states).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from idea_prune_jax.prune.errors import PruneError
from idea_prune_jax.prune.structure import UNIT_KINDS, Structure, locate

Masks = dict[str, jax.Array]


def init(params: Any, structure: Structure) -> Masks:
  """All-ones float32 masks, [n_layers, width] per unit ([width] for layer_axis None,
  [n_layers, groups, width] for a grouped unit)."""
  _, _, _, shapes = locate(params, structure, one_leaf_per_slice=True, what='params')
  return {name: jnp.ones(shape, jnp.float32) for name, shape in shapes.items()}


def _expand(mask, match):
  """A unit's mask [.., (groups,) width] as one entry per element of the leaf's neuron axis:
  [.., groups · width · inner], the axis's [groups, width, inner] layout flattened."""
  xp = np if isinstance(mask, np.ndarray) else jnp
  if match.inner > 1:
    mask = xp.repeat(mask, match.inner, axis=-1)
  if match.unit.groups > 1:
    mask = mask.reshape(mask.shape[:-2] + (-1,))
  return mask


def _broadcast(mask, match, ndim):
  """A [layers, neurons] (or [neurons]) array reshaped to broadcast against a leaf of rank ndim."""
  axes = (match.neuron_axis,) if match.layer_axis is None else (match.layer_axis,
                                                                 match.neuron_axis)
  if len(axes) == 2 and axes[1] < axes[0]:
    mask, axes = mask.T, axes[::-1]  # mask is [layers, neurons]; the leaf has them swapped
  shape = [1] * ndim
  for a, size in zip(axes, mask.shape):
    shape[a] = size
  return mask.reshape(shape)


def _unit(tree: dict, name: str, what: str):
  if name not in tree:
    raise PruneError(f"{what} has no unit '{name}' (it has {sorted(tree)}); build it from the "
                     'same structure')
  return tree[name]


def apply(tree: Any, masks: Masks, structure: Structure) -> Any:
  """Multiplies every leaf of each unit by its neuron mask (dtype preserved); params, grads, ..."""
  leaves, treedef, matches, _ = locate(tree, structure)
  leaves = list(leaves)
  for m in matches:
    leaf = leaves[m.index]
    mask = _broadcast(_expand(jnp.asarray(_unit(masks, m.unit.name, 'masks')), m), m, leaf.ndim)
    leaves[m.index] = leaf * mask.astype(leaf.dtype)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def zero_pruned(updates: Any, params: Any, masks: Masks, structure: Structure) -> Any:
  """Updates that leave every pruned slice of `params + updates` exactly 0, the rest unchanged.

  For a pruned entry the update is −param (p + (−p) is exactly 0 in IEEE arithmetic); a kept
  entry keeps its update bit for bit, so `optax.apply_updates` gives the same kept values as
  without pruning.
  """
  leaves, treedef, matches, _ = locate(updates, structure, one_leaf_per_slice=True,
                                       what='updates')
  params_leaves = jax.tree_util.tree_leaves(params)
  if len(params_leaves) != len(leaves):
    raise PruneError(f'updates have {len(leaves)} leaves, params {len(params_leaves)}; '
                     'pass the params the updates are for')
  leaves = list(leaves)
  for m in matches:
    mask = _expand(jnp.asarray(_unit(masks, m.unit.name, 'masks')), m)
    mask = _broadcast(mask, m, leaves[m.index].ndim)
    # Sequential over units: an entry pruned by any unit of its leaf ends at −param.
    leaves[m.index] = jnp.where(mask > 0, leaves[m.index], -params_leaves[m.index])
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _refresh_rows(mask_LxF, scores_LxF, keep_k):
  alive_LxF = mask_LxF > 0
  # lax.sort's total order would rank a -NaN score first and -0.0 before +0.0 (breaking the index
  # tie-break); so NaN ranks last among alive neurons and zeros are made equal. Pruned neurons
  # sort after every alive one, whatever their score: they never return.
  score = jnp.where(jnp.isnan(scores_LxF), -jnp.inf, scores_LxF.astype(jnp.float32))
  score = jnp.where(score == 0, 0.0, score)
  iota_LxF = jax.lax.broadcasted_iota(jnp.int32, score.shape, 1)
  # Lexicographic sort on (pruned, -score, index): ties break by index (lower index wins) so
  # exactly min(k, alive) neurons are kept per layer, never k plus however many tie at the cut.
  _, _, order_LxF = jax.lax.sort((jnp.logical_not(alive_LxF).astype(jnp.int32), -score, iota_LxF),
                                 dimension=1, num_keys=3)
  rows_LxF = jax.lax.broadcasted_iota(jnp.int32, score.shape, 0)
  rank_LxF = jnp.zeros_like(iota_LxF).at[rows_LxF, order_LxF].set(iota_LxF)
  keep_k = jnp.asarray(keep_k, jnp.int32)
  keep_k = keep_k[:, None] if keep_k.ndim == 1 else keep_k  # one k per layer, if given so
  return (alive_LxF & (rank_LxF < keep_k)).astype(mask_LxF.dtype)


def refresh(masks: Masks, scores: dict[str, jax.Array], keep_k) -> Masks:
  """Monotone masks keeping the top-`keep_k` alive neurons per layer by score.

  keep_k: an int (traced is fine: no recompile as it changes), a dict unit name -> int, or an
  int array [n_layers]. Already-pruned neurons never return; each layer keeps exactly
  min(keep_k, currently kept) neurons.
  """
  out = {}
  for name, mask in masks.items():
    k = _unit(keep_k, name, 'keep_k') if isinstance(keep_k, dict) else keep_k
    mask, score = jnp.asarray(mask), jnp.asarray(_unit(scores, name, 'scores'))
    if score.shape != mask.shape:
      raise PruneError(f"refresh: scores of unit '{name}' have shape {score.shape}, its mask "
                       f'{mask.shape}; scores must be [n_layers, width] like the mask')
    _check_keep_k(name, k, mask.shape)
    flat = _refresh_rows(mask.reshape(-1, mask.shape[-1]), score.reshape(-1, mask.shape[-1]), k)
    out[name] = flat.reshape(mask.shape)
  return out


def _check_keep_k(name: str, k, mask_shape) -> None:
  """A k that is not one count (or one per layer) >= 0 fails here; a traced k is not seen."""
  shape = jnp.shape(k)
  layers = mask_shape[:-1]
  if shape not in ((), (int(np.prod(layers)),)):
    raise PruneError(f"refresh: keep_k of unit '{name}' has shape {shape}; give one int or one "
                     f'per layer {layers}')
  if isinstance(k, jax.core.Tracer):
    return
  k = np.asarray(k)
  if k.dtype == bool or not (np.issubdtype(k.dtype, np.integer) or np.all(k == np.round(k))):
    raise PruneError(f"refresh: keep_k={k.tolist()} of unit '{name}' must be whole numbers of "
                     'neurons')
  if np.any(k < 0):
    raise PruneError(f"refresh: keep_k={k.tolist()} of unit '{name}' must be >= 0 (0 prunes "
                     'every neuron)')


def widths(masks: Masks) -> dict[str, jax.Array]:
  """Kept neurons per layer: name -> int32 [n_layers] (a scalar for an unstacked unit)."""
  return {name: jnp.sum(jnp.asarray(m) > 0, axis=-1, dtype=jnp.int32) for name, m in masks.items()}


def kept_indices(masks: Masks) -> dict[str, np.ndarray]:
  """Ascending kept indices: name -> int [n_layers, k] ([k] if unstacked); needs uniform width."""
  out = {}
  for name, mask in masks.items():
    if isinstance(mask, jax.core.Tracer):
      raise PruneError(f"unit '{name}': masks are traced; shrink and kept_indices change shapes, "
                       'so call them outside jit (on concrete masks, between steps)')
    keep = np.asarray(mask) > 0
    keep_LxF = keep.reshape(-1, keep.shape[-1])
    counts = keep_LxF.sum(-1)
    if np.any(counts != counts[0]):
      raise PruneError(f"unit '{name}': layers keep different widths {counts.tolist()}; "
                       'shrink needs one width for every layer')
    idx = np.stack([np.flatnonzero(row) for row in keep_LxF])
    out[name] = idx.reshape(keep.shape[:-1] + (int(counts[0]),))
  return out


def _take(x, idx, axis):
  take = np.take_along_axis if isinstance(x, np.ndarray) else jnp.take_along_axis
  return take(x, idx, axis=axis)


def shrink(tree: Any, masks: Masks, structure: Structure) -> Any:
  """Slices the kept neurons out of every unit leaf: params, grads, optax states, and a
  `prune_optimizer` state (its own masks and importance too), so training goes on at the new width.

  Per-unit trees such as masks ({unit: [.., width]}) are not params-shaped, so the structure does
  not find them: a node that holds some says how to slice them with a `shrink_units(take)`
  method, which gets `take` ({unit: [.., width]} -> {unit: [.., kept]}) and returns the node
  shrunk. Outside jit: the masks must be concrete, and every layer must keep the same number of
  neurons.
  """
  indices = kept_indices(masks)
  leaves, treedef, matches, _ = locate(tree, structure)
  leaves = list(leaves)
  on_axis = {}  # several units may cut one axis of one leaf (KV groups and query heads of q)
  for m in matches:
    on_axis.setdefault((m.index, m.neuron_axis), []).append(m)
  stacked_on = {(m.index, m.layer_axis) for m in matches if m.layer_axis is not None}
  # Layers go last (a depth unit cuts another unit's layer axis): the per-layer indices of the
  # other units are for the full stack.
  for (i, axis), ms in sorted(on_axis.items(), key=lambda item: item[0] in stacked_on):
    keep = np.ones((), bool)
    for m in ms:
      keep = keep & _expand(np.asarray(masks[m.unit.name]) > 0, m)
    ref = next((m for m in ms if m.layer_axis is not None), ms[0])
    if len({m.layer_axis for m in ms if m.layer_axis is not None}) > 1:
      raise PruneError(f'leaf {ref.path}: units {[m.unit.name for m in ms]} stack layers on '
                       'different axes')
    keep_rows = keep.reshape(-1, keep.shape[-1])
    idx = np.stack([np.flatnonzero(row) for row in keep_rows]).reshape(keep.shape[:-1] + (-1,))
    leaves[i] = _take(leaves[i], _broadcast(idx, ref, leaves[i].ndim), axis)
  tree = jax.tree_util.tree_unflatten(treedef, leaves)
  # Per-unit trees lose what other units cut: the groups of a grouped unit whose groups are
  # another unit's neurons (query heads within the kept KV groups), the layers of a unit stacked
  # on the axis a depth unit cuts.
  groups_of = {m.unit.name: indices[g.unit.name] for m in matches for g in matches
               if m.unit.groups > 1 and g.index == m.index and g.neuron_axis == m.neuron_axis
               and g.width == m.unit.groups and g.unit.groups == 1}
  layers_of = {m.unit.name: indices[d.unit.name] for m in matches for d in matches
               if d.index == m.index and d.neuron_axis == m.layer_axis}

  def take(tree_by_unit):
    out = {}
    for name, x in tree_by_unit.items():
      x = _take(x, indices[name], -1)
      if name in groups_of:
        x = _take(x, groups_of[name][..., None], -2)
      out[name] = x[layers_of[name]] if name in layers_of else x
    return out

  holds_units = lambda node: hasattr(type(node), 'shrink_units')
  return jax.tree.map(lambda node: node.shrink_units(take) if holds_units(node) else node, tree,
                      is_leaf=holds_units)


def shrink_params(params: Any, masks: Masks, structure: Structure):
  """(shrunk params, {unit name: kept width}): rebuild your module at those widths (Linen:
  `Model(ffn=widths['ffn']).apply({'params': shrunk}, ...)`; NNX: `nnx.update` a module made at
  them, see docs/pruning_api.md)."""
  widths = {name: int(idx.shape[-1]) for name, idx in kept_indices(masks).items()}
  return shrink(params, masks, structure), widths


def shrink_model(params: Any, masks: Masks, structure: Structure, model_config):
  """(shrunk params, model_config at the kept widths) for units named as `structure.llama`
  names them: ffn -> ffn_dim, kv_groups -> n_kv_heads, heads -> heads per group (n_heads),
  hidden -> d_model, layers -> n_layers; any other unit name counts as an FFN (one width
  overall)."""
  kept = {name: int(idx.shape[-1]) for name, idx in kept_indices(masks).items()}
  ffn = {kept[n] for n in kept if n == 'ffn' or n not in UNIT_KINDS}
  if len(ffn) > 1:
    raise PruneError(f'units keep different widths {kept}; ffn_dim needs one')
  cfg = model_config
  groups = cfg.n_heads // cfg.n_kv_heads
  kv_heads = kept.get('kv_groups', cfg.n_kv_heads)
  fields = {'n_kv_heads': kv_heads, 'n_heads': kv_heads * kept.get('heads', groups),
            'd_model': kept.get('hidden', cfg.d_model),
            'n_layers': kept.get('layers', cfg.n_layers),
            'ffn_dim': ffn.pop() if ffn else cfg.ffn_dim}  # head_dim is explicit: it stays
  return shrink(params, masks, structure), dataclasses.replace(cfg, **fields)
