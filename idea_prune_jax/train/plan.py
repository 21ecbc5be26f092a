"""The pipelines as phase plans over the same step: scratch, naive enlarge-and-prune, idea; and
their analytical FLOPs and tokens. Pure: `pipeline` executes a plan.

A plan is a tuple of `Phase`s. Each phase boundary is a checkpoint; a restart reads the phase
from the latest checkpoint, rebuilds that phase's state shapes, restores, and carries on.
"""

import dataclasses

from idea_prune_jax.model import model as model_lib
from idea_prune_jax.model.config import ModelConfig
from idea_prune_jax.prune.schedules import PruneSchedule
from idea_prune_jax.train import budget
from idea_prune_jax.train.config import RunConfig, field
from idea_prune_jax.train.targets import (TARGET_FIELDS, prune_schedule, prune_schedules,
                                          pruned_units, target_model)


@dataclasses.dataclass(frozen=True)
class Phase:
  name: str  # enlarged | prune | recovery | scratch | train
  start: int
  end: int  # exclusive
  model: ModelConfig  # the model this phase trains (enlarged, or the target after the shrink)
  prune: dict[str, PruneSchedule] | None = None  # unit kind -> its width schedule
  lr_start: int = 0  # the step this phase's LR schedule counts from (naive re-warms)
  lr_steps: int = 0  # that schedule's length
  kd: bool = False  # distils from TrainState.teacher
  teacher: bool = False  # holds a teacher in its state (this or a later phase distils)
  fresh_optimizer: bool = False  # naive: a new run's optimizer at this phase's start


def plan(run: RunConfig) -> tuple[Phase, ...]:
  """The phases of run.pipeline (or 'train': dense run.model for all steps)."""
  phases = _phases(run)
  # The teacher is snapshotted when the first phase after the enlarged one starts, and carried
  # while any later phase distils: idea's KD-in-recovery still uses the model at t_s.
  return tuple(dataclasses.replace(ph, teacher=i > 0 and any(q.kd for q in phases[i:]))
               for i, ph in enumerate(phases))


def _phases(run: RunConfig) -> tuple[Phase, ...]:
  T, enlarged, target = run.train.steps, run.model, target_model(run)
  kd_on = run.distill.alpha > 0
  kd_prune = kd_on and run.distill.phases in ('prune', 'both')
  kd_recovery = kd_on and run.distill.phases in ('recovery', 'both')
  name = run.pipeline
  if name == 'train':
    return (Phase('train', 0, T, enlarged, lr_steps=T),)
  if name == 'scratch':
    return (Phase('scratch', 0, T, target, lr_steps=T),)
  ps = prune_schedule(run)  # t_end clamped to the last step: never past the run
  schedules = prune_schedules(run)
  if name == 'idea':
    return (Phase('enlarged', 0, ps.t_start, enlarged, lr_steps=T),
            Phase('prune', ps.t_start, ps.t_end + 1, enlarged, prune=schedules, lr_steps=T,
                  kd=kd_prune),
            Phase('recovery', ps.t_end + 1, T, target, lr_steps=T, kd=kd_recovery))
  split = int(round(run.naive.split * T))
  first = Phase('enlarged', 0, split, enlarged, lr_steps=split)
  rec = dict(lr_start=split, lr_steps=T - split)
  if run.naive.prune == 'oneshot':
    return (first, Phase('recovery', split, T, target, kd=kd_recovery, fresh_optimizer=True, **rec))
  return (first,
          Phase('prune', split, ps.t_end + 1, enlarged, prune=schedules, kd=kd_prune,
                fresh_optimizer=True, **rec),
          Phase('recovery', ps.t_end + 1, T, target, kd=kd_recovery, **rec))


def plan_fields(run: RunConfig) -> dict:
  """{'prune.t_end': 0.7, ...}: the config fields run.pipeline's phases, pruning window and
  schedules come from. A checkpoint records them; resuming under other values is refused.
  (Not the peak LR, KD or cadences: runs may change those and still share a checkpoint.)"""
  fields = ['train.steps', 'train.warmup_steps', 'train.min_lr_ratio']
  targets = [f'prune.{TARGET_FIELDS[u]}' for u in pruned_units(run)]
  if run.prune.target_params:  # the run chose the targets (its budget.json); these chose them
    targets = ['prune.target_params', 'prune.units', 'prune.tolerance', 'prune.budget',
               'prune.budget_batches', 'prune.round_to']
  prune = targets + ['prune.score', 'prune.beta1', 'prune.beta2']
  window = ['prune.every', 'prune.schedule']
  if run.pipeline == 'scratch':
    fields += targets
  elif run.pipeline == 'idea':
    fields += prune + ['prune.t_start', 'prune.t_end'] + window
  elif run.pipeline == 'naive':
    fields += prune + ['naive.split', 'naive.prune']
    fields += (['naive.window'] + window if run.naive.prune == 'iterative'
               else ['naive.score_batches'])
  return {f: field(run, f) for f in fields}


def step_flops(run: RunConfig, phase: Phase, teacher: ModelConfig | None = None) -> float:
  """Analytical FLOPs of one training step of `phase` (a KD teacher forward: a third of its 6N;
  teacher: the teacher's model, default the enlarged one)."""
  seq = run.data.seq_len
  per_token = model_lib.flops_per_token(phase.model, seq)
  if phase.kd:
    per_token += model_lib.flops_per_token(teacher or run.model, seq) / 3
  return run.train.batch_size * seq * per_token


def plan_tokens(run: RunConfig, phases) -> int:
  """Training tokens of a plan: the steps it executes times the global batch's tokens."""
  steps = sum(ph.end - ph.start for ph in phases)
  return steps * run.train.batch_size * run.data.seq_len


def train_flops(run: RunConfig, phases, teacher: ModelConfig | None = None) -> float:
  """Analytical training FLOPs of a plan, with the naive one-shot's scoring batches (a forward
  and backward of the enlarged model each)."""
  total = sum((ph.end - ph.start) * step_flops(run, ph, teacher) for ph in phases)
  if run.prune.target_params and run.pipeline in ('idea', 'naive'):
    # Choosing the shape: a forward and backward per scoring batch, and for 'lookahead' a
    # forward per batch of each candidate it evaluates.
    passes = 1 + (budget.LOOKAHEAD / 3 if run.prune.budget == 'lookahead' else 0)
    enlarged = dataclasses.replace(phases[0], kd=False)
    total += run.prune.budget_batches * passes * step_flops(run, enlarged)
  for prev, nxt in zip(phases, phases[1:]):
    if prev.model != nxt.model and prev.prune is None:  # a one-shot prune at this boundary
      total += run.naive.score_batches * step_flops(run, dataclasses.replace(prev, kd=False))
  return total
