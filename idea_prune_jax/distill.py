"""Knowledge distillation: the KD loss (optionally in sequence chunks) and a one-jit KD train step.

    loss = (1 − α)·CE(labels, student) + α·τ²·KL(p_teacher^τ ‖ p_student^τ)

averaged over the tokens the batch's `weights` keep (the data pipeline masks padding). The τ² keeps the KL's gradient on
the same scale as the CE's as τ grows (Hinton et al. 2015). The teacher is never differentiated:
its logits pass through `stop_gradient`, so a `jax.grad` w.r.t. teacher params is exactly zero and
no teacher backward pass is ever built.

Three levels, each usable alone:
  kd_loss          logits in, (loss, aux) out; any model.
  chunked_kd_loss  final hidden states + LM heads in; chunk > 0 computes logits one sequence chunk
                   at a time so full [B, L, V] teacher and student logits are never both alive.
  kd_loss_fn       (params, batch, teacher_params) -> (loss, aux) for `model.Transformer`; the loss
                   inside `distill_step` and inside any other step (e.g. pruning, whose importance
                   scores then see the KD gradient).
`distill_step(state, batch, teacher_params, ...)` is `train.train_step` with this loss; teacher
params are its third jit *argument* (see `jit_distill_step`, `bind_teacher`), so they stay sharded
and are not baked into the executable as constants.
"""

import functools

import jax
import jax.numpy as jnp

from idea_prune_jax import config as config_lib
from idea_prune_jax import model as model_lib
from idea_prune_jax import sharding as sharding_lib
from idea_prune_jax import train as train_lib

_SUM_KEYS = ('ce', 'kl', 'teacher_ce')


def _is_one(x) -> bool:
  return isinstance(x, (int, float)) and x == 1


def _token_sums(student_logits_BxLxV, teacher_logits_BxLxV, targets_BxL, weights_BxL, tau):
  """Weighted sums of per-token CE, KL and teacher CE, and the summed weight."""
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
  # max(count, 1) as in train.lm_loss: an all-padding batch gives loss 0, not NaN.
  aux = {k: sums[k] / jnp.maximum(count, 1.0) for k in _SUM_KEYS}
  aux['tokens'] = count
  loss = (1.0 - alpha) * aux['ce'] + alpha * tau**2 * aux['kl']
  return loss, aux


def kd_loss(student_logits_BxLxV, teacher_logits_BxLxV, targets_BxL, weights_BxL, *, alpha, tau):
  """(loss, aux): mixed CE/KL over weighted tokens; aux: ce, kl, teacher_ce, tokens."""
  sums, count = _token_sums(student_logits_BxLxV, teacher_logits_BxLxV, targets_BxL, weights_BxL,
                            tau)
  return _finish(sums, count, alpha, tau)


def check_chunk(chunk: int, seq_len: int) -> None:
  """Raises a one-line ConfigError unless chunk is 0, >= seq_len, or divides seq_len."""
  if chunk < 0:
    raise config_lib.ConfigError(f'config.distill.chunk={chunk!r}: must be >= 0 (0 = unchunked)')
  if 0 < chunk < seq_len and seq_len % chunk:
    raise config_lib.ConfigError(
        f'config.distill.chunk={chunk!r}: does not divide the sequence length {seq_len}; '
        'use a divisor of it, or 0 for unchunked')


def chunked_kd_loss(student_hidden_BxLxD, student_head_DxV, teacher_hidden_BxLxD,
                    teacher_head_DxV, targets_BxL, weights_BxL, *, alpha, tau, chunk,
                    student_cfg, teacher_cfg):
  """`kd_loss` from final hidden states and LM heads, logits built `chunk` positions at a time."""
  B, L, D = student_hidden_BxLxD.shape
  check_chunk(chunk, L)  # shapes are static: this runs at trace time, outside the compiled step
  teacher_hidden_BxLxD = jax.lax.stop_gradient(teacher_hidden_BxLxD)
  teacher_head_DxV = jax.lax.stop_gradient(teacher_head_DxV)
  if chunk == 0 or chunk >= L:
    return kd_loss(model_lib.logits(student_hidden_BxLxD, student_head_DxV, student_cfg),
                   model_lib.logits(teacher_hidden_BxLxD, teacher_head_DxV, teacher_cfg),
                   targets_BxL, weights_BxL, alpha=alpha, tau=tau)
  n = L // chunk
  # Chunks along the sequence, not the batch: the batch axis stays whole, so its data sharding
  # is untouched; [n, B, C, ...] lets scan walk the leading axis.
  to_chunks = lambda x: jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)

  # Checkpointed body: the backward pass recomputes this chunk's logits (two [B, C, D]x[D, V]
  # matmuls) instead of keeping n chunks of [B, C, V] alive, which would undo the chunking.
  @jax.checkpoint
  def body(carry, xs):
    s_BxCxD, t_BxCxD, targets_BxC, weights_BxC = xs
    sums, count = _token_sums(model_lib.logits(s_BxCxD, student_head_DxV, student_cfg),
                              model_lib.logits(t_BxCxD, teacher_head_DxV, teacher_cfg),
                              targets_BxC, weights_BxC, tau)
    return jax.tree.map(jnp.add, carry, (sums, count)), None

  zero = jnp.zeros((), jnp.float32)
  init = ({k: zero for k in _SUM_KEYS}, zero)
  (sums, count), _ = jax.lax.scan(
      body, init, (to_chunks(student_hidden_BxLxD), to_chunks(teacher_hidden_BxLxD),
                   to_chunks(targets_BxL), to_chunks(weights_BxL)))
  return _finish(sums, count, alpha, tau)


