"""The pipelines as phase plans over the same step: scratch, naive enlarge-and-prune, idea.

A plan is a tuple of `Phase`s. Each phase boundary is a checkpoint; a restart reads the phase
from the latest checkpoint, rebuilds that phase's state shapes, restores, and carries on.
"""

import copy
import dataclasses
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from idea_prune_jax import checkpoint as ckpt_lib
from idea_prune_jax import data as data_lib
from idea_prune_jax import export
from idea_prune_jax import importance
from idea_prune_jax import loop
from idea_prune_jax import masks as masks_lib
from idea_prune_jax import model as model_lib
from idea_prune_jax import schedules
from idea_prune_jax import sharding as sharding_lib
from idea_prune_jax import train as train_lib
from idea_prune_jax.config import ConfigError, ModelConfig
from idea_prune_jax.structure import FFN_STRUCTURE


@dataclasses.dataclass(frozen=True)
class Phase:
  name: str  # enlarged | prune | recovery | scratch | train
  start: int
  end: int  # exclusive
  ffn_dim: int
  prune: schedules.PruneSchedule | None = None
  lr_start: int = 0  # the step this phase's LR schedule counts from (naive re-warms)
  lr_steps: int = 0  # that schedule's length
  kd: bool = False  # distils from TrainState.teacher
  teacher: bool = False  # holds a teacher in its state (this or a later phase distils)
  fresh_optimizer: bool = False  # naive: a new run's optimizer at this phase's start


def plan(config) -> tuple[Phase, ...]:
  """The phases of config.pipeline (or 'train': dense config.model for all steps)."""
  phases = _phases(config)
  # The teacher is snapshotted when the first phase after the enlarged one starts, and carried
  # while any later phase distils: idea's KD-in-recovery still uses the model at t_s.
  return tuple(dataclasses.replace(ph, teacher=i > 0 and any(q.kd for q in phases[i:]))
               for i, ph in enumerate(phases))


def _phases(config) -> tuple[Phase, ...]:
  T, f_e, f_t = config.train.steps, config.model.ffn_dim, config.prune.target_ffn
  kd_on = config.distill.alpha > 0
  kd_prune = kd_on and config.distill.phases in ('prune', 'both')
  kd_recovery = kd_on and config.distill.phases in ('recovery', 'both')
  name = config.pipeline
  if name == 'train':
    return (Phase('train', 0, T, f_e, lr_steps=T),)
  if name == 'scratch':
    return (Phase('scratch', 0, T, f_t, lr_steps=T),)
  if name == 'idea':
    ps = schedules.PruneSchedule.from_config(config)
    ps = dataclasses.replace(ps, t_end=min(ps.t_end, T - 1))
    return (Phase('enlarged', 0, ps.t_start, f_e, lr_steps=T),
            Phase('prune', ps.t_start, ps.t_end + 1, f_e, prune=ps, lr_steps=T, kd=kd_prune),
            Phase('recovery', ps.t_end + 1, T, f_t, lr_steps=T, kd=kd_recovery))
  split = int(round(config.naive.split * T))
  enlarged = Phase('enlarged', 0, split, f_e, lr_steps=split)
  rec = dict(lr_start=split, lr_steps=T - split)
  if config.naive.prune == 'oneshot':
    return (enlarged, Phase('recovery', split, T, f_t, kd=kd_recovery, fresh_optimizer=True, **rec))
  t_end = split + max(int(round(config.naive.window * T)), 1)
  ps = dataclasses.replace(schedules.PruneSchedule.from_config(config), t_start=split, t_end=t_end)
  return (enlarged,
          Phase('prune', split, t_end + 1, f_e, prune=ps, kd=kd_prune, fresh_optimizer=True, **rec),
          Phase('recovery', t_end + 1, T, f_t, kd=kd_recovery, **rec))


def teacher_config(config) -> ModelConfig:
  """The KD teacher's model: config.distill.teacher's export, else the enlarged model."""
  path = config.distill.teacher
  if not path:
    return ModelConfig.from_config(config)
  info = export.export_info(path)
  if info.get('format') != export.DENSE_FORMAT:
    raise ConfigError(f'config.distill.teacher={path!r}: not a dense export (W/export of a run)')
  teacher = ModelConfig.from_dict(info['model'])
  if teacher.vocab_size != config.model.vocab_size:
    raise ConfigError(f'config.distill.teacher={path!r}: vocab {teacher.vocab_size} != '
                      f'model.vocab_size={config.model.vocab_size}; KD needs one vocabulary')
  return teacher


