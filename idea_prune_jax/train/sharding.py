"""The mesh, the logical-axis rules table, and shardings for every piece of state."""

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from idea_prune_jax.train.config import MeshConfig, mesh_shape

AXES = ('data', 'fsdp', 'tensor')

# Logical axis -> mesh axes. Params shard over fsdp on d_model and over tensor on the
# head / FFN / vocab axes; FFN masks and importance scores use 'mlp' and so shard like the FFN.
RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('q_heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('vocab', 'tensor'),
    ('layers', None),
    ('norm', None),
    ('length', None),
)


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  # A plain Mesh keeps Auto axis types: classic sharding propagation inside jit.
  return Mesh(grid, AXES)


def logical_to_sharding(logical_tree, mesh: Mesh):
  """A pytree of logical PartitionSpecs -> NamedShardings under RULES."""
  return nn.logical_to_mesh_sharding(logical_tree, mesh, RULES)


def spec(*logical_axes) -> P:
  return nn.logical_to_mesh_axes(logical_axes, RULES)


def named(mesh: Mesh, *logical_axes) -> NamedSharding:
  return NamedSharding(mesh, spec(*logical_axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return named(mesh, 'batch', 'length')


def param_shardings(boxed_params, mesh: Mesh):
  """Shardings for a (possibly abstract) boxed param tree, from its logical names."""
  return logical_to_sharding(nn.get_partition_spec(boxed_params), mesh)


class MeshJit:
  """A jitted function traced and run under jax.set_mesh(mesh), so that the model's activation
  constraints (`model.shard_batch`) see the mesh; no mesh, no constraint (tests, user code)."""

  def __init__(self, jitted, mesh: Mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args, **kwargs)

  def _cache_size(self) -> int:
    return self.jitted._cache_size()
