"""Run by test_multihost.py: one host of the two-process CPU run, or the one-process reference.

  multihost_worker.py WORKDIR RECORD_DIR [kill@STEP | term@STEP | run]

The idea pipeline of configs/tiny.py:test on a data=1, fsdp=2, tensor=2 mesh (fsdp spans the
hosts, tensor stays inside one), exported at the end. Every local batch this process feeds is
appended to RECORD_DIR/feed_<process>.jsonl. After the checkpoint of STEP:
  kill@STEP  every host, once all have committed it, SIGKILLs itself (no cleanup, no atexit);
  term@STEP  the last host alone SIGTERMs itself (a preemption notice reaching one VM) and holds
             still for NOTICE_S, as a slow host would; JAX's preemption service (whose SIGTERM
             handler polls once a second) must then stop the run on every host at one step,
             with a checkpoint.
Multi-host when IDEA_PRUNE_DISTRIBUTED=1 and IDEA_PRUNE_{COORDINATOR,NUM_PROCESSES,PROCESS_ID}.
"""

import json
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from idea_prune_jax.io import checkpoint as ckpt_lib  # noqa: E402
from idea_prune_jax import settings  # noqa: E402
from idea_prune_jax.data import batch as batch_lib  # noqa: E402
from idea_prune_jax.experiments import experiment  # noqa: E402
from idea_prune_jax.train import loop  # noqa: E402
from idea_prune_jax.cli import initialize_distributed  # noqa: E402

NOTICE_S = 2.5  # > the notifier's 1 s poll plus a round trip through the coordinator


def make_config():
  config = settings.load(os.path.join(ROOT, 'configs/tiny.py:test'))
  config.mesh.update(data=1, fsdp=2, tensor=2)
  # Steps 0-5 enlarged, 6-8 pruning, shrink, 9-11 recovery; a checkpoint at 10, after the shrink.
  config.train.ckpt_every = 5
  config.data.shards = 2  # one data shard per host; the one-process reference reads both
  return config


def main():
  workdir, record_dir, action = sys.argv[1], sys.argv[2], sys.argv[3]
  what, _, at = action.partition('@')
  at = int(at) if at else -1
  os.makedirs(record_dir, exist_ok=True)
  config = make_config()

  feed = None
  global_batch = batch_lib.global_batch

  def recording_global_batch(local, sharding):
    nonlocal feed
    if feed is None:  # one file per process
      feed = open(os.path.join(record_dir, f'feed_{jax.process_index()}.jsonl'), 'a')
    rows = np.concatenate([local['inputs'], local['targets'][:, -1:]], axis=1)
    feed.write(json.dumps(rows.tolist()) + '\n')
    feed.flush()
    out = global_batch(local, sharding)
    assert out['inputs'].shape[0] == config.train.batch_size, out['inputs'].shape
    return out

  save = ckpt_lib.save

  def save_then_act(mngr, step, *args, **kwargs):
    save(mngr, step, *args, **kwargs)
    if step != at:
      return
    if what == 'kill':
      mngr.wait_until_finished()  # saves are async: this one must be committed first
      multihost_utils.sync_global_devices(f'checkpoint {step} written everywhere')
      _mark(record_dir, 'killed', step)
      os.kill(os.getpid(), signal.SIGKILL)
    elif what == 'term' and jax.process_index() == jax.process_count() - 1:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier notes it; no exit here
      time.sleep(NOTICE_S)

  batch_lib.global_batch = recording_global_batch
  ckpt_lib.save = save_then_act
  try:
    run = settings.read(config).run
    initialize_distributed(run.mesh)  # IDEA_PRUNE_DISTRIBUTED=1, as the launch scripts set it
    summary = experiment.run_experiment(run, workdir)
  except loop.Preempted as e:  # as the CLI: a clean exit, rerun to resume
    _mark(record_dir, 'preempted', str(e))
    return
  with open(os.path.join(record_dir, f'result_{jax.process_index()}.json'), 'w') as f:
    json.dump({'val_loss': summary['val_loss'], 'steps': summary['steps'],
               'ffn_final': summary['ffn_final'], 'process_count': jax.process_count(),
               'device_count': jax.device_count()}, f)


def _mark(record_dir, name, value):
  with open(os.path.join(record_dir, f'{name}_{jax.process_index()}'), 'w') as f:
    f.write(str(value))


if __name__ == '__main__':
  main()
