"""A plan executed (`plan`): each phase's model, optimizer and jitted step, the transitions
between phases (teacher snapshot, shrink of params and optimizer state, one-shot scoring), and
the run end to end, resuming from the latest checkpoint."""

import dataclasses
import io
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from idea_prune_jax.io import checkpoint as ckpt_lib
from idea_prune_jax.data import batch as batch_lib
from idea_prune_jax.prune import distill
from idea_prune_jax.io import export
from idea_prune_jax.prune import importance
from idea_prune_jax.train import loop
from idea_prune_jax.prune import masks as masks_lib
from idea_prune_jax.model import model as model_lib
from idea_prune_jax.train import sharding as sharding_lib
from idea_prune_jax.data import storage
from idea_prune_jax.train import optim
from idea_prune_jax.train import state as state_lib
from idea_prune_jax.train import step as step_lib
from idea_prune_jax.model.config import ModelConfig
from idea_prune_jax.train import budget
from idea_prune_jax.train.config import ConfigError, RunConfig, override
from idea_prune_jax.train.targets import (budget_constraints, budget_units, prune_structure,
                                          target_widths)
from idea_prune_jax.train.plan import Phase, plan, plan_fields, step_flops
from idea_prune_jax.prune.prune_optax import PruneState


def teacher_config(run: RunConfig) -> ModelConfig:
  """The KD teacher's model: run.distill.teacher's export, else the enlarged model."""
  path = run.distill.teacher
  if not path:
    return run.model
  info = export.export_info(path)
  if info.get('format') != export.DENSE_FORMAT:
    raise ConfigError(f'config.distill.teacher={path!r}: not a dense export (W/export of a run)')
  teacher = ModelConfig.from_dict(info['model'])
  if teacher.vocab_size != run.model.vocab_size:
    raise ConfigError(f'config.distill.teacher={path!r}: vocab {teacher.vocab_size} != '
                      f'model.vocab_size={run.model.vocab_size}; KD needs one vocabulary')
  return teacher


@dataclasses.dataclass
class Parts:
  """What one phase compiles: its model, optimizer, LR schedule and state shardings."""
  model_cfg: ModelConfig
  model: model_lib.Transformer
  optimizer: object  # `inner`, wrapped by prune_optimizer in a prune phase
  inner: object  # the dense AdamW
  schedule: object
  init_fn: object  # key -> TrainState of this phase (shapes; values only for the first phase)
  shardings: state_lib.TrainState


def parts(run: RunConfig, phase: Phase, mesh) -> Parts:
  model_cfg = phase.model
  teacher_cfg = teacher_config(run)
  schedule = optim.lr_schedule(run.train, phase.lr_steps)
  inner = optimizer = optim.make_optimizer(run.train, schedule)
  if phase.prune:
    optimizer = optim.prune_tx(inner, prune_options(run, phase))

  def init_fn(key):
    params = nn.unbox(model_lib.init_params(model_cfg, key))
    opt_state = optimizer.init(params)
    if phase.prune:  # the schedule counts global steps
      opt_state = opt_state._replace(count=jnp.asarray(phase.start, jnp.int32))
    state = state_lib.TrainState(step=jnp.asarray(phase.start, jnp.int32), params=params,
                                 opt_state=opt_state)
    if phase.teacher:
      state = state.replace(teacher=nn.unbox(model_lib.init_params(teacher_cfg, key)))
    return state

  params_sharding = sharding_lib.param_shardings(state_lib.abstract_params(model_cfg), mesh)
  teacher_sharding = (sharding_lib.param_shardings(state_lib.abstract_params(teacher_cfg), mesh)
                      if phase.teacher else None)
  shardings = state_lib.state_shardings(jax.eval_shape(init_fn, jax.random.key(0)),
                                        params_sharding, inner, mesh, teacher_sharding)
  return Parts(model_cfg, model_lib.Transformer(model_cfg), optimizer, inner, schedule, init_fn,
               shardings)


