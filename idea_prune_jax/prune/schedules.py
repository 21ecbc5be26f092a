"""The width schedule k(t) of the pruning window (FFN neurons, or any unit's); its methods trace
inside jit.

(The LR schedules live with the trainer, `train.warmup_cosine`; reading a schedule from the
config is `train/targets.py`'s `prune_schedule`.)
"""

import dataclasses
import numbers

import jax.numpy as jnp

from idea_prune_jax.prune.errors import PruneError

WIDTH_SCHEDULES = ('cubic', 'linear')


@dataclasses.dataclass(frozen=True)
class PruneSchedule:
  """A unit's width per layer (FFN neurons, KV groups, ...) over the window [t_start, t_end]
  (steps); methods trace inside jit.

  p = clip((t − t_start) / (t_end − t_start), 0, 1)   (1 from t_end on, also when t_end = t_start)
  k(t) = f_T + (f_E − f_T)·(1 − p)^3   (cubic)   or   f_T + (f_E − f_T)·(1 − p)   (linear)
  """
  t_start: int
  t_end: int
  every: int  # ΔT: steps between mask refreshes inside the window
  width_enlarged: int  # f_E
  width_target: int  # f_T
  kind: str = 'cubic'

  def __post_init__(self):
    for name in ('t_start', 't_end', 'every', 'width_enlarged', 'width_target'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PruneError(f'PruneSchedule.{name}={value!r}: must be an integer')
      object.__setattr__(self, name, int(value))
    if self.width_target < 1:
      raise PruneError(f'PruneSchedule.width_target={self.width_target}: must be >= 1')
    if self.width_target > self.width_enlarged:
      raise PruneError(f'PruneSchedule.width_target={self.width_target}: above width_enlarged='
                       f'{self.width_enlarged}; pruning only removes neurons')
    if self.t_start < 0:
      raise PruneError(f'PruneSchedule.t_start={self.t_start}: must be >= 0')
    if self.t_end < self.t_start:
      raise PruneError(f'PruneSchedule.t_end={self.t_end}: before t_start={self.t_start}')
    if self.every < 1:
      raise PruneError(f'PruneSchedule.every={self.every}: must be >= 1')
    if self.kind not in WIDTH_SCHEDULES:
      raise PruneError(f'PruneSchedule.kind={self.kind!r}: use one of '
                       f"{', '.join(WIDTH_SCHEDULES)}")

  def progress(self, step):
    step = jnp.asarray(step, jnp.float32)
    p = jnp.clip((step - self.t_start) / max(self.t_end - self.t_start, 1), 0.0, 1.0)
    # A one-step window (t_end = t_start) is a one-shot prune: p = 1 at t_end, so k = f_T there.
    return jnp.where(step >= self.t_end, 1.0, p)

  def keep_k(self, step):
    """int32 k(t). Rounded to nearest: float32 error in p cannot shift k by a whole neuron the
    way ceil/floor would, and since f_T, f_E are integers k stays in [f_T, f_E] (exactly f_E
    at p = 0, exactly f_T at p = 1)."""
    remaining = 1.0 - self.progress(step)
    if self.kind == 'cubic':
      remaining = remaining ** 3
    k = self.width_target + (self.width_enlarged - self.width_target) * remaining
    return jnp.clip(jnp.round(k), self.width_target, self.width_enlarged).astype(jnp.int32)

  def in_window(self, step):
    step = jnp.asarray(step)
    return (step >= self.t_start) & (step <= self.t_end)

  def is_refresh(self, step):
    """Every `every` steps from t_start, and always at t_end so the last refresh reaches f_T."""
    step = jnp.asarray(step)
    return self.in_window(step) & (((step - self.t_start) % self.every == 0)
                                   | (step == self.t_end))
