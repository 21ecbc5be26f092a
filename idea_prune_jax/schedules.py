"""Learning-rate schedules (one cosine for idea/scratch, re-warmed for naive recovery) and the
FFN width schedule k(t) of the pruning window."""

import dataclasses

import jax.numpy as jnp
import optax

from idea_prune_jax.config import ConfigError
from idea_prune_jax.importance import KINDS as SCORE_KINDS


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


def lr_schedule(train_config, total_steps: int | None = None) -> optax.Schedule:
  """The run's schedule from config.train; total_steps overrides train.steps (naive phases)."""
  t = train_config
  return warmup_cosine(t.lr, t.warmup_steps, t.steps if total_steps is None else total_steps,
                       t.min_lr_ratio)


WIDTH_SCHEDULES = ('cubic', 'linear')


@dataclasses.dataclass(frozen=True)
class PruneSchedule:
  """FFN width per layer over the window [t_start, t_end] (steps); methods trace inside jit.

  p = clip((t − t_start) / (t_end − t_start), 0, 1)
  k(t) = f_T + (f_E − f_T)·(1 − p)^3   (cubic)   or   f_T + (f_E − f_T)·(1 − p)   (linear)
  """
  t_start: int
  t_end: int
  every: int  # ΔT: steps between mask refreshes inside the window
  ffn_enlarged: int  # f_E
  ffn_target: int  # f_T
  kind: str = 'cubic'

  def progress(self, step):
    step = jnp.asarray(step, jnp.float32)
    return jnp.clip((step - self.t_start) / max(self.t_end - self.t_start, 1), 0.0, 1.0)

  def keep_k(self, step):
    """int32 k(t). Rounded to nearest: float32 error in p cannot shift k by a whole neuron the
    way ceil/floor would, and since f_T, f_E are integers k stays in [f_T, f_E] (exactly f_E
    at p = 0, exactly f_T at p = 1)."""
    remaining = 1.0 - self.progress(step)
    if self.kind == 'cubic':
      remaining = remaining ** 3
    k = self.ffn_target + (self.ffn_enlarged - self.ffn_target) * remaining
    return jnp.clip(jnp.round(k), self.ffn_target, self.ffn_enlarged).astype(jnp.int32)

  def in_window(self, step):
    step = jnp.asarray(step)
    return (step >= self.t_start) & (step <= self.t_end)

  def is_refresh(self, step):
    """Every `every` steps from t_start, and always at t_end so the last refresh reaches f_T."""
    step = jnp.asarray(step)
    return self.in_window(step) & (((step - self.t_start) % self.every == 0)
                                   | (step == self.t_end))

  @classmethod
  def from_config(cls, config) -> 'PruneSchedule':
    """From config.prune (t_start / t_end as fractions of train.steps) and model.ffn_dim."""
    p, steps = config.prune, config.train.steps
    return cls(t_start=int(round(p.t_start * steps)), t_end=int(round(p.t_end * steps)),
               every=int(p.every), ffn_enlarged=int(config.model.ffn_dim),
               ffn_target=int(p.target_ffn), kind=p.schedule)


def _prune_fail(field, value, why):
  raise ConfigError(f'config.{field}={value!r}: {why}')


def validate_prune(config, tensor_parallel: int | None = None) -> None:
  """Raises ConfigError (one line naming the field) for an impossible pruning config.

  tensor_parallel defaults to config.mesh.tensor (1 when that is -1, i.e. not yet known).
  """
  p, ffn = config.prune, config.model.ffn_dim
  tp = tensor_parallel if tensor_parallel is not None else max(int(config.mesh.tensor), 1)
  if not 1 <= p.target_ffn <= ffn:
    _prune_fail('prune.target_ffn', p.target_ffn, f'must lie in [1, model.ffn_dim={ffn}]')
  if p.round_to < 1:
    _prune_fail('prune.round_to', p.round_to, 'must be >= 1')
  if p.target_ffn % p.round_to:
    _prune_fail('prune.target_ffn', p.target_ffn,
                f'not a multiple of prune.round_to={p.round_to}')
  if p.target_ffn % tp:
    _prune_fail('prune.target_ffn', p.target_ffn,
                f'not a multiple of the tensor-parallel degree {tp}')
  if ffn % tp:
    _prune_fail('model.ffn_dim', ffn, f'not a multiple of the tensor-parallel degree {tp}')
  if not 0 <= p.t_start < p.t_end <= 1:
    field = 'prune.t_start' if not 0 <= p.t_start < 1 else 'prune.t_end'
    _prune_fail(field, p[field.split('.')[1]],
                f'need 0 <= prune.t_start < prune.t_end <= 1 (got {p.t_start}, {p.t_end})')
  sched = PruneSchedule.from_config(config)
  if sched.t_end - sched.t_start < 1:
    _prune_fail('prune.t_end', p.t_end, f'window [{sched.t_start}, {sched.t_end}] of '
                f'train.steps={config.train.steps} is shorter than one step')
  if p.every < 1:
    _prune_fail('prune.every', p.every, 'must be >= 1')
  if p.schedule not in WIDTH_SCHEDULES:
    _prune_fail('prune.schedule', p.schedule, f"use one of {', '.join(WIDTH_SCHEDULES)}")
  if p.score not in SCORE_KINDS:
    _prune_fail('prune.score', p.score, f"use one of {', '.join(SCORE_KINDS)}")
  for beta in ('beta1', 'beta2'):
    if not 0 <= p[beta] < 1:
      _prune_fail(f'prune.{beta}', p[beta], 'must lie in [0, 1)')