def prune_options(run: RunConfig, phase: Phase) -> optim.PruneOptions:
  return optim.PruneOptions(phase.prune, run.prune.score, run.prune.beta1, run.prune.beta2,
                            prune_structure(run, phase.model))


def kd_weights(run: RunConfig):
  """(alpha, tau): numbers when constant, else `distill.schedule`s over the steps that distil
  (the first distilling phase's start to the last one's end)."""
  kd_phases = [ph for ph in plan(run) if ph.kd]
  begin, end = kd_phases[0].start, kd_phases[-1].end
  k = run.distill
  weight = lambda kind, start, stop: (
      start if kind == 'constant' else distill.schedule(kind, start, stop, begin, end - begin))
  return (weight(k.alpha_schedule, k.alpha, k.alpha_end), weight(k.tau_schedule, k.tau, k.tau_end))


def step_fn(run: RunConfig, phase: Phase, p: Parts, mesh):
  kd = None
  if phase.kd:
    alpha, tau = kd_weights(run)
    kd = step_lib.KDOptions(model_lib.Transformer(teacher_config(run)), alpha, tau,
                             run.distill.chunk)
  want_acts = phase.prune is not None and run.prune.score == 'activation'
  return step_lib.jit_step(step_lib.train_step, p.shardings, mesh, model=p.model,
                            optimizer=p.optimizer, schedule=p.schedule, kd=kd, want_acts=want_acts)


def _host(tree):
  """A (possibly multi-host sharded) tree as numpy on every host."""
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def oneshot_score_fn(run: RunConfig, model_cfg: ModelConfig, mesh, structure=None):
  """Naive one-shot's jitted (scores, params, batch) -> scores, traced under the step's mesh
  (so the model's activation batch sharding applies, as in the train step). structure: the
  units scored (default: those the run prunes)."""
  kind, want_acts = run.prune.score, run.prune.score == 'activation'
  model = model_lib.Transformer(model_cfg)
  structure = structure or prune_structure(run, model_cfg)

  def accumulate(scores, params, batch):
    (_, aux), grads = jax.value_and_grad(step_lib.loss_and_aux, has_aux=True)(
        params, batch, None, model=model, kd=None, want_acts=want_acts)
    acts = {'ffn': aux['ffn_act']} if want_acts else None
    return importance.update(scores, kind, params=params, grads=grads, activations=acts,
                             structure=structure, beta1=run.prune.beta1,
                             beta2=run.prune.beta2)

  abstract_params = state_lib.abstract_params(model_cfg)
  params_sharding = sharding_lib.param_shardings(abstract_params, mesh)
  scores_sharding = state_lib.unit_shardings(jax.eval_shape(lambda: importance.init(
      masks_lib.init(nn.unbox(abstract_params), structure), kind)), mesh)
  jitted = jax.jit(accumulate, out_shardings=scores_sharding, in_shardings=(
      scores_sharding, params_sharding, sharding_lib.batch_sharding(mesh)))
  return sharding_lib.MeshJit(jitted, mesh)


def _unit_scores(ctx, run: RunConfig, params, model_cfg: ModelConfig, structure, n_batches):
  """(scores {unit: mask-shaped}, the batch stream after them): importance accumulated over
  n_batches training batches at `params`, read from a copy of the stream (scoring must not
  move the training data order)."""
  state = importance.init(masks_lib.init(params, structure), run.prune.score)
  accumulate = oneshot_score_fn(run, model_cfg, ctx.mesh, structure)
  stream = ctx.data.train.copy()
  sharding = sharding_lib.batch_sharding(ctx.mesh)
  for _ in range(n_batches):
    state = accumulate(state, params, batch_lib.global_batch(next(stream), sharding))
  scores = importance.scores(state, run.prune.score, params=params, structure=structure)
  return scores, stream


