"""Training: loss falls on the corpus, exact resume, sharded == single device, bad input."""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import run_config, validate
from idea_prune_jax import settings
from idea_prune_jax.train import pipeline


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _final_params(workdir, step):
  ckpt = ocp.StandardCheckpointer()
  return ckpt.restore(os.path.join(os.path.abspath(workdir), 'checkpoints', str(step), 'state'))


def test_loss_falls_on_the_corpus(tiny_config, tmp_path):
  tiny_config.train.update(steps=40, eval_every=40, ckpt_every=40, lr=3e-3)
  result = pipeline.train_dense(run_config(tiny_config), str(tmp_path))
  train_losses = [m['loss'] for m in _metrics(tmp_path) if 'loss' in m]
  assert np.mean(train_losses[-5:]) < train_losses[0] - 1.0
  assert result['val_loss'] < train_losses[0] - 0.6  # held-out plays: 0.70 below at 40 steps


def test_resume_equals_uninterrupted_bit_for_bit(tiny_config, tmp_path):
  full, resumed = str(tmp_path / 'full'), str(tmp_path / 'resumed')
  pipeline.train_dense(run_config(tiny_config), full)
  pipeline.train_dense(run_config(tiny_config), resumed)
  # Lose the final checkpoint: the restart resumes at step 6 and redoes 6..12.
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '12'))
  result = pipeline.train_dense(run_config(tiny_config), resumed)
  assert result['steps'] == 12
  a, b = _final_params(full, 12), _final_params(resumed, 12)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  losses = lambda w: [m['loss'] for m in _metrics(w) if m.get('step', 0) >= 6 and 'loss' in m]
  assert losses(full) == losses(resumed)[-len(losses(full)):]


@pytest.mark.parametrize('override, field', [
    ({'model.d_model': 30}, 'model.d_model'),
    ({'model.d_model': 30, 'model.head_dim': 7}, 'model.head_dim'),  # explicit: d_model free
    ({'model.n_kv_heads': 4, 'model.n_heads': 6, 'model.d_model': 48}, 'model.n_heads'),
    ({'mesh.data': 3}, 'mesh'),
    ({'train.batch_size': 7, 'mesh.data': 2, 'mesh.fsdp': 1}, None),
    ({'pipeline': 'bogus'}, 'pipeline'),
    ({'train.warmup_steps': 100}, 'train.warmup_steps'),
    ({'train.keep_steps': '6,x'}, 'train.keep_steps'),
    ({'train.keep_steps': '0'}, 'train.keep_steps'),
])
def test_bad_config_is_one_clear_line(tiny_config, override, field):
  for k, v in override.items():
    section, _, name = k.rpartition('.')
    (tiny_config[section] if section else tiny_config)[name] = v
  n_devices = 2 if 'train.batch_size' in override else 1
  with pytest.raises(settings.ConfigError) as e:
    validate(tiny_config, n_devices)
  msg = str(e.value)
  assert '\n' not in msg
  assert msg.startswith(f'config.{field or "train.batch_size"}=')


def test_workdir_with_a_different_model_is_refused(tiny_config, tmp_path):
  pipeline.train_dense(run_config(tiny_config), str(tmp_path))
  tiny_config.model.d_model = 64
  with pytest.raises(settings.ConfigError, match='config.model.d_model=64: workdir .* different'):
    pipeline.train_dense(run_config(tiny_config), str(tmp_path))
