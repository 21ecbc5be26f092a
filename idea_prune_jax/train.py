"""TrainState, the optimizer, the jitted steps, and sharded state construction."""

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from idea_prune_jax import importance
from idea_prune_jax import masks as masks_lib
from idea_prune_jax import model as model_lib
from idea_prune_jax import schedules
from idea_prune_jax import sharding as sharding_lib
from idea_prune_jax import structure as structure_lib
from idea_prune_jax.config import ModelConfig


@flax.struct.dataclass
class TrainState:
  """Everything that is sharded, donated, checkpointed and restored as one unit."""
  step: jax.Array
  params: Any
  opt_state: Any
  masks: Any = None  # FFN masks while pruning; None for a dense model
  scores: Any = None  # importance state while pruning
  teacher: Any = None  # frozen teacher params while distilling


def _decays(path, leaf) -> bool:
  # Norm scales and the token embedding stay un-decayed (LLaMA / nanoGPT practice).
  names = [getattr(k, 'key', getattr(k, 'name', '')) for k in path]
  return leaf.ndim >= 2 and 'embed' not in names and not any('norm' in str(n) for n in names)


def make_optimizer(train_cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; weight decay only on matrices."""
  return optax.chain(
      optax.clip_by_global_norm(train_cfg.clip_norm),
      optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                  weight_decay=train_cfg.weight_decay,
                  mask=lambda params: jax.tree_util.tree_map_with_path(_decays, params)))


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
  sum and, in the backward pass, rebuilt (jax.checkpoint) rather than kept. chunk (default
  cfg.loss_chunk) 0 or >= L is the unchunked loss.
  """
  B, L, _ = hidden_BxLxD.shape
  chunk = cfg.loss_chunk if chunk is None else chunk
  if chunk == 0 or chunk >= L:
    return cross_entropy(model_lib.logits(hidden_BxLxD, head_DxV, cfg), targets_BxL, weights_BxL)
  n = L // chunk
  # Sequence chunks keep the batch axis (and its data sharding) whole; scan walks axis 0.
  to_chunks = lambda x: jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def body(carry, xs):
    h_BxCxD, targets_BxC, weights_BxC = xs
    sums = cross_entropy(model_lib.logits(h_BxCxD, head_DxV, cfg), targets_BxC, weights_BxC)
    return jax.tree.map(jnp.add, carry, sums), None

  zero = jnp.zeros((), jnp.float32)
  (total, count), _ = jax.lax.scan(
      body, (zero, zero), (to_chunks(hidden_BxLxD), to_chunks(targets_BxL), to_chunks(weights_BxL)))
  return total, count


def _forward_sums(params, batch, model: nn.Module, mutable):
  """(summed NLL, token count) of model on batch, and the mutated collections if mutable.

  With model.cfg.loss_chunk the head runs chunk by chunk on the final hidden states.
  """
  chunked = bool(model.cfg.loss_chunk)
  out = forward(params, batch, model, mutable=mutable, return_hidden=chunked)
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
class PruneOptions:
  """Static settings of the prune step (the traced parts live in TrainState.masks/scores)."""
  schedule: schedules.PruneSchedule
  score: str = 'platon'
  beta1: float = 0.85
  beta2: float = 0.95
  structure: Any = structure_lib.FFN_STRUCTURE


@dataclasses.dataclass(frozen=True)
class KDOptions:
  """Distillation from TrainState.teacher (a frozen param tree) through `teacher_model`."""
  teacher_model: nn.Module
  alpha: float = 0.5
  tau: float = 1.0
  chunk: int = 0


def loss_and_aux(params, batch, teacher, *, model, kd: KDOptions | None, want_acts: bool):
  """Training loss at `params`, with metrics and (optionally) sowed FFN activations."""
  mutable = ['intermediates'] if want_acts else False
  if kd is None:
    (total, count), inter = _forward_sums(params, batch, model, mutable)
    loss, aux = total / jnp.maximum(count, 1.0), {'tokens': count}
  else:
    from idea_prune_jax import distill  # distill builds on this module's TrainState
    loss, aux = distill.kd_loss_fn(params, batch, teacher, model=model,
                                   teacher_model=kd.teacher_model, alpha=kd.alpha, tau=kd.tau,
                                   chunk=kd.chunk, intermediates=want_acts)
    inter = {'intermediates': aux.pop('intermediates')} if want_acts else None
  if want_acts:
    aux['ffn_act'] = inter['intermediates']['layers']['mlp']['ffn_act']
  return loss, aux


def train_step(state: TrainState, batch, *, model, optimizer, schedule, lr_offset: int = 0,
               prune: PruneOptions | None = None, kd: KDOptions | None = None):
  """One AdamW step: dense, or (prune) on masked params with score update and mask refresh.

  Pruning: the forward pass sees masked params, scores update from the gradients this step
  already has, the masks refresh on the schedule's refresh steps (k is traced: no recompile),
  and the masks are re-applied after the update so pruned slices stay exactly zero.
  """
  params = state.params
  if prune is not None:
    params = masks_lib.apply(params, state.masks, prune.structure)
  want_acts = prune is not None and prune.score == 'activation'
  (loss, aux), grads = jax.value_and_grad(loss_and_aux, has_aux=True)(
      params, batch, state.teacher, model=model, kd=kd, want_acts=want_acts)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
             'lr': schedule(state.step - lr_offset), **aux}
  masks, scores = state.masks, state.scores
  if prune is not None:
    # No mask on the grads: a pruned neuron's gate/up columns and down row are all zero, so its
    # activation and each of its slices' gradients carry an exact zero factor already (masking
    # them again cost 3 extra passes over the FFN weights; BENCHMARKS.md, prune overhead).
    scores = importance.update(scores, prune.score, params=params, grads=grads,
                               activations=metrics.pop('ffn_act', None),
                               structure=prune.structure, beta1=prune.beta1, beta2=prune.beta2)
    keep_k = prune.schedule.keep_k(state.step)
    masks = jax.lax.cond(
        prune.schedule.is_refresh(state.step),
        lambda: masks_lib.refresh(state.masks, importance.scores(
            scores, prune.score, params=params, structure=prune.structure), keep_k),
        lambda: state.masks)
    metrics['ffn_width'] = jnp.mean(jnp.stack(
        [jnp.mean(w.astype(jnp.float32)) for w in masks_lib.widths(masks).values()]))
  updates, opt_state = optimizer.update(grads, state.opt_state, params)
  params = optax.apply_updates(params, updates)
  if prune is not None:
    params = masks_lib.apply(params, masks, prune.structure)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, masks=masks,
                            scores=scores)
  return new_state, metrics


