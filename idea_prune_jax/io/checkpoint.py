"""Orbax checkpoints of the whole run: train state, data iterator position, phase and model shape."""

import re
import time

import jax
import orbax.checkpoint as ocp
from absl import logging

from idea_prune_jax.data import storage

_COMMIT_MARKER = 'commit_success.txt'  # orbax's mark of a finished save

# Waits between tries of a checkpoint read that failed on the way to storage (7 tries over about
# a minute): a bucket's bad minute must cost a pause, never a checkpoint.
RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
# tensorstore reports GCS failures as ValueErrors carrying an absl status and the HTTP code.
_TRANSIENT_STATUS = re.compile(r'\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|ABORTED):|'
                               r'HTTP response code: (5\d\d|408|429)\b')
_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}
# aiohttp's (under gcsfs), by name: the gcs extra is optional.
_TRANSIENT_CLASSES = {'ClientConnectionError', 'ClientPayloadError', 'ServerDisconnectedError',
                      'ServerTimeoutError'}


class StorageUnavailable(storage.StorageError):
  """Reading a checkpoint failed transiently through every retry; nothing was set aside."""


def manager(workdir: str, keep: int = 2, subdir: str = 'checkpoints',
            async_save: bool = True, keep_steps: tuple[int, ...] = ()) -> ocp.CheckpointManager:
  """Orbax manager of W/checkpoints (local or gs://: orbax commits without renames on GCS).

  With async_save a save returns once the state is copied to host memory and training goes on
  while it is written; a step only counts (latest_step, restore) once committed, so a process
  killed mid-write resumes from the previous one. Call `wait_until_finished` before exiting.
  Committed means: locally, renamed from <step>.orbax-checkpoint-tmp-* to <step>; on gs:// (no
  rename) written into <step>/ with commit_success.txt last, a step without it not listed. The
  test of a kill mid-write (tests/test_checkpoint_faults.py) passes with either scheme forced.
  keep_steps: saved steps kept besides the latest `keep` (where other runs start, `copy_step`).
  """
  if keep_steps:
    policy = ocp.checkpoint_managers.preservation_policy
    keeping = dict(max_to_keep=None, preservation_policy=policy.AnyPreservationPolicy(
        [policy.LatestN(keep), policy.CustomSteps(list(keep_steps))]))
  else:
    keeping = dict(max_to_keep=keep)
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=async_save,
                                         **keeping)
  return ocp.CheckpointManager(storage.join(workdir, subdir), options=options,
                               item_names=('state', 'data', 'meta'))


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, meta: dict) -> None:
  """Starts the save of `step` (waits for the previous one first); returns before it commits.

  data_iter: the train iterator; grain's handler stores its position (one file per host) before
  this returns, so the loop may advance it at once.
  """
  from grain import checkpoint as grain_checkpoint  # the data extra; data.build checked it
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain_checkpoint.CheckpointSave(data_iter),
      meta=ocp.args.JsonSave(meta)), force=True)


def copy_step(src_workdir: str, dst_workdir: str, step: int, subdir: str = 'checkpoints') -> bool:
  """Copies src's committed checkpoint `step` into dst's checkpoints; False if src has none.

  A run in dst then resumes there, as it would have after training to `step` itself. Locally
  the copy is renamed into place once whole; on GCS orbax's commit marker is copied last.
  """
  src = storage.path(src_workdir) / subdir / str(step)
  if not (src / _COMMIT_MARKER).exists():
    return False
  storage.copy_dir(src, storage.join(dst_workdir, subdir, str(step)), last=_COMMIT_MARKER)
  return True


def is_transient(error: BaseException) -> bool:
  """A timeout, reset connection, 5xx, 408 or 429 on the way to storage (or one behind `error`):
  worth another try. Anything else (a file that reads wrong) is not."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if (isinstance(error, (TimeoutError, ConnectionError))
        or getattr(error, 'code', None) in _TRANSIENT_HTTP
        or _TRANSIENT_CLASSES & {c.__name__ for c in type(error).__mro__}
        or _TRANSIENT_STATUS.search(str(error))):
      return True
    error = error.__cause__ or error.__context__
  return False


def _first_line(error: BaseException) -> str:
  return f'{type(error).__name__}: {(str(error).splitlines() or [""])[0][:200]}'


def _retrying(read, what: str):
  """read(), tried again after each of RETRY_DELAYS_S while storage fails transiently."""
  delays = RETRY_DELAYS_S
  for attempt in range(len(delays) + 1):
    try:
      return read()
    except Exception as e:  # noqa: BLE001  sorted by is_transient; the rest re-raised
      if not is_transient(e):
        raise
      if attempt == len(delays):
        raise StorageUnavailable(
            f'cannot read {what}: storage failed {attempt + 1} times '
            f'in {sum(delays):.0f} s, last with {_first_line(e)}; rerun once it answers (the '
            'checkpoint was left as it is)') from e
      logging.warning('reading %s failed (%s); retrying in %.0f s', what, _first_line(e),
                      delays[attempt])
      time.sleep(delays[attempt])


def all_steps(mngr: ocp.CheckpointManager) -> list[int]:
  """The committed steps, newest first."""
  return sorted(_retrying(mngr.all_steps, 'the list of checkpoints'), reverse=True)


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  return _retrying(lambda: mngr.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore()))['meta'], f'checkpoint step {step} (meta)')


def abstract_like(state, shardings):
  """ShapeDtypeStructs carrying the target shardings, for restoring straight onto the mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iter):
  """(state, meta) at `step`, state placed by the shardings in abstract_state; data_iter is
  moved to the saved position in place.

  A transient storage error is retried (StorageUnavailable once the retries are spent); any
  other error means the checkpoint reads wrong, and is raised at once.
  """
  from grain import checkpoint as grain_checkpoint
  out = _retrying(lambda: mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain_checkpoint.CheckpointRestore(data_iter),
      meta=ocp.args.JsonRestore())), f'checkpoint step {step}')
  return out['state'], out['meta']
