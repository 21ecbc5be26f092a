"""What pruning ends at, read from a RunConfig: the target shape (explicit, or the budget's
constraints when the run chooses it), the units pruned and their width schedules over the window.
"""

import dataclasses
from typing import TYPE_CHECKING

from idea_prune_jax.model.config import ModelConfig
from idea_prune_jax.prune import structure as structure_lib
from idea_prune_jax.prune.schedules import PruneSchedule
from idea_prune_jax.train import budget

if TYPE_CHECKING:  # config.py imports this module to validate
  from idea_prune_jax.train.config import RunConfig

BUDGET_CRITERIA = ('importance', 'lookahead')


def prune_schedule(run: 'RunConfig') -> PruneSchedule | None:
  """The width schedule the pipeline runs (idea's window, or naive-iterative's), None otherwise.

  t_end is clamped to the last step (train.steps - 1): the window, its final refresh to f_T and
  the shrink all happen inside the run, never after it.
  """
  p, T = run.prune, run.train.steps
  if run.pipeline == 'idea':
    t_start, t_end = int(round(p.t_start * T)), int(round(p.t_end * T))
  elif run.pipeline == 'naive' and run.naive.prune == 'iterative':
    t_start = int(round(run.naive.split * T))
    t_end = t_start + max(int(round(run.naive.window * T)), 1)
  else:
    return None
  t_end = min(t_end, T - 1)
  return PruneSchedule(t_start=t_start, t_end=max(t_end, t_start), every=int(p.every),
                       width_enlarged=int(run.model.ffn_dim), width_target=int(p.target_ffn),
                       kind=p.schedule)


# Unit kind (`structure.llama`) -> the PruneConfig field of its target width.
TARGET_FIELDS = {'ffn': 'target_ffn', 'kv_groups': 'target_kv_heads',
                 'heads': 'target_heads_per_group', 'hidden': 'target_d_model',
                 'layers': 'target_layers'}


def target_widths(run: 'RunConfig') -> dict[str, int]:
  enlarged = budget.widths(run.model)
  return {u: getattr(run.prune, f) or enlarged[u] for u, f in TARGET_FIELDS.items()}


def target_model(run: 'RunConfig') -> ModelConfig:
  """The model the pipeline ends with (scratch trains it from the start); head_dim stays."""
  w = target_widths(run)
  return dataclasses.replace(run.model, ffn_dim=w['ffn'], n_kv_heads=w['kv_groups'],
                             n_heads=w['kv_groups'] * w['heads'], d_model=w['hidden'],
                             n_layers=w['layers'])


def pruned_units(run: 'RunConfig') -> tuple[str, ...]:
  """The unit kinds the pipeline prunes: the FFN always, the other axes where the target is
  narrower than the enlarged model."""
  enlarged, target = budget.widths(run.model), target_widths(run)
  return ('ffn',) + tuple(u for u in TARGET_FIELDS if u != 'ffn' and target[u] < enlarged[u])


def prune_structure(run: 'RunConfig', m: ModelConfig,
                    units: tuple[str, ...] | None = None) -> structure_lib.Structure:
  """The units `pruned_units` names (or `units`), on model `m` (`structure.FFN_STRUCTURE` for
  FFN only)."""
  return structure_lib.llama(n_kv_heads=m.n_kv_heads, heads_per_group=m.n_heads // m.n_kv_heads,
                             head_dim=m.head_dim, tie_embeddings=m.tie_embeddings,
                             units=pruned_units(run) if units is None else units)


def prune_schedules(run: 'RunConfig') -> dict[str, PruneSchedule] | None:
  """One width schedule per pruned unit over `prune_schedule`'s window (None without one)."""
  ps = prune_schedule(run)
  if ps is None:
    return None
  enlarged, target = budget.widths(run.model), target_widths(run)
  return {u: dataclasses.replace(ps, width_enlarged=enlarged[u], width_target=target[u])
          for u in pruned_units(run)}


def budget_units(run: 'RunConfig') -> tuple[str, ...]:
  return tuple(u.strip() for u in run.prune.units.split(',') if u.strip())


def budget_constraints(run: 'RunConfig', tensor: int, fsdp: int) -> budget.Constraints:
  return budget.Constraints(multiple=run.prune.round_to, tensor=tensor, fsdp=fsdp,
                            units=budget_units(run), tolerance=run.prune.tolerance)
