"""The entry point's process-wide setup: env vars, `jax.config`, `jax.distributed`, re-exec.

`main` (the flags) and `commands` (what each command does) call these before any compute, as do
the test workers that stand in for `main`; no library module does, so library calls change no
process-wide state.
"""

import os
import signal
import sys

from idea_prune_jax.train.config import ConfigError, MeshConfig

# TPU pods find their peers themselves; elsewhere (CPU hosts, the two-process test) these name them.
_DISTRIBUTED_ENV = (('coordinator_address', 'IDEA_PRUNE_COORDINATOR', str),
                    ('num_processes', 'IDEA_PRUNE_NUM_PROCESSES', int),
                    ('process_id', 'IDEA_PRUNE_PROCESS_ID', int))
_COUNT_FLAG = '--xla_force_host_platform_device_count'
_REEXEC_ENV = 'IDEA_PRUNE_COMPILE_CHECK_REEXEC'


def install_sigterm_handler() -> None:
  """A SIGTERM then stops the run at the next step, with a checkpoint (`train.loop`). Call it
  before `initialize_distributed`: multi-host, jax.distributed.initialize() replaces it with JAX's
  preemption notifier, which tells every host at the same step."""
  from idea_prune_jax.train import loop
  signal.signal(signal.SIGTERM, lambda signum, frame: loop.SIGTERM.set())


def set_libtpu_args(mesh: MeshConfig) -> None:
  """mesh.libtpu_args into LIBTPU_INIT_ARGS, which libtpu reads once, when it starts."""
  from jax._src import xla_bridge  # backends_are_initialized(): no public spelling
  have = os.environ.get('LIBTPU_INIT_ARGS', '').split()
  missing = [a for a in mesh.libtpu_args.split() if a not in have]
  if not missing:
    return
  if xla_bridge.backends_are_initialized():
    raise ConfigError(
        f'config.mesh.libtpu_args={mesh.libtpu_args!r}: JAX started its backends before they '
        f'could be set; run with LIBTPU_INIT_ARGS="{" ".join(have + missing)}" instead')
  os.environ['LIBTPU_INIT_ARGS'] = ' '.join(have + missing)


def initialize_distributed(mesh: MeshConfig) -> None:
  """Multi-host: on when mesh.distributed or IDEA_PRUNE_DISTRIBUTED=1 says so (TPU pods set the
  rest)."""
  import jax
  if not (mesh.distributed or os.environ.get('IDEA_PRUNE_DISTRIBUTED') == '1'):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {arg: cast(os.environ[var]) for arg, var, cast in _DISTRIBUTED_ENV
            if os.environ.get(var)}
  if jax.config.jax_cpu_collectives_implementation in (None, 'none'):
    # Cross-process collectives on CPU devices need an implementation (older jax default none).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)


def use_compilation_cache(where: str, workdir: str) -> None:
  """The persistent compilation cache: a resumed run loads its compiled steps instead."""
  import jax
  from idea_prune_jax.data import storage
  if where == 'none' or (not where and os.environ.get('JAX_COMPILATION_CACHE_DIR')):
    return
  jax.config.update('jax_compilation_cache_dir', where or storage.join(workdir, 'jax_cache'))


def use_host_devices(n: int) -> list:
  """n CPU devices. XLA reads the device count once, when the backend starts, which JAX defers
  to the first device query; so the flag works unless something already asked for devices, in
  which case the process re-executes itself with the flag in its environment."""
  import jax
  kept = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith(_COUNT_FLAG)]
  os.environ['XLA_FLAGS'] = ' '.join(kept + [f'{_COUNT_FLAG}={n}'])
  os.environ['JAX_PLATFORMS'] = 'cpu'
  jax.config.update('jax_platforms', 'cpu')
  have = len(jax.devices())
  if have == n:
    return jax.devices()
  if os.environ.get(_REEXEC_ENV):
    raise ConfigError(f'--devices={n}: JAX started with {have} devices even after a '
                               f'restart with XLA_FLAGS={os.environ["XLA_FLAGS"]!r}')
  os.environ[_REEXEC_ENV] = '1'
  sys.stdout.flush()
  os.execv(sys.executable, [sys.executable] + sys.argv)


def use_tpu_compiler() -> None:
  """libtpu's compiler with no TPU attached: JAX's own backend stays the CPU, and libtpu's
  single-process lock (/tmp/libtpu_lockfile) must not stop a second compile-check or a test."""
  import jax
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  jax.config.update('jax_platforms', os.environ['JAX_PLATFORMS'])


def use_offline_hubs() -> None:
  """Nothing is downloaded at run time: the hub libraries' offline switches, where unset."""
  from idea_prune_jax.eval import harness
  for var, value in harness.OFFLINE_ENV.items():
    os.environ.setdefault(var, value)
