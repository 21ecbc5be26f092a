"""The losses and the one train step (dense, pruning while the optimizer is a `prune_optimizer`,
or fused KD with `kd=KDOptions(...)`), the eval step, and both jitted with shardings."""

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from idea_prune_jax.model import model as model_lib
from idea_prune_jax.model.config import ModelConfig
from idea_prune_jax.prune import chunked
from idea_prune_jax.prune import distill
from idea_prune_jax.prune import masks as masks_lib
from idea_prune_jax.prune.prune_optax import find as find_prune_state
from idea_prune_jax.train import sharding as sharding_lib
from idea_prune_jax.train.optim import lr_count
from idea_prune_jax.train.state import TrainState


def cross_entropy(logits_BxLxV, targets_BxL, weights_BxL):
  """(weighted summed token NLL, summed weight); the data pipeline's weights mask padding."""
  nll_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
  return jnp.sum(nll_BxL * weights_BxL), jnp.sum(weights_BxL)

def forward(params, batch, model: nn.Module, **kwargs):
  """The model on a batch dict (packing fields passed when the batch has them)."""
  return model.apply({'params': params}, batch['inputs'], **model_lib.batch_inputs(batch),
                     **kwargs)

def chunked_cross_entropy(hidden_BxLxD, head_DxV, targets_BxL, weights_BxL, cfg: ModelConfig,
                          chunk: int | None = None):
  """`cross_entropy` from final hidden states and the LM head, `chunk` positions at a time.

  The f32 [B, L, V] logits are never whole: each chunk's [B, C, V] is built, reduced to its NLL
  sum and, in the backward pass, rebuilt (`chunked.sum_over_chunks`, as the chunked KD loss does)
  rather than kept. chunk (default cfg.loss_chunk) 0 or >= L is the unchunked loss.
  """
  chunk = cfg.loss_chunk if chunk is None else chunk
  token_sums = lambda h_BxCxD, targets_BxC, weights_BxC: cross_entropy(
      model_lib.logits(h_BxCxD, head_DxV, cfg), targets_BxC, weights_BxC)
  return chunked.sum_over_chunks(token_sums, (hidden_BxLxD, targets_BxL, weights_BxL), chunk)

def _forward_sums(params, batch, model: nn.Module, mutable, hidden_kept=None):
  """(summed NLL, token count) of model on batch, and the mutated collections if mutable.

  With model.cfg.loss_chunk the head runs chunk by chunk on the final hidden states.
  """
  chunked = bool(model.cfg.loss_chunk)
  out = forward(params, batch, model, mutable=mutable, return_hidden=chunked,
                hidden_kept=hidden_kept)
  out, inter = out if mutable else (out, None)
  if chunked:
    sums = chunked_cross_entropy(out, model_lib.head(params, model.cfg), batch['targets'],
                                 batch['weights'], model.cfg)
  else:
    sums = cross_entropy(out, batch['targets'], batch['weights'])
  return sums, inter

def lm_loss(params, batch, model: nn.Module):
  (total, count), _ = _forward_sums(params, batch, model, False)
  return total / jnp.maximum(count, 1.0), count

@dataclasses.dataclass(frozen=True)
class KDOptions:
  """Distillation from TrainState.teacher (a frozen param tree) through `teacher_model`.

  alpha, tau: numbers, or schedules (step -> value, `distill.schedule`) read at the state's step.
  """
  teacher_model: nn.Module
  alpha: float | Callable = 0.5
  tau: float | Callable = 1.0
  chunk: int = 0

  def at(self, step) -> 'KDOptions':
    """alpha and tau as values at `step` (scheduled ones traced; numbers stay static)."""
    value = lambda v: v(step) if callable(v) else v
    return dataclasses.replace(self, alpha=value(self.alpha), tau=value(self.tau))

