"""Knowledge distillation: the KD loss, optionally in sequence chunks; pure (jax only).

    loss = (1 − α)·CE(labels, student) + α·τ²·KL(p_teacher^τ ‖ p_student^τ)

averaged over the tokens' loss weights (`weights_BxL`, 1 for every token when omitted). The τ²
keeps the KL's gradient on the same scale as the CE's as τ grows (Hinton et al. 2015). The teacher
is never differentiated: its logits pass through `stop_gradient`, so a `jax.grad` w.r.t. teacher
params is exactly zero and no teacher backward pass is ever built.

  kd_loss          logits in, (loss, aux) out; any model.
  chunked_kd_loss  final hidden states + LM heads in; chunk > 0 computes logits one sequence chunk
                   at a time (`chunked.sum_over_chunks`) so full [B, L, V] teacher and student
                   logits are never both alive.
  schedule         α or τ over the distilling steps: constant, linear or cosine from a start to an
                   end value (an optax schedule: step -> value, traceable).
The trainer's fused teacher+student step (`train.train_step(..., kd=train.KDOptions(...))`, through
`train.kd_loss_fn`) builds on these.
"""

import jax
import jax.numpy as jnp
import optax

from idea_prune_jax.prune import chunked
from idea_prune_jax.prune.errors import PruneError

_SUM_KEYS = ('ce', 'kl', 'teacher_ce')
SCHEDULES = ('constant', 'linear', 'cosine')


def schedule(kind: str, start: float, end: float, begin: int, steps: int) -> optax.Schedule:
  """start until step `begin`, then to `end` over `steps` steps (linear or cosine), end after."""
  if kind == 'constant':
    return optax.constant_schedule(start)
  if kind == 'linear':
    return optax.linear_schedule(start, end, max(steps, 1), begin)
  if kind == 'cosine':
    # optax's cosine decays to a fraction of its start, so it cannot begin at 0 (α ramping up).
    def cosine(step):
      p = jnp.clip((step - begin) / max(steps, 1), 0.0, 1.0)
      return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
    return cosine
  raise PruneError(f'KD schedule {kind!r}: use one of {", ".join(SCHEDULES)}')


def _is_one(x) -> bool:
  return isinstance(x, (int, float)) and x == 1


def _weights(weights_BxL, targets_BxL):
  if weights_BxL is None:
    return jnp.ones(targets_BxL.shape, jnp.float32)
  if jnp.shape(weights_BxL) != targets_BxL.shape:
    raise PruneError(f'KD loss: weights have shape {jnp.shape(weights_BxL)}, targets '
                     f'{targets_BxL.shape}; one weight per token')
  return jnp.asarray(weights_BxL, jnp.float32)


def _token_sums(student_logits_BxLxV, teacher_logits_BxLxV, targets_BxL, weights_BxL, tau):
  """Summed per-token CE, KL, teacher CE weighted by the tokens' loss weights, and their sum."""
  s_BxLxV = student_logits_BxLxV.astype(jnp.float32)
  t_BxLxV = jax.lax.stop_gradient(teacher_logits_BxLxV).astype(jnp.float32)
  logp_s_BxLxV = jax.nn.log_softmax(s_BxLxV)
  logp_t_BxLxV = jax.nn.log_softmax(t_BxLxV)
  pick = lambda logp: jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
  ce_BxL = -pick(logp_s_BxLxV)
  teacher_ce_BxL = -pick(logp_t_BxLxV)
  # τ = 1 (the default) reuses the CE's log-softmaxes: two fewer passes over [B, L, V].
  if not _is_one(tau):
    logp_s_BxLxV = jax.nn.log_softmax(s_BxLxV / tau)
    logp_t_BxLxV = jax.nn.log_softmax(t_BxLxV / tau)
  # Identical teacher and student give exactly 0 here (x − x), not merely ~0.
  kl_BxL = jnp.sum(jnp.exp(logp_t_BxLxV) * (logp_t_BxLxV - logp_s_BxLxV), axis=-1)
  sums = {'ce': ce_BxL, 'kl': kl_BxL, 'teacher_ce': teacher_ce_BxL}
  return {k: jnp.sum(v * weights_BxL) for k, v in sums.items()}, jnp.sum(weights_BxL)


def _finish(sums, count, alpha, tau):
  """Per-token means and the mixed loss from summed terms."""
  # max(count, 1): an all-padding batch gives loss 0, not NaN.
  aux = {k: sums[k] / jnp.maximum(count, 1.0) for k in _SUM_KEYS}
  aux['tokens'] = count
  loss = (1.0 - alpha) * aux['ce'] + alpha * tau**2 * aux['kl']
  return loss, aux


def kd_loss(student_logits_BxLxV, teacher_logits_BxLxV, targets_BxL, weights_BxL=None, *, alpha,
            tau):
  """(loss, aux): mixed CE/KL over weighted tokens; aux: ce, kl, teacher_ce, tokens."""
  sums, count = _token_sums(student_logits_BxLxV, teacher_logits_BxLxV, targets_BxL,
                            _weights(weights_BxL, targets_BxL), tau)
  return _finish(sums, count, alpha, tau)


def check_chunk(chunk: int, seq_len: int) -> None:
  """Raises a one-line PruneError unless chunk is 0, >= seq_len, or divides seq_len."""
  if chunk < 0:
    raise PruneError(f'KD chunk={chunk!r}: must be >= 0 (0 = unchunked)')
  if 0 < chunk < seq_len and seq_len % chunk:
    raise PruneError(f'KD chunk={chunk!r}: does not divide the sequence length {seq_len}; '
                     'use a divisor of it, or 0 for unchunked')


def logits(x_BxLxD, head_DxV, dtype=None):
  """f32 logits of hidden states through an LM head computed in `dtype` (default: x's)."""
  dtype = x_BxLxD.dtype if dtype is None else dtype
  return (x_BxLxD @ head_DxV.astype(dtype)).astype(jnp.float32)


def chunked_kd_loss(student_hidden_BxLxD, student_head_DxV, teacher_hidden_BxLxD,
                    teacher_head_DxV, targets_BxL, weights_BxL=None, *, alpha, tau, chunk,
                    student_dtype=None, teacher_dtype=None):
  """`kd_loss` from final hidden states and LM heads, logits built `chunk` positions at a time.

  *_dtype: the dtype each head's matmul runs in (the model's compute dtype; default the hidden's).
  """
  L = student_hidden_BxLxD.shape[1]
  check_chunk(chunk, L)  # shapes are static: this runs at trace time, outside the compiled step
  weights_BxL = _weights(weights_BxL, targets_BxL)
  teacher_hidden_BxLxD = jax.lax.stop_gradient(teacher_hidden_BxLxD)
  teacher_head_DxV = jax.lax.stop_gradient(teacher_head_DxV)

  def token_sums(s_BxCxD, t_BxCxD, targets_BxC, weights_BxC):
    return _token_sums(logits(s_BxCxD, student_head_DxV, student_dtype),
                       logits(t_BxCxD, teacher_head_DxV, teacher_dtype),
                       targets_BxC, weights_BxC, tau)

  sums, count = chunked.sum_over_chunks(
      token_sums, (student_hidden_BxLxD, teacher_hidden_BxLxD, targets_BxL, weights_BxL), chunk)
  return _finish(sums, count, alpha, tau)


def snapshot(params):
  """A copy of params in fresh buffers (same shardings): a teacher that survives state donation."""
  # Taking the teacher from a state that the next step donates would leave it pointing at
  # deleted buffers; copies keep it alive.
  return jax.tree.map(jnp.copy, params)
