"""Checkpoints under faults: a flaky bucket at resume, wall-time saves, a save killed mid-write."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import (ROOT, checkpoint_state as _state, logged_losses as _losses, run_config,
                      validate)
from idea_prune_jax.io import checkpoint as ckpt_lib
from idea_prune_jax import settings
from idea_prune_jax.train import loop, pipeline

KILL_WORKER = os.path.join(ROOT, 'tests', 'ckpt_kill_worker.py')


def _config(**train):
  config = settings.load(os.path.join(ROOT, 'configs/tiny.py:test'))
  config.pipeline = 'scratch'
  config.train.update({'ckpt_every': 2, 'keep_ckpts': 100, **train})
  return config


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


@pytest.fixture(scope='module')
def full_run(tmp_path_factory):
  """The uninterrupted scratch run of 12 steps, a checkpoint every 2."""
  workdir = str(tmp_path_factory.mktemp('full'))
  pipeline.run_pipeline(run_config(_config()), workdir)
  return workdir


def _resumable_copy(full_run, tmp_path, at):
  """full_run's workdir as if it had stopped after step `at`'s checkpoint."""
  workdir = str(tmp_path / 'w')
  shutil.copytree(full_run, workdir)
  for step in _steps(workdir):
    if step > at:
      shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w'):
    pass  # only the resumed steps' metrics remain to compare
  return workdir


def _failing_restore(monkeypatch, errors):
  """CheckpointManager.restore raises errors[0], errors[1], ... then works; returns the calls."""
  calls = []
  real = ocp.CheckpointManager.restore

  def restore(self, step, *args, **kwargs):
    calls.append(step)
    if len(calls) <= len(errors):
      raise errors[len(calls) - 1]
    return real(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'restore', restore)
  monkeypatch.setattr(ckpt_lib, 'RETRY_DELAYS_S', (0.0,) * 5, raising=False)  # no waiting here
  return calls


def test_transient_storage_errors_on_restore_are_retried_not_set_aside(full_run, tmp_path,
                                                                        monkeypatch, caplog):
  workdir = _resumable_copy(full_run, tmp_path, 8)
  # What gcsfs, the network and tensorstore raise while a bucket has a bad minute.
  calls = _failing_restore(monkeypatch, [
      TimeoutError('read timed out'), ConnectionResetError(104, 'Connection reset by peer'),
      ValueError('UNAVAILABLE: Error reading "gs://b/w/checkpoints/8/state/d/1": HTTP response '
                 'code: 503 with body: Service Unavailable')])
  with caplog.at_level('WARNING'):
    pipeline.run_pipeline(run_config(_config()), workdir)
  assert calls[:4] == [8, 8, 8, 8]  # the same checkpoint, read again until it came through
  assert not [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if 'unreadable' in n]
  assert sum('retrying' in r.getMessage() for r in caplog.records) == 3
  assert min(_losses(workdir)) == 8
  jax.tree.map(np.testing.assert_array_equal, _state(full_run, 12), _state(workdir, 12))


def test_storage_down_through_every_retry_stops_without_setting_anything_aside(
    full_run, tmp_path, monkeypatch):
  workdir = _resumable_copy(full_run, tmp_path, 8)
  _failing_restore(monkeypatch, [ConnectionResetError(104, 'Connection reset by peer')] * 1000)
  with pytest.raises(ckpt_lib.StorageUnavailable,
                     match=r'^cannot read checkpoint step 8 .*ConnectionResetError.*; rerun'):
    pipeline.run_pipeline(run_config(_config()), workdir)
  assert _steps(workdir) == [2, 4, 6, 8]
  assert not [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if 'unreadable' in n]


def test_corrupt_checkpoint_is_set_aside_once_and_the_log_names_the_lost_step(full_run, tmp_path,
                                                                              caplog):
  workdir = _resumable_copy(full_run, tmp_path, 8)
  for root, _, files in os.walk(os.path.join(workdir, 'checkpoints', '8', 'state')):
    for f in files:
      with open(os.path.join(root, f), 'wb') as fh:
        fh.write(b'garbage')
  with caplog.at_level('WARNING'):
    pipeline.run_pipeline(run_config(_config()), workdir)
  messages = [r.getMessage() for r in caplog.records]
  assert not [m for m in messages if 'retrying' in m]  # corruption is not worth a retry
  lost = [m for m in messages if m.startswith('lost checkpoint step 8 ')]
  assert len(lost) == 1, messages
  assert 'set aside as' in lost[0] and 'resuming from step 6' in lost[0]
  assert [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if 'unreadable' in n]
  assert min(_losses(workdir)) == 6
  jax.tree.map(np.testing.assert_array_equal, _state(full_run, 12), _state(workdir, 12))


def test_negative_ckpt_minutes_is_a_one_line_error():
  config = _config(ckpt_minutes=-1)
  with pytest.raises(settings.ConfigError, match=r'^config\.train\.ckpt_minutes=-1\.0: must be '
                     r'>= 0[^\n]*$'):
    validate(config, jax.device_count())


class _FakeState:
  def __init__(self, step):
    self.step, self.params, self.hidden_kept = step, None, None


def test_a_clock_of_one_minute_per_step_saves_every_ckpt_minutes_steps(tmp_path, monkeypatch):
  minutes = [0.0]
  config = _config(ckpt_every=1000, eval_every=1000, ckpt_minutes=3)
  ctx = loop.setup(run_config(config), str(tmp_path), wall_clock=lambda: minutes[0] * 60)

  def step_fn(state, batch):
    del batch
    minutes[0] += 1
    return _FakeState(state.step + 1), {'loss': np.float32(1.0)}

  saved = []
  monkeypatch.setattr(loop, 'save', lambda ctx, state, meta: saved.append(state.step))
  eval_fn = lambda *_: (0.0, 1.0)  # noqa: E731  (each call's end evaluates)
  loop.run_steps(ctx, _FakeState(0), step_fn, 8, phase='scratch', eval_fn=eval_fn, meta={})
  loop.run_steps(ctx, _FakeState(8), step_fn, 13, phase='scratch', eval_fn=eval_fn, meta={})
  # 8 and 13 end the two calls (phases); every save, those too, restarts the count.
  assert saved == [3, 6, 8, 11, 13]


def test_saves_by_wall_time_leave_the_losses_unchanged(full_run, tmp_path, monkeypatch):
  calls = [0]

  def clock():  # a minute per reading: wall-time saves come every few steps
    calls[0] += 1
    return 60.0 * calls[0]

  setup = loop.setup
  monkeypatch.setattr(loop, 'setup', lambda config, workdir: setup(config, workdir,
                                                                   wall_clock=clock))
  workdir = str(tmp_path / 'w')
  run = run_config(_config(ckpt_every=1000, ckpt_minutes=2.5))
  pipeline.run_pipeline(run, workdir)
  assert len(_steps(workdir)) >= 3 and set(_steps(workdir)) != {12}, _steps(workdir)
  assert _losses(workdir) == _losses(full_run)
  jax.tree.map(np.testing.assert_array_equal, _state(full_run, 12), _state(workdir, 12))


def test_hosts_with_different_clocks_save_at_the_same_steps():
  """Two processes: process 0's clock decides, every loop.WALL_CHECK_EVERY steps."""
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    coordinator = f'127.0.0.1:{s.getsockname()[1]}'
  env = {k: v for k, v in os.environ.items() if not k.startswith('IDEA_PRUNE_')}
  env.update(JAX_PLATFORMS='cpu')
  worker = os.path.join(ROOT, 'tests', 'clock_agreement_worker.py')
  procs = [subprocess.Popen([sys.executable, worker, coordinator, str(i)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
           for i in range(2)]
  outs = []
  for proc in procs:
    try:
      out, err = proc.communicate(timeout=120)
    finally:
      proc.kill()
    assert proc.returncode == 0, err[-3000:]
    outs.append(json.loads(out.strip().splitlines()[-1]))
  # Process 0's clock: 40 s at step 10, 80 s at 20 (save), 120 s at 30, 160 s at 40 (save).
  assert outs == [[20, 40], [20, 40]]


@pytest.mark.parametrize('async_ckpt', [True, False])
def test_sigterm_save_killed_mid_write_resumes_from_the_previous_checkpoint(full_run, tmp_path,
                                                                           async_ckpt):
  """The grace period ran out: SIGKILL while the SIGTERM's save is being written."""
  workdir = str(tmp_path / 'w')
  started = os.path.join(str(tmp_path), 'save_started')
  log = tmp_path / 'worker.log'
  with open(log, 'w') as err:
    proc = subprocess.Popen([sys.executable, KILL_WORKER, workdir, started, str(int(async_ckpt))],
                            stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
  try:
    deadline = time.time() + 240
    while not os.path.exists(started) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.1)
    assert os.path.exists(started), log.read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    proc.kill()
  ckpts = os.path.join(workdir, 'checkpoints')
  half = [n for n in os.listdir(ckpts) if n.split('.')[0] == '5']
  assert half and os.listdir(os.path.join(ckpts, half[0])), os.listdir(ckpts)  # being written
  assert ckpt_lib.manager(workdir).all_steps() == [4]  # and not taken for a checkpoint
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w'):
    pass
  pipeline.run_pipeline(run_config(_config(ckpt_every=4)), workdir)
  assert not [n for n in os.listdir(ckpts) if 'unreadable' in n]  # nothing needed setting aside
  assert min(_losses(workdir)) == 4
  assert _losses(workdir) == {s: v for s, v in _losses(full_run).items() if s >= 4}
  jax.tree.map(np.testing.assert_array_equal, _state(full_run, 12), _state(workdir, 12))
