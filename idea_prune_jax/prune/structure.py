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
  # Entries of `axis` per neuron, contiguous: head_dim for a head of a flat [D, H·head_dim]
  # projection, (heads per group)·head_dim for a KV group's query heads.
  inner: int = 1

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
  # > 1: neurons come in `groups` independent groups that each keep the same count (query heads
  # within each KV group); the mask is [n_layers, groups, width] and a slice's axis is laid out
  # [groups, width, inner].
  groups: int = 1


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


def attention_units(prefix: Sequence[str], *, kv_heads: int, heads_per_group: int,
                    head_dim: int, q='q', k='k', v='v', o='o', kernel: Sequence[str] = (),
                    layer_axis: int | None = None, in_axis: int = -1, out_axis: int = -2,
                    names=('kv_groups', 'heads')) -> Structure:
  """Two units of a GQA attention with flat head axes: q `prefix/q` [.., D, H·head_dim] and k, v
  [.., D, KV·head_dim] with heads on `in_axis`, o [.., H·head_dim, D] with heads on `out_axis`;
  query head h belongs to KV group h // heads_per_group (the layout of Llama, jax.nn's GQA and
  splash), so q's head axis is [KV, heads_per_group, head_dim].

  names[0]: whole KV groups (k and v's head with its query heads), mask [.., KV]. names[1]: query
  heads within each group, mask [.., KV, heads_per_group], the same count kept in every group.
  Shrinking either gives a valid GQA model. Axes count in the stacked leaf, as for ffn_unit.
  """
  prefix, kernel = tuple(prefix), tuple(kernel)
  path = lambda p: prefix + (p,) + kernel
  group = heads_per_group * head_dim
  kv_unit = Unit(names[0], (Slice(path(q), in_axis, group), Slice(path(k), in_axis, head_dim),
                            Slice(path(v), in_axis, head_dim), Slice(path(o), out_axis, group)),
                 layer_axis)
  head_unit = Unit(names[1], (Slice(path(q), in_axis, head_dim),
                              Slice(path(o), out_axis, head_dim)), layer_axis, groups=kv_heads)
  return kv_unit, head_unit


def llama_hidden(tie_embeddings: bool = True, name: str = 'hidden') -> Unit:
  """The d_model channels of our `model.Transformer`: the embedding's, every norm scale's, the in
  side of q, k, v, gate, up and the out side of o, down (and the untied LM head's). One width for
  all layers (the residual stream), so the mask is [d_model]; the model's RMSNorm must average
  over the kept channels (`Transformer(..., hidden_kept=)`) for masked == shrunk."""
  slices = [Slice('embed', -1), Slice('final_norm/scale', -1),
            Slice('layers/attn_norm/scale', -1), Slice('layers/mlp_norm/scale', -1)]
  slices += [Slice(('layers', 'attn', p), -2) for p in ('q', 'k', 'v')]
  slices += [Slice('layers/attn/o', -1), Slice('layers/mlp/gate', -2),
             Slice('layers/mlp/up', -2), Slice('layers/mlp/down', -1)]
  if not tie_embeddings:
    slices.append(Slice('lm_head', 0))
  return Unit(name, tuple(slices), layer_axis=None)


# Every per-layer leaf of our `model.Block`, under the scanned stack 'layers'.
LLAMA_LAYER_LEAVES = ('attn_norm/scale', 'attn/q', 'attn/k', 'attn/v', 'attn/o', 'mlp_norm/scale',
                      'mlp/gate', 'mlp/up', 'mlp/down')


def depth_unit(name: str, prefix: Sequence[str], leaves: Sequence[str], *,
               layer_axis: int = 0) -> Unit:
  """Whole layers of a scanned stack: neuron l is layer l of every per-layer leaf
  `prefix/<leaf>` (its stacked axis `layer_axis`), so the mask is [n_layers].

  A pre-norm residual layer whose params are all 0 adds 0 to the stream (its norms output 0, so
  do its o and down projections): the masked model equals the one with the layer removed. List
  EVERY leaf of the layer, or the shrunk stack disagrees in length. Units stacked on the same
  axis (`ffn_unit(layer_axis=...)`) keep [n_layers, ...] masks and scores; `shrink` cuts those
  along layers too. MaxText's scanned layout: `depth_unit(..., layer_axis=1)`.
  """
  prefix = tuple(prefix)
  return Unit(name, tuple(Slice(prefix + tuple(leaf.split('/')), layer_axis) for leaf in leaves),
              layer_axis=None)