def _oneshot_masks(ctx, run: RunConfig, state, model_cfg: ModelConfig):
  """Naive one-shot: scores over a few batches at the final enlarged params, each unit's top
  target width kept."""
  structure = prune_structure(run, model_cfg)
  scores, _ = _unit_scores(ctx, run, state.params, model_cfg, structure,
                           run.naive.score_batches)
  targets = target_widths(run)
  return masks_lib.refresh(masks_lib.init(state.params, structure), scores,
                           {u: targets[u] for u in scores})


BUDGET_FILE = 'budget.json'


def chosen_run(run: RunConfig, workdir: str) -> RunConfig | None:
  """run with the target shape its budget.json records (chosen by an earlier attempt); None when
  prune.target_params still has to be chosen."""
  path = storage.join(workdir, BUDGET_FILE)
  if not run.prune.target_params:
    return run
  if not storage.exists(path):
    return None
  return with_shape(run, json.loads(storage.read_text(path))['chosen'])


def with_shape(run: RunConfig, chosen: dict) -> RunConfig:
  """run with its prune.target_* set to a `budget.shape_dict`."""
  return override(run, {'prune.target_ffn': chosen['ffn_dim'],
                        'prune.target_kv_heads': chosen['n_kv_heads'],
                        'prune.target_heads_per_group': chosen['heads_per_group'],
                        'prune.target_d_model': chosen['d_model'],
                        # budget.json files from before depth was an axis have no n_layers
                        'prune.target_layers': chosen.get('n_layers', run.model.n_layers)})


def choose_shape(ctx, run: RunConfig, params) -> dict:
  """prune.target_params: the target shape, chosen from the enlarged params where pruning
  starts, and written to WORKDIR/budget.json with every candidate and why.

  Every legal shape within prune.tolerance of the count (`budget.candidates`) is ranked by the
  importance mass it keeps (scores over prune.budget_batches batches); 'lookahead' then takes,
  of the budget.LOOKAHEAD best, the one whose masked model has the lowest loss on the next
  budget_batches batches."""
  m, p = run.model, run.prune
  structure = prune_structure(run, m, budget_units(run))
  scores, stream = _unit_scores(ctx, run, params, m, structure, p.budget_batches)
  cands = budget.candidates(m, p.target_params, budget_constraints(
      run, ctx.mesh.shape['tensor'], ctx.mesh.shape['fsdp']))
  chosen, table = budget.choose_by_importance(cands, m, _host(scores))
  if p.budget == 'lookahead':
    ranked = sorted(range(len(cands)), key=lambda i: -table[i]['retained_importance'])
    ranked = ranked[:budget.LOOKAHEAD]
    losses = _lookahead_losses(ctx, run, params, structure, scores,
                               [cands[i] for i in ranked], stream)
    for i, loss in zip(ranked, losses):
      table[i]['lookahead_loss'] = loss
    best = ranked[int(np.argmin(losses))]
    chosen = cands[best]
    for i, row in enumerate(table):
      row['chosen'] = i == best
  record = {'target_params': p.target_params, 'criterion': p.budget,
            'chosen': budget.shape_dict(chosen), 'candidates': table}
  if jax.process_index() == 0:
    storage.write_text(storage.join(ctx.workdir, BUDGET_FILE), json.dumps(record, indent=1))
  return record


def _lookahead_losses(ctx, run: RunConfig, params, structure, scores, shapes, stream):
  """The masked enlarged model's loss at each shape's one-shot masks, on the same batches."""
  sharding = sharding_lib.batch_sharding(ctx.mesh)
  batches = [batch_lib.global_batch(next(stream), sharding)
             for _ in range(run.prune.budget_batches)]
  params_sharding = sharding_lib.param_shardings(state_lib.abstract_params(run.model), ctx.mesh)
  eval_fn = step_lib.jit_eval(model_lib.Transformer(run.model), params_sharding, ctx.mesh)
  masked_fn = jax.jit(lambda ps, ms: masks_lib.apply(ps, ms, structure),
                      out_shardings=params_sharding)
  ones = masks_lib.init(params, structure)
  losses = []
  for shape in shapes:
    keep = budget.widths(shape)
    unit_masks = masks_lib.refresh(ones, scores, {u: keep[u] for u in ones})
    masked = masked_fn(params, unit_masks)
    sums = [eval_fn(masked, b, state_lib.hidden_kept(unit_masks)) for b in batches]
    losses.append(float(sum(n for n, _ in sums) / max(sum(c for _, c in sums), 1.0)))
  return losses


