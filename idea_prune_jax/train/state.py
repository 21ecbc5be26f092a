"""TrainState, the unit that is sharded, donated, checkpointed and restored, and its sharded
construction from abstract shapes."""

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from idea_prune_jax.model import model as model_lib
from idea_prune_jax.model.config import ModelConfig
from idea_prune_jax.prune.prune_optax import PruneState, find as find_prune_state
from idea_prune_jax.train import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  """Everything that is sharded, donated, checkpointed and restored as one unit.

  While pruning, opt_state is a `prune_optax.PruneState`: the masks and importance state
  live in it (read them as `state.masks`, `state.importance`).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  teacher: Any = None  # frozen teacher params while distilling

  @property
  def masks(self):
    """The masks while pruning ({unit: mask}); None for a dense model."""
    prune = find_prune_state(self.opt_state)
    return None if prune is None else prune.masks

  @property
  def importance(self):
    """The importance state while pruning (`importance.scores` of it ranks neurons); None for a
    dense model."""
    prune = find_prune_state(self.opt_state)
    return None if prune is None else prune.importance

  @property
  def hidden_kept(self):
    return hidden_kept(self.masks)


def hidden_kept(unit_masks):
  """The alive d_model channels while the hidden size is masked (the model's RMSNorm averages
  over them), else None."""
  if unit_masks is None or 'hidden' not in unit_masks:
    return None
  return jnp.sum(unit_masks['hidden'])


def abstract_params(model_cfg: ModelConfig):
  """Boxed ShapeDtypeStructs: shapes plus logical axis names, no memory."""
  return jax.eval_shape(functools.partial(model_lib.init_params, model_cfg), jax.random.key(0))

# The logical axes of each unit's masks and importance (`structure.llama`'s units): sharded like
# the axis they describe. 'heads' is [layers, KV groups, heads per group] ([layers, heads] when
# there is one group).
UNIT_AXES = {'ffn': ('layers', 'mlp'), 'kv_groups': ('layers', 'kv_heads'),
             'heads': ('layers', 'kv_heads', None), 'hidden': ('embed',), 'layers': ('layers',)}


def unit_shardings(tree_by_unit, mesh):
  """Shardings for a tree whose leaves sit under unit names ({unit: array}, or nested in fields
  as the importance state is)."""
  def sharding(path, leaf):
    axes = UNIT_AXES[path[-1].key]
    return sharding_lib.named(mesh, *(axes if len(axes) == len(leaf.shape) else ('layers', None)))
  return jax.tree_util.tree_map_with_path(sharding, tree_by_unit)


def state_shardings(abstract_state: TrainState, params_sharding, optimizer, mesh,
                    teacher_sharding=None) -> TrainState:
  """Opt moments follow their params; masks and the importance state shard like their axes;
  everything else (counts, step) is replicated. optimizer: the dense one (inside the prune
  wrapper, if any)."""
  replicated = sharding_lib.replicated(mesh)
  moments = lambda opt_state: optax.tree_map_params(
      optimizer, lambda _, s: s, opt_state, params_sharding,
      transform_non_params=lambda _: replicated)
  opt_state = abstract_state.opt_state
  if isinstance(opt_state, PruneState):
    opt_sharding = PruneState(count=replicated, masks=unit_shardings(opt_state.masks, mesh),
                              importance=unit_shardings(opt_state.importance, mesh),
                              inner=moments(opt_state.inner))
  else:
    opt_sharding = moments(opt_state)
  return TrainState(step=replicated, params=params_sharding, opt_state=opt_sharding,
                    teacher=teacher_sharding)

def init_state(model_cfg: ModelConfig, optimizer, mesh, key):
  """Dense state built already sharded: shapes first, then one jitted init with out_shardings."""
  boxed = abstract_params(model_cfg)
  params_sharding = sharding_lib.param_shardings(boxed, mesh)

  def _init(k):
    params = nn.unbox(model_lib.init_params(model_cfg, k))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))

  shardings = state_shardings(jax.eval_shape(_init, key), params_sharding, optimizer, mesh)
  return jax.jit(_init, out_shardings=shardings)(key), shardings
