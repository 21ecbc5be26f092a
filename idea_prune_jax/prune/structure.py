"""Which param slices form one prunable unit, found by key path in any pytree shaped like params.

A `Unit` is a group of neurons that are pruned together: neuron j of a unit is index j along the
`axis` of every one of its `Slice`s (for a SwiGLU FFN: gate[:, j], up[:, j], down[j, :]). A
`Slice` matches every leaf whose key path ENDS WITH `slice.path`, so one structure describes
params, gradients, optimizer moments nested in an optax state (`opt_state[1][0].mu[...]`),
Linen boxed params and NNX `State`s alike.

    FFN_STRUCTURE                                      # our scanned model (layers on axis 0)
    ffn_units([('block_0', 'mlp'), ('block_1', 'mlp')], kernel=('kernel',))  # two NNX blocks
    ffn_unit('mlp', ('decoder', 'layers', 'mlp'), in_projs=('wi_0', 'wi_1'), out_projs=('wo',),
             kernel=('kernel',), layer_axis=1, out_axis=0)   # MaxText, param_scan_axis=1
"""

import dataclasses
from typing import Any, Sequence

import jax

from idea_prune_jax.prune.errors import PruneError


@dataclasses.dataclass(frozen=True)
class Slice:
  path: tuple[str, ...]  # the trailing keys of the leaf, e.g. ('layers', 'mlp', 'gate')
  axis: int  # the neuron axis of the leaf (negative counts from the end)

  def __post_init__(self):
    # Key paths are compared as strings: 'layers/mlp/gate' and list indices (0 -> '0') work too.
    path = self.path.split('/') if isinstance(self.path, str) else self.path
    object.__setattr__(self, 'path', tuple(str(k) for k in path))


@dataclasses.dataclass(frozen=True)
class Unit:
  name: str  # key of this unit in masks and scores
  slices: tuple[Slice, ...]
  layer_axis: int | None = 0  # the stacked (nn.scan) axis of every slice; None: one layer
  # True: a slice may match several leaves of one params tree (tied copies) and they share this
  # unit's mask; False (default): that is an error, since it usually means the prefix also
  # matches an encoder and a decoder, an EMA copy or a teacher held in the same tree.
  shared: bool = False


Structure = tuple[Unit, ...]


def ffn_unit(name: str, prefix: Sequence[str], *, in_projs=('gate', 'up'), out_projs=('down',),
             kernel: Sequence[str] = (), bias: str | None = None,
             layer_axis: int | None = None, in_axis: int = -1, out_axis: int = -2,
             shared: bool = False) -> Unit:
  """One FFN: `prefix/<in_proj>/<kernel>` [.., D, F] with neurons on `in_axis`,
  `prefix/<out_proj>/<kernel>` [.., F, D] with neurons on `out_axis`; `bias`: the leaf name of
  the in-projections' biases `prefix/<in_proj>/<bias>` [.., F] (neurons on their last axis),
  which belong to the neuron (Linen Dense / nnx.Linear: kernel=('kernel',), bias='bias').

  The axes count in the stacked leaf, layers included: MaxText's scanned layout
  (param_scan_axis=1), wi_0/wi_1 [D, L, F] and wo [F, L, D], is
  `ffn_unit(..., in_projs=('wi_0', 'wi_1'), out_projs=('wo',), layer_axis=1, out_axis=0)`.
  """
  prefix, kernel = tuple(prefix), tuple(kernel)
  slices = [Slice(prefix + (p,) + kernel, in_axis) for p in in_projs]
  if bias is not None:
    slices += [Slice(prefix + (p, bias), -1) for p in in_projs]
  slices += [Slice(prefix + (p,) + kernel, out_axis) for p in out_projs]
  return Unit(name, tuple(slices), layer_axis, shared)


def ffn_units(prefixes: Sequence[Sequence[str]], **kwargs) -> Structure:
  """One unstacked FFN unit per prefix, named by its joined path ('block_0/mlp'); see ffn_unit."""
  return tuple(ffn_unit('/'.join(str(k) for k in p), p, **kwargs) for p in prefixes)


