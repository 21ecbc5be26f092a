"""Ahead-of-time compilation of the idea pipeline's steps for a pod-sized mesh, on fake CPU devices.

  idea-prune compile-check --config configs/paper_2p8b_to_1p3b.py --devices 64 \
      --mesh data=1,fsdp=64,tensor=1

Nothing is allocated or run: state and batch are ShapeDtypeStructs that carry their shardings, and
each step (the jitted, donated step of `pipeline.step_fn`) is only lowered and compiled. The
compiled SPMD program is one device's program, so `memory_analysis()` reads per device.
"""

import copy
import math
import os
import sys
import time

import jax
import jax.numpy as jnp

from idea_prune_jax import checkpoint as ckpt_lib
from idea_prune_jax import config as config_lib
from idea_prune_jax import model as model_lib
from idea_prune_jax import pipeline
from idea_prune_jax import schedules
from idea_prune_jax import sharding as sharding_lib
from idea_prune_jax import structure
from idea_prune_jax.config import ConfigError, ModelConfig

GIB = 2 ** 30
STEPS = ('enlarged', 'prune', 'recovery')
KD_ALPHA = 0.5  # what `compare`'s idea_kd uses when the config has no alpha of its own
_COUNT_FLAG = '--xla_force_host_platform_device_count'
_REEXEC_ENV = 'IDEA_PRUNE_COMPILE_CHECK_REEXEC'


def parse_mesh(spec: str) -> dict[str, int]:
  """'data=1,fsdp=16,tensor=4' -> {'data': 1, 'fsdp': 16, 'tensor': 4}; unnamed axes keep config."""
  out = {}
  for item in (s.strip() for s in spec.split(',') if s.strip()):
    name, eq, value = item.partition('=')
    name = name.strip()
    if not eq or name not in sharding_lib.AXES:
      raise ConfigError(f'--mesh={spec!r}: {item!r} is not AXIS=SIZE with AXIS one of '
                        f'{",".join(sharding_lib.AXES)} (e.g. data=1,fsdp=16,tensor=4)')
    try:
      out[name] = int(value)
    except ValueError:
      raise ConfigError(f'--mesh={spec!r}: mesh.{name}={value.strip()!r} is not an integer'
                        ) from None
    if out[name] != -1 and out[name] < 1:
      raise ConfigError(f'--mesh={spec!r}: mesh.{name}={out[name]} must be >= 1 (or -1)')
  if not out:
    raise ConfigError(f'--mesh={spec!r}: empty; e.g. data=1,fsdp=16,tensor=4')
  return out


def use_host_devices(n: int) -> None:
  """Makes JAX see n CPU devices.

  XLA reads the device count once, when the backend starts, which JAX defers to the first device
  query; so setting XLA_FLAGS here works unless something already asked for devices, in which
  case the process re-executes itself with the flag in its environment.
  """
  kept = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith(_COUNT_FLAG)]
  os.environ['XLA_FLAGS'] = ' '.join(kept + [f'{_COUNT_FLAG}={n}'])
  os.environ['JAX_PLATFORMS'] = 'cpu'
  jax.config.update('jax_platforms', 'cpu')
  have = len(jax.devices())
  if have == n:
    return
  if os.environ.get(_REEXEC_ENV):
    raise ConfigError(f'--devices={n}: JAX started with {have} devices even after a restart with '
                      f'XLA_FLAGS={os.environ["XLA_FLAGS"]!r}')
  os.environ[_REEXEC_ENV] = '1'
  sys.stdout.flush()
  os.execv(sys.executable, [sys.executable] + sys.argv)


def kd_config(config):
  """The idea pipeline with KD in its prune phase; recovery stays as the config runs it.

  A config without KD gets alpha=KD_ALPHA on the prune phase only, so the prune step holds masks,
  scores and the teacher while the recovery step is still the plain shrunk one.
  """
  config = copy.deepcopy(config)
  config.pipeline = 'idea'
  if config.distill.alpha <= 0:
    config.distill.alpha, config.distill.phases = KD_ALPHA, 'prune'
  elif config.distill.phases == 'recovery':
    config.distill.phases = 'both'
  return config


def abstract_batch(config, mesh):
  shape = (config.train.batch_size, config.data.seq_len)
  leaf = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding_lib.batch_sharding(mesh))
  weights = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=leaf.sharding)
  return {'inputs': leaf, 'targets': leaf, 'weights': weights}


def _name(path) -> str:
  return '/'.join(structure.key_names(path))