def kd_loss_fn(params, batch, teacher_params, *, model, teacher_model, alpha, tau, chunk=0,
               intermediates: bool = False):
  """(loss, aux) of `model.Transformer` student params against a teacher; for jax.value_and_grad.

  model / teacher_model: `model.Transformer(cfg)`s sharing vocab (ffn_dim etc. may differ).
  intermediates=True adds aux['intermediates'], the student's sown FFN activations (activation
  importance), as `model.apply(..., mutable=['intermediates'])` returns them.
  """
  # Stopping gradients at the params (not only at the logits) keeps the teacher forward out of
  # any autodiff trace: its activations are never saved for a backward pass.
  teacher_params = jax.lax.stop_gradient(teacher_params)
  packing = model_lib.batch_inputs(batch)
  t_hidden_BxLxD = teacher_model.apply({'params': teacher_params}, batch['inputs'], **packing,
                                       return_hidden=True)
  if intermediates:
    s_hidden_BxLxD, extra = model.apply({'params': params}, batch['inputs'], **packing,
                                        return_hidden=True, mutable=['intermediates'])
  else:
    s_hidden_BxLxD = model.apply({'params': params}, batch['inputs'], **packing,
                                 return_hidden=True)
  loss, aux = chunked_kd_loss(
      s_hidden_BxLxD, model_lib.head(params, model.cfg), t_hidden_BxLxD,
      model_lib.head(teacher_params, teacher_model.cfg), batch['targets'], batch['weights'],
      alpha=alpha, tau=tau,
      chunk=chunk, student_cfg=model.cfg, teacher_cfg=teacher_model.cfg)
  if intermediates:
    aux['intermediates'] = extra['intermediates']
  return loss, aux


def distill_step(state: train_lib.TrainState, batch, teacher_params, *, model, teacher_model,
                 optimizer, schedule, alpha=0.5, tau=1.0, chunk=0):
  """One AdamW step of the student on the KD loss; the teacher forward runs in the same program.

  The trainer's own step with KD on (`train.train_step(..., kd=KDOptions(...))`), for a teacher
  held outside the state: only the student params are differentiated.
  """
  kd = train_lib.KDOptions(teacher_model, alpha, tau, chunk)
  new_state, metrics = train_lib.train_step(state.replace(teacher=teacher_params), batch,
                                            model=model, optimizer=optimizer, schedule=schedule,
                                            kd=kd)
  return new_state.replace(teacher=state.teacher), metrics


def jit_distill_step(shardings: train_lib.TrainState, teacher_sharding, mesh, step_fn=distill_step,
                     **static):
  """Jits a (state, batch, teacher_params) step like `train.jit_step`; only the state is donated.

  teacher_sharding: the teacher's param shardings, e.g.
  `sharding.param_shardings(train.abstract_params(teacher_cfg), mesh)`.
  """
  return jax.jit(functools.partial(step_fn, **static),
                 in_shardings=(shardings, sharding_lib.batch_sharding(mesh), teacher_sharding),
                 out_shardings=(shardings, sharding_lib.replicated(mesh)),
                 donate_argnums=(0,))


def bind_teacher(step_fn, teacher_params):
  """A (state, batch) step for `loop.run_steps`; the teacher is still passed as a jit argument."""
  return lambda state, batch: step_fn(state, batch, teacher_params)


def snapshot(params):
  """A copy of params in fresh buffers (same shardings): a teacher that survives state donation."""
  # Taking the teacher from a state that the next step donates would leave it pointing at
  # deleted buffers; copies keep it alive.
  return jax.tree.map(jnp.copy, params)
