"""Whether two checkouts compile the same train-step programs: after a refactor that should change
no computation, equal programs settle "is the step as fast as before" without timing noise.

  .venv/bin/python benchmarks/compiled_programs.py --trees /tmp/before,/tmp/after

Each tree's idea phases (configs/tiny.py: enlarged, prune, recovery) are lowered and compiled for
the CPU in a child process importing that tree's package; the optimized HLO is compared with its
debug information (source files and lines, stack frames) stripped.
"""

import argparse
import difflib
import hashlib
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402


def _child(tree: str) -> dict:
  """{phase: normalized optimized HLO} of the tree's tiny idea plan."""
  sys.path.insert(0, tree)  # ahead of this script's own checkout
  import jax
  import numpy as np
  from idea_prune_jax.train import pipeline, sharding
  try:
    from idea_prune_jax import settings
    from idea_prune_jax.data import batch as batch_lib
    from idea_prune_jax.train import plan as plan_lib
    run = settings.read(settings.load(os.path.join(tree, 'configs/tiny.py'))).run
    mesh, phases, make_batch = sharding.make_mesh(run.mesh), plan_lib.plan(run), batch_lib.from_rows
  except ImportError:  # a tree from before the settings edge (49ecc2e and older)
    from idea_prune_jax import config as config_lib
    from idea_prune_jax.data import data as data_lib
    run = config_lib.load(os.path.join(tree, 'configs/tiny.py'))
    mesh, phases, make_batch = sharding.make_mesh(run), pipeline.plan(run), data_lib.split_batch
  rows = np.zeros((run.train.batch_size, run.data.seq_len + 1), np.int32)
  batch = jax.device_put(make_batch(rows), sharding.batch_sharding(mesh))
  out = {}
  for phase in phases:
    parts = pipeline.parts(run, phase, mesh)
    state = jax.eval_shape(parts.init_fn, jax.random.key(0))
    text = pipeline.step_fn(run, phase, parts, mesh).lower(state, batch).compile().as_text()
    text = text[text.index('\nHloModule'):] if '\nHloModule' in text else text
    text = '\n'.join(l for l in text.split('\n') if not re.match(r'^\s*\d+ [{"]', l))
    text = re.sub(r',\s*metadata=\{[^}]*\}|,?\s*stack_frame_id=\d+', '', text)
    out[phase.name] = re.sub(r'^HloModule \S+', 'HloModule', text, flags=re.M)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--trees', default='', help='two checkouts, e.g. /tmp/before,/tmp/after')
  parser.add_argument('--child', help=argparse.SUPPRESS)
  parser.add_argument('--no-append', action='store_true')
  args = parser.parse_args()
  if args.child:
    print(json.dumps(_child(args.child)))
    return
  if len(args.trees.split(',')) != 2:
    parser.error('--trees needs two checkouts, e.g. --trees /tmp/before,/tmp/after')
  programs = []
  for tree in args.trees.split(','):
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=tree)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', tree], env=env,
                         cwd=tree, capture_output=True, text=True, check=True)
    programs.append(json.loads(out.stdout.strip().splitlines()[-1]))
  rows = []
  for phase in programs[0]:
    a, b = programs[0][phase], programs[1][phase]
    changed = [l for l in difflib.unified_diff(a.split('\n'), b.split('\n'), lineterm='', n=0)
               if l[:1] in '+-' and l[:3] not in ('+++', '---')]
    names = sorted({m for l in changed for m in re.findall(r'%(\w+?)\.\d+ = ', l)})
    rows.append([phase, f'{len(a.splitlines()):,}', hashlib.sha256(a.encode()).hexdigest()[:12],
                 hashlib.sha256(b.encode()).hexdigest()[:12],
                 'identical' if a == b else f'{len(changed)} lines differ ({", ".join(names[:4])})'])
  body = common.table(['phase', 'HLO lines', f'sha256, {args.trees.split(",")[0]}',
                       f'sha256, {args.trees.split(",")[1]}', 'optimized programs'], rows)
  print(body)
  if not args.no_append:
    common.append_section('Compiled train-step programs of two checkouts '
                          '(benchmarks/compiled_programs.py)', body)


if __name__ == '__main__':
  main()
