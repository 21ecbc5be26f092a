"""From a parameter budget to the final model's shape: `prune.target_params` -> widths.

The enlarged model's prunable width axes, by unit kind (`structure.UNIT_KINDS`):
  'ffn'        ffn_dim
  'kv_groups'  n_kv_heads (whole KV groups, each with its query heads)
  'heads'      query heads per KV group (n_heads // n_kv_heads, the same in every group)
  'hidden'     d_model (head_dim is explicit and stays fixed)
  'layers'     n_layers (whole layers of the stack)

`candidates` lists every shape no wider than the enlarged model on any axis, legal for the mesh
and the rounding, whose `model.param_count` is within the tolerance of the target;
`choose_by_importance` picks the one that keeps the most importance mass (criterion 1). Pure
Python and numpy: it runs in config validation and in the report as well as in the run.
"""

import dataclasses
import itertools
import math

import numpy as np

from idea_prune_jax.model import model as model_lib
from idea_prune_jax.model.config import ModelConfig
from idea_prune_jax.prune.structure import UNIT_KINDS
# The module, not the class: config.py may import this module while it is itself being imported.
from idea_prune_jax.train import config as config_lib


LOOKAHEAD = 4  # candidates (the best by importance) that prune.budget='lookahead' evaluates


@dataclasses.dataclass(frozen=True)
class Constraints:
  """What a pruned shape must satisfy besides its parameter count.

  Only axes in `units` are constrained: an axis not listed keeps the enlarged value, and an axis
  that is listed may also keep it, since the enlarged model already runs on this mesh.
  """
  multiple: int = 1  # ffn_dim and d_model are multiples of it (prune.round_to; 128 at paper scale)
  tensor: int = 1  # n_kv_heads (so n_heads) and ffn_dim divide over the mesh's tensor axis
  fsdp: int = 1  # d_model divides over the mesh's fsdp axis
  units: tuple[str, ...] = ('ffn',)  # the unit kinds that may shrink
  tolerance: float = 0.005  # relative distance of a shape's param count from the target


def widths(m: ModelConfig) -> dict[str, int]:
  """The model's width on each prunable axis, by unit kind."""
  return {'ffn': m.ffn_dim, 'kv_groups': m.n_kv_heads, 'heads': m.n_heads // m.n_kv_heads,
          'hidden': m.d_model, 'layers': m.n_layers}


def shape_dict(cfg: ModelConfig) -> dict:
  """The widths of a shape, as JSON (report.json)."""
  return {'ffn_dim': cfg.ffn_dim, 'n_kv_heads': cfg.n_kv_heads,
          'heads_per_group': cfg.n_heads // cfg.n_kv_heads, 'd_model': cfg.d_model,
          'n_layers': cfg.n_layers, 'params': model_lib.param_count(cfg)}


def _fail(field_name, value, why):
  raise config_lib.ConfigError(f'config.{field_name}={value!r}: {why}')


def _check(c: Constraints):
  for field_name, value in (('prune.round_to', c.multiple), ('mesh.tensor', c.tensor),
                            ('mesh.fsdp', c.fsdp)):
    if value < 1:
      _fail(field_name, value, 'must be >= 1')
  unknown = sorted(set(c.units) - set(UNIT_KINDS))
  if unknown or not c.units:
    _fail('prune.units', c.units, f'name one or more of {UNIT_KINDS} (unknown: {unknown})')
  if not 0 < c.tolerance < 1:
    _fail('prune.tolerance', c.tolerance, 'must be in (0, 1), e.g. 0.005 for 0.5%')


def _steps(enlarged_width: int, step: int) -> list[int]:
  """Multiples of step up to the enlarged width, and the enlarged width itself (ascending)."""
  return sorted(set(range(step, enlarged_width + 1, step)) | {enlarged_width})


