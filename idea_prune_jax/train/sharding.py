"""Mesh from config, the logical-axis rules table, and shardings for every piece of state."""

import os

import flax.linen as nn
import jax
import numpy as np
from jax._src import xla_bridge  # backends_are_initialized(): no public spelling
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from idea_prune_jax import config as config_lib

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


# TPU pods find their peers themselves; elsewhere (CPU hosts, the two-process test) these name them.
_DISTRIBUTED_ENV = (('coordinator_address', 'IDEA_PRUNE_COORDINATOR', str),
                    ('num_processes', 'IDEA_PRUNE_NUM_PROCESSES', int),
                    ('process_id', 'IDEA_PRUNE_PROCESS_ID', int))


def apply_libtpu_args(config) -> None:
  """config.mesh.libtpu_args into LIBTPU_INIT_ARGS, which libtpu reads once, when it starts."""
  wanted = config.mesh.libtpu_args.split()
  if any(not a.startswith('--') for a in wanted):
    raise config_lib.ConfigError(
        f'config.mesh.libtpu_args={config.mesh.libtpu_args!r}: flags start with --, e.g. '
        '--xla_tpu_enable_windowed_einsum_for_all_gather=false')
  have = os.environ.get('LIBTPU_INIT_ARGS', '').split()
  missing = [a for a in wanted if a not in have]
  if not missing:
    return
  if xla_bridge.backends_are_initialized():
    raise config_lib.ConfigError(
        f'config.mesh.libtpu_args={config.mesh.libtpu_args!r}: JAX started its backends before '
        f'they could be set; run with LIBTPU_INIT_ARGS="{" ".join(have + missing)}" instead')
  os.environ['LIBTPU_INIT_ARGS'] = ' '.join(have + missing)


def maybe_initialize_distributed(config) -> None:
  """Multi-host: on when the config or IDEA_PRUNE_DISTRIBUTED=1 says so (TPU pods set the rest)."""
  if config.mesh.distributed or os.environ.get('IDEA_PRUNE_DISTRIBUTED') == '1':
    if jax.distributed.is_initialized():
      return
    kwargs = {arg: cast(os.environ[var]) for arg, var, cast in _DISTRIBUTED_ENV
              if os.environ.get(var)}
    if jax.config.jax_cpu_collectives_implementation in (None, 'none'):
      # Cross-process collectives on CPU devices need an implementation (older jax default none).
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(**kwargs)


def make_mesh(config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = config_lib.mesh_shape(config, len(devices))
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
