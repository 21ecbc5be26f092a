"""Orbax checkpoints of the whole run: train state, data iterator position, phase and model shape."""

import dataclasses
import os

import jax
import orbax.checkpoint as ocp

from idea_prune_jax.config import ConfigError


def manager(workdir: str, keep: int = 2, subdir: str = 'checkpoints') -> ocp.CheckpointManager:
  """Saves are synchronous so SIGTERM-then-exit never leaves a half-written step behind."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False)
  path = os.path.abspath(os.path.join(workdir, subdir))
  return ocp.CheckpointManager(path, options=options, item_names=('state', 'data', 'meta'))


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      meta=ocp.args.JsonSave(meta)), force=True)
  mngr.wait_until_finished()


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


def abstract_like(state, shardings):
  """ShapeDtypeStructs carrying the target shardings, for restoring straight onto the mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """(state, data_state, meta) at `step`, state placed by the shardings in abstract_state."""
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=ocp.args.JsonRestore(),
      meta=ocp.args.JsonRestore()))
  return out['state'], out['data'], out['meta']


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