def _grids(enlarged: ModelConfig, c: Constraints) -> dict[str, list[int]]:
  """The widths each axis may take, ascending; a single value for an axis that does not shrink."""
  kv, groups = enlarged.n_kv_heads, enlarged.n_heads // enlarged.n_kv_heads
  return {
      'kv_groups': _steps(kv, c.tensor) if 'kv_groups' in c.units else [kv],
      'heads': list(range(1, groups + 1)) if 'heads' in c.units else [groups],
      'hidden': (_steps(enlarged.d_model, math.lcm(c.multiple, c.fsdp))
                 if 'hidden' in c.units else [enlarged.d_model]),
      'ffn': (_steps(enlarged.ffn_dim, math.lcm(c.multiple, c.tensor))
              if 'ffn' in c.units else [enlarged.ffn_dim]),
      'layers': (list(range(1, enlarged.n_layers + 1)) if 'layers' in c.units
                 else [enlarged.n_layers]),
  }


def _shape(enlarged, kv, groups, d_model, ffn, layers):
  return dataclasses.replace(enlarged, n_kv_heads=kv, n_heads=kv * groups, d_model=d_model,
                             ffn_dim=ffn, n_layers=layers)


def _nearest_ffn(enlarged, kv, groups, d_model, layers, ffn_grid, target_params) -> int:
  """The ffn_dim on the grid whose param count is nearest the target (ties: the wider).

  param_count is linear in ffn_dim (3·n_layers·d_model per unit), so solve rather than search;
  the answer is a grid neighbour of the exact solution, or an end of the grid.
  """
  without_ffn = model_lib.param_count(_shape(enlarged, kv, groups, d_model, 0, layers))
  exact = (target_params - without_ffn) / (3 * layers * d_model)
  i = int(np.searchsorted(ffn_grid, exact))
  near = ffn_grid[max(i - 1, 0):i + 1]
  return min(near, key=lambda f: (abs(f - exact), -f))


def candidates(enlarged: ModelConfig, target_params: int, c: Constraints) -> list[ModelConfig]:
  """Every shape within c.tolerance of target_params, nearest first.

  One shape per (n_layers, n_kv_heads, heads per group, d_model): the ffn_dim nearest the
  target (when 'ffn' shrinks), so FFN-only pruning gives one candidate. Sorted by
  |params - target|, then deeper and wider first (n_layers, d_model, n_kv_heads, heads per group,
  ffn_dim), so the order is deterministic.
  """
  _check(c)
  grids = _grids(enlarged, c)
  found = []
  for layers, kv, groups, d_model in itertools.product(grids['layers'], grids['kv_groups'],
                                                       grids['heads'], grids['hidden']):
    if d_model % (kv * groups):  # not a Llama transformers loads (hidden_size % heads)
      continue
    ffn = (_nearest_ffn(enlarged, kv, groups, d_model, layers, grids['ffn'], target_params)
           if 'ffn' in c.units else enlarged.ffn_dim)
    shape = _shape(enlarged, kv, groups, d_model, ffn, layers)
    miss = abs(model_lib.param_count(shape) - target_params)
    if miss <= c.tolerance * target_params:
      found.append((miss, -layers, -d_model, -kv, -groups, -ffn, shape))
  if not found:
    # param_count grows with every width, so the narrowest legal shape is the smallest.
    narrowest = (grids[unit][0] for unit in ('kv_groups', 'heads', 'hidden', 'ffn', 'layers'))
    smallest = model_lib.param_count(_shape(enlarged, *narrowest))
    largest = model_lib.param_count(enlarged)
    _fail('prune.target_params', target_params,
          f'no shape within {c.tolerance:.1%} of it: the enlarged model has '
          f'{largest:,} params and pruning {", ".join(c.units)} (multiple {c.multiple}, '
          f'tensor {c.tensor}, fsdp {c.fsdp}) reaches {smallest:,} to {largest:,}; '
          'set it in that range, or add units to prune.units or raise prune.tolerance')
  return [entry[-1] for entry in sorted(found, key=lambda entry: entry[:-1])]


