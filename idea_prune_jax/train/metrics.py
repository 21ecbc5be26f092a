"""What a run reports while it trains: where its wall time went (`Clock`), metrics.jsonl and
TensorBoard (`MetricsWriter`), each step's throughput and MFU (`StepLog`), profiler traces."""

import contextlib
import json
import math
import os
import shutil
import sys
import time

import jax
import numpy as np
import tqdm
from absl import logging

from idea_prune_jax.data import storage
from idea_prune_jax.train.config import ProfileConfig


class Clock:
  """Where one process's wall time went; goodput is the share spent in training steps."""
  KINDS = ('train', 'compile', 'data', 'eval', 'checkpoint', 'restore')

  def __init__(self):
    self.start = time.perf_counter()
    self.seconds = dict.fromkeys(self.KINDS, 0.0)

  @contextlib.contextmanager
  def timing(self, kind: str):
    t = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[kind] += time.perf_counter() - t

  def summary(self) -> dict:
    """{'goodput', 'wall_s', '<kind>_s', 'other_s'} (other: setup, data prep, export, ...)."""
    wall = time.perf_counter() - self.start
    out = {f'{k}_s': round(v, 3) for k, v in self.seconds.items()}
    out['other_s'] = round(wall - sum(self.seconds.values()), 3)
    return {'goodput': round(self.seconds['train'] / max(wall, 1e-9), 4), 'wall_s': round(wall, 3),
            **out}