def kd_loss_fn(params, batch, teacher_params, *, model, teacher_model, alpha, tau, chunk=0,
               intermediates: bool = False, hidden_kept=None):
  """(loss, aux) of `model.Transformer` student params against a teacher; for jax.value_and_grad.

  model / teacher_model: `model.Transformer(cfg)`s sharing vocab (ffn_dim etc. may differ).
  intermediates=True adds aux['intermediates'], the student's sown FFN activations (activation
  importance), as `model.apply(..., mutable=['intermediates'])` returns them.
  """
  # Stopping gradients at the params (not only at the logits) keeps the teacher forward out of
  # any autodiff trace: its activations are never saved for a backward pass.
  teacher_params = jax.lax.stop_gradient(teacher_params)
  t_hidden_BxLxD = forward(teacher_params, batch, teacher_model, return_hidden=True)
  if intermediates:
    s_hidden_BxLxD, extra = forward(params, batch, model, return_hidden=True,
                                    mutable=['intermediates'], hidden_kept=hidden_kept)
  else:
    s_hidden_BxLxD = forward(params, batch, model, return_hidden=True, hidden_kept=hidden_kept)
  loss, aux = distill.chunked_kd_loss(
      s_hidden_BxLxD, model_lib.head(params, model.cfg), t_hidden_BxLxD,
      model_lib.head(teacher_params, teacher_model.cfg), batch['targets'], batch['weights'],
      alpha=alpha, tau=tau, chunk=chunk, student_dtype=model.cfg.dtype,
      teacher_dtype=teacher_model.cfg.dtype)
  if intermediates:
    aux['intermediates'] = extra['intermediates']
  return loss, aux

def loss_and_aux(params, batch, teacher, *, model, kd: KDOptions | None, want_acts: bool,
                 hidden_kept=None):
  """Training loss at `params`, with metrics and (optionally) sowed FFN activations.
  hidden_kept: the alive d_model channels while the hidden size is masked."""
  mutable = ['intermediates'] if want_acts else False
  if kd is None:
    (total, count), inter = _forward_sums(params, batch, model, mutable, hidden_kept)
    loss, aux = total / jnp.maximum(count, 1.0), {'tokens': count}
  else:
    loss, aux = kd_loss_fn(params, batch, teacher, model=model, teacher_model=kd.teacher_model,
                           alpha=kd.alpha, tau=kd.tau, chunk=kd.chunk, intermediates=want_acts,
                           hidden_kept=hidden_kept)
    inter = {'intermediates': aux.pop('intermediates')} if want_acts else None
  if want_acts:
    aux['ffn_act'] = inter['intermediates']['layers']['mlp']['ffn_act']
  return loss, aux

def train_step(state: TrainState, batch, *, model, optimizer, schedule,
               kd: KDOptions | None = None, want_acts: bool = False):
  """One optimizer step: dense, or (while the optimizer is a `prune_optimizer`) pruning.

  Pruning lives in the optimizer: its update scores neurons from this step's grads, refreshes
  the masks on the schedule (k traced: no recompile) and returns updates that keep pruned slices
  exactly zero, so the params the forward pass sees are already masked. want_acts: the sown FFN
  activations go to the optimizer as `activations=` (the 'activation' score).
  """
  kd = None if kd is None else kd.at(state.step)
  (loss, aux), grads = jax.value_and_grad(loss_and_aux, has_aux=True)(
      state.params, batch, state.teacher, model=model, kd=kd, want_acts=want_acts,
      hidden_kept=state.hidden_kept)
  # The LR logged is the one this update applies: the schedule at the optimizer's own count.
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
             'lr': schedule(lr_count(state.opt_state)), **aux}
  if kd is not None:
    metrics.update(kd_alpha=jnp.asarray(kd.alpha, jnp.float32),
                   kd_tau=jnp.asarray(kd.tau, jnp.float32))
  extra = {'activations': {'ffn': metrics.pop('ffn_act')}} if want_acts else {}
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **extra)
  params = optax.apply_updates(state.params, updates)
  prune = find_prune_state(opt_state)
  if prune is not None:  # ffn_width, and kv_groups_, heads_, hidden_, layers_width if pruned
    for unit, kept in masks_lib.widths(prune.masks).items():
      metrics[f'{unit}_width'] = jnp.mean(kept.astype(jnp.float32))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics

def eval_step(params, batch, hidden_kept=None, *, model):
  """(summed NLL, token count); the caller sums over batches for perplexity."""
  return _forward_sums(params, batch, model, False, hidden_kept)[0]

def jit_step(step_fn, shardings: TrainState, mesh, **static):
  """Jits a (state, batch) -> (state, metrics) step with shardings and a donated state."""
  jitted = jax.jit(functools.partial(step_fn, **static),
                   in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))
  return sharding_lib.MeshJit(jitted, mesh)

def jit_eval(model, params_sharding, mesh):
  """(params, batch, hidden_kept or None) -> (summed NLL, token count), jitted."""
  jitted = jax.jit(functools.partial(eval_step, model=model),
                   in_shardings=(params_sharding, sharding_lib.batch_sharding(mesh),
                                 sharding_lib.replicated(mesh)),
                   out_shardings=sharding_lib.replicated(mesh))
  return sharding_lib.MeshJit(jitted, mesh)
