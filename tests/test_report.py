"""Run report and pipeline comparison from synthetic metrics.jsonl and importance snapshots."""

import json
import math
import os

import numpy as np
import pytest

from idea_prune_jax.tools import report

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
TOKENS_PER_STEP = 100


def _train_row(step, phase, **extra):
  return {'step': step, 'phase': phase, 'loss': 6.0 - step / 50, 'lr': 1e-3, 'grad_norm': 1.0,
          'tokens': TOKENS_PER_STEP, 'tokens_seen': (step + 1) * TOKENS_PER_STEP,
          'tokens_per_s': 1e4, **extra}


def _write_rows(workdir, rows):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)


def _idea_run(workdir):
  """Steps 0..90 every 10: enlarged to 30, prune 40..60 (width 8 -> 4), recovery from 70."""
  rows = []
  for step in range(0, 100, 10):
    phase = 'enlarged' if step < 40 else 'prune' if step < 70 else 'recovery'
    width = 8.0 if step < 40 else max(4.0, 8.0 - (step - 30) / 10)
    rows.append(_train_row(step, phase, ffn_width=width))
    if step % 30 == 0:
      rows.append({'step': step, 'phase': phase, 'val_loss': 5.0 - step / 100,
                   'val_ppl': math.exp(5.0 - step / 100), 'tokens_seen': (step + 1) * 100})
  # A resume from step 40: steps 40 and 50 are logged again, and the second rows are the kept run.
  rows.append(_train_row(40, 'prune', ffn_width=7.0, loss=1.25))
  rows.append(_train_row(50, 'prune', ffn_width=6.0, loss=1.5))
  _write_rows(workdir, rows)
  os.makedirs(os.path.join(workdir, 'importance'))
  rng = np.random.default_rng(0)
  scores = np.exp(rng.normal(size=(2, 8)))
  np.savez(os.path.join(workdir, 'importance', 't_start.npz'), scores=scores)
  mask = np.zeros((2, 8), bool)
  mask[:, :4] = True
  np.savez(os.path.join(workdir, 'importance', 't_end.npz'),
           scores=np.where(mask, scores + 1.0, 0.0), mask=mask)


def _assert_png(path):
  assert os.path.getsize(path) > 1000
  with open(path, 'rb') as f:
    assert f.read(8) == PNG_MAGIC


SUMMARY = {'pipeline': 'idea', 'params_enlarged': 1_000_000, 'params_final': 600_000,
           'ffn_enlarged': 8, 'ffn_final': 4, 'tokens': 10_000, 'steps': 100, 'val_loss': 4.1,
           'val_ppl': math.exp(4.1), 'wall_s': 12.5, 'export_dir': 'W/export'}


def test_read_metrics_dedups_with_later_rows_winning(tmp_path):
  _idea_run(tmp_path)
  train, evals = report.read_metrics(tmp_path)
  assert [r['step'] for r in train] == list(range(0, 100, 10))
  assert [r['step'] for r in evals] == [0, 30, 60, 90]
  assert train[4]['loss'] == 1.25 and train[4]['ffn_width'] == 7.0
  assert train[5]['loss'] == 1.5
  assert all('loss' not in r for r in evals)


def test_read_metrics_skips_torn_last_line(tmp_path):
  _write_rows(tmp_path, [_train_row(0, 'train')])
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 10, "phase": "tr')
  train, evals = report.read_metrics(tmp_path)
  assert [r['step'] for r in train] == [0] and evals == []


def test_phase_boundaries():
  rows = [{'step': s, 'phase': p, 'tokens_seen': s * 2}
          for s, p in ((0, 'a'), (5, 'a'), (10, 'b'), (15, 'c'), (20, 'c'))]
  assert report.phase_boundaries(rows) == [
      {'step': 10, 'tokens_seen': 20, 'from': 'a', 'to': 'b'},
      {'step': 15, 'tokens_seen': 30, 'from': 'b', 'to': 'c'}]


def test_write_report(tmp_path):
  _idea_run(tmp_path)
  report.write_report(str(tmp_path), SUMMARY)
  got = json.loads((tmp_path / 'report.json').read_text())
  assert got == {**SUMMARY, 'attempts': [],  # no goodput rows in this metrics.jsonl
                 'plots': ['loss.png', 'lr.png', 'ffn_width.png', 'importance.png']}
  for name in got['plots']:
    _assert_png(tmp_path / name)
  md = (tmp_path / 'report.md').read_text()
  assert '| enlarged → prune | 40 | 4,100 |' in md
  assert '| prune → recovery | 70 | 7,100 |' in md
  assert '| params_final | 600,000 |' in md and '| val_loss | 4.1000 |' in md
  assert all(f'({name})' in md for name in got['plots'])


def test_the_json_that_says_done_is_written_last(tmp_path, monkeypatch):
  """supervise.sh deletes the slice once report.json (compare.json) exists: nothing may follow."""
  written, real = [], report.storage.write_bytes  # write_text writes through it
  monkeypatch.setattr(report.storage, 'write_bytes', lambda path, data: (
      written.append(os.path.basename(path)), real(path, data))[1])
  _idea_run(tmp_path)
  report.write_report(str(tmp_path), SUMMARY)
  assert written[-1] == 'report.json' and {'report.md', 'loss.png'} <= set(written[:-1])
  pipelines = _pipelines(tmp_path)
  written.clear()
  report.write_compare(str(tmp_path / 'compare'), pipelines)
  assert written == ['compare.png', 'compare.md', 'compare.json']