def transition(ctx, run: RunConfig, prev: Phase, nxt: Phase, state, p_next: Parts):
  """The state of `nxt` at its first step, from the state `prev` ended with."""
  teacher = state.teacher if nxt.teacher else None
  if nxt.teacher and teacher is None and run.distill.teacher:
    teacher, _ = export.load_dense(run.distill.teacher, p_next.shardings.teacher)
  elif nxt.teacher and teacher is None:
    # idea: the enlarged model at t_s; naive: the final enlarged model. A copy: the state is
    # donated each step, and one buffer cannot be donated as both params and teacher.
    teacher = jax.tree.map(jnp.copy, state.params)
  params, opt_state = state.params, state.opt_state
  if isinstance(opt_state, PruneState):  # the window ended: keep the dense optimizer's state
    masks, opt_state = opt_state.masks, opt_state.inner
  else:
    masks = None
  if prev.model != nxt.model:
    if masks is None:
      masks = _oneshot_masks(ctx, run, state, prev.model)
    masks = _host(masks)
    structure = prune_structure(run, prev.model)
    params = masks_lib.shrink(params, masks, structure)
    opt_state = masks_lib.shrink(opt_state, masks, structure)
  if nxt.fresh_optimizer:
    opt_state = p_next.inner.init(params)
  if nxt.prune:
    # prune_optimizer's init state around the carried (or fresh) AdamW state; the schedule
    # counts global steps.
    masks = masks_lib.init(params, prune_structure(run, nxt.model))
    # A copy of the step: one buffer cannot be donated twice (as step and count).
    opt_state = PruneState(count=jnp.copy(state.step), masks=masks,
                           importance=importance.init(masks, run.prune.score), inner=opt_state)
  new = state_lib.TrainState(step=state.step, params=params, opt_state=opt_state,
                             teacher=teacher)
  return jax.device_put(new, p_next.shardings)


def _save_importance(workdir, tag, state, run: RunConfig, model_cfg: ModelConfig):
  scores = importance.scores(state.importance, run.prune.score, params=state.params,
                             structure=prune_structure(run, model_cfg))
  scores, masks = _host(scores), _host(state.masks)
  if jax.process_index() == 0:
    name, buf = next(iter(scores)), io.BytesIO()
    np.savez(buf, scores=scores[name], mask=masks[name])
    storage.write_bytes(storage.join(workdir, 'importance', f'{tag}.npz'), buf.getvalue())


