"""compile-check reports for TPU slices as one BENCHMARKS.md section (per-chip HBM, roofline).

  idea-prune compile-check --config configs/paper_2p8b_to_1p3b.py:v5p64 --topology v5p-64 \\
      > v5p64.json
  python benchmarks/tpu_slices.py v5p64.json v6e64.json v5e64.json

Compiling the paper pair takes minutes of CPU per step, so the reports are made by the CLI (each
records its own command) and this script only lays them out.
"""

import json
import sys

import common

from idea_prune_jax.tools import compile_check


def section(reports) -> str:
  parts = []
  for r in reports:
    c = r['config']
    topo = c.get('topology', {})
    parts.append(f'### {topo.get("name", c["devices"])} ({c["devices"]} x {c["device_kind"]}, '
                 f'{c["platform"]} compiler)\n\n`{r.get("command", "")}`\n\n'
                 f'```\n{compile_check.table(r)}\n```\n')
  return '\n'.join(parts)


def main(paths):
  reports = [json.load(open(p)) for p in paths]
  body = ('Per chip, from the TPU compiler through libtpu (no TPU attached): HBM in GiB '
          '(argument, output, temp, total = arg + out + temp - aliased), compiled TFLOP and GB '
          'accessed per step (every loop iteration counted from the compiled HLO), model '
          'TFLOP (6N per token, + 2N for a KD teacher), the roofline bound max(flops / peak, '
          'bytes / HBM bandwidth) and the MFU it allows (chips.py peaks).\n\n' + section(reports))
  print(body)
  facts = {k: v for k, v in common.machine().items() if k in ('cpu', 'cores', 'jax')}
  common.append_section('compile-check on TPU slices (TPU compiler, paper pair)', body, facts)


if __name__ == '__main__':
  main(sys.argv[1:])