def _check_divisible(state, mesh) -> None:
  """One line naming the mesh field, where jit would raise many, for a dim split unevenly."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    for dim, (size, axes) in enumerate(zip(leaf.shape, leaf.sharding.spec)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      ways = math.prod(mesh.shape[a] for a in axes)
      if size % ways:
        raise ConfigError(f'config.mesh.{axes[-1]}={mesh.shape[axes[-1]]}: {_name(path)} dim '
                          f'{dim} (size {size}) does not split {ways} ways over mesh axes {axes}')


def _state_bytes(state) -> dict:
  """Per-device state bytes from the shardings, and what of it every device holds in full."""
  total = replicated = 0
  largest = ('', 0)
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    nbytes = math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    total += nbytes
    if leaf.sharding.is_fully_replicated and leaf.sharding.num_devices > 1:
      replicated += nbytes
      largest = max(largest, (_name(path), nbytes), key=lambda t: t[1])
  return {'state_bytes': total, 'replicated_state_bytes': replicated,
          'largest_replicated': largest[0]}


def compile_step(config, phase: pipeline.Phase, mesh, hbm_gib: float) -> dict:
  """Lowers and compiles one phase's step from abstract state; its per-device memory figures."""
  parts = pipeline.parts(config, phase, mesh)
  state = ckpt_lib.abstract_like(jax.eval_shape(parts.init_fn, jax.random.key(0)),
                                 parts.shardings)
  _check_divisible(state, mesh)
  step = pipeline.step_fn(config, phase, parts, mesh)
  t0 = time.perf_counter()
  lowered = step.lower(state, abstract_batch(config, mesh))
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  out = {'ffn_dim': phase.ffn_dim, 'kd': phase.kd, 'teacher': phase.teacher,
         'masks': phase.prune is not None, 'lower_s': round(t1 - t0, 2),
         'compile_s': round(t2 - t1, 2), **_state_bytes(state)}
  mem = compiled.memory_analysis()
  if mem is None:  # some backends report nothing
    return out
  for key in ('argument', 'output', 'temp', 'alias', 'generated_code'):
    out[f'{key}_bytes'] = int(getattr(mem, f'{key}_size_in_bytes', 0))
  total = out['argument_bytes'] + out['output_bytes'] + out['temp_bytes'] - out['alias_bytes']
  out.update(total_bytes=total, total_gib=round(total / GIB, 3),
             fits_hbm_gib=total <= hbm_gib * GIB)
  return out


def validate(config, n_devices: int):
  """The KD config compile_check compiles, after the checks a run would make."""
  config = kd_config(config)
  _, _, tensor = config_lib.validate(config, n_devices)
  schedules.validate_prune(config, tensor)
  return config


def compile_check(config, n_devices: int, hbm_gib: float = 95.0) -> dict:
  """Compiles the enlarged, prune+KD and recovery steps of config on the first n_devices devices."""
  config = validate(config, n_devices)
  devices = jax.devices()
  if len(devices) < n_devices:
    raise ConfigError(f'--devices={n_devices}: JAX sees only {len(devices)} devices')
  mesh = sharding_lib.make_mesh(config, devices[:n_devices])
  phases = {ph.name: ph for ph in pipeline.plan(config)}
  steps = {name: compile_step(config, phases[name], mesh, hbm_gib) for name in STEPS}
  return {
      'config': {
          'devices': n_devices, 'platform': devices[0].platform,
          'mesh': dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape))),
          'batch': config.train.batch_size, 'seq_len': config.data.seq_len,
          'dtype': config.model.dtype, 'param_dtype': config.model.param_dtype,
          'remat': config.model.remat, 'distill_alpha': config.distill.alpha,
          'distill_phases': config.distill.phases,
          'params_enlarged': model_lib.param_count(ModelConfig.from_config(config)),
          'params_target': model_lib.param_count(
              ModelConfig.from_config(config, ffn_dim=config.prune.target_ffn)),
          'jax': jax.__version__},
      'hbm_gib': hbm_gib,
      'steps': steps,
      'fits_hbm_gib': {name: s.get('fits_hbm_gib') for name, s in steps.items()},
  }


def command(config, n_devices: int, mesh: str | None, hbm_gib: float) -> dict:
  """The CLI's compile-check: --mesh into config.mesh, validate, fake devices, compile."""
  config = copy.deepcopy(config)
  if n_devices is None or n_devices < 1:
    raise ConfigError(f'--devices={n_devices}: compile-check needs the chip count of the slice, '
                      'e.g. --devices 64')
  if mesh:
    config.mesh.update(parse_mesh(mesh))
  validate(config, n_devices)  # a bad mesh fails before the devices start
  use_host_devices(n_devices)
  return compile_check(config, n_devices, hbm_gib)
