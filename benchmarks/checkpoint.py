"""Checkpoint save and restore time and size of the `small` run's state, enlarged and shrunk;
and what async saves cost the training loop.

  .venv/bin/python benchmarks/checkpoint.py [--repeats 3] [--rounds 3] [--batch_size 4] [--no-append]

The state is what the trainer checkpoints: params + AdamW moments (+ masks and PLATON scores in
the prune phase), saved and restored through `checkpoint.save` / `checkpoint.restore` exactly
as a run does, onto the same shardings. The async part trains the enlarged `small` step and
compares step times with no save in flight against step times while a save is written, the
time the save call itself blocks the loop, and SIGTERM -> checkpoint committed.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from idea_prune_jax.data import batch as batch_lib  # noqa: E402
from idea_prune_jax.io import checkpoint as ckpt_lib  # noqa: E402
from idea_prune_jax import settings  # noqa: E402
from idea_prune_jax.train import pipeline, sharding  # noqa: E402
from idea_prune_jax.train import plan as plan_lib  # noqa: E402


class _Position:
  """Stands in for the train iterator in a checkpoint (grain's handler stores its state)."""

  def __init__(self, index: int = 0):
    self.index = index

  def get_state(self) -> bytes:
    return str(self.index).encode()

  def set_state(self, state: bytes) -> None:
    self.index = int(state)

  def start_prefetch(self) -> None:
    pass


def _small_step(run, phase, mesh):
  """(jitted step, state, batch) of `phase` of `run` on `mesh`, compiled and warmed."""
  parts = pipeline.parts(run, phase, mesh)
  state = jax.jit(parts.init_fn, out_shardings=parts.shardings)(jax.random.key(0))
  step = pipeline.step_fn(run, phase, parts, mesh)
  B, L = run.train.batch_size, run.data.seq_len
  x = np.random.default_rng(0).integers(0, run.model.vocab_size, (B, L + 1), dtype=np.int32)
  batch = jax.device_put(batch_lib.from_rows(x), sharding.batch_sharding(mesh))
  for _ in range(2):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  return step, state, batch


def measure_async(run, phase, rounds: int) -> dict:
  """Step times with no save in flight vs while an async save is written, the time the save
  call blocks the step, and SIGTERM -> committed (one step, the save, its commit)."""
  mesh = sharding.make_mesh(run.mesh)
  step, state, batch = _small_step(run, phase, mesh)

  def one_step(state):
    t = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)  # as the loop does when it reads the step's loss
    return state, time.perf_counter() - t

  plain, during, blocked, sigterm = [], [], [], []
  workdir = tempfile.mkdtemp(prefix='ckpt_bench_')
  try:
    mngr = ckpt_lib.manager(workdir, keep=2)
    for r in range(rounds):
      for _ in range(3):  # no save in flight
        state, dt = one_step(state)
        plain.append(dt)
      t = time.perf_counter()
      ckpt_lib.save(mngr, 2 * r, state, _Position(r), {'phase': phase.name})
      blocked.append(time.perf_counter() - t)
      while mngr.is_saving_in_progress():  # train on while it is written
        state, dt = one_step(state)
        during.append(dt)
      mngr.wait_until_finished()
      # SIGTERM at the start of a step: the loop sees it after that step, saves, and the process
      # waits for the commit before exiting.
      t = time.perf_counter()
      state, _ = one_step(state)
      ckpt_lib.save(mngr, 2 * r + 1, state, _Position(r), {'phase': phase.name})
      mngr.wait_until_finished()
      sigterm.append(time.perf_counter() - t)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  return {'plain': plain, 'during': during, 'blocked': blocked, 'sigterm': sigterm}


def _size(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
             for f in files)


def measure(run, phase, repeats: int) -> list:
  mesh = sharding.make_mesh(run.mesh)
  parts = pipeline.parts(run, phase, mesh)
  state = jax.jit(parts.init_fn, out_shardings=parts.shardings)(jax.random.key(0))
  abstract = ckpt_lib.abstract_like(jax.eval_shape(parts.init_fn, jax.random.key(0)),
                                    parts.shardings)
  n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  saves, restores = [], []
  workdir = tempfile.mkdtemp(prefix='ckpt_bench_')
  try:
    mngr = ckpt_lib.manager(workdir, keep=repeats + 1, async_save=False)
    for i in range(repeats):
      wall, _, _ = common.timed(ckpt_lib.save, mngr, i, state, _Position(i), {'phase': phase.name})
      saves.append(wall)
      wall, _, out = common.timed(ckpt_lib.restore, mngr, i, abstract, _Position())
      jax.block_until_ready(out[0])
      restores.append(wall)
    on_disk = _size(os.path.join(workdir, 'checkpoints', '0'))
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  return [phase.name, f'{n_bytes / 2**20:.0f}', f'{on_disk / 2**20:.0f}',
          f'{common.median(saves):.2f}', f'{common.median(restores):.2f}',
          f'{n_bytes / 2**20 / common.median(saves):.0f}',
          f'{n_bytes / 2**20 / common.median(restores):.0f}']


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--rounds', type=int, default=3, help='async saves measured')
  parser.add_argument('--batch_size', type=int, default=4,
                      help='of the async part (the saved state does not depend on it; a CPU '
                      'step at the config\'s 16 takes minutes)')
  parser.add_argument('--no-append', action='store_true')
  args = parser.parse_args()
  config = settings.load(os.path.join(common.REPO, 'configs/small.py'))
  config.pipeline = 'idea'
  run = settings.read(config).run
  run.train.batch_size = args.batch_size
  async_run = settings.read(config).run
  a = measure_async(async_run, plan_lib.plan(async_run)[0], args.rounds)
  med = {k: common.median(v) if v else float('nan') for k, v in a.items()}
  async_body = common.table(
      ['step s, no save (median)', 'step s, save in flight (median)', 'ratio',
       'steps while a save is written', 'save call blocks s (median)', 'blocks / step',
       'SIGTERM -> committed s (median)'],
      [[f'{med["plain"]:.3f}', f'{med["during"]:.3f}', f'{med["during"] / med["plain"]:.2f}',
        f'{len(a["during"]) / args.rounds:.1f}', f'{med["blocked"]:.3f}',
        f'{med["blocked"] / med["plain"]:.2f}', f'{med["sigterm"]:.2f}']])
  print(async_body)
  rows = [measure(run, phase, args.repeats) for phase in plan_lib.plan(run)]
  headers = ['phase', 'state MiB', 'on disk MiB', 'save s (median)', 'restore s (median)',
             'save MiB/s', 'restore MiB/s']
  body = common.table(headers, rows)
  print(body)
  if not args.no_append:
    common.append_section('checkpoint: save / restore of the `small` state', body + '\n\n'
                          f'Medians of {args.repeats} synchronous saves and restores to local '
                          'disk (orbax, OCDBT); state = params + AdamW moments (+ masks and '
                          'PLATON scores while pruning).\n\n'
                          'Async saves (the default, `train.async_ckpt`), enlarged phase at '
                          f'batch size {args.batch_size}, {args.rounds} saves: step time with no save in flight vs while one '
                          'is written (the loop trains on), the time the save call blocks the '
                          'loop (copy to host, then the write runs in the background), and '
                          'SIGTERM -> committed when the signal lands at the start of a step '
                          '(that step, the save, its commit; the process then exits 0).\n\n'
                          + async_body)


if __name__ == '__main__':
  main()
