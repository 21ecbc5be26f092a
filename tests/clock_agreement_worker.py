"""Run by test_checkpoint_faults.py: one of two CPU processes deciding wall-time saves.

  clock_agreement_worker.py COORDINATOR PROCESS_ID

Process 0's clock reaches train.ckpt_minutes=1 at step 15, then every 15 steps; process 1's says
a save is always due. Prints the steps at which this process decided to save, as JSON.
"""

import json
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from idea_prune_jax import settings  # noqa: E402
from idea_prune_jax.cli import initialize_distributed  # noqa: E402
from idea_prune_jax.train import loop  # noqa: E402

STEPS = 45


def main():
  coordinator, process_id = sys.argv[1], int(sys.argv[2])
  os.environ.update(IDEA_PRUNE_DISTRIBUTED='1', IDEA_PRUNE_COORDINATOR=coordinator,
                    IDEA_PRUNE_NUM_PROCESSES='2', IDEA_PRUNE_PROCESS_ID=str(process_id))
  config = settings.load(os.path.join(ROOT, 'configs/tiny.py:test'))
  config.train.ckpt_minutes = 1
  run = settings.read(config).run
  initialize_distributed(run.mesh)
  step = [0]
  clock = (lambda: 4.0 * step[0]) if process_id == 0 else (lambda: 1e9)
  ctx = types.SimpleNamespace(run=run, wall_clock=clock, last_save_s=0.0)
  saved = []
  for step[0] in range(1, STEPS + 1):
    if loop._save_due_by_clock(ctx, step[0]):
      saved.append(step[0])
      ctx.last_save_s = ctx.wall_clock()
  print(json.dumps(saved))


if __name__ == '__main__':
  main()
