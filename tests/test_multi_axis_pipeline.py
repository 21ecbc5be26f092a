"""Every axis (widths and depth) pruned inside one run: idea and naive to an explicit target
shape, exact resume mid-window and after the shrink, the export, one-line errors for bad
targets."""

import functools
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT, checkpoint_state, logged_losses, run_config, validate
from idea_prune_jax import masks, prune_optimizer, schedules, settings, structure
from idea_prune_jax.data import batch as batch_lib
from idea_prune_jax.experiments import experiment
from idea_prune_jax.io import export
from idea_prune_jax.model.config import ModelConfig
from idea_prune_jax.model.model import Transformer, init_params
from idea_prune_jax.model import model as model_lib
from idea_prune_jax.train import budget, pipeline
from idea_prune_jax.train import step as step_lib
from idea_prune_jax.train.config import ConfigError
from idea_prune_jax.train.targets import target_model
from idea_prune_jax.train.state import TrainState

# tiny:test is d_model 32, 4 query heads in 2 KV groups (head_dim 8), FFN 96 -> 32, 2 layers.
TARGET = dict(target_kv_heads=1, target_heads_per_group=1, target_d_model=16, target_layers=1)


def _config(name='idea'):
  config = settings.load(os.path.join(ROOT, 'configs/tiny.py:test'))
  config.pipeline = name
  config.prune.update(every=2, **TARGET)  # idea window [6, 8]: refreshes at 6 and 8
  config.train.update(ckpt_every=1, keep_ckpts=100)
  config.distill.alpha = 0.1  # the student distils from the enlarged model while it shrinks
  return config


@pytest.fixture(scope='module')
def idea_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('multi'))
  summary = experiment.run_experiment(run_config(_config()), workdir)
  return workdir, summary


def _widths(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {k: {r['step']: r[k] for r in rows if k in r}
          for k in ('ffn_width', 'kv_groups_width', 'heads_width', 'hidden_width', 'layers_width',
                    'kd_alpha')}


def test_idea_reaches_the_target_shape_on_every_axis(idea_run):
  workdir, summary = idea_run
  widths = _widths(workdir)
  for unit, want in (('ffn_width', 32), ('kv_groups_width', 1), ('heads_width', 1),
                     ('hidden_width', 16), ('layers_width', 1)):
    series = list(widths[unit].values())
    assert series[-1] == want and all(b <= a for a, b in zip(series, series[1:])), unit
  assert min(widths['kd_alpha']) == 6  # KD from t_start, through the window and the recovery
  params = checkpoint_state(workdir, 12)['params']
  assert params['embed'].shape == (512, 16)
  assert params['layers']['attn']['q'].shape == (1, 16, 8)  # 1 group x 1 head x head_dim 8
  assert params['layers']['attn']['k'].shape == (1, 16, 8)
  assert params['layers']['mlp']['down'].shape == (1, 32, 16)
  assert params['layers']['attn_norm']['scale'].shape == (1, 16)
  assert np.isfinite(summary['val_loss']) and summary['distill_alpha'] == 0.1
  loaded, cfg = export.load_dense(os.path.join(workdir, 'export'))
  assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.n_layers) == (
      16, 1, 1, 8, 32, 1)


@pytest.mark.parametrize('at', [7, 9])  # between the refreshes at 6 and 8; just before the shrink
def test_resume_equals_uninterrupted(idea_run, tmp_path, at):
  workdir, _ = idea_run
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  for name in os.listdir(os.path.join(resumed, 'checkpoints')):
    if name.isdigit() and int(name) > at:
      shutil.rmtree(os.path.join(resumed, 'checkpoints', name))
  with open(os.path.join(resumed, 'metrics.jsonl'), 'w'):
    pass
  pipeline.run_pipeline(run_config(_config()), resumed)
  jax.tree.map(np.testing.assert_array_equal, checkpoint_state(workdir, 12),
               checkpoint_state(resumed, 12))
  full, part = logged_losses(workdir), logged_losses(resumed)
  assert min(part) == at and part == {s: full[s] for s in part}


def test_naive_oneshot_prunes_every_axis(tmp_path):
  config = _config('naive')
  out = pipeline.run_pipeline(run_config(config), str(tmp_path))
  assert out['model_cfg'] == target_model(run_config(config))
  assert out['state'].params['layers']['attn']['o'].shape == (1, 8, 16)
  assert np.isfinite(out['val_loss'])


@pytest.mark.parametrize('field, value, message', [
    ('target_kv_heads', 3, r'config.prune.target_kv_heads=3: must be 0 \(not pruned\) or an '
                           r'integer in \[1, 2\] of the enlarged model'),
    ('target_d_model', 12, 'config.prune.target_d_model=12: not a multiple of prune.round_to=8'),
    ('target_layers', 3, r'config.prune.target_layers=3: must be 0 \(not pruned\) or an integer '
                         r'in \[1, 2\] of the enlarged model'),
])
def test_bad_targets_are_one_line_errors(field, value, message):
  config = _config()
  config.prune.round_to = 8
  config.prune[field] = value
  with pytest.raises(ConfigError, match=message):
    validate(config, 1)