def eval_step(params, batch, *, model):
  """(summed NLL, token count); the caller sums over batches for perplexity."""
  return _forward_sums(params, batch, model, False)[0]


def abstract_params(model_cfg: ModelConfig):
  """Boxed ShapeDtypeStructs: shapes plus logical axis names, no memory."""
  return jax.eval_shape(functools.partial(model_lib.init_params, model_cfg), jax.random.key(0))


def state_shardings(abstract_state: TrainState, params_sharding, optimizer, mesh,
                    teacher_sharding=None) -> TrainState:
  """Opt moments follow their params; everything else (counts, step) is replicated."""
  replicated = sharding_lib.replicated(mesh)
  opt_sharding = optax.tree_map_params(
      optimizer, lambda _, s: s, abstract_state.opt_state, params_sharding,
      transform_non_params=lambda _: replicated)
  ffn = sharding_lib.named(mesh, 'layers', 'mlp')
  per_ffn = lambda tree: None if tree is None else jax.tree.map(lambda _: ffn, tree)
  return TrainState(step=replicated, params=params_sharding, opt_state=opt_sharding,
                    masks=per_ffn(abstract_state.masks), scores=per_ffn(abstract_state.scores),
                    teacher=teacher_sharding)


def init_state(model_cfg: ModelConfig, optimizer, mesh, key, extra_fn=None):
  """State built already sharded: shapes first, then one jitted init with out_shardings.

  extra_fn(params) -> dict of extra TrainState fields (masks, scores) for pruning runs.
  """
  boxed = abstract_params(model_cfg)
  params_sharding = sharding_lib.param_shardings(boxed, mesh)

  def _init(k):
    params = nn.unbox(model_lib.init_params(model_cfg, k))
    extra = extra_fn(params) if extra_fn else {}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), **extra)

  shardings = state_shardings(jax.eval_shape(_init, key), params_sharding, optimizer, mesh)
  return jax.jit(_init, out_shardings=shardings)(key), shardings


def jit_step(step_fn, shardings: TrainState, mesh, **static):
  """Jits a (state, batch) -> (state, metrics) step with shardings and a donated state."""
  jitted = jax.jit(functools.partial(step_fn, **static),
                   in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))
  return sharding_lib.MeshJit(jitted, mesh)


def jit_eval(model, params_sharding, mesh):
  jitted = jax.jit(functools.partial(eval_step, model=model),
                   in_shardings=(params_sharding, sharding_lib.batch_sharding(mesh)),
                   out_shardings=sharding_lib.replicated(mesh))
  return sharding_lib.MeshJit(jitted, mesh)