def _axis_params(enlarged: ModelConfig) -> dict[str, int]:
  """The enlarged model's parameters in the slices of each axis's units: its weight in criterion 1.

  Approximate by design: the axes overlap (a KV group's slices include its query heads; d_model
  touches every matmul; a layer holds all of its own), and norms are left out. ffn: gate, up,
  down. kv_groups: k, v and the groups' q, o. heads: q, o. hidden: every matmul and the
  embedding (and an untied lm_head). layers: every matmul of the stack.
  """
  layers, d, hd = enlarged.n_layers, enlarged.d_model, enlarged.head_dim
  ffn = 3 * layers * d * enlarged.ffn_dim
  k_and_v = 2 * layers * d * enlarged.n_kv_heads * hd
  q_and_o = 2 * layers * d * enlarged.n_heads * hd
  head = 0 if enlarged.tie_embeddings else d * enlarged.vocab_size
  return {'ffn': ffn, 'kv_groups': k_and_v + q_and_o, 'heads': q_and_o,
          'hidden': ffn + k_and_v + q_and_o + enlarged.vocab_size * d + head,
          'layers': ffn + k_and_v + q_and_o}


def _kept_fraction(scores_RxN: np.ndarray, keep: int) -> float:
  """Of the score mass, the fraction in each row's `keep` largest entries (1 when there is none)."""
  width = scores_RxN.shape[-1]
  if not 1 <= keep <= width:
    raise ValueError(f'keeping {keep} of {width} units; a pruned shape never grows')
  total = float(scores_RxN.sum())
  if total <= 0:
    return 1.0
  return float(np.partition(scores_RxN, width - keep, axis=-1)[..., width - keep:].sum()) / total


def retained_importance(shape: ModelConfig, enlarged: ModelConfig,
                        scores: dict[str, np.ndarray]) -> float:
  """Criterion 1: importance mass retained per parameter, in [0, 1]; 1 at the enlarged shape.

  scores (non-negative, shaped like the masks): 'ffn' [L, F], 'kv_groups' [L, KV],
  'heads' [L, KV, G], 'hidden' [D], 'layers' [L]. Per unit kind present, the fraction of its
  mass kept when each row keeps its top k (k: the shape's width on that axis; 'heads' rows are
  (layer, group), all groups and layers counted whether or not they are kept), averaged with
  weights `_axis_params`.
  """
  keep = widths(shape)
  want = {'ffn': (enlarged.n_layers, enlarged.ffn_dim),
          'kv_groups': (enlarged.n_layers, enlarged.n_kv_heads),
          'heads': (enlarged.n_layers, enlarged.n_kv_heads,
                    enlarged.n_heads // enlarged.n_kv_heads),
          'hidden': (enlarged.d_model,), 'layers': (enlarged.n_layers,)}
  weights = _axis_params(enlarged)
  weighted, total_weight = 0.0, 0.0
  for unit, unit_scores in sorted(scores.items()):
    unit_scores = np.asarray(unit_scores, np.float64)
    if unit not in want or unit_scores.shape != want[unit]:
      raise ValueError(f'scores[{unit!r}] has shape {unit_scores.shape}; want {want.get(unit)} '
                       f'(unit kinds: {UNIT_KINDS})')
    rows = unit_scores.reshape(-1, unit_scores.shape[-1])
    weighted += weights[unit] * _kept_fraction(rows, keep[unit])
    total_weight += weights[unit]
  return weighted / total_weight if total_weight else 1.0


def choose_by_importance(cands: list[ModelConfig], enlarged: ModelConfig,
                         scores: dict[str, np.ndarray]) -> tuple[ModelConfig, list[dict]]:
  """(the candidate retaining the most importance, every candidate as JSON for report.json).

  Ties (to 12 decimals, so float noise does not decide) go to the earlier candidate: with
  `candidates`' order, the one nearest the target.
  """
  if not cands:
    raise ValueError('no candidate shapes to choose from')
  values = [retained_importance(shape, enlarged, scores) for shape in cands]
  best = max(range(len(cands)), key=lambda i: (round(values[i], 12), -i))
  table = [{**shape_dict(shape), 'retained_importance': value, 'chosen': i == best}
           for i, (shape, value) in enumerate(zip(cands, values))]
  return cands[best], table
