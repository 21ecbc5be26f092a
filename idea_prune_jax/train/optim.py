"""The optimizer: AdamW with clipping, its warmup + cosine LR schedule, and the prune phase's
wrapper around it (`prune_optimizer`)."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from idea_prune_jax.prune import structure as structure_lib
from idea_prune_jax.prune.prune_optax import prune_optimizer
from idea_prune_jax.prune.schedules import PruneSchedule
from idea_prune_jax.train.config import TrainConfig


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.1) -> optax.Schedule:
  """Linear warmup to peak, cosine decay to min_lr_ratio·peak at total_steps, flat after."""
  warmup_steps = max(int(warmup_steps), 0)
  decay_steps = max(int(total_steps) - warmup_steps, 1)
  end_lr = peak_lr * min_lr_ratio

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak_lr * jnp.minimum(1.0, (step + 1) / max(warmup_steps, 1))
    p = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    cosine = end_lr + (peak_lr - end_lr) * 0.5 * (1 + jnp.cos(jnp.pi * p))
    return jnp.where(step < warmup_steps, warm, cosine)

  return schedule

def lr_schedule(train_config: TrainConfig, total_steps: int | None = None) -> optax.Schedule:
  """The run's schedule from config.train; total_steps overrides train.steps (naive phases)."""
  t = train_config
  return warmup_cosine(t.lr, t.warmup_steps, t.steps if total_steps is None else total_steps,
                       t.min_lr_ratio)

def lr_count(opt_state) -> jax.Array:
  """The count the optimizer's LR schedule reads (optax's ScaleByScheduleState): the LR that
  `schedule(lr_count(opt_state))` gives is the one the next update applies."""
  counts = [s.count for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
            if isinstance(s, optax.ScaleByScheduleState)]
  if len(counts) != 1:
    raise ValueError(f'the optimizer state holds {len(counts)} LR schedule counts, want 1')
  return counts[0]

def _decays(path, leaf) -> bool:
  # Norm scales and the token embedding stay un-decayed (LLaMA / nanoGPT practice).
  names = [getattr(k, 'key', getattr(k, 'name', '')) for k in path]
  return leaf.ndim >= 2 and 'embed' not in names and not any('norm' in str(n) for n in names)

def make_optimizer(train_cfg: TrainConfig,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; weight decay only on matrices."""
  return optax.chain(
      optax.clip_by_global_norm(train_cfg.clip_norm),
      optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                  weight_decay=train_cfg.weight_decay,
                  mask=lambda params: jax.tree_util.tree_map_with_path(_decays, params)))

@dataclasses.dataclass(frozen=True)
class PruneOptions:
  """How the prune phase scores and prunes; `prune_tx` turns it into the optimizer."""
  schedule: PruneSchedule
  score: str = 'platon'
  beta1: float = 0.85
  beta2: float = 0.95
  structure: Any = structure_lib.FFN_STRUCTURE

def prune_tx(inner: optax.GradientTransformation, prune: PruneOptions):
  """The prune phase's optimizer: `inner` wrapped by `prune_optimizer` (the one implementation)."""
  return prune_optimizer(inner, prune.structure, prune.schedule, prune.score, beta1=prune.beta1,
                         beta2=prune.beta2)
