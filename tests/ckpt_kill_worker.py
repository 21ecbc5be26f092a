"""Run by test_checkpoint_faults.py: a scratch run whose SIGTERM save never finishes.

  ckpt_kill_worker.py WORKDIR STARTED_FILE ASYNC(0|1)

configs/tiny.py:test, a checkpoint every 4 steps. Once step 4's save has started, the process
SIGTERMs itself (a preemption notice); the loop stops at step 5 and saves it, but that save's
write of the meta item stalls: it writes STARTED_FILE (the directory being written) and sleeps,
as a save too slow for the grace period would. The test then SIGKILLs it.
"""

import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from orbax.checkpoint._src.handlers import json_checkpoint_handler  # noqa: E402

from idea_prune_jax.io import checkpoint as ckpt_lib  # noqa: E402
from idea_prune_jax import settings  # noqa: E402
from idea_prune_jax.train import loop, pipeline  # noqa: E402
from idea_prune_jax import cli  # noqa: E402

TERM_AFTER = 4  # the step whose save is followed by the SIGTERM


def main():
  workdir, started, async_ckpt = sys.argv[1], sys.argv[2], sys.argv[3] == '1'
  config = settings.load(os.path.join(ROOT, 'configs/tiny.py:test'))
  config.pipeline = 'scratch'
  config.train.update(ckpt_every=TERM_AFTER, keep_ckpts=100, async_ckpt=async_ckpt)

  write_json = json_checkpoint_handler.JsonCheckpointHandler._save_fn

  async def stalling_write(self, x, directory):
    if os.path.basename(os.path.dirname(str(directory))).split('.')[0] == str(TERM_AFTER + 1):
      with open(started, 'w') as f:
        f.write(str(directory))
      time.sleep(600)
    return await write_json(self, x, directory)

  save = ckpt_lib.save

  def save_then_term(mngr, step, *args, **kwargs):
    save(mngr, step, *args, **kwargs)
    if step == TERM_AFTER:
      os.kill(os.getpid(), signal.SIGTERM)

  json_checkpoint_handler.JsonCheckpointHandler._save_fn = stalling_write
  ckpt_lib.save = save_then_term
  cli.install_sigterm_handler()
  try:
    pipeline.run_pipeline(settings.read(config).run, workdir)
  except loop.Preempted:
    pass
  sys.exit('the stalled save finished: it was meant to be killed')


if __name__ == '__main__':
  main()