UNIT_KINDS = ('ffn', 'kv_groups', 'heads', 'hidden', 'layers')


def llama(*, n_kv_heads: int, heads_per_group: int, head_dim: int, tie_embeddings: bool = True,
          units: Sequence[str] = UNIT_KINDS) -> Structure:
  """Our `model.Transformer`, pruned on `units` (of UNIT_KINDS), named as there."""
  unknown = set(units) - set(UNIT_KINDS)
  if unknown:
    raise PruneError(f'unknown unit kinds {sorted(unknown)}; use some of {UNIT_KINDS}')
  attention = attention_units(('layers', 'attn'), kv_heads=n_kv_heads,
                              heads_per_group=heads_per_group, head_dim=head_dim, layer_axis=0)
  every = {'ffn': FFN_STRUCTURE[0], 'kv_groups': attention[0], 'heads': attention[1],
           'hidden': llama_hidden(tie_embeddings),
           'layers': depth_unit('layers', ('layers',), LLAMA_LAYER_LEAVES)}
  return tuple(every[u] for u in UNIT_KINDS if u in units)


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
  inner: int = 1  # entries per neuron along neuron_axis (Slice.inner)
  size: int = 0  # the leaf's neuron_axis length: groups · width · inner

  @property
  def width(self) -> int:
    """Neurons per group (the mask's last dimension)."""
    return self.size // (self.unit.groups * self.inner)


def mask_shape(layers: int | None, unit: Unit, width: int) -> tuple[int, ...]:
  """[n_layers][, groups], width: the shape of a unit's mask, importance and scores."""
  return ((() if layers is None else (layers,)) + ((unit.groups,) if unit.groups > 1 else ())
          + (width,))


def locate(tree: Any, structure: Structure, *, one_leaf_per_slice: bool = False,
           what: str = 'the tree'):
  """(leaves, treedef, matches, shapes): shapes[name] is the unit's mask shape (`mask_shape`).

  A leaf may belong to several units (a q projection to the hidden size, the KV groups and the
  query heads), but to one slice of each. Raises PruneError (one line) when a slice matches no
  leaf, a leaf matches two slices of one unit, or the sizes of a unit's leaves disagree.
  one_leaf_per_slice: `tree` is ONE params-shaped tree (params, grads), so a slice matching
  several leaves is an error unless its unit is `shared` (optax states legitimately hold several
  copies: mu, nu).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  leaves = [leaf for _, leaf in flat]
  names = [key_names(p) for p, _ in flat]
  matches, shapes = [], {}
  for unit in structure:
    owned = {}
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
        if i in owned:
          raise PruneError(f"leaf {path} matches two slices of unit '{unit.name}' "
                           f"({'/'.join(owned[i])} and {'/'.join(sl.path)})")
        owned[i] = sl.path
        m = _match(i, path, unit, sl, leaves[i])
        got = mask_shape(None if m.layer_axis is None else leaves[i].shape[m.layer_axis], unit,
                         m.width)
        want = shapes.setdefault(unit.name, (got, path))
        if got != want[0]:
          raise PruneError(f"unit '{unit.name}': mask shapes disagree: {path} gives {got}, "
                           f'{want[1]} gives {want[0]}')
        matches.append(m)
  return leaves, treedef, matches, {k: v[0] for k, v in shapes.items()}


def _match(index, path, unit, sl, leaf) -> Match:
  shape = tuple(getattr(leaf, 'shape', ()))
  ndim = len(shape)
  axes = [sl.axis] + ([] if unit.layer_axis is None else [unit.layer_axis])
  if any(not -ndim <= a < ndim for a in axes):
    raise PruneError(f"unit '{unit.name}': leaf {path} of shape {shape} has no axis {axes}")
  neuron = sl.axis % ndim
  layer = None if unit.layer_axis is None else unit.layer_axis % ndim
  if neuron == layer:
    raise PruneError(f"unit '{unit.name}': leaf {path} uses axis {neuron} for layers and neurons")
  per_neuron = unit.groups * sl.inner
  if sl.inner < 1 or unit.groups < 1 or shape[neuron] % per_neuron:
    raise PruneError(f"unit '{unit.name}': leaf {path} axis {neuron} has {shape[neuron]} "
                     f'entries, not a multiple of groups {unit.groups} x inner {sl.inner}')
  return Match(index, path, unit, neuron, layer, sl.inner, shape[neuron])
