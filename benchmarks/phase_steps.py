"""Step time of each idea phase (enlarged, prune, recovery), with and without extra XLA flags.

XLA reads its flags once per process, so each measurement is a child process; the children
alternate (without, with, without, with, ...) so the two settings see the same machine load.

  .venv/bin/python benchmarks/phase_steps.py --configs configs/tiny.py,configs/micro.py \
      --xla_flags=--xla_cpu_experimental_ynn_fusion_type=dot

With --trees A,B the two settings are two checkouts of the repository instead (before and after a
refactor, say), each child importing its own tree's package, both under --xla_flags.
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
  from idea_prune_jax.data import batch as batch_lib
  from idea_prune_jax.train import pipeline, sharding
  from idea_prune_jax.train import plan as plan_lib
  run = settings.read(settings.load(os.path.join(common.REPO, spec))).run
  mesh = sharding.make_mesh(run.mesh)
  rng = np.random.RandomState(0)
  rows = rng.randint(4, run.model.vocab_size,
                     (run.train.batch_size, run.data.seq_len + 1)).astype(np.int32)
  batch = jax.device_put(batch_lib.from_rows(rows), sharding.batch_sharding(mesh))
  out = {}
  for phase in plan_lib.plan(run):
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
  parser.add_argument('--trees', default='', help='two checkouts to compare, e.g. /tmp/a,/tmp/b')
  parser.add_argument('--child', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args.child, args.steps)))
    return
  if args.trees:  # label -> (the child's script, its environment)
    trees = args.trees.split(',')
    settings = {t: (os.path.join(t, 'benchmarks', 'phase_steps.py'),
                    dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=args.xla_flags,
                         PYTHONPATH=t)) for t in trees}
  else:
    settings = {label: (__file__, dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=flags))
                for label, flags in (('no flags', ''), (args.xla_flags, args.xla_flags))}
  first, second = settings
  rows = []
  for spec in args.configs.split(','):
    runs = {label: [] for label in settings}
    for _ in range(args.rounds):
      for label, (script, env) in settings.items():
        out = subprocess.run([sys.executable, script, '--child', spec, '--steps',
                              str(args.steps)], env=env, capture_output=True, text=True,
                             check=True, cwd=env.get('PYTHONPATH'))
        runs[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for phase in runs[first][0]:
      a, b = ([r[phase] for r in runs[label]] for label in (first, second))
      rows.append([spec, phase, ' / '.join(f'{t:.3f}' for t in a),
                   ' / '.join(f'{t:.3f}' for t in b),
                   f'{common.median(a) / common.median(b):.2f}x'])
  headers = ['config', 'phase', f'step s, {first} (per child)', f'step s, {second}',
             f'{first} / {second} (medians)']
  body = common.table(headers, rows) + (
      f'\n\nMedian of {args.steps} steps after 3 warm-up ones, one random batch; children '
      'alternate between the two settings.')
  print(body)
  title = ('Idea phase step times, two checkouts' if args.trees else
           'Idea phase step times with and without XLA flags')
  common.append_section(f'{title} (benchmarks/phase_steps.py)', body)


if __name__ == '__main__':
  main()