def train_flops(config, phases) -> float:
  """Analytical training FLOPs of a plan (a KD teacher forward costs a third of its 6N)."""
  tokens = config.train.batch_size * config.data.seq_len
  seq, total = config.data.seq_len, 0.0
  teacher = model_lib.flops_per_token(teacher_config(config), seq) / 3
  for ph in phases:
    per_token = model_lib.flops_per_token(ModelConfig.from_config(config, ffn_dim=ph.ffn_dim), seq)
    total += (ph.end - ph.start) * tokens * (per_token + (teacher if ph.kd else 0.0))
  return total


@dataclasses.dataclass
class Parts:
  """What one phase compiles: its model, optimizer, LR schedule and state shardings."""
  model_cfg: ModelConfig
  model: model_lib.Transformer
  optimizer: object
  schedule: object
  init_fn: object  # key -> TrainState of this phase (shapes; values only for the first phase)
  shardings: train_lib.TrainState


def parts(config, phase: Phase, mesh) -> Parts:
  model_cfg = ModelConfig.from_config(config, ffn_dim=phase.ffn_dim)
  teacher_cfg = teacher_config(config)
  schedule = schedules.lr_schedule(config.train, phase.lr_steps)
  optimizer = train_lib.make_optimizer(config.train, schedule)
  score = config.prune.score

  def init_fn(key):
    params = nn.unbox(model_lib.init_params(model_cfg, key))
    state = train_lib.TrainState(step=jnp.asarray(phase.start, jnp.int32), params=params,
                                 opt_state=optimizer.init(params))
    if phase.prune:
      masks = masks_lib.init(params, FFN_STRUCTURE)
      state = state.replace(masks=masks, scores=importance.init(masks, score))
    if phase.teacher:
      state = state.replace(teacher=nn.unbox(model_lib.init_params(teacher_cfg, key)))
    return state

  params_sharding = sharding_lib.param_shardings(train_lib.abstract_params(model_cfg), mesh)
  teacher_sharding = (sharding_lib.param_shardings(train_lib.abstract_params(teacher_cfg), mesh)
                      if phase.teacher else None)
  shardings = train_lib.state_shardings(jax.eval_shape(init_fn, jax.random.key(0)),
                                        params_sharding, optimizer, mesh, teacher_sharding)
  return Parts(model_cfg, model_lib.Transformer(model_cfg), optimizer, schedule, init_fn,
               shardings)


def step_fn(config, phase: Phase, p: Parts, mesh):
  prune = kd = None
  if phase.prune:
    prune = train_lib.PruneOptions(phase.prune, config.prune.score, config.prune.beta1,
                                   config.prune.beta2)
  if phase.kd:
    kd = train_lib.KDOptions(model_lib.Transformer(teacher_config(config)),
                             config.distill.alpha, config.distill.tau, config.distill.chunk)
  return train_lib.jit_step(train_lib.train_step, p.shardings, mesh, model=p.model,
                            optimizer=p.optimizer, schedule=p.schedule, lr_offset=phase.lr_start,
                            prune=prune, kd=kd)


def _host(tree):
  """A (possibly multi-host sharded) tree as numpy on every host."""
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def oneshot_score_fn(config, model):
  """Naive one-shot's scoring step: (scores, params, batch) -> scores updated from its grads."""
  kind, want_acts = config.prune.score, config.prune.score == 'activation'

  def accumulate(scores, params, batch):
    (_, aux), grads = jax.value_and_grad(train_lib.loss_and_aux, has_aux=True)(
        params, batch, None, model=model, kd=None, want_acts=want_acts)
    return importance.update(scores, kind, params=params, grads=grads,
                             activations=aux.get('ffn_act'), structure=FFN_STRUCTURE,
                             beta1=config.prune.beta1, beta2=config.prune.beta2)
  return accumulate


def _oneshot_masks(run, config, state, model):
  """Naive one-shot: scores over a few batches at the final enlarged params, top f_T kept."""
  masks = masks_lib.init(state.params, FFN_STRUCTURE)
  scores = importance.init(masks, config.prune.score)
  kind = config.prune.score
  accumulate = jax.jit(oneshot_score_fn(config, model))

  stream = copy.deepcopy(run.data.train)  # scoring must not move the training data order
  sharding = sharding_lib.batch_sharding(run.mesh)
  for _ in range(config.naive.score_batches):
    batch = data_lib.global_batch(data_lib.split_batch(next(stream)), sharding)
    scores = accumulate(scores, state.params, batch)
  final = importance.scores(scores, kind, params=state.params, structure=FFN_STRUCTURE)
  return masks_lib.refresh(masks, final, config.prune.target_ffn)


