"""Run by test_harness.py: the `idea-prune` LM on fixed requests, one process of two or alone.

  harness_worker.py EXPORT_DIR OUT_DIR

Multi-host when IDEA_PRUNE_DISTRIBUTED=1 and IDEA_PRUNE_{COORDINATOR,NUM_PROCESSES,PROCESS_ID}.
Writes OUT_DIR/result_<process>.json: every request kind's results and the compile counts.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from idea_prune_jax import settings  # noqa: E402
from idea_prune_jax.eval import harness  # noqa: E402
from idea_prune_jax.cli import initialize_distributed  # noqa: E402

CONTEXTS = ['To be, or not to be', 'Good night, sweet prince', 'O, what a rogue',
            'Frailty, thy name is woman', 'The rest is', '', 'Something is rotten in the state']


def main():
  export_dir, out_dir = sys.argv[1], sys.argv[2]
  initialize_distributed(settings.read(settings.base()).run.mesh)
  lm = harness.IdeaPruneLM(checkpoint=export_dir, batch_size=4, max_length=32)

  def inst(kind, args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)

  ll = lm.loglikelihood([inst('loglikelihood', (c, ' of Denmark')) for c in CONTEXTS],
                        disable_tqdm=True)
  rolling = lm.loglikelihood_rolling([inst('loglikelihood_rolling', (c * 6,))
                                      for c in CONTEXTS if c])
  gen = lm.generate_until([inst('generate_until', (c or 'Ham.', {'until': ['\n'],
                                                                  'max_gen_toks': 6}))
                           for c in CONTEXTS])
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f'result_{jax.process_index()}.json'), 'w') as f:
    json.dump({'loglikelihood': ll, 'rolling': rolling, 'generate': gen,
               'traces': dict(lm.scorer.traces), 'process_count': jax.process_count(),
               'device_count': jax.device_count()}, f)


if __name__ == '__main__':
  main()
