"""Run by test_multihost.py: one host of the two-process CPU run, or the one-process reference.

  multihost_worker.py WORKDIR RECORD_DIR KILL_AT

The idea pipeline of configs/tiny.py:test on a data=1, fsdp=2, tensor=2 mesh (fsdp spans the
hosts, tensor stays inside one), exported at the end. Every local batch this process feeds is
appended to RECORD_DIR/feed_<process>.jsonl. KILL_AT > 0: once the checkpoint of that step is
written on every host, the process SIGKILLs itself (no cleanup, no atexit: a preempted VM).
Multi-host when IDEA_PRUNE_DISTRIBUTED=1 and IDEA_PRUNE_{COORDINATOR,NUM_PROCESSES,PROCESS_ID}.
"""

import json
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from idea_prune_jax import checkpoint as ckpt_lib  # noqa: E402
from idea_prune_jax import config as config_lib  # noqa: E402
from idea_prune_jax import data as data_lib  # noqa: E402
from idea_prune_jax import experiment  # noqa: E402


def make_config():
  config = config_lib.load(os.path.join(ROOT, 'configs/tiny.py:test'))
  config.mesh.update(data=1, fsdp=2, tensor=2)
  # Steps 0-5 enlarged, 6-8 pruning, shrink, 9-11 recovery; a checkpoint at 10, after the shrink.
  config.train.ckpt_every = 5
  return config


def main():
  workdir, record_dir, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
  os.makedirs(record_dir, exist_ok=True)
  config = make_config()

  feed = None
  global_batch = data_lib.global_batch

  def recording_global_batch(local, sharding):
    nonlocal feed
    if feed is None:  # process_index is known only once loop.setup initialized jax.distributed
      feed = open(os.path.join(record_dir, f'feed_{jax.process_index()}.jsonl'), 'a')
    rows = np.concatenate([local['inputs'], local['targets'][:, -1:]], axis=1)
    feed.write(json.dumps(rows.tolist()) + '\n')
    feed.flush()
    out = global_batch(local, sharding)
    assert out['inputs'].shape[0] == config.train.batch_size, out['inputs'].shape
    return out

  save = ckpt_lib.save

  def save_then_maybe_die(mngr, step, *args, **kwargs):
    save(mngr, step, *args, **kwargs)
    if step == kill_at:
      multihost_utils.sync_global_devices(f'checkpoint {step} written everywhere')
      with open(os.path.join(record_dir, f'killed_{jax.process_index()}'), 'w') as f:
        f.write(str(step))
      os.kill(os.getpid(), signal.SIGKILL)

  data_lib.global_batch = recording_global_batch
  ckpt_lib.save = save_then_maybe_die
  summary = experiment.run(config, workdir)
  with open(os.path.join(record_dir, f'result_{jax.process_index()}.json'), 'w') as f:
    json.dump({'val_loss': summary['val_loss'], 'steps': summary['steps'],
               'ffn_final': summary['ffn_final'], 'process_count': jax.process_count(),
               'device_count': jax.device_count()}, f)


if __name__ == '__main__':
  main()
