"""Shared fixtures: the tiny test config, and a runner for checks that need 8 fake devices.

Also one persistent compilation cache for the whole session, this process and every process a
test starts: the same tiny programs are compiled by many tests (each resume test recompiles the
uninterrupted run's steps), and a cache hit skips XLA. Set before jax is imported. Tests of the
cache itself give their runs their own directory.
"""

import json
import os
import subprocess
import sys
import tempfile

if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ.update(JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(prefix='idea_prune_jax_cache_'),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')

import pytest  # noqa: E402

from idea_prune_jax import config as config_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_config():
  return config_lib.load(os.path.join(ROOT, 'configs/tiny.py:test'))


def run_on_devices(script: str, n_devices: int = 8, timeout: int = 600) -> dict:
  """Runs tests/<script> in a fresh process with n fake CPU devices; returns its last JSON line.

  XLA reads the device count once, at backend start, so sharded checks need their own process.
  """
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={n_devices}',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', script)], env=env,
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])
