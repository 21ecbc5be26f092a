"""The host loop: batches in, steps dispatched, metrics out, eval, checkpoints, preemption."""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from idea_prune_jax.io import checkpoint as ckpt_lib
from idea_prune_jax.train import chips
from idea_prune_jax.data import data as data_lib
from idea_prune_jax.train import sharding as sharding_lib
from idea_prune_jax.data import storage
from idea_prune_jax.train.config import ConfigError, RunConfig, check_devices, keep_steps

# Set by the SIGTERM handler the entry point installs (`process.install_sigterm_handler`).
SIGTERM = threading.Event()


class NonFiniteLoss(RuntimeError):
  """The loss went NaN/inf; the last good checkpoint is kept."""


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint was saved at the step boundary."""


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


@dataclasses.dataclass
class RunContext:
  """What stays fixed across the phases of one run: config, mesh, data, checkpoints."""
  run: RunConfig
  workdir: str
  mesh: Any
  data: Any
  ckpt: Any
  writer: 'MetricsWriter'
  clock: Clock
  peak_flops: float  # per device, for MFU
  # Seconds, for train.ckpt_minutes: injectable so tests run on a fake clock.
  wall_clock: Callable[[], float] = time.monotonic
  last_save_s: float = 0.0  # wall_clock() at the last checkpoint (or setup)

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0


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
    row = {'step': int(step), **{k: _py(v) for k, v in metrics.items()}}
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


def _py(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


def setup(run: RunConfig, workdir: str,
          wall_clock: Callable[[], float] = time.monotonic) -> RunContext:
  """Checks the devices, builds the mesh and data, opens checkpoints; no model compute yet.

  workdir may be local or gs://; it is checked (bucket, credentials, not a file) up front.
  """
  clock = Clock()
  storage.check_workdir(workdir)
  check_devices(run, jax.device_count())
  mesh = sharding_lib.make_mesh(run.mesh)
  data = data_lib.build(
      run.data, workdir, vocab_size=run.model.vocab_size, batch_size=run.train.batch_size,
      eval_batches=run.train.eval_batches, seed=run.seed, process_index=jax.process_index(),
      process_count=jax.process_count(),
      barrier=lambda: multihost_utils.sync_global_devices('idea_prune_jax:data_prepared'))
  ckpt = ckpt_lib.manager(workdir, run.train.keep_ckpts, async_save=run.train.async_ckpt,
                          keep_steps=keep_steps(run.train))
  return RunContext(run, workdir, mesh, data, ckpt,
                    MetricsWriter(workdir, jax.process_index() == 0), clock,
                    chips.peak_flops_per_device(jax.devices()[0]), wall_clock, wall_clock())


def evaluate(ctx: RunContext, eval_fn: Callable, params) -> dict:
  """Validation loss and perplexity over the fixed held-out batches."""
  sharding = sharding_lib.batch_sharding(ctx.mesh)
  total = count = 0.0
  for local in ctx.data.val:
    batch = data_lib.global_batch(local, sharding)
    nll, n = eval_fn(params, batch)
    total, count = total + float(nll), count + float(n)
  val_loss = total / max(count, 1.0)
  return {'val_loss': val_loss, 'val_ppl': math.exp(min(val_loss, 50.0))}


def save(ctx: RunContext, state, meta: dict) -> None:
  """Starts an async save (blocks only for the copy to host and any previous save)."""
  with ctx.clock.timing('checkpoint'):
    ckpt_lib.save(ctx.ckpt, int(state.step), state, ctx.data.train, meta)
  ctx.writer.sync()


def finish_saves(ctx: RunContext) -> None:
  """Blocks until every started save is committed (before exit, restore, or reading them)."""
  with ctx.clock.timing('checkpoint'):
    ctx.ckpt.wait_until_finished()


def _preempted(step: int) -> bool:
  """True at the step every host stops at after a SIGTERM reached any of them.

  Multi-host, JAX's preemption service (started by jax.distributed.initialize, whose handler
  catches SIGTERM) agrees through the coordinator on one step just past every host's current
  one; each host calls this every step and all return True at that step. One process: the flag.
  """
  if jax.distributed.is_initialized():
    return multihost_utils.reached_preemption_sync_point(step)
  return SIGTERM.is_set()


# Multi-host, process 0's clock is broadcast every this many steps (a collective, but not one
# per step): a wall-time checkpoint comes at most this many steps late.
WALL_CHECK_EVERY = 10


def _save_due_by_clock(ctx: RunContext, step: int) -> bool:
  """True at the step every host saves at once train.ckpt_minutes passed since the last save.

  Hosts' clocks differ, and a host saving alone would hang the others in orbax's barriers: the
  decision is process 0's, broadcast at steps every host reaches alike (WALL_CHECK_EVERY apart).
  JAX's preemption sync point cannot carry it: it is armed once, by the SIGTERM notifier only.
  """
  minutes = ctx.run.train.ckpt_minutes
  if not minutes:
    return False
  many = jax.process_count() > 1
  if many and step % WALL_CHECK_EVERY:
    return False
  due = ctx.wall_clock() - ctx.last_save_s >= minutes * 60
  if many:
    due = bool(multihost_utils.broadcast_one_to_all(np.bool_(due)))
  return due


def _non_finite(ctx: RunContext, step: int, phase: str, loss: float, position: dict):
  """Records where the loss broke (step, phase, data position of that batch) and stops."""
  position = json.loads(position)  # the grain iterator state of each shard this host reads
  info = {'step': step, 'phase': phase, 'loss': loss, 'data_position': position}
  if ctx.is_main:
    storage.write_text(storage.join(ctx.workdir, 'nonfinite.json'), json.dumps(info))
  raise NonFiniteLoss(
      f'loss is {loss} at step {step} ({phase}; batch at data position {position}); stopped '
      f'without saving, the last good checkpoint in {ctx.workdir} is kept; lower train.lr or '
      'check that batch')


class _Profiler:
  """A jax.profiler trace of steps [start_step, start_step + steps) into W/profile."""

  def __init__(self, ctx: RunContext):
    cfg = ctx.run.profile
    self.start, self.end = cfg.start_step, cfg.start_step + cfg.steps
    self.target = storage.join(ctx.workdir, 'profile')
    # The profiler writes local files; a bucket gets a copy when the trace stops.
    self.local = (storage.local_twin(ctx.workdir, 'profile') if storage.is_url(ctx.workdir)
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


def run_steps(ctx: RunContext, state, step_fn: Callable, end: int, *, phase: str, eval_fn: Callable,
              meta: dict, flops_per_step: float = 0.0):
  """Runs steps state.step .. end-1 and returns the final state.

  Step t is dispatched before step t-1's metrics are read, so the host never stalls the device.
  Checkpoints (with `meta` and the phase) at every train.ckpt_every, once train.ckpt_minutes
  passed since the last one, at `end`, and when a SIGTERM reached any host (then raises
  Preempted). Each logged row has the step time, tokens/s, TFLOP/s per device and MFU
  (flops_per_step: the analytic FLOPs of one step, all devices).
  """
  cfg = ctx.run.train
  sharding = sharding_lib.batch_sharding(ctx.mesh)
  start = int(state.step)
  tokens_per_step = cfg.batch_size * ctx.run.data.seq_len
  n_devices = jax.device_count()
  # A progress bar on a terminal; plain lines every log_every steps in log files (pods, CI).
  plain = ctx.is_main and not sys.stderr.isatty()
  bar = tqdm.tqdm(total=end - start, desc=phase, disable=plain or not ctx.is_main or start >= end,
                  dynamic_ncols=True, mininterval=1.0)
  profiler = _Profiler(ctx)
  clock = ctx.clock
  before = dict(clock.seconds)
  loop_start = time.perf_counter()
  pending, t_last = None, time.perf_counter()
  # Passes over the train split, from the data position (restored with every checkpoint).
  epoch = math.floor(ctx.data.train.epochs())

  def flush():
    nonlocal pending, t_last, epoch
    step, metrics, position = pending
    pending = None
    metrics = {k: _py(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(metrics['loss']):
      _non_finite(ctx, step, phase, metrics['loss'], position)
    now = time.perf_counter()
    step_s = max(now - t_last, 1e-9)
    tflops = flops_per_step / step_s / n_devices / 1e12
    metrics.update(step_s=step_s, tokens_per_s=tokens_per_step / step_s,
                   tflops_per_device=tflops, mfu=tflops * 1e12 / ctx.peak_flops, phase=phase,
                   tokens_seen=(step + 1) * tokens_per_step,
                   epochs=ctx.data.train.epochs(position))  # read before this step's batch
    if math.floor(metrics['epochs']) > epoch:
      epoch = math.floor(metrics['epochs'])
      logging.info('data: epoch %d of the train split began by step %d (%.4f epochs read)',
                   epoch + 1, step, metrics['epochs'])
    t_last = now
    if step % cfg.log_every == 0 or step == end - 1:
      ctx.writer.write(step, metrics)
      if plain:
        print(f'{phase} step {step + 1}/{end} loss {metrics["loss"]:.4f} '
              f'tok/s {metrics["tokens_per_s"]:.0f} step_s {step_s:.3f} '
              f'TFLOP/s/device {tflops:.3g} MFU {metrics["mfu"]:.1%}', file=sys.stderr,
              flush=True)
    bar.set_postfix(loss=f'{metrics["loss"]:.3f}', tok_s=f'{metrics["tokens_per_s"]:.0f}',
                    mfu=f'{metrics["mfu"]:.1%}')
    bar.update(1)

  try:
    for step in range(start, end):
      profiler.at(step, state)
      with clock.timing('data'):
        position = ctx.data.train.get_state()
        batch = data_lib.global_batch(next(ctx.data.train), sharding)
      # The first call of a step function traces and compiles it (or loads it from the cache).
      with clock.timing('compile') if step == start else contextlib.nullcontext():
        state, metrics = step_fn(state, batch)
      if pending is not None:
        flush()
      pending = (step, metrics, position)
      if step == start:
        flush()  # the first step's time is its compile's; the rest time only themselves
      done = step + 1
      if done % cfg.eval_every == 0 or done == end:
        if pending is not None:
          flush()
        with clock.timing('eval'):
          val = evaluate(ctx, eval_fn, state.params)
        ctx.writer.write(step, {**val, 'phase': phase, 'tokens_seen': done * tokens_per_step})
        if plain:
          print(f'{phase} step {done}/{end} val_loss {val["val_loss"]:.4f}', file=sys.stderr,
                flush=True)
        t_last = time.perf_counter()
      stop = _preempted(done)
      by_clock = _save_due_by_clock(ctx, done)  # before any `or`: every host joins its broadcast
      if stop or by_clock or done % cfg.ckpt_every == 0 or done == end:
        if pending is not None:
          flush()  # a non-finite loss must stop before it is saved
        save(ctx, state, {**meta, 'phase': phase})
        if cfg.ckpt_minutes:
          ctx.last_save_s = ctx.wall_clock()
        t_last = time.perf_counter()
        if stop:
          bar.close()
          raise Preempted(f'SIGTERM: saved step {done} in {ctx.workdir}; rerun to resume')
    if pending is not None:
      flush()
  finally:
    profiler.stop(state)
    bar.close()
    spent = sum(clock.seconds[k] - before[k] for k in clock.KINDS)
    clock.seconds['train'] += time.perf_counter() - loop_start - spent
  return state


class CheckpointError(RuntimeError):
  """No checkpoint in the workdir can be read."""


def restore_latest(ctx: RunContext, abstract_for: Callable[[dict], Any], model_cfg):
  """(state, meta) of the newest readable checkpoint, or None when there is none.

  abstract_for(meta) gives the abstract state (shapes + shardings) of the phase a checkpoint
  was written in. Storage failing on the way (timeouts, 5xx, resets) is retried and, if it
  lasts, stops the run with every checkpoint left in place (ckpt_lib.StorageUnavailable). A
  checkpoint that reads wrong (truncated, corrupted) is skipped, then set aside with a warning
  naming the lost step and why; if none is readable the run stops with a clear error rather than
  start over.
  """
  errors = []  # (step, path, why) of each checkpoint that reads wrong, newest first
  for step in ckpt_lib.all_steps(ctx.ckpt):
    try:
      meta = ckpt_lib.read_meta(ctx.ckpt, step)
      check_same_model(meta, model_cfg, ctx.workdir)
      abstract = abstract_for(meta)
      with ctx.clock.timing('restore'):
        state, meta = ckpt_lib.restore(ctx.ckpt, step, abstract, ctx.data.train)
    except (ConfigError, ckpt_lib.StorageUnavailable):
      raise
    except Exception as e:  # noqa: BLE001  orbax/tensorstore raise many types for bad files
      where = os.path.join(str(ctx.ckpt.directory), str(step))
      why = f'{type(e).__name__}: {(str(e).splitlines() or [""])[0][:300]}'
      logging.warning('checkpoint %s is unreadable, skipping it: %s', where, why)
      errors.append((step, where, why))
      continue
    if errors:
      # Keep the unreadable ones for inspection, out of the way of this step number's next save.
      if ctx.is_main:
        for lost, where, why in errors:
          aside = f'{where}.unreadable-{int(time.time())}'
          storage.path(where).rename(aside)
          logging.warning('lost checkpoint step %d (%s): it reads wrong (%s); set aside as %s, '
                          'resuming from step %d', lost, where, why, aside, step)
      multihost_utils.sync_global_devices('idea_prune_jax:unreadable_checkpoints_moved')
      ctx.ckpt.reload()
    logging.info('resumed %s at step %d (phase %s)', ctx.workdir, step, meta.get('phase'))
    return state, meta
  if errors:
    listed = '; '.join(f'{where}: {why.split(":")[0]}' for _, where, why in errors)
    raise CheckpointError(f'no readable checkpoint in {ctx.ckpt.directory} ({listed}); '
                          'move the directory away to start fresh')
  return None


def model_meta(model_cfg) -> dict:
  return dataclasses.asdict(model_cfg)


def check_same_model(meta: dict, model_cfg, workdir: str) -> None:
  """Refuses to resume a checkpoint written for a different model shape."""
  saved = meta.get('model', {})
  mine = model_meta(model_cfg)
  diff = {k: (saved.get(k), v) for k, v in mine.items()
          if k in saved and saved[k] != v and k not in model_cfg.COMPUTE_FIELDS}
  if diff:
    field, (old, new) = next(iter(diff.items()))
    raise ConfigError(
        f'config.model.{field}={new!r}: workdir {workdir} holds a checkpoint of a different model '
        f'({field}={old!r}); use a fresh --workdir or the matching config')


def check_same_plan(meta: dict, plan: dict, workdir: str) -> None:
  """Refuses to resume a checkpoint written under another plan ({'prune.t_end': 0.7, ...}: the
  config fields the phases, windows and schedules come from); meta without one is not checked."""
  saved = meta.get('plan', {})
  diff = [(k, saved[k], v) for k, v in plan.items() if k in saved and saved[k] != v]
  if diff:
    field, old, new = diff[0]
    raise ConfigError(
        f'config.{field}={new!r}: workdir {workdir} holds a checkpoint of a different plan '
        f'({field}={old!r}); use a fresh --workdir or the matching config')
