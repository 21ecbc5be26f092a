"""Orbax checkpoints of the whole run: train state, data iterator position, phase and model shape."""

import dataclasses

import jax
import orbax.checkpoint as ocp

from idea_prune_jax import storage
from idea_prune_jax.config import ConfigError

_COMMIT_MARKER = 'commit_success.txt'  # orbax's mark of a finished save


def manager(workdir: str, keep: int = 2, subdir: str = 'checkpoints',
            async_save: bool = True, keep_steps: tuple[int, ...] = ()) -> ocp.CheckpointManager:
  """Orbax manager of W/checkpoints (local or gs://: orbax commits without renames on GCS).

  With async_save a save returns once the state is copied to host memory and training goes on
  while it is written; a step only counts (latest_step, restore) once committed, so a process
  killed mid-write resumes from the previous one. Call `wait_until_finished` before exiting.
  keep_steps: saved steps kept besides the latest `keep` (fork points, see `fork`).
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


def fork(src_workdir: str, dst_workdir: str, step: int, subdir: str = 'checkpoints') -> bool:
  """Copies src's committed checkpoint `step` into dst's checkpoints; False if src has none.

  A run in dst then resumes there, as it would have after training to `step` itself. Locally
  the copy is renamed into place once whole; on GCS orbax's commit marker is copied last.
  """
  src = storage.path(src_workdir) / subdir / str(step)
  if not (src / _COMMIT_MARKER).exists():
    return False
  storage.copy_dir(src, storage.join(dst_workdir, subdir, str(step)), last=_COMMIT_MARKER)
  return True


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


def abstract_like(state, shardings):
  """ShapeDtypeStructs carrying the target shardings, for restoring straight onto the mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iter):
  """(state, meta) at `step`, state placed by the shardings in abstract_state; data_iter is
  moved to the saved position in place."""
  from grain import checkpoint as grain_checkpoint
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain_checkpoint.CheckpointRestore(data_iter),
      meta=ocp.args.JsonRestore()))
  return out['state'], out['meta']


def model_meta(model_cfg) -> dict:
  return dataclasses.asdict(model_cfg)


def check_same_model(meta: dict, model_cfg, workdir: str) -> None:
  """Refuses to resume a checkpoint written for a different model shape."""
  saved = meta.get('model', {})
  mine = model_meta(model_cfg)
  diff = {k: (saved.get(k), v) for k, v in mine.items()
          if k in saved and saved[k] != v and k not in model_cfg.COMPUTE_FIELDS}
  if diff:
    field, (old, new) = next(iter(diff.items()))
    raise ConfigError(
        f'config.model.{field}={new!r}: workdir {workdir} holds a checkpoint of a different model '
        f'({field}={old!r}); use a fresh --workdir or the matching config')
