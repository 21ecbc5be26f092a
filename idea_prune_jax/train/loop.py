"""The host loop: batches in, steps dispatched, metrics out, eval, checkpoints, preemption, and
resuming from the newest readable checkpoint of the same model and plan."""

import contextlib
import dataclasses
import json
import math
import os
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from idea_prune_jax.io import checkpoint as ckpt_lib
from idea_prune_jax.train import chips
from idea_prune_jax.train import metrics as metrics_lib
from idea_prune_jax.data import batch as batch_lib
from idea_prune_jax.data import data as data_lib
from idea_prune_jax.train import sharding as sharding_lib
from idea_prune_jax.data import storage
from idea_prune_jax.train.config import ConfigError, RunConfig, check_devices, keep_steps

# Set by the SIGTERM handler the entry point installs (`cli.install_sigterm_handler`).
SIGTERM = threading.Event()


class NonFiniteLoss(RuntimeError):
  """The loss went NaN/inf; the last good checkpoint is kept."""


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint was saved at the step boundary."""


@dataclasses.dataclass
class RunContext:
  """What stays fixed across the phases of one run: config, mesh, data, checkpoints."""
  run: RunConfig
  workdir: str
  mesh: Any
  data: Any
  ckpt: Any
  writer: metrics_lib.MetricsWriter
  clock: metrics_lib.Clock
  peak_flops: float  # per device, for MFU
  # Seconds, for train.ckpt_minutes: injectable so tests run on a fake clock.
  wall_clock: Callable[[], float] = time.monotonic
  last_save_s: float = 0.0  # wall_clock() at the last checkpoint (or setup)

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0


def setup(run: RunConfig, workdir: str,
          wall_clock: Callable[[], float] = time.monotonic) -> RunContext:
  """Checks the devices, builds the mesh and data, opens checkpoints; no model compute yet.

  workdir may be local or gs://; it is checked (bucket, credentials, not a file) up front.
  """
  clock = metrics_lib.Clock()
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
                    metrics_lib.MetricsWriter(workdir, jax.process_index() == 0), clock,
                    chips.peak_flops_per_device(jax.devices()[0]), wall_clock, wall_clock())


def evaluate(ctx: RunContext, eval_fn: Callable, params, hidden_kept=None) -> dict:
  """Validation loss and perplexity over the fixed held-out batches (hidden_kept: see
  `TrainState.hidden_kept`)."""
  sharding = sharding_lib.batch_sharding(ctx.mesh)
  total = count = 0.0
  for local in ctx.data.val:
    batch = batch_lib.global_batch(local, sharding)
    nll, n = eval_fn(params, batch, hidden_kept)
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

  Multi-host, JAX's preemption service (started when the entry point initializes
  jax.distributed; its handler catches SIGTERM) agrees through the coordinator on one step just past every host's current
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
  log = metrics_lib.StepLog(ctx, phase, start, end, flops_per_step)
  profiler = metrics_lib.Profiler(ctx.run.profile, ctx.workdir)
  clock = ctx.clock
  before = dict(clock.seconds)
  loop_start = time.perf_counter()
  try:
    for step in range(start, end):
      profiler.at(step, state)
      with clock.timing('data'):
        position = ctx.data.train.get_state()
        batch = batch_lib.global_batch(next(ctx.data.train), sharding)
      # The first call of a step function traces and compiles it (or loads it from the cache).
      with clock.timing('compile') if step == start else contextlib.nullcontext():
        state, metrics = step_fn(state, batch)
      log.add(step, metrics, position)
      if step == start:
        log.flush()  # the first step's time is its compile's; the rest time only themselves
      done = step + 1
      if done % cfg.eval_every == 0 or done == end:
        log.flush()
        with clock.timing('eval'):
          log.validation(done, evaluate(ctx, eval_fn, state.params, state.hidden_kept))
        log.restart_timer()
      stop = _preempted(done)
      by_clock = _save_due_by_clock(ctx, done)  # before any `or`: every host joins its broadcast
      if stop or by_clock or done % cfg.ckpt_every == 0 or done == end:
        log.flush()  # a non-finite loss must stop before it is saved
        save(ctx, state, {**meta, 'phase': phase})
        if cfg.ckpt_minutes:
          ctx.last_save_s = ctx.wall_clock()
        log.restart_timer()
        if stop:
          raise Preempted(f'SIGTERM: saved step {done} in {ctx.workdir}; rerun to resume')
    log.flush()
  except metrics_lib.NonFiniteMetrics as e:
    step, loss, position = e.args
    _non_finite(ctx, step, phase, loss, position)
  finally:
    profiler.stop(state)
    log.close()
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
