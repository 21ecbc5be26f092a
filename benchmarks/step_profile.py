"""Where a train step's time goes on this CPU: XLA ops from a jax.profiler trace, by kind, and the
step with its layers scanned against unrolled (the same stacked params), in one run.

  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot .venv/bin/python benchmarks/step_profile.py
  ... benchmarks/step_profile.py --config configs/small.py --no-append

Shares, not times, are the profile's figure (tracing slows the step); the scanned / unrolled
ratio is the median over interleaved rounds of best-of-5 steps.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from benchmarks import train_step  # noqa: E402

# (kind, test on an XLA:CPU thunk name), first match wins.
KINDS = (('matmuls (ynn_fusion, dot)', lambda n: n.startswith(('ynn_fusion', 'dot'))),
         ("the layer scan's dynamic-(update-)slices", lambda n: 'dynamic' in n),
         ('transposes and copies', lambda n: 'transpose' in n or n.startswith('copy')),
         ('broadcasts', lambda n: 'broadcast' in n),
         ('reduces', lambda n: 'reduce' in n),
         ('other fusions (norms, softmax, AdamW, RoPE)', lambda n: True))
_NOT_OPS = ('ThunkExecutor', '$', 'SlinkyThreadPool')


def op_shares(bench, steps: int = 5) -> dict[str, float]:
  """{kind: share of the summed XLA op time} over `steps` traced steps."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(steps):
        bench.run_step()
    [path] = glob.glob(f'{d}/**/*.trace.json.gz', recursive=True)
    events = json.load(gzip.open(path))
  events = events['traceEvents'] if isinstance(events, dict) else events
  spent = collections.Counter()
  for e in events:
    name = e.get('name', '')
    if e.get('ph') == 'X' and not name.startswith(_NOT_OPS):
      spent[next(kind for kind, match in KINDS if match(name))] += e.get('dur', 0)
  total = sum(spent.values())
  return {kind: spent[kind] / total for kind, _ in KINDS}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/tiny.py')
  parser.add_argument('--rounds', type=int, default=6)
  parser.add_argument('--no-append', action='store_true', help='print only')
  args = parser.parse_args(argv)
  benches = {u: train_step.build(args.config, [f'model.unroll_layers={u}']) for u in (False, True)}
  for b in benches.values():
    for _ in range(3):
      b.run_step()
  shares = op_shares(benches[False])
  best = {u: [] for u in benches}
  for _ in range(args.rounds):
    for u, b in benches.items():
      best[u].append(min(b.run_step()[0] for _ in range(5)))
  ratio = float(np.median(np.array(best[True]) / np.array(best[False])))
  body = common.table(['kind of XLA op (scanned step)', 'share'],
                      [(k, f'{v:.0%}') for k, v in shares.items()])
  body += (f'\n\nStep s, scanned / unrolled (median best-of-5): {np.median(best[False]):.3f} / '
           f'{np.median(best[True]):.3f}; unrolled / scanned {ratio:.2f}; compile s '
           f'{benches[False].compile_s:.1f} / {benches[True].compile_s:.1f}.')
  print(body)
  if not args.no_append:
    common.append_section(f'Train step profile: {benches[False].name}', body)


if __name__ == '__main__':
  main()
