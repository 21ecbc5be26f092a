"""The host loop: batches in, steps dispatched, metrics out, eval, checkpoints, preemption."""

import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from idea_prune_jax import checkpoint as ckpt_lib
from idea_prune_jax import config as config_lib
from idea_prune_jax import data as data_lib
from idea_prune_jax import sharding as sharding_lib


class NonFiniteLoss(RuntimeError):
  """The loss went NaN/inf; the last good checkpoint is kept."""


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint was saved at the step boundary."""


@dataclasses.dataclass
class RunContext:
  """What stays fixed across the phases of one run: config, mesh, data, checkpoints."""
  config: Any
  workdir: str
  mesh: Any
  data: Any
  ckpt: Any
  writer: 'MetricsWriter'
  stop: list  # [signal number] once SIGTERM arrived

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0


class MetricsWriter:
  """metrics.jsonl plus TensorBoard event files, written by process 0 only."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self._jsonl = self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tb'))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {'step': int(step), **{k: _py(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    for k, v in row.items():
      if isinstance(v, (int, float)) and k != 'step':
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _py(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


def setup(config, workdir: str) -> RunContext:
  """Validates everything, builds the mesh and data, opens checkpoints; no model compute yet."""
  if '://' in workdir:
    # Metrics, tokenizer cache, report and export use plain file I/O; orbax alone would
    # reach the bucket. A gcsfuse mount gives every writer the same path.
    raise config_lib.ConfigError(
        f'--workdir={workdir}: URLs are not supported yet; mount the bucket with gcsfuse '
        '(see docs/tpu.md) and pass the mount path')
  sharding_lib.maybe_initialize_distributed(config)
  _, _, tensor = config_lib.validate(config, jax.device_count())
  if config.pipeline in ('idea', 'naive'):
    config_lib.validate_prune(config, tensor)
  mesh = sharding_lib.make_mesh(config)
  data = data_lib.build(config, workdir, jax.process_index(), jax.process_count(),
                        barrier=lambda: multihost_utils.sync_global_devices(
                            'idea_prune_jax:data_prepared'))
  ckpt = ckpt_lib.manager(workdir, config.train.keep_ckpts)
  stop = []
  try:
    signal.signal(signal.SIGTERM, lambda signum, _: stop.append(signum))
  except ValueError:  # not the main thread: no preemption hook
    pass
  return RunContext(config, workdir, mesh, data, ckpt,
                    MetricsWriter(workdir, jax.process_index() == 0), stop)


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
  ckpt_lib.save(ctx.ckpt, int(state.step), state, ctx.data.train, meta)


def _should_stop(ctx: RunContext, step: int) -> bool:
  """SIGTERM seen by any host: every host must take the same save-and-exit branch."""
  if jax.process_count() == 1:
    return bool(ctx.stop)
  if step % ctx.config.train.log_every:
    return False
  flags = multihost_utils.process_allgather(np.asarray(len(ctx.stop), np.int32))
  return bool(np.any(flags))


def _non_finite(ctx: RunContext, step: int, phase: str, loss: float, position: dict):
  """Records where the loss broke (step, phase, data position of that batch) and stops."""
  position = json.loads(position)  # the grain iterator state of each shard this host reads
  info = {'step': step, 'phase': phase, 'loss': loss, 'data_position': position}
  if ctx.is_main:
    with open(os.path.join(ctx.workdir, 'nonfinite.json'), 'w') as f:
      json.dump(info, f)
  raise NonFiniteLoss(
      f'loss is {loss} at step {step} ({phase}; batch at data position {position}); stopped '
      f'without saving, the last good checkpoint in {ctx.workdir} is kept; lower train.lr or '
      'check that batch')


def run_steps(ctx: RunContext, state, step_fn: Callable, end: int, *, phase: str, eval_fn: Callable,
              meta: dict):
  """Runs steps state.step .. end-1 and returns the final state.

  Step t is dispatched before step t-1's metrics are read, so the host never stalls the device.
  Checkpoints (with `meta` and the phase) at every train.ckpt_every, at `end`, and on SIGTERM.
  """
  cfg = ctx.config.train
  sharding = sharding_lib.batch_sharding(ctx.mesh)
  start = int(state.step)
  tokens_per_step = cfg.batch_size * ctx.config.data.seq_len
  # A progress bar on a terminal; plain lines every log_every steps in log files (pods, CI).
  plain = ctx.is_main and not sys.stderr.isatty()
  bar = tqdm.tqdm(total=end - start, desc=phase, disable=plain or not ctx.is_main or start >= end,
                  dynamic_ncols=True, mininterval=1.0)
  pending, t_last = None, time.perf_counter()

  def flush():
    nonlocal pending, t_last
    step, metrics, position = pending
    pending = None
    metrics = {k: _py(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(metrics['loss']):
      _non_finite(ctx, step, phase, metrics['loss'], position)
    now = time.perf_counter()
    metrics.update(tokens_per_s=tokens_per_step / max(now - t_last, 1e-9), phase=phase,
                   tokens_seen=(step + 1) * tokens_per_step)
    t_last = now
    if step % cfg.log_every == 0 or step == end - 1:
      ctx.writer.write(step, metrics)
      if plain:
        print(f'{phase} step {step + 1}/{end} loss {metrics["loss"]:.4f} '
              f'tok/s {metrics["tokens_per_s"]:.0f}', file=sys.stderr, flush=True)
    bar.set_postfix(loss=f'{metrics["loss"]:.3f}', tok_s=f'{metrics["tokens_per_s"]:.0f}')
    bar.update(1)

  for step in range(start, end):
    position = ctx.data.train.get_state()
    batch = data_lib.global_batch(next(ctx.data.train), sharding)
    state, metrics = step_fn(state, batch)
    if pending is not None:
      flush()
    pending = (step, metrics, position)
    done = step + 1
    if done % cfg.eval_every == 0 or done == end:
      flush()
      val = evaluate(ctx, eval_fn, state.params)
      ctx.writer.write(step, {**val, 'phase': phase, 'tokens_seen': done * tokens_per_step})
      if plain:
        print(f'{phase} step {done}/{end} val_loss {val["val_loss"]:.4f}', file=sys.stderr,
              flush=True)
    stop = _should_stop(ctx, done)
    if stop or done % cfg.ckpt_every == 0 or done == end:
      if pending is not None:
        flush()  # a non-finite loss must stop before it is saved
      save(ctx, state, {**meta, 'phase': phase})
      if stop:
        bar.close()
        raise Preempted(f'SIGTERM: saved step {done} in {ctx.workdir}; rerun to resume')
  if pending is not None:
    flush()
  bar.close()
  return state


class CheckpointError(RuntimeError):
  """No checkpoint in the workdir can be read."""


def restore_latest(ctx: RunContext, abstract_for: Callable[[dict], Any], model_cfg):
  """(state, meta) of the newest readable checkpoint, or None when there is none.

  abstract_for(meta) gives the abstract state (shapes + shardings) of the phase a checkpoint
  was written in. An unreadable checkpoint (truncated, corrupted) is skipped with a warning
  naming it; if none is readable the run stops with a clear error rather than start over.
  """
  steps = sorted(ctx.ckpt.all_steps(), reverse=True)
  errors = []
  for step in steps:
    try:
      meta = ckpt_lib.read_meta(ctx.ckpt, step)
      ckpt_lib.check_same_model(meta, model_cfg, ctx.workdir)
      abstract = abstract_for(meta)
      state, meta = ckpt_lib.restore(ctx.ckpt, step, abstract, ctx.data.train)
    except config_lib.ConfigError:
      raise
    except Exception as e:  # noqa: BLE001  orbax/tensorstore raise many types for bad files
      where = os.path.join(str(ctx.ckpt.directory), str(step))
      logging.warning('checkpoint %s is unreadable, skipping it: %s', where,
                      str(e).splitlines()[0][:300])
      errors.append(f'{where}: {type(e).__name__}')
      continue
    if errors:
      # Keep the unreadable ones for inspection, out of the way of this step number's next save.
      if ctx.is_main:
        for err in errors:
          path = err.split(': ')[0]
          os.rename(path, f'{path}.unreadable-{int(time.time())}')
      multihost_utils.sync_global_devices('idea_prune_jax:unreadable_checkpoints_moved')
      ctx.ckpt.reload()
    logging.info('resumed %s at step %d (phase %s)', ctx.workdir, step, meta.get('phase'))
    return state, meta
  if errors:
    raise CheckpointError(f'no readable checkpoint in {ctx.ckpt.directory} ({"; ".join(errors)}); '
                          'move the directory away to start fresh')
  return None
