"""Shared fixtures: the tiny test config, and a runner for checks that need 8 fake devices."""

import json
import os
import subprocess
import sys

import pytest

from idea_prune_jax import config as config_lib

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