def test_a_target_the_tensor_axis_cannot_split_is_refused():
  config = _config()
  config.mesh.update(data=1, fsdp=4, tensor=2)
  config.prune.target_ffn = 32
  with pytest.raises(ConfigError, match='config.prune.target_kv_heads=1: the target has 1 KV '
                                        'heads, 1 query heads: both must divide by the '
                                        'tensor-parallel degree 2'):
    validate(config, 8)


def test_the_train_and_eval_steps_see_a_masked_hidden_size_as_the_shrunk_model():
  """While d_model is masked the steps pass the alive channel count to the model's RMSNorm
  (`TrainState.hidden_kept`): loss and eval equal the shrunk model's on the same batch."""
  cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=12)
  s = structure.llama(n_kv_heads=2, heads_per_group=2, head_dim=4)
  params = nn.unbox(init_params(cfg, jax.random.key(0)))
  ones = masks.init(params, s)
  scores = {n: jax.random.uniform(jax.random.key(i), m.shape) for i, (n, m) in enumerate(
      ones.items())}
  unit_masks = masks.refresh(ones, scores, {'ffn': 5, 'kv_groups': 1, 'heads': 1, 'hidden': 10,
                                            'layers': 1})
  later = {n: schedules.PruneSchedule(100, 101, 1, m.shape[-1], 1) for n, m in ones.items()}
  lr = optax.constant_schedule(0.0)
  tx = prune_optimizer(optax.chain(optax.scale_by_schedule(lr)), s, later)
  masked = masks.apply(params, unit_masks, s)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=masked,
                     opt_state=tx.init(masked)._replace(masks=unit_masks))
  tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, 32)
  batch = batch_lib.make(tokens[:, :-1], tokens[:, 1:], jnp.ones((2, 8)))
  # Jitted: eagerly, the step's thousands of small ops cost 20 s of dispatch.
  step = lambda st, model, opt: jax.jit(functools.partial(  # noqa: E731
      step_lib.train_step, model=model, optimizer=opt, schedule=lr))(st, batch)[1]
  got = step(state, Transformer(cfg), tx)
  small_params, small_cfg = masks.shrink_model(params, unit_masks, s, cfg)
  dense = optax.chain(optax.scale_by_schedule(lr))
  small = TrainState(step=jnp.zeros((), jnp.int32), params=small_params,
                     opt_state=dense.init(small_params))
  want = step(small, Transformer(small_cfg), dense)
  np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-6)
  assert got['hidden_width'] == 10 and got['heads_width'] == 1 and got['layers_width'] == 1
  evaluate = lambda model, params, kept=None: jax.jit(functools.partial(  # noqa: E731
      step_lib.eval_step, model=model))(params, batch, kept)
  np.testing.assert_allclose(evaluate(Transformer(cfg), masked, state.hidden_kept),
                             evaluate(Transformer(small_cfg), small_params), rtol=1e-6)


@pytest.mark.parametrize('criterion', ['importance', 'lookahead'])
def test_a_parameter_budget_is_reached_and_the_choice_recorded(tmp_path, criterion):
  config = _config()
  for f in TARGET:
    config.prune[f] = 0
  enlarged = model_lib.param_count(run_config(config).model)
  config.prune.update(target_params=int(enlarged * 0.55), budget=criterion, budget_batches=2,
                      tolerance=0.02)
  if criterion == 'importance':  # depth among the axes the budget may narrow
    config.prune.units = 'ffn,kv_groups,heads,hidden,layers'
  summary = experiment.run_experiment(run_config(config), str(tmp_path), do_export=False)
  final = summary['shape_final']
  assert abs(final['params'] - config.prune.target_params) <= 0.02 * config.prune.target_params
  assert summary['budget']['chosen'] == final and summary['budget']['criterion'] == criterion
  why, other = summary['budget']['chosen_figures'], summary['budget']['runner_up']
  if criterion == 'lookahead':
    assert why['lookahead_loss'] <= other['lookahead_loss']
  else:
    assert why['retained_importance'] >= other['retained_importance']
  with open(tmp_path / 'budget.json') as f:
    record = json.load(f)
  assert sum(row['chosen'] for row in record['candidates']) == 1
  assert (criterion == 'lookahead') == any('lookahead_loss' in r for r in record['candidates'])
  # A resumed run reads the choice back instead of choosing again.
  resumed = pipeline.run_pipeline(run_config(config), str(tmp_path))
  assert budget.shape_dict(resumed['model_cfg']) == final


def test_compare_with_a_parameter_budget_asks_for_an_explicit_shape(tmp_path):
  config = _config()
  config.prune.target_params = 30000
  cmp = settings.read(config).compare
  with pytest.raises(ConfigError, match='config.prune.target_params=30000: compare trains every '
                                        'pipeline to one shape; set prune.target_'):
    experiment.compare(run_config(config), cmp, str(tmp_path))


def test_scratch_with_a_parameter_budget_is_refused():
  config = _config('scratch')
  config.prune.target_params = 30000
  with pytest.raises(ConfigError, match='config.prune.target_params=30000: scratch trains a '
                                        'given shape'):
    run_config(config)


def test_a_budget_json_from_before_depth_keeps_every_layer():
  run = run_config(_config())
  chosen = {'ffn_dim': 32, 'n_kv_heads': 1, 'heads_per_group': 1, 'd_model': 16}
  assert target_model(pipeline.with_shape(run, chosen)).n_layers == 2
  assert target_model(pipeline.with_shape(run, {**chosen, 'n_layers': 1})).n_layers == 1
