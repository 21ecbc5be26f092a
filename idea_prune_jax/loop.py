"""The host loop: batches in, steps dispatched, metrics out, eval, checkpoints, preemption."""

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import numpy as np
import tqdm
from absl import logging

from idea_prune_jax import checkpoint as ckpt_lib
from idea_prune_jax import config as config_lib
from idea_prune_jax import data as data_lib
from idea_prune_jax import schedules
from idea_prune_jax import sharding as sharding_lib


class NonFiniteLoss(RuntimeError):
  """The loss went NaN/inf; the last good checkpoint is kept."""


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint was saved at the step boundary."""


@dataclasses.dataclass
class Run:
  """What stays fixed across the phases of one run."""
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


def setup(config, workdir: str) -> Run:
  """Validates everything, builds the mesh and data, opens checkpoints; no model compute yet."""
  sharding_lib.maybe_initialize_distributed(config)
  _, _, tensor = config_lib.validate(config, jax.device_count())
  if config.pipeline in ('idea', 'naive'):
    schedules.validate_prune(config, tensor)
  mesh = sharding_lib.make_mesh(config)
  data = data_lib.build(config, workdir, jax.process_index(), jax.process_count())
  ckpt = ckpt_lib.manager(workdir, config.train.keep_ckpts)
  stop = []
  try:
    signal.signal(signal.SIGTERM, lambda signum, _: stop.append(signum))
  except ValueError:  # not the main thread: no preemption hook
    pass
  return Run(config, workdir, mesh, data, ckpt, MetricsWriter(workdir, jax.process_index() == 0),
             stop)


def evaluate(run: Run, eval_fn: Callable, params) -> dict:
  """Validation loss and perplexity over the fixed held-out batches."""
  sharding = sharding_lib.batch_sharding(run.mesh)
  total = count = 0.0
  for local in run.data.val:
    batch = data_lib.global_batch(data_lib.split_batch(local), sharding)
    nll, n = eval_fn(params, batch)
    total, count = total + float(nll), count + float(n)
  val_loss = total / max(count, 1.0)
  return {'val_loss': val_loss, 'val_ppl': math.exp(min(val_loss, 50.0))}


def save(run: Run, state, meta: dict) -> None:
  ckpt_lib.save(run.ckpt, int(state.step), state, run.data.train.get_state(), meta)


def run_steps(run: Run, state, step_fn: Callable, end: int, *, phase: str, eval_fn: Callable,
              meta: dict, params_fn: Callable = lambda s: s.params,
              on_step: Callable | None = None):
  """Runs steps state.step .. end-1; returns the final state.

  Step t is dispatched before step t-1's metrics are read, so the host never stalls the device.
  meta (with 'model') goes into every checkpoint; params_fn picks the params to evaluate
  (masked ones while pruning). on_step(step, metrics) lets a pipeline record extra series.
  """
  cfg = run.config.train
  sharding = sharding_lib.batch_sharding(run.mesh)
  start = int(state.step)
  tokens_per_step = cfg.batch_size * run.config.data.seq_len
  bar = tqdm.tqdm(total=end - start, desc=phase, disable=not run.is_main or start >= end,
                  dynamic_ncols=True, mininterval=1.0)
  pending, t_last = None, time.perf_counter()

  def flush(pending):
    nonlocal t_last
    step, metrics = pending
    metrics = {k: _py(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(metrics['loss']):
      raise NonFiniteLoss(
          f'loss is {metrics["loss"]} at step {step} (batch {step} of the data order); '
          f'stopped; the last good checkpoint in {run.workdir} is kept. Lower train.lr or check data')
    now = time.perf_counter()
    metrics['tokens_per_s'] = tokens_per_step / max(now - t_last, 1e-9)
    t_last = now
    metrics['phase'] = phase
    metrics['tokens_seen'] = (step + 1) * tokens_per_step
    if on_step:
      on_step(step, metrics)
    if step % cfg.log_every == 0 or step == end - 1:
      run.writer.write(step, metrics)
    bar.set_postfix(loss=f'{metrics["loss"]:.3f}', tok_s=f'{metrics["tokens_per_s"]:.0f}')
    bar.update(1)

  for step in range(start, end):
    batch = data_lib.global_batch(data_lib.split_batch(next(run.data.train)), sharding)
    state, metrics = step_fn(state, batch)
    if pending is not None:
      flush(pending)
    pending = (step, metrics)
    done = step + 1
    if done % cfg.eval_every == 0 or done == end:
      flush(pending)
      pending = None
      run.writer.write(step, {**evaluate(run, eval_fn, params_fn(state)), 'phase': phase,
                              'tokens_seen': done * tokens_per_step})
    if run.stop or done % cfg.ckpt_every == 0 or done == end:
      if pending is not None:
        flush(pending)
        pending = None
      save(run, state, {**meta, 'phase': phase})
      if run.stop:
        bar.close()
        raise Preempted(f'SIGTERM: saved step {done} in {run.workdir}; rerun to resume')
  if pending is not None:
    flush(pending)
  bar.close()
  return state


def latest(run: Run):
  return ckpt_lib.latest_step(run.ckpt)


def restore(run: Run, step: int, abstract_state, model_cfg):
  """(state, meta) from the checkpoint at step, refusing one of a model other than model_cfg."""
  meta = ckpt_lib.read_meta(run.ckpt, step)
  if meta.get('model'):
    ckpt_lib.check_same_model(meta, model_cfg, run.workdir)
  state, data_state, meta = ckpt_lib.restore(run.ckpt, step, abstract_state)
  run.data.train.set_state(data_state)
  logging.info('resumed %s at step %d (phase %s)', run.workdir, step, meta.get('phase'))
  return state, meta