def run_pipeline(run: RunConfig, workdir: str) -> dict:
  """Runs (or resumes) run.pipeline to the end; returns the final state, model and figures."""
  t0 = time.time()
  teacher_config(run)  # a bad distill.teacher fails here, before any compute
  ctx = loop.setup(run, workdir)
  # With prune.target_params the shape is chosen where pruning starts (`choose_shape`); until
  # then the plan's enlarged phase, which does not depend on it, runs.
  resolved = chosen_run(run, workdir)
  run = resolved or run
  phases, names = plan(run), [ph.name for ph in plan(run)]
  base_cfg = run.model
  digest = ctx.data.manifest['tokenizer_digest']
  meta = {'model': loop.model_meta(base_cfg), 'pipeline': run.pipeline,
          'plan': plan_fields(run), 'tokenizer_digest': digest}

  def abstract_for(saved):
    if saved.get('pipeline') != run.pipeline or saved.get('phase') not in names:
      raise ConfigError(f'config.pipeline={run.pipeline!r}: workdir {workdir} holds a '
                        f'checkpoint of pipeline {saved.get("pipeline")!r}; use a fresh --workdir')
    loop.check_same_plan(saved, meta['plan'], workdir)
    if saved.get('tokenizer_digest', digest) != digest:
      raise ConfigError(f'config.data.prepared_dir={ctx.data.prepared_dir!r}: its tokenizer '
                        f'(digest {digest}) is not the one the checkpoint in {workdir} was '
                        f'trained with ({saved["tokenizer_digest"]}); resume with the same data')
    p = parts(run, phases[names.index(saved['phase'])], ctx.mesh)
    return ckpt_lib.abstract_like(jax.eval_shape(p.init_fn, jax.random.key(0)), p.shardings)

  try:
    state, p, result, phases = _run_phases(ctx, run, phases, abstract_for, base_cfg, meta,
                                           choose=resolved is None)
  finally:
    # Every started save committed before the process moves on (or exits, when preempted).
    loop.finish_saves(ctx)
    # One row per attempt (also a preempted one): where its wall time went.
    ctx.writer.write(ctx.ckpt.latest_step() or 0, ctx.clock.summary())
    ctx.writer.close()
    ctx.data.train.close()
  return {'state': state, 'model_cfg': p.model_cfg, 'ctx': ctx, 'phases': phases,
          'wall_s': time.time() - t0, **result}


def _run_phases(ctx, run: RunConfig, phases, abstract_for, base_cfg, meta, choose: bool):
  names = [ph.name for ph in phases]
  restored = loop.restore_latest(ctx, abstract_for, base_cfg)
  if restored is None:
    index = 0
    p = parts(run, phases[0], ctx.mesh)
    state = jax.jit(p.init_fn, out_shardings=p.shardings)(jax.random.key(run.seed))
  else:
    state, saved = restored
    index = names.index(saved['phase'])
    p = parts(run, phases[index], ctx.mesh)
  for i in range(index, len(phases)):
    phase = phases[i]
    if i > index:
      if choose and i == 1:
        run = with_shape(run, choose_shape(ctx, run, state.params)['chosen'])
        phases = plan(run)
        phase = phases[i]
      p_next = parts(run, phase, ctx.mesh)
      state, p = transition(ctx, run, phases[i - 1], phase, state, p_next), p_next
    if int(state.step) >= phase.end:
      continue
    fn = step_fn(run, phase, p, ctx.mesh)
    eval_fn = step_lib.jit_eval(p.model, p.shardings.params, ctx.mesh)
    kwargs = dict(phase=phase.name, eval_fn=eval_fn, meta=meta,
                  flops_per_step=step_flops(run, phase, teacher_config(run)))
    if phase.prune and int(state.step) == phase.start:
      # One step in, so the t_start histogram shows real sensitivities rather than zeros.
      state = loop.run_steps(ctx, state, fn, phase.start + 1, **kwargs)
      _save_importance(ctx.workdir, 't_start', state, run, phase.model)
    state = loop.run_steps(ctx, state, fn, phase.end, **kwargs)
    if phase.prune:
      _save_importance(ctx.workdir, 't_end', state, run, phase.model)
  with ctx.clock.timing('eval'):
    result = loop.evaluate(ctx, step_lib.jit_eval(p.model, p.shardings.params, ctx.mesh),
                           state.params)
  return state, p, result, phases


def train_dense(run: RunConfig, workdir: str) -> dict:
  """Dense pretraining of run.model for train.steps; resumes from workdir's latest checkpoint."""
  out = run_pipeline(dataclasses.replace(run, pipeline='train'), workdir)
  return {'steps': int(out['state'].step), 'params': model_lib.param_count(out['model_cfg']),
          'val_loss': out['val_loss'], 'val_ppl': out['val_ppl']}