def transition(run, config, prev: Phase, nxt: Phase, state, p_next: Parts):
  """The state of `nxt` at its first step, from the state `prev` ended with."""
  teacher = state.teacher if nxt.teacher else None
  if nxt.teacher and teacher is None and config.distill.teacher:
    teacher, _ = export.load_dense(config.distill.teacher, p_next.shardings.teacher)
  elif nxt.teacher and teacher is None:
    # idea: the enlarged model at t_s; naive: the final enlarged model. A copy: the state is
    # donated each step, and one buffer cannot be donated as both params and teacher.
    teacher = jax.tree.map(jnp.copy, state.params)
  masks, scores = state.masks, state.scores
  params, opt_state = state.params, state.opt_state
  if prev.ffn_dim != nxt.ffn_dim:
    if masks is None:
      enlarged = model_lib.Transformer(ModelConfig.from_config(config, ffn_dim=prev.ffn_dim))
      masks = _oneshot_masks(run, config, state, enlarged)
    masks = _host(masks)
    params = masks_lib.shrink(params, masks, FFN_STRUCTURE)
    opt_state = masks_lib.shrink(opt_state, masks, FFN_STRUCTURE)
    masks = scores = None
  if nxt.fresh_optimizer:
    opt_state = p_next.optimizer.init(params)
  if nxt.prune:
    masks = masks_lib.init(params, FFN_STRUCTURE)
    scores = importance.init(masks, config.prune.score)
  new = train_lib.TrainState(step=state.step, params=params, opt_state=opt_state, masks=masks,
                             scores=scores, teacher=teacher)
  return jax.device_put(new, p_next.shardings)


def _save_importance(workdir, tag, state, config):
  scores = importance.scores(state.scores, config.prune.score, params=state.params,
                             structure=FFN_STRUCTURE)
  scores, masks = _host(scores), _host(state.masks)
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, 'importance'), exist_ok=True)
    name = next(iter(scores))
    np.savez(os.path.join(workdir, 'importance', f'{tag}.npz'), scores=scores[name],
             mask=masks[name])


def run_pipeline(config, workdir: str) -> dict:
  """Runs (or resumes) config.pipeline to the end; returns the final state, model and figures."""
  t0 = time.time()
  teacher_config(config)  # a bad distill.teacher fails here, before any compute
  run = loop.setup(config, workdir)
  phases, names = plan(config), [ph.name for ph in plan(config)]
  base_cfg = ModelConfig.from_config(config)
  meta = {'model': ckpt_lib.model_meta(base_cfg), 'pipeline': config.pipeline}

  def abstract_for(saved):
    if saved.get('pipeline') != config.pipeline or saved.get('phase') not in names:
      raise ConfigError(f'config.pipeline={config.pipeline!r}: workdir {workdir} holds a '
                        f'checkpoint of pipeline {saved.get("pipeline")!r}; use a fresh --workdir')
    p = parts(config, phases[names.index(saved['phase'])], run.mesh)
    return ckpt_lib.abstract_like(jax.eval_shape(p.init_fn, jax.random.key(0)), p.shardings)

  restored = loop.restore_latest(run, abstract_for, base_cfg)
  if restored is None:
    index = 0
    p = parts(config, phases[0], run.mesh)
    state = jax.jit(p.init_fn, out_shardings=p.shardings)(jax.random.key(config.seed))
  else:
    state, saved = restored
    index = names.index(saved['phase'])
    p = parts(config, phases[index], run.mesh)
  for i in range(index, len(phases)):
    phase = phases[i]
    if i > index:
      p_next = parts(config, phase, run.mesh)
      state, p = transition(run, config, phases[i - 1], phase, state, p_next), p_next
    if int(state.step) >= phase.end:
      continue
    fn = step_fn(config, phase, p, run.mesh)
    eval_fn = train_lib.jit_eval(p.model, p.shardings.params, run.mesh)
    kwargs = dict(phase=phase.name, eval_fn=eval_fn, meta=meta)
    if phase.prune and int(state.step) == phase.start:
      # One step in, so the t_start histogram shows real sensitivities rather than zeros.
      state = loop.run_steps(run, state, fn, phase.start + 1, **kwargs)
      _save_importance(workdir, 't_start', state, config)
    state = loop.run_steps(run, state, fn, phase.end, **kwargs)
    if phase.prune:
      _save_importance(workdir, 't_end', state, config)
  result = loop.evaluate(run, train_lib.jit_eval(p.model, p.shardings.params, run.mesh),
                         state.params)
  run.writer.close()
  return {'state': state, 'model_cfg': p.model_cfg, 'run': run, 'phases': phases,
          'wall_s': time.time() - t0, **result}


def train(config, workdir: str) -> dict:
  """Dense pretraining of config.model for train.steps; resumes from workdir's latest checkpoint."""
  config = copy.deepcopy(config)
  config.pipeline = 'train'
  out = run_pipeline(config, workdir)
  return {'steps': int(out['state'].step), 'params': model_lib.param_count(out['model_cfg']),
          'val_loss': out['val_loss'], 'val_ppl': out['val_ppl']}
