"""Pipelines end to end on the tiny test config: LR continuity, shrink, export, resume."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, run_config
from idea_prune_jax.data import batch as batch_lib
from idea_prune_jax.experiments import experiment
from idea_prune_jax.io import export
from idea_prune_jax import importance, masks as masks_lib
from idea_prune_jax.train import pipeline
from idea_prune_jax.train import plan as plan_lib
from idea_prune_jax.model import model as model_lib
from idea_prune_jax.train import sharding as sharding_lib
from idea_prune_jax.train import optim
from idea_prune_jax.prune.structure import FFN_STRUCTURE


def _rows(workdir, key):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r[key] for r in rows if key in r}


def _ckpt_state(workdir, step):
  path = os.path.join(os.path.abspath(workdir), 'checkpoints', str(step), 'state')
  return ocp.StandardCheckpointer().restore(path)


@pytest.fixture(scope='module')
def idea_run(tmp_path_factory):
  """One idea run of the tiny test config, every checkpoint kept, exported."""
  from conftest import ROOT
  from idea_prune_jax import settings
  config = settings.load(os.path.join(ROOT, 'configs/tiny.py:test'))
  config.train.keep_ckpts = 20
  workdir = str(tmp_path_factory.mktemp('idea'))
  return config, workdir, experiment.run_experiment(run_config(config), workdir)


def test_idea_plan_is_one_cosine_and_never_rewarms(idea_run):
  config, workdir, summary = idea_run
  lr = _rows(workdir, 'lr')
  steps = sorted(lr)
  assert steps == list(range(config.train.steps))  # log_every=1 in the test config
  after_warmup = [lr[s] for s in steps if s >= config.train.warmup_steps - 1]
  assert all(b <= a + 1e-9 for a, b in zip(after_warmup, after_warmup[1:]))
  assert [p['name'] for p in summary['phases']] == ['enlarged', 'prune', 'recovery']
  assert summary['ffn_final'] == config.prune.target_ffn


def test_idea_masks_reach_target_and_shrink_happens_once(idea_run):
  config, workdir, _ = idea_run
  width = _rows(workdir, 'ffn_width')
  phases = _rows(workdir, 'phase')
  assert set(phases.values()) == {'enlarged', 'prune', 'recovery'}
  assert width[max(width)] == config.prune.target_ffn
  assert all(b <= a for a, b in zip(list(width.values()), list(width.values())[1:]))
  final = _ckpt_state(workdir, config.train.steps)
  assert final['params']['layers']['mlp']['gate'].shape[-1] == config.prune.target_ffn
  assert len(final['opt_state']) == 2  # the dense (clip, AdamW) chain: no PruneState after it


def test_export_reloads_with_the_same_logits(idea_run):
  config, workdir, summary = idea_run
  params, model_cfg = export.load_dense(summary['export_dir'])
  final = _ckpt_state(workdir, config.train.steps)['params']
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), final)
  tokens = jnp.arange(16)[None] % model_cfg.vocab_size
  np.testing.assert_allclose(model_lib.Transformer(model_cfg).apply({'params': params}, tokens),
                             model_lib.Transformer(model_cfg).apply({'params': final}, tokens),
                             atol=1e-6)
  for name in ('report.json', 'report.md', 'loss.png', 'lr.png', 'ffn_width.png',
               'importance.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  report = json.load(open(os.path.join(workdir, 'report.json')))
  for key in ('pipeline', 'params_enlarged', 'params_final', 'ffn_enlarged', 'ffn_final',
              'tokens', 'steps', 'val_loss', 'val_ppl', 'wall_s', 'export_dir'):
    assert key in report, key


def test_naive_rewarms_and_scratch_does_not(tiny_config, tmp_path):
  for name in ('naive', 'scratch'):
    tiny_config.pipeline = name
    workdir = str(tmp_path / name)
    pipeline.run_pipeline(run_config(tiny_config), workdir)
    lr = _rows(workdir, 'lr')
    if name == 'naive':
      split = int(round(tiny_config.naive.split * tiny_config.train.steps))
      assert lr[split] > lr[split - 1]  # the recovery re-warms: the LR rises again
      assert _rows(workdir, 'phase')[split] == 'recovery'
      assert _ckpt_state(workdir, 12)['params']['layers']['mlp']['up'].shape[-1] == 32
    else:
      after = [lr[s] for s in sorted(lr) if s >= tiny_config.train.warmup_steps - 1]
      assert all(b <= a + 1e-9 for a, b in zip(after, after[1:]))


def test_shrink_at_t_end_keeps_logits_and_slices_optimizer_state(tiny_config):
  phases = plan_lib.plan(run_config(tiny_config))
  prune, recovery = phases[1], phases[2]
  mesh = sharding_lib.make_mesh(run_config(tiny_config).mesh)
  p_prune = pipeline.parts(run_config(tiny_config), prune, mesh)
  p_rec = pipeline.parts(run_config(tiny_config), recovery, mesh)
  state = p_prune.init_fn(jax.random.key(0))
  scores = {'ffn': jax.random.uniform(jax.random.key(1), state.masks['ffn'].shape)}
  masks = masks_lib.refresh(state.masks, scores, tiny_config.prune.target_ffn)
  params = masks_lib.apply(state.params, masks, FFN_STRUCTURE)
  # Non-trivial moments, so slicing them is observable.
  inner = jax.tree.map(lambda x: x + 1.0 if x.ndim else x, state.opt_state.inner)
  state = state.replace(params=params, opt_state=state.opt_state._replace(masks=masks, inner=inner))
  new = pipeline.transition(None, tiny_config, prune, recovery, state, p_rec)
  tokens = jnp.arange(24)[None] % tiny_config.model.vocab_size
  np.testing.assert_allclose(p_rec.model.apply({'params': new.params}, tokens),
                             p_prune.model.apply({'params': params}, tokens), atol=1e-5)
  keep = np.stack([np.flatnonzero(row) for row in np.asarray(masks['ffn'])])
  mu_old = state.opt_state.inner[1][0].mu['layers']['mlp']
  mu_new = new.opt_state[1][0].mu['layers']['mlp']
  np.testing.assert_array_equal(mu_new['gate'],
                                np.take_along_axis(np.asarray(mu_old['gate']), keep[:, None], -1))
  np.testing.assert_array_equal(mu_new['down'],
                                np.take_along_axis(np.asarray(mu_old['down']), keep[:, :, None], 1))
  assert new.masks is None and new.importance is None
  assert int(new.opt_state[1][0].count) == int(state.opt_state.inner[1][0].count)  # never reset


def test_idea_with_kd_logs_both_terms_and_the_teacher(tiny_config, tmp_path):
  # α and τ scheduled over the distilling steps (t_s to T): the loss mixes the values logged.
  tiny_config.distill.update(alpha=0.9, alpha_end=0.5, alpha_schedule='cosine', tau=1.0,
                             tau_end=2.0, tau_schedule='linear', phases='both', chunk=16)
  workdir = str(tmp_path / 'kd')
  pipeline.run_pipeline(run_config(tiny_config), workdir)
  kl, teacher_ce, ce = _rows(workdir, 'kl'), _rows(workdir, 'teacher_ce'), _rows(workdir, 'ce')
  phases = _rows(workdir, 'phase')
  assert {phases[s] for s in kl} == {'prune', 'recovery'}  # KD in the window and recovery only
  assert set(teacher_ce) == set(ce) == set(kl)
  t_s = min(kl)
  assert abs(kl[t_s]) < 1e-6  # at t_s the student is the teacher it was snapshotted from
  assert all(kl[s] > 0 for s in kl if s > t_s)
  alpha, tau, loss = _rows(workdir, 'kd_alpha'), _rows(workdir, 'kd_tau'), _rows(workdir, 'loss')
  steps = sorted(kl)
  span = tiny_config.train.steps - t_s
  for s in steps:
    p = (s - t_s) / span
    assert alpha[s] == pytest.approx(0.5 + 0.4 * 0.5 * (1 + np.cos(np.pi * p)), rel=1e-5)
    assert tau[s] == pytest.approx(1.0 + p, rel=1e-5)
    assert loss[s] == pytest.approx((1 - alpha[s]) * ce[s] + alpha[s] * tau[s]**2 * kl[s],
                                    rel=1e-5)
  # The teacher carried to the end is the enlarged model (full FFN width), not the shrunk student.
  final = _ckpt_state(workdir, tiny_config.train.steps)
  assert final['teacher']['layers']['mlp']['gate'].shape[-1] == tiny_config.model.ffn_dim


def test_teacher_from_any_export(idea_run, tiny_config, tmp_path):
  _, _, summary = idea_run
  tiny_config.distill.update(alpha=0.5, phases='recovery', teacher=summary['export_dir'])
  workdir = str(tmp_path / 'kd_export')
  pipeline.run_pipeline(run_config(tiny_config), workdir)
  teacher = _ckpt_state(workdir, tiny_config.train.steps)['teacher']
  exported, _ = export.load_dense(summary['export_dir'])
  jax.tree.map(np.testing.assert_array_equal, teacher, jax.device_get(exported))
  assert set(_rows(workdir, 'kl')) == {9, 10, 11}  # recovery only
  tiny_config.distill.teacher = str(tmp_path)
  from idea_prune_jax.io.export import ExportError
  with pytest.raises(ExportError, match='not an export'):
    pipeline.run_pipeline(run_config(tiny_config), str(tmp_path / 'bad'))


def test_naive_iterative_stays_inside_the_run_and_reports_the_executed_plan(tiny_config,
                                                                            tmp_path):
  # split 0.5 + window 0.49 of 12 steps: the window must end at the last step, not step 12.
  tiny_config.pipeline = 'naive'
  tiny_config.naive.update(prune='iterative', split=0.5, window=0.49)
  summary = experiment.run_experiment(run_config(tiny_config), str(tmp_path), do_export=False)
  assert summary['steps'] == tiny_config.train.steps == summary['phases'][-1]['end']
  tokens_per_step = tiny_config.train.batch_size * tiny_config.data.seq_len
  report = json.load(open(os.path.join(str(tmp_path), 'report.json')))
  assert report['tokens'] == max(_rows(str(tmp_path), 'tokens_seen').values())
  assert report['tokens'] == tiny_config.train.steps * tokens_per_step
  run = run_config(tiny_config)
  assert report['train_flops'] == plan_lib.train_flops(run, plan_lib.plan(run))
  assert summary['ffn_final'] == tiny_config.prune.target_ffn  # shrunk after the last step


def test_oneshot_scoring_batches_count_in_train_flops(tiny_config):
  tiny_config.pipeline = 'naive'
  phases = plan_lib.plan(run_config(tiny_config))
  enlarged, recovery = phases
  tokens = tiny_config.train.batch_size * tiny_config.data.seq_len
  per_token = lambda ffn: model_lib.flops_per_token(
      dataclasses.replace(run_config(tiny_config).model, ffn_dim=ffn), tiny_config.data.seq_len)
  steps = lambda ph: ph.end - ph.start
  want = tokens * (steps(enlarged) * per_token(96) + steps(recovery) * per_token(32)
                   + tiny_config.naive.score_batches * per_token(96))
  assert plan_lib.train_flops(run_config(tiny_config), phases) == pytest.approx(want, rel=1e-12)


def test_oneshot_scoring_runs_under_the_steps_mesh(tiny_config):
  """Its program carries the model's activation batch sharding, as the train step's does."""
  run = run_config(tiny_config)
  mesh = sharding_lib.make_mesh(run.mesh)
  fn = pipeline.oneshot_score_fn(run, run.model, mesh)
  enlarged = plan_lib.plan(run)[0]
  parts = pipeline.parts(run, enlarged, mesh)
  params = jax.eval_shape(lambda: parts.init_fn(jax.random.key(0)).params)
  scores = importance.init({'ffn': jnp.zeros((2, 96))}, run.prune.score)
  tokens = jax.ShapeDtypeStruct((8, 32), jnp.int32)
  batch = batch_lib.make(tokens, tokens, jax.ShapeDtypeStruct((8, 32), jnp.float32))
  text = fn.lower(scores, params, batch).as_text()
  step_text = pipeline.step_fn(run, enlarged, parts, mesh).lower(
      jax.eval_shape(parts.init_fn, jax.random.key(0)), batch).as_text()
  marker = 'sharding_constraint'
  assert marker in step_text  # what the check looks for is in the train step
  assert marker in text


@pytest.mark.parametrize('name', ['idea', 'naive'])
def test_applied_lr_at_phase_boundaries(tiny_config, name):
  """The LR the optimizer applies (its schedule at its own count), not a separately logged one:
  idea carries the count into the window, naive's window restarts it (re-warm)."""
  tiny_config.pipeline = name
  tiny_config.naive.update(prune='iterative', window=0.25)
  run = run_config(tiny_config)
  mesh = sharding_lib.make_mesh(run.mesh)
  enlarged, prune = plan_lib.plan(run)[:2]
  p_enl, p_prune = pipeline.parts(run, enlarged, mesh), pipeline.parts(run, prune, mesh)
  state = p_enl.init_fn(jax.random.key(0))
  state = state.replace(step=jnp.asarray(prune.start), opt_state=jax.tree.map(
      lambda x: jnp.full_like(x, prune.start) if x.dtype == jnp.int32 else x, state.opt_state))
  new = pipeline.transition(None, run, enlarged, prune, state, p_prune)
  count = int(optim.lr_count(new.opt_state))
  assert count == (prune.start if name == 'idea' else 0)
  x = np.random.RandomState(0).randint(4, 512, (8, 33)).astype(np.int32)
  batch = batch_lib.from_rows(x)
  before = jax.tree.map(np.asarray, new.params)
  step = pipeline.step_fn(run_config(tiny_config), prune, p_prune, mesh)
  after, metrics = step(new, batch)
  lr = float(p_prune.schedule(count))
  assert float(metrics['lr']) == pytest.approx(lr)
  assert int(optim.lr_count(after.opt_state)) == count + 1
  # AdamW's first step moves an un-decayed param (a norm scale) by lr·m̂/(√v̂+ε) ≈ lr·sign(g).
  if name == 'naive':
    moved = np.abs(np.asarray(after.params['final_norm']['scale']) - before['final_norm']['scale'])
    np.testing.assert_allclose(moved.max(), lr, rtol=1e-3)


@pytest.mark.parametrize('field, value', [('prune.t_end', 0.6), ('train.steps', 16),
                                          ('prune.schedule', 'linear')])
def test_resume_under_another_plan_is_refused_naming_the_field(idea_run, tmp_path, field, value):
  import shutil
  from idea_prune_jax import settings
  config, workdir, _ = idea_run
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  changed = settings.load(os.path.join(ROOT, 'configs/tiny.py:test'))
  changed.train.keep_ckpts = config.train.keep_ckpts
  group, name = field.split('.')
  old, changed[group][name] = changed[group][name], value
  with pytest.raises(settings.ConfigError,
                     match=rf"^config\.{field}={value!r}: workdir {copy} holds a checkpoint of a "
                           rf"different plan \({field}={old!r}\)") as e:
    pipeline.run_pipeline(run_config(changed), copy)
  assert '\n' not in str(e.value)
