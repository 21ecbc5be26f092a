"""Step time of each idea phase (enlarged, prune, recovery), with and without extra XLA flags.

XLA reads its flags once per process, so each measurement is a child process; the children
alternate (without, with, without, with, ...) so the two settings see the same machine load.

  .venv/bin/python benchmarks/phase_steps.py --configs configs/tiny.py,configs/micro.py \
      --xla_flags=--xla_cpu_experimental_ynn_fusion_type=dot
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402


def measure(spec: str, steps: int) -> dict:
  """{phase: median step seconds} of the idea plan of `spec`, on one random batch."""
  import jax
  from idea_prune_jax import settings
  from idea_prune_jax.data import data as data_lib
  from idea_prune_jax.train import pipeline, sharding
  run = settings.read(settings.load(os.path.join(common.REPO, spec))).run
  mesh = sharding.make_mesh(run.mesh)
  rng = np.random.RandomState(0)
  rows = rng.randint(4, run.model.vocab_size,
                     (run.train.batch_size, run.data.seq_len + 1)).astype(np.int32)
  batch = jax.device_put(data_lib.split_batch(rows), sharding.batch_sharding(mesh))
  out = {}
  for phase in pipeline.plan(run):
    parts = pipeline.parts(run, phase, mesh)
    state = jax.jit(parts.init_fn, out_shardings=parts.shardings)(jax.random.key(0))
    step = pipeline.step_fn(run, phase, parts, mesh)
    for _ in range(3):  # compile and warm up
      state, _ = jax.block_until_ready(step(state, batch))
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      state, _ = jax.block_until_ready(step(state, batch))
      times.append(time.perf_counter() - t)
    out[phase.name] = common.median(times)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default='configs/tiny.py,configs/micro.py')
  parser.add_argument('--xla_flags', default='--xla_cpu_experimental_ynn_fusion_type=dot')
  parser.add_argument('--steps', type=int, default=10, help='timed steps per phase')
  parser.add_argument('--rounds', type=int, default=2, help='children per setting and config')
  parser.add_argument('--child', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args.child, args.steps)))
    return
  rows = []
  for spec in args.configs.split(','):
    runs = {'': [], args.xla_flags: []}
    for _ in range(args.rounds):
      for flags in runs:
        env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=flags)
        out = subprocess.run([sys.executable, __file__, '--child', spec, '--steps',
                              str(args.steps)], env=env, capture_output=True, text=True,
                             check=True)
        runs[flags].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for phase in runs[''][0]:
      base = [r[phase] for r in runs['']]
      flagged = [r[phase] for r in runs[args.xla_flags]]
      rows.append([spec, phase, ' / '.join(f'{t:.3f}' for t in base),
                   ' / '.join(f'{t:.3f}' for t in flagged),
                   f'{common.median(base) / common.median(flagged):.2f}x'])
  headers = ['config', 'phase', 'step s, no flags (per child)', f'step s, {args.xla_flags}',
             'speed-up (medians)']
  body = common.table(headers, rows) + (
      f'\n\nMedian of {args.steps} steps after 3 warm-up ones, one random batch; children '
      'alternate between the two settings.')
  print(body)
  common.append_section('Idea phase step times with and without XLA flags '
                        '(benchmarks/phase_steps.py)', body)


if __name__ == '__main__':
  main()
