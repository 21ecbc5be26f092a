"""Fault tolerance: exact resume anywhere, SIGTERM, unreadable checkpoints, non-finite loss."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, checkpoint_state as _state, logged_losses as _losses, run_config
from idea_prune_jax import settings
from idea_prune_jax.train import loop, pipeline


def _config(name):
  config = settings.load(os.path.join(ROOT, 'configs/tiny.py:test'))
  config.pipeline = name
  config.train.update(ckpt_every=1, keep_ckpts=100)
  config.prune.every = 2  # idea window [6, 8]: refreshes at 6 and 8
  config.naive.update(prune='iterative', window=0.25)  # naive window [6, 9]
  return config


@pytest.fixture(scope='module')
def full_runs(tmp_path_factory):
  """One uninterrupted run per pipeline, a checkpoint at every step."""
  runs = {}
  for name in ('idea', 'naive', 'scratch'):
    workdir = str(tmp_path_factory.mktemp(name))
    pipeline.run_pipeline(run_config(_config(name)), workdir)
    runs[name] = workdir
  return runs


def _drop_after(workdir, step):
  for name in os.listdir(os.path.join(workdir, 'checkpoints')):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(os.path.join(workdir, 'checkpoints', name))


@pytest.mark.parametrize('name, at', [
    ('idea', 3),  # enlarged training
    ('idea', 7),  # inside the window, between the refreshes at 6 and 8
    ('idea', 9),  # the prune phase just ended: the shrink happens on resume
    ('idea', 10),  # recovery, after the shrink
    ('naive', 3), ('naive', 7), ('naive', 10), ('naive', 11),
    ('scratch', 5),
])
def test_resume_anywhere_equals_uninterrupted(full_runs, tmp_path, name, at):
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(full_runs[name], resumed)
  _drop_after(resumed, at)
  with open(os.path.join(resumed, 'metrics.jsonl'), 'w'):
    pass  # only the resumed steps' metrics remain to compare
  pipeline.run_pipeline(run_config(_config(name)), resumed)
  final = _config(name).train.steps
  jax.tree.map(np.testing.assert_array_equal, _state(full_runs[name], final),
               _state(resumed, final))
  full, part = _losses(full_runs[name]), _losses(resumed)
  assert min(part) == at and part == {s: full[s] for s in part}


def test_unreadable_latest_checkpoint_is_skipped(full_runs, tmp_path, caplog):
  workdir = str(tmp_path / 'w')
  shutil.copytree(full_runs['scratch'], workdir)
  _drop_after(workdir, 9)
  ckpts = os.path.join(workdir, 'checkpoints')
  # A write killed half-way leaves orbax's tmp directory: never taken for a checkpoint.
  shutil.copytree(os.path.join(ckpts, '9'), os.path.join(ckpts, '10.orbax-checkpoint-tmp'))
  for root, _, files in os.walk(os.path.join(ckpts, '9', 'state')):
    for f in files:  # truncate the newest complete one
      open(os.path.join(root, f), 'wb').close()
  with caplog.at_level('WARNING'):
    pipeline.run_pipeline(run_config(_config('scratch')), workdir)
  assert any('checkpoints/9' in r.getMessage() and 'unreadable' in r.getMessage()
             for r in caplog.records)
  jax.tree.map(np.testing.assert_array_equal, _state(full_runs['scratch'], 12),
               _state(workdir, 12))


def test_only_checkpoint_unreadable_is_a_clear_error(full_runs, tmp_path):
  workdir = str(tmp_path / 'w')
  shutil.copytree(full_runs['scratch'], workdir)
  _drop_after(workdir, 4)
  for step in range(1, 4):
    shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))
  for root, _, files in os.walk(os.path.join(workdir, 'checkpoints', '4', 'state')):
    for f in files:
      with open(os.path.join(root, f), 'wb') as fh:
        fh.write(b'garbage')
  with pytest.raises(loop.CheckpointError, match=r'no readable checkpoint .*checkpoints/4'):
    pipeline.run_pipeline(run_config(_config('scratch')), workdir)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  config = _config('scratch')
  config.train.ckpt_every = 2
  ctx = loop.setup(run_config(config), str(tmp_path))

  class State:
    def __init__(self, step):
      self.step = step

  def step_fn(state, batch):
    del batch
    loss = np.nan if state.step == 3 else 1.0
    return State(state.step + 1), {'loss': np.float32(loss)}

  saved = []
  monkeypatch.setattr(loop, 'save', lambda ctx, state, meta: saved.append(state.step))
  with pytest.raises(loop.NonFiniteLoss, match='loss is nan at step 3'):
    loop.run_steps(ctx, State(0), step_fn, 12, phase='scratch', eval_fn=None, meta={})
  assert saved == [2]  # step 4's checkpoint would hold the broken state: never written
  info = json.load(open(tmp_path / 'nonfinite.json'))
  # The position is that of step 3's batch: a fresh iterator after three batches is there.
  fresh = loop.setup(run_config(config), str(tmp_path)).data.train
  for _ in range(3):
    next(fresh)
  assert info['step'] == 3 and info['data_position'] == json.loads(fresh.get_state())


def _sigterm_once_logging(cmd, workdir, **popen):
  """Starts cmd, sends SIGTERM once it has logged a step; (return code, stderr, checkpoint steps)."""
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=ROOT, **popen)
  try:
    metrics = os.path.join(workdir, 'metrics.jsonl')
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics)):
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  steps = [int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit()]
  return proc.returncode, err, steps


def test_sigterm_saves_exits_zero_and_resumes(tmp_path):
  workdir = str(tmp_path / 'w')
  cmd = [sys.executable, '-m', 'idea_prune_jax.main', 'train', '--config',
         os.path.join(ROOT, 'configs/tiny.py:test'), '--workdir', workdir,
         '--config.train.steps=400', '--config.train.ckpt_every=1000',
         '--config.train.eval_every=1000']
  code, err, steps = _sigterm_once_logging(cmd, workdir)
  assert code == 0, err[-3000:]
  assert len(steps) == 1 and 0 < steps[0] < 400
  assert 'SIGTERM: saved step' in err
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout.strip().splitlines()[-1])['steps'] == 400
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = [json.loads(line)['step'] for line in f if '"loss"' in line]
  assert logged.count(0) == 1 and logged.count(399) == 1  # resumed, not restarted
  # stderr is a pipe here, as in pod and CI logs: plain lines, no progress-bar carriage returns
  assert '\r' not in out.stderr
  assert re.search(r'^\w+ step 400/400 loss \d+\.\d{4} tok/s \d+ step_s \d+\.\d{3} '
                   r'TFLOP/s/device \S+ MFU \d+\.\d%$', out.stderr, re.M), out.stderr


def test_sigterm_under_jax_distributed_stops_at_the_preemption_sync_point(tmp_path):
  """One process under jax.distributed: JAX's preemption notifier takes the SIGTERM (it replaces
  the entry point's handler) and `reached_preemption_sync_point` stops the loop."""
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  workdir = str(tmp_path / 'w')
  env = dict(os.environ, IDEA_PRUNE_DISTRIBUTED='1', IDEA_PRUNE_COORDINATOR=f'127.0.0.1:{port}',
             IDEA_PRUNE_NUM_PROCESSES='1', IDEA_PRUNE_PROCESS_ID='0', JAX_PLATFORMS='cpu')
  code, err, steps = _sigterm_once_logging(
      [sys.executable, '-m', 'idea_prune_jax.main', 'train', '--config',
       os.path.join(ROOT, 'configs/tiny.py:test'), '--workdir', workdir,
       '--config.train.steps=2000', '--config.train.ckpt_every=5000',
       '--config.train.eval_every=5000'], workdir, env=env)
  assert code == 0, err[-3000:]
  assert len(steps) == 1 and 0 < steps[0] < 2000
  assert f'SIGTERM: saved step {steps[0]}' in err


def test_resume_with_data_of_another_tokenizer_is_refused(full_runs, tmp_path):
  from idea_prune_jax.data import prepare
  workdir = str(tmp_path / 'copy')
  shutil.copytree(full_runs['scratch'], workdir)
  other = str(tmp_path / 'other')
  prepare.prepare('embedded:sonnets', other, vocab_size=512, val_input='embedded:tempest',
                  progress=False)
  config = _config('scratch')
  config.data.update(source='prepared', prepared_dir=other)
  with pytest.raises(settings.ConfigError,
                     match=r"^config.data.prepared_dir='.*other': its tokenizer \(digest"):
    pipeline.run_pipeline(run_config(config), workdir)