def test_write_report_plots_and_averages_the_distilling_steps(tmp_path):
  rows = [_train_row(s, 'enlarged') for s in (0, 10)]
  rows += [_train_row(s, 'prune', ce=4.0 + s / 100, teacher_ce=3.0, kl=0.5) for s in (20, 30)]
  _write_rows(tmp_path, rows)
  report.write_report(str(tmp_path), {'pipeline': 'idea'})
  got = json.loads((tmp_path / 'report.json').read_text())
  assert got['kd_means'] == pytest.approx({'ce': 4.25, 'teacher_ce': 3.0, 'kl': 0.5})
  assert 'kd.png' in got['plots']
  _assert_png(tmp_path / 'kd.png')


def test_write_report_takes_exact_boundaries_from_the_plan(tmp_path):
  _idea_run(tmp_path)  # logged every 10 steps; the plan's phases start at 35 and 66
  phases = [{'name': 'enlarged', 'start': 0, 'end': 35, 'ffn_dim': 8},
            {'name': 'prune', 'start': 35, 'end': 66, 'ffn_dim': 8},
            {'name': 'recovery', 'start': 66, 'end': 100, 'ffn_dim': 4}]
  report.write_report(str(tmp_path), {**SUMMARY, 'phases': phases})
  md = (tmp_path / 'report.md').read_text()
  assert 'First step of each new phase.' in md
  assert '| enlarged → prune | 35 | 3,500 |' in md and '| prune → recovery | 66 | 6,600 |' in md


def test_write_report_skips_absent_plots(tmp_path):
  _write_rows(tmp_path, [_train_row(s, 'scratch') for s in range(0, 50, 10)])
  report.write_report(str(tmp_path), {'pipeline': 'scratch'})
  got = json.loads((tmp_path / 'report.json').read_text())
  assert got['plots'] == ['loss.png', 'lr.png']
  assert not (tmp_path / 'ffn_width.png').exists() and not (tmp_path / 'importance.png').exists()
  assert 'One phase only: scratch.' in (tmp_path / 'report.md').read_text()


def test_load_importance_orders_tags_and_reads_mask(tmp_path):
  _idea_run(tmp_path)
  snaps = report.load_importance(tmp_path)
  assert [tag for tag, _, _ in snaps] == ['t_start', 't_end']
  assert snaps[0][2] is None and snaps[1][2].sum() == 8 and snaps[1][1].shape == (2, 8)


def _pipelines(tmp_path):
  results = {}
  for name, final in (('naive', (4.0, 4.2)), ('idea', (3.5, 3.6))):
    dirs = []
    for seed, loss in enumerate(final):
      wd = str(tmp_path / f'{name}_{seed}')
      _write_rows(wd, [{'step': s, 'phase': 'x', 'val_loss': loss + 1 - s / 100,
                        'val_ppl': 1.0, 'tokens_seen': s * 10} for s in (0, 50, 100)])
      dirs.append(wd)
    results[name] = {'val_loss': list(final), 'val_ppl': [math.exp(v) for v in final],
                     'params_final': 600_000, 'tokens': 10_000, 'train_flops': 3.2e12,
                     'wall_s': [10.0, 14.0], 'workdirs': dirs}
  return results


def test_write_compare(tmp_path):
  out = tmp_path / 'compare'
  report.write_compare(str(out), _pipelines(tmp_path))
  got = json.loads((out / 'compare.json').read_text())
  assert list(got) == ['idea', 'naive']
  assert got['idea']['val_loss_mean'] == pytest.approx(3.55)
  assert got['idea']['val_loss_std'] == pytest.approx(0.1 / math.sqrt(2))
  assert got['naive']['val_loss_mean'] == pytest.approx(4.1)
  assert got['naive']['val_loss'] == [4.0, 4.2]
  assert got['idea']['val_ppl_mean'] == pytest.approx((math.exp(3.5) + math.exp(3.6)) / 2)
  assert got['idea']['wall_s_mean'] == 12.0 and got['idea']['params_final'] == 600_000
  md = (out / 'compare.md').read_text()
  rows = [line for line in md.splitlines() if line.startswith('| 1 ') or line.startswith('| 2 ')]
  assert rows[0].startswith('| 1 | idea | 3.5500 ± 0.0707 |') and '| 2 | naive |' in rows[1]
  assert ('**idea** wins: val loss 0.5500 nats below **naive** (next best), seed by seed ± 0.0707 '
          'over 2 seeds; it is ahead on every seed.') in md
  _assert_png(out / 'compare.png')


def test_compare_verdict_is_seed_by_seed():
  # The seeds overlap (3.4 > 3.1), but a is ahead of b by 0.1 on each seed: a clear win.
  table = report.compare_table({'a': {'val_loss': [3.0, 3.4]}, 'b': {'val_loss': [3.1, 3.5]},
                                'c': {'val_loss': []}})
  assert list(table) == ['a', 'b', 'c'] and math.isnan(table['c']['val_loss_mean'])
  assert 'val loss 0.1000 nats below **b** (next best), seed by seed ± 0.0000 over 2 seeds; it is ' \
         'ahead on every seed.' in report._verdict(table)
  table = report.compare_table({'a': {'val_loss': [3.0, 3.4]}, 'b': {'val_loss': [3.3, 3.35]}})
  assert 'ahead on 1 of 2 seeds, so the win is not clear.' in report._verdict(table)