class MetricsWriter:
  """metrics.jsonl plus TensorBoard event files, written by process 0 only.

  GCS objects cannot be appended to, so with a gs:// workdir both are written in a local twin
  directory and uploaded whole by `sync` (at checkpoints, at close, and SYNC_S apart otherwise).
  """
  SYNC_S = 60.0

  def __init__(self, workdir: str, enabled: bool):
    self.enabled, self.workdir, self.remote = enabled, workdir, storage.is_url(workdir)
    self._jsonl = self._tb = None
    if not enabled:
      return
    self._local = storage.local_twin(workdir, 'metrics') if self.remote else workdir
    os.makedirs(self._local, exist_ok=True)
    jsonl = os.path.join(self._local, 'metrics.jsonl')
    if self.remote:  # carry on from the bucket's copy; this attempt's events go to a new file
      remote = storage.path(workdir) / 'metrics.jsonl'
      with open(jsonl, 'wb') as f:
        f.write(remote.read_bytes() if remote.exists() else b'')
      shutil.rmtree(os.path.join(self._local, 'tb'), ignore_errors=True)
    self._jsonl = open(jsonl, 'a')
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(os.path.join(self._local, 'tb'))
    self._synced = time.monotonic()

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {'step': int(step), **{k: to_python(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    for k, v in row.items():
      if isinstance(v, (int, float)) and k != 'step':
        self._tb.add_scalar(k, v, step)
    if self.remote and time.monotonic() - self._synced > self.SYNC_S:
      self.sync()

  def sync(self) -> None:
    """Uploads metrics.jsonl and the event files (gs:// workdirs; a no-op locally)."""
    if not (self.enabled and self.remote):
      return
    self._jsonl.flush()
    self._tb.flush()
    self._upload()

  def _upload(self) -> None:
    for rel in ['metrics.jsonl'] + [os.path.join('tb', f)
                                    for f in os.listdir(os.path.join(self._local, 'tb'))]:
      with open(os.path.join(self._local, rel), 'rb') as f:
        storage.write_bytes(storage.join(self.workdir, rel), f.read())
    self._synced = time.monotonic()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
      if self.remote:
        self._upload()


def to_python(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


class StepLog:
  """Each step's metrics, read one step late (so the host never stalls the device), with its
  time, throughput and MFU; written every log_every steps, to a progress bar or plain lines."""

  def __init__(self, ctx, phase: str, start: int, end: int, flops_per_step: float):
    self.ctx, self.phase, self.end, self.flops_per_step = ctx, phase, end, flops_per_step
    self.tokens_per_step = ctx.run.train.batch_size * ctx.run.data.seq_len
    # A progress bar on a terminal; plain lines every log_every steps in log files (pods, CI).
    self.plain = ctx.is_main and not sys.stderr.isatty()
    self.bar = tqdm.tqdm(total=end - start, desc=phase,
                         disable=self.plain or not ctx.is_main or start >= end,
                         dynamic_ncols=True, mininterval=1.0)
    self.pending = None  # (step, metrics on device, data position before its batch)
    self.t_last = time.perf_counter()
    # Passes over the train split, from the data position (restored with every checkpoint).
    self.epoch = math.floor(ctx.data.train.epochs())

  def add(self, step: int, metrics, position) -> None:
    """Step `step` dispatched: the previous one's metrics are read now."""
    self.flush()
    self.pending = (step, metrics, position)

  def restart_timer(self) -> None:
    """After eval or a checkpoint: the next step times only itself."""
    self.t_last = time.perf_counter()

  def flush(self) -> None:
    if self.pending is None:
      return
    (step, metrics, position), self.pending = self.pending, None
    metrics = {k: to_python(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(metrics['loss']):
      raise NonFiniteMetrics(step, metrics['loss'], position)
    now = time.perf_counter()
    step_s = max(now - self.t_last, 1e-9)
    tflops = self.flops_per_step / step_s / jax.device_count() / 1e12
    epochs = self.ctx.data.train.epochs(position)  # read before this step's batch
    metrics.update(step_s=step_s, tokens_per_s=self.tokens_per_step / step_s,
                   tflops_per_device=tflops, mfu=tflops * 1e12 / self.ctx.peak_flops,
                   phase=self.phase, tokens_seen=(step + 1) * self.tokens_per_step,
                   epochs=epochs)
    if math.floor(epochs) > self.epoch:
      self.epoch = math.floor(epochs)
      logging.info('data: epoch %d of the train split began by step %d (%.4f epochs read)',
                   self.epoch + 1, step, epochs)
    self.t_last = now
    if step % self.ctx.run.train.log_every == 0 or step == self.end - 1:
      self.ctx.writer.write(step, metrics)
      if self.plain:
        print(f'{self.phase} step {step + 1}/{self.end} loss {metrics["loss"]:.4f} '
              f'tok/s {metrics["tokens_per_s"]:.0f} step_s {step_s:.3f} '
              f'TFLOP/s/device {tflops:.3g} MFU {metrics["mfu"]:.1%}', file=sys.stderr,
              flush=True)
    self.bar.set_postfix(loss=f'{metrics["loss"]:.3f}', tok_s=f'{metrics["tokens_per_s"]:.0f}',
                         mfu=f'{metrics["mfu"]:.1%}')
    self.bar.update(1)

  def validation(self, done: int, val: dict) -> None:
    self.ctx.writer.write(done - 1, {**val, 'phase': self.phase,
                                     'tokens_seen': done * self.tokens_per_step})
    if self.plain:
      print(f'{self.phase} step {done}/{self.end} val_loss {val["val_loss"]:.4f}',
            file=sys.stderr, flush=True)

  def close(self) -> None:
    self.bar.close()


class NonFiniteMetrics(Exception):
  """A step's loss was NaN/inf: (step, loss, the data position before its batch)."""


class Profiler:
  """A jax.profiler trace of steps [start_step, start_step + steps) into W/profile."""

  def __init__(self, cfg: ProfileConfig, workdir: str):
    self.start, self.end = cfg.start_step, cfg.start_step + cfg.steps
    self.target = storage.join(workdir, 'profile')
    # The profiler writes local files; a bucket gets a copy when the trace stops.
    self.local = (storage.local_twin(workdir, 'profile') if storage.is_url(workdir)
                  else self.target)
    self.on = False

  def at(self, step: int, state) -> None:
    if step == self.start and self.start >= 0 and not self.on:
      jax.profiler.start_trace(self.local)
      self.on = True
    elif self.on and step >= self.end:
      self.stop(state)

  def stop(self, state) -> None:
    if not self.on:
      return
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.on = False
    if self.local != self.target:
      for root, _, files in os.walk(self.local):
        for f in files:
          rel = os.path.relpath(os.path.join(root, f), self.local)
          with open(os.path.join(root, f), 'rb') as fh:
            storage.write_bytes(storage.join(self.target, rel), fh.read())
