"""TrainState, the optimizer and its LR schedules, the losses, the one jitted train step (dense,
pruning, or fused KD with `kd=KDOptions(...)`), and sharded state construction."""

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from idea_prune_jax.prune import chunked
from idea_prune_jax.prune import distill
from idea_prune_jax.prune import masks as masks_lib
from idea_prune_jax.model import model as model_lib
from idea_prune_jax.train import sharding as sharding_lib
from idea_prune_jax.prune import structure as structure_lib
from idea_prune_jax.model.config import ModelConfig
from idea_prune_jax.prune.prune_optax import PruneState, find as find_prune_state, prune_optimizer
from idea_prune_jax.prune.schedules import PruneSchedule


@flax.struct.dataclass
class TrainState:
  """Everything that is sharded, donated, checkpointed and restored as one unit.

  While pruning, opt_state is a `prune_optax.PruneState`: the FFN masks and importance state
  live in it (read them as `state.masks`, `state.importance`).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  teacher: Any = None  # frozen teacher params while distilling

  @property
  def masks(self):
    """FFN masks while pruning; None for a dense model."""
    prune = find_prune_state(self.opt_state)
    return None if prune is None else prune.masks

  @property
  def importance(self):
    """The importance state while pruning (`importance.scores` of it ranks neurons); None for a
    dense model."""
    prune = find_prune_state(self.opt_state)
    return None if prune is None else prune.importance


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
  sum and, in the backward pass, rebuilt (`chunked.sum_over_chunks`, as the chunked KD loss does)
  rather than kept. chunk (default cfg.loss_chunk) 0 or >= L is the unchunked loss.
  """
  chunk = cfg.loss_chunk if chunk is None else chunk
  token_sums = lambda h_BxCxD, targets_BxC, weights_BxC: cross_entropy(
      model_lib.logits(h_BxCxD, head_DxV, cfg), targets_BxC, weights_BxC)
  return chunked.sum_over_chunks(token_sums, (hidden_BxLxD, targets_BxL, weights_BxL), chunk)


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
               intermediates: bool = False):
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
                                    mutable=['intermediates'])
  else:
    s_hidden_BxLxD = forward(params, batch, model, return_hidden=True)
  loss, aux = distill.chunked_kd_loss(
      s_hidden_BxLxD, model_lib.head(params, model.cfg), t_hidden_BxLxD,
      model_lib.head(teacher_params, teacher_model.cfg), batch['targets'], batch['weights'],
      alpha=alpha, tau=tau, chunk=chunk, student_dtype=model.cfg.dtype,
      teacher_dtype=teacher_model.cfg.dtype)
  if intermediates:
    aux['intermediates'] = extra['intermediates']
  return loss, aux


def loss_and_aux(params, batch, teacher, *, model, kd: KDOptions | None, want_acts: bool):
  """Training loss at `params`, with metrics and (optionally) sowed FFN activations."""
  mutable = ['intermediates'] if want_acts else False
  if kd is None:
    (total, count), inter = _forward_sums(params, batch, model, mutable)
    loss, aux = total / jnp.maximum(count, 1.0), {'tokens': count}
  else:
    loss, aux = kd_loss_fn(params, batch, teacher, model=model, teacher_model=kd.teacher_model,
                           alpha=kd.alpha, tau=kd.tau, chunk=kd.chunk, intermediates=want_acts)
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
      state.params, batch, state.teacher, model=model, kd=kd, want_acts=want_acts)
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
  if prune is not None:
    metrics['ffn_width'] = jnp.mean(jnp.stack(
        [jnp.mean(w.astype(jnp.float32)) for w in masks_lib.widths(prune.masks).values()]))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def eval_step(params, batch, *, model):
  """(summed NLL, token count); the caller sums over batches for perplexity."""
  return _forward_sums(params, batch, model, False)[0]


def abstract_params(model_cfg: ModelConfig):
  """Boxed ShapeDtypeStructs: shapes plus logical axis names, no memory."""
  return jax.eval_shape(functools.partial(model_lib.init_params, model_cfg), jax.random.key(0))


def state_shardings(abstract_state: TrainState, params_sharding, optimizer, mesh,
                    teacher_sharding=None) -> TrainState:
  """Opt moments follow their params; masks and the importance state shard like the FFN axis;
  everything else (counts, step) is replicated. optimizer: the dense one (inside the prune
  wrapper, if any)."""
  replicated = sharding_lib.replicated(mesh)
  moments = lambda opt_state: optax.tree_map_params(
      optimizer, lambda _, s: s, opt_state, params_sharding,
      transform_non_params=lambda _: replicated)
  opt_state = abstract_state.opt_state
  if isinstance(opt_state, PruneState):
    ffn = sharding_lib.named(mesh, 'layers', 'mlp')
    per_ffn = lambda tree: jax.tree.map(lambda _: ffn, tree)
    opt_sharding = PruneState(count=replicated, masks=per_ffn(opt_state.masks),
                              importance=per_ffn(opt_state.importance),
                              inner=moments(opt_state.inner))
  else:
    opt_sharding = moments(opt_state)
  return TrainState(step=replicated, params=params_sharding, opt_state=opt_sharding,
                    teacher=teacher_sharding)


def init_state(model_cfg: ModelConfig, optimizer, mesh, key):
  """Dense state built already sharded: shapes first, then one jitted init with out_shardings."""
  boxed = abstract_params(model_cfg)
  params_sharding = sharding_lib.param_shardings(boxed, mesh)

  def _init(k):
    params = nn.unbox(model_lib.init_params(model_cfg, k))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))

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