def llama_ffn(prefix=('layers', 'mlp'), name: str = 'ffn', layer_axis: int | None = 0) -> Structure:
  """Our `model.Transformer`: gate/up [L, D, F], down [L, F, D], layers stacked on axis 0."""
  return (ffn_unit(name, prefix, layer_axis=layer_axis),)


FFN_STRUCTURE = llama_ffn()


def key_names(path) -> tuple[str, ...]:
  """A jax key path as strings; a trailing `.value` attribute (NNX Variable, Linen Partitioned
  box) is dropped so a param's path reads the same boxed or not."""
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == 'value':
    path = path[:-1]
  names = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
    else:
      names.append(str(k))
  return tuple(names)


@dataclasses.dataclass(frozen=True)
class Match:
  """A leaf that belongs to a unit: its index in the flat leaves and where its axes are."""
  index: int
  path: str
  unit: Unit
  neuron_axis: int  # non-negative
  layer_axis: int | None  # non-negative


def locate(tree: Any, structure: Structure, *, one_leaf_per_slice: bool = False,
           what: str = 'the tree'):
  """(leaves, treedef, matches, dims): dims[name] = (n_layers | None, width).

  Raises PruneError (one line) when a slice matches no leaf, a leaf matches two slices, or the
  sizes of a unit's leaves disagree. one_leaf_per_slice: `tree` is ONE params-shaped tree
  (params, grads), so a slice matching several leaves is an error unless its unit is `shared`
  (optax states legitimately hold several copies: mu, nu).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  leaves = [leaf for _, leaf in flat]
  names = [key_names(p) for p, _ in flat]
  matches, owner, dims = [], {}, {}
  for unit in structure:
    for sl in unit.slices:
      n = len(sl.path)
      hits = [i for i, nm in enumerate(names) if nm[-n:] == tuple(sl.path)]
      if not hits:
        raise PruneError(f"unit '{unit.name}': slice path {'/'.join(sl.path)} matches no leaf "
                         f'of {what}')
      if one_leaf_per_slice and len(hits) > 1 and not unit.shared:
        raise PruneError(
            f"unit '{unit.name}': slice path {'/'.join(sl.path)} matches {len(hits)} leaves of "
            f"{what} ({', '.join('/'.join(names[i]) for i in hits)}); give a longer path prefix "
            'that picks one, or Unit(shared=True) if they really share one mask')
      for i in hits:
        path = '/'.join(names[i])
        if i in owner:
          raise PruneError(f'leaf {path} matches two slices ({owner[i]} and {unit.name})')
        owner[i] = unit.name
        m = _match(i, path, unit, sl, leaves[i])
        shape = leaves[i].shape
        got = (None if m.layer_axis is None else shape[m.layer_axis], shape[m.neuron_axis])
        want = dims.setdefault(unit.name, (got, path))
        if got != want[0]:
          raise PruneError(f"unit '{unit.name}': (layers, neurons) sizes disagree: {path} has "
                           f'{got}, {want[1]} has {want[0]}')
        matches.append(m)
  return leaves, treedef, matches, {k: v[0] for k, v in dims.items()}


def _match(index, path, unit, sl, leaf) -> Match:
  ndim = len(getattr(leaf, 'shape', ()))
  axes = [sl.axis] + ([] if unit.layer_axis is None else [unit.layer_axis])
  if any(not -ndim <= a < ndim for a in axes):
    raise PruneError(f"unit '{unit.name}': leaf {path} of shape {getattr(leaf, 'shape', ())} "
                     f'has no axis {axes}')
  neuron = sl.axis % ndim
  layer = None if unit.layer_axis is None else unit.layer_axis % ndim
  if neuron == layer:
    raise PruneError(f"unit '{unit.name}': leaf {path} uses axis {neuron} for layers and neurons")
  return Match(index, path, unit, neuron, layer)
