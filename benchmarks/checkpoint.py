"""Checkpoint save and restore time and size of the `small` run's state, enlarged and shrunk.

  .venv/bin/python benchmarks/checkpoint.py [--repeats 3] [--no-append]

The state is what the trainer checkpoints: params + AdamW moments (+ masks and PLATON scores in
the prune phase), saved and restored through `checkpoint.save` / `checkpoint.restore` exactly
as a run does, onto the same shardings.
"""

import argparse
import os
import shutil
import sys
import tempfile

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from idea_prune_jax import checkpoint as ckpt_lib  # noqa: E402
from idea_prune_jax import config as config_lib  # noqa: E402
from idea_prune_jax import pipeline, sharding  # noqa: E402


def _size(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
             for f in files)


def measure(config, phase, repeats: int) -> list:
  mesh = sharding.make_mesh(config)
  parts = pipeline.parts(config, phase, mesh)
  state = jax.jit(parts.init_fn, out_shardings=parts.shardings)(jax.random.key(0))
  abstract = ckpt_lib.abstract_like(jax.eval_shape(parts.init_fn, jax.random.key(0)),
                                    parts.shardings)
  n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  saves, restores = [], []
  workdir = tempfile.mkdtemp(prefix='ckpt_bench_')
  try:
    mngr = ckpt_lib.manager(workdir, keep=repeats + 1)
    for i in range(repeats):
      wall, _, _ = common.timed(ckpt_lib.save, mngr, i, state, {'index': i}, {'phase': phase.name})
      saves.append(wall)
      wall, _, out = common.timed(ckpt_lib.restore, mngr, i, abstract)
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
  parser.add_argument('--no-append', action='store_true')
  args = parser.parse_args()
  config = config_lib.load(os.path.join(common.REPO, 'configs/small.py'))
  config.pipeline = 'idea'
  rows = [measure(config, phase, args.repeats) for phase in pipeline.plan(config)]
  headers = ['phase', 'state MiB', 'on disk MiB', 'save s (median)', 'restore s (median)',
             'save MiB/s', 'restore MiB/s']
  body = common.table(headers, rows)
  print(body)
  if not args.no_append:
    common.append_section('checkpoint: save / restore of the `small` state', body + '\n\n'
                          f'Medians of {args.repeats} synchronous saves and restores to local '
                          'disk (orbax, OCDBT); state = params + AdamW moments (+ masks and '
                          'PLATON scores while pruning).')


if __name__ == '__main__':
  main()
