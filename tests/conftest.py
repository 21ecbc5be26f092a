"""Shared fixtures: the tiny test config, and a runner for checks that need 8 fake devices.

Also one persistent compilation cache for the whole session, this process and every process a
test starts: the same tiny programs are compiled by many tests (each resume test recompiles the
uninterrupted run's steps), and a cache hit skips XLA. Set before jax is imported. Tests of the
cache itself give their runs their own directory.

And XLA:CPU at LLVM optimisation level 0, for this process and every process a test starts: the
tests compile hundreds of tiny programs and run each for a few steps, so LLVM's optimisation costs
more than it saves (a quarter of the suite's wall time). Every comparison is like for like.
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
# Likewise the embedded corpus, prepared once per set of prepare arguments (data/provision.py).
os.environ.setdefault('IDEA_PRUNE_DATA_CACHE', tempfile.mkdtemp(prefix='idea_prune_jax_data_'))
FAST_COMPILE_FLAG = '--xla_backend_optimization_level=0'
if FAST_COMPILE_FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {FAST_COMPILE_FLAG}'.strip()

import pytest  # noqa: E402

from idea_prune_jax import settings  # noqa: E402
from idea_prune_jax.train.config import check_devices  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_config():
  return settings.load(os.path.join(ROOT, 'configs/tiny.py:test'))


def run_on_devices(script: str, n_devices: int = 8, timeout: int = 600) -> dict:
  """Runs tests/<script> in a fresh process with n fake CPU devices; returns its last JSON line.

  XLA reads the device count once, at backend start, so sharded checks need their own process.
  Its programs (n-device meshes) are nobody else's: no compilation cache, whose writes cost 15%.
  """
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env.update(XLA_FLAGS=f'{FAST_COMPILE_FLAG} --xla_force_host_platform_device_count={n_devices}',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', script)], env=env,
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def checkpoint_state(workdir, step):
  """The train state a run saved at `step`, as plain arrays."""
  import orbax.checkpoint as ocp
  path = os.path.join(os.path.abspath(workdir), 'checkpoints', str(step), 'state')
  return ocp.StandardCheckpointer().restore(path)


def logged_losses(workdir) -> dict:
  """{step: train loss} from a run's metrics.jsonl."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


@pytest.fixture(scope='session')
def rehearsal_reference(tmp_path_factory):
  """The uninterrupted run both rehearsal files compare with (tests/fake_gcloud/fleet.py), one
  per session: under xdist the workers share basetemp's parent, which is this session's."""
  from fake_gcloud import fleet
  session_dir = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    session_dir = session_dir.parent
  report, stop = fleet.shared_reference(session_dir, timeout=240)
  yield report
  stop()


# The files that take a minute or more (several processes, a GCS server, 8-device meshes) start
# first: `make test` hands whole files to its workers in this order (--no-loadscope-reorder), and
# one of these last would run alone at the end while the other cores idle.
SLOW_FILES = ('test_rehearsal.py', 'test_rehearsal_faults.py', 'test_multihost.py', 'test_gcs.py',
              'test_sharding.py', 'test_resume.py', 'test_sweep.py', 'test_checkpoint_faults.py',
              'test_tpu_compile.py', 'test_compile_check.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: files keep order


def run_config(config):
  """The RunConfig a ConfigDict reads as (settings.read: checked)."""
  return settings.read(config).run


def validate(config, n_devices: int):
  """Every check a run makes before compute; the mesh shape."""
  return check_devices(run_config(config), n_devices)
