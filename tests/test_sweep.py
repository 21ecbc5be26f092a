"""The regime sweep: its run plan, best-LR table and gaps, and one tiny sweep end to end."""

import json
import math
import os

import pytest

from conftest import ROOT
from idea_prune_jax import settings
from idea_prune_jax.experiments import experiment
from idea_prune_jax.experiments import sweep
from idea_prune_jax.settings import ConfigError


def _config(**sweep_fields):
  c = settings.load(os.path.join(ROOT, 'configs/micro.py:test'))
  c.sweep.update(**sweep_fields)
  return c


def _runs(config, workdir: str) -> list[dict]:
  s = settings.read(config)
  return sweep.runs(s.run, s.sweep, workdir)


def _sweep(config, workdir: str) -> dict:
  s = settings.read(config)
  return sweep.sweep(s.run, s.sweep, workdir)


def test_plan_covers_budgets_lrs_seeds_and_flops_matches_scratch():
  c = _config(budgets='1,2', pipelines='idea,naive,scratch,scratch_flops', lrs='1e-3,2e-3',
              lr_pipelines='idea,scratch,scratch_flops', seeds=2)
  plan = _runs(c, '/s')
  key = lambda r: (r['budget'], r['pipeline'], r['lr'], r['seed'])
  assert len({key(r) for r in plan}) == len(plan) == len({r['dir'] for r in plan})
  # naive is left out of the LR study: the first LR only; the rest at every LR.
  assert {(r['pipeline'], r['lr']) for r in plan} == {
      (n, lr) for n in ('idea', 'scratch', 'scratch_flops') for lr in (1e-3, 2e-3)} | {
      ('naive', 1e-3)}
  assert len(plan) == 2 * 2 * (3 * 2 + 1)
  for r in plan:
    cfg, steps = r['config'], c.train.steps * r['budget']
    assert cfg.train.lr == r['lr'] and cfg.seed == r['seed']
    assert cfg.pipeline == {'scratch_flops': 'scratch'}.get(r['pipeline'], r['pipeline'])
    if r['pipeline'] == 'scratch_flops':  # the target model on idea's FLOPs: more steps
      assert cfg.train.steps > steps
    else:
      assert cfg.train.steps == steps
    assert r['budget_tokens'] == steps * c.train.batch_size * c.data.seq_len


def test_idea_kd_runs_once_per_kd_setting_with_its_distill_config():
  c = _config(budgets='1', pipelines='idea,idea_kd', lrs='1e-3', seeds=2,
              kd_alphas='0.1,0.9:0.5', kd_taus='1,2', kd_phases='prune,both')
  plan = _runs(c, '/s')
  kd = {r['pipeline']: r['config'].distill for r in plan if r['seed'] == c.seed
        and r['pipeline'] != 'idea'}
  assert len(plan) == 2 * (1 + 2 * 2 * 2) and len({r['dir'] for r in plan}) == len(plan)
  d = kd['idea_kd_a0.9-0.5cos_t2_prune']
  assert (d.alpha, d.alpha_end, d.alpha_schedule, d.tau, d.phases) == (0.9, 0.5, 'cosine', 2.0,
                                                                       'prune')
  d = kd['idea_kd_a0.1_t1_both']
  assert (d.alpha, d.alpha_schedule, d.tau, d.phases) == (0.1, 'constant', 1.0, 'both')
  assert all(r['config'].distill.alpha == 0.0 for r in plan if r['pipeline'] == 'idea')
  # Each idea_kd run forks from its seed's idea run at t_start, the step that run keeps.
  ideas = {r['seed']: r for r in plan if r['pipeline'] == 'idea'}
  t_start = c.train.steps * c.prune.t_start
  for r in plan:
    if r['pipeline'] != 'idea':
      assert r['start_from'] == {'dir': ideas[r['seed']]['dir'], 'step': t_start}
  assert {ideas[s]['config'].train.keep_steps for s in ideas} == {f'{t_start:g}'}
  # An LR idea does not run at has no idea run to fork from.
  tuned = _runs(_config(budgets='1', pipelines='idea_kd,idea', lrs='1e-3,2e-3', seeds=1,
                             lr_pipelines='idea_kd'), '/s')
  assert [(r['pipeline'], r['lr'], 'start_from' in r) for r in tuned] == [
      ('idea', 1e-3, False), ('idea_kd', 1e-3, True), ('idea_kd', 2e-3, False)]
  # No KD grid: one idea_kd, the distill config as it is (IDEA_KD_ALPHA when it has none).
  (only,) = [r for r in _runs(_config(pipelines='idea_kd', seeds=1, budgets='1'), '/s')]
  assert only['pipeline'] == 'idea_kd' and only['config'].distill.alpha == 0.1


@pytest.mark.parametrize('field,value,match', [
    ('budgets', '1,x', 'config.sweep.budgets'), ('lrs', '0,1e-3', 'config.sweep.lrs'),
    ('pipelines', 'idea,bogus', 'config.sweep.pipelines'), ('seeds', 0, 'config.sweep.seeds'),
    ('kd_alphas', '0.5,1.5', 'config.sweep.kd_alphas'),
    ('kd_alphas', '0.9:0.5:step', 'config.sweep.kd_alphas'),
    ('kd_taus', '1,-2', 'config.sweep.kd_taus'), ('kd_phases', 'all', 'config.sweep.kd_phases')])
def test_bad_sweep_fields_are_one_line_naming_them(field, value, match):
  with pytest.raises(ConfigError, match=match):
    _runs(_config(**{'pipelines': 'idea,idea_kd', field: value}), '/s')


def _result(budget, name, lr, seed, loss):
  return {'budget': budget, 'pipeline': name, 'lr': lr, 'seed': seed, 'val_loss': loss,
          'budget_tokens': 1000 * budget, 'train_flops': 1.0, 'tokens': 1000 * budget}


def test_table_takes_each_pipelines_best_lr_and_gaps_at_those():
  results = [_result(1, 'idea', 1e-3, s, 3.0 + s * 0.02) for s in (0, 1)]
  results += [_result(1, 'idea', 2e-3, s, 2.9 + s * 0.02) for s in (0, 1)]  # idea's best
  results += [_result(1, 'scratch', 1e-3, s, 2.95 + s * 0.04) for s in (0, 1)]  # scratch's best
  results += [_result(1, 'scratch', 2e-3, s, 3.2) for s in (0, 1)]
  results += [_result(1, 'idea', 5e-4, s, 3.5) for s in (0, 1)]  # a later sweep's lower peak
  (row,) = sweep.table(results, params_target=100)
  assert row['tokens_per_param'] == 10.0
  idea, scratch = row['pipelines']['idea'], row['pipelines']['scratch']
  assert idea['best_lr'] == 2e-3 and scratch['best_lr'] == 1e-3
  assert list(idea['by_lr']) == ['0.0005', '0.001', '0.002']  # by LR, not by when each ran
  assert idea['val_loss_mean'] == pytest.approx(2.91)
  # Seed by seed, each at its best LR: 2.90 − 2.95 and 2.92 − 2.99.
  assert row['idea-scratch'] == pytest.approx({'gap': -0.06, 'spread': math.sqrt(2) * 0.01,
                                               'seeds': 2})
  assert 'idea-scratch_flops' not in row and 'idea-naive' not in row  # no such runs
  results += [_result(1, 'naive', 1e-3, s, 2.96) for s in (0, 1)]
  assert sweep.table(results, params_target=100)[0]['idea-naive']['gap'] == pytest.approx(-0.05)
  assert row['kd-idea'] == {}


def test_table_gives_each_kd_setting_against_idea_seed_by_seed():
  # Seeds far apart (0.5), KD's effect small and steady: paired by seed it stands out.
  results = [_result(1, 'idea', 1e-3, s, 3.0 + 0.5 * s) for s in (0, 1)]
  results += [_result(1, 'idea', 2e-3, s, 2.0) for s in (0, 1)]  # idea's best LR, not KD's
  results += [_result(1, 'idea_kd_a0.1', 1e-3, s, 2.99 + 0.5 * s) for s in (0, 1)]
  results += [_result(1, 'idea_kd_a0.5', 1e-3, s, 3.1 + 0.4 * s) for s in (0, 1, 2)]
  (row,) = sweep.table(results, params_target=100)
  assert row['kd-idea']['idea_kd_a0.1'] == pytest.approx({'gap': -0.01, 'spread': 0.0,
                                                          'seeds': 2})
  assert row['kd-idea']['idea_kd_a0.5'] == pytest.approx(
      {'gap': 0.05, 'spread': math.sqrt(0.005), 'seeds': 2})  # seed 2 has no idea run
  # The teacher's and the student's CE while distilling: means over the best LR's seeds.
  results[4]['kd_means'] = {'ce': 4.0, 'teacher_ce': 3.0, 'kl': 0.5}
  results[5]['kd_means'] = {'ce': 5.0, 'teacher_ce': 3.5, 'kl': 0.7}
  (row,) = sweep.table(results, params_target=100)
  assert row['pipelines']['idea_kd_a0.1']['kd_means'] == pytest.approx(
      {'ce': 4.5, 'teacher_ce': 3.25, 'kl': 0.6})
  assert 'kd_means' not in row['pipelines']['idea_kd_a0.5']


def test_sweep_runs_writes_skips_finished_runs_and_forks_idea_kd_from_idea(tmp_path):
  # Compiles dominate here, so one budget, idea and one idea_kd: the plan and table tests cover
  # the grid; this covers runs -> sweep.json/md/png, the fork at t_start and the rerun.
  c = _config(budgets='1', pipelines='idea_kd,idea', lrs='1e-3', seeds=1)
  workdir = str(tmp_path / 's')
  out = _sweep(c, workdir)
  saved = json.loads((tmp_path / 's' / 'sweep.json').read_text())
  assert saved == json.loads(json.dumps(out)) and len(saved['runs']) == 2
  (row,) = saved['budgets']
  assert set(row['pipelines']) == {'idea', 'idea_kd'}
  assert math.isfinite(row['kd-idea']['idea_kd']['gap'])
  assert row['tokens'] == c.train.steps * c.train.batch_size * c.data.seq_len
  md = (tmp_path / 's' / 'sweep.md').read_text()
  assert 'idea_kd' in md and (tmp_path / 's' / 'sweep.png').stat().st_size > 0
  # idea ran first and kept its t_start checkpoint; idea_kd started from it, with idea's
  # metrics before t_start, and ends where a run of its own from step 0 ends.
  idea, kd = saved['runs']
  assert idea['pipeline'] == 'idea' and kd['start_from']['dir'] == idea['dir'] and kd['start_from']['done']
  t_start = kd['start_from']['step']
  assert os.path.isdir(os.path.join(idea['dir'], 'checkpoints', str(t_start)))
  rows = [json.loads(l) for l in open(os.path.join(kd['dir'], 'metrics.jsonl'))]
  assert rows[0]['step'] == 0 and {r['phase'] for r in rows if r['step'] < t_start} == {'enlarged'}
  (kd_plan,) = [r for r in _runs(c, workdir) if r['pipeline'] == 'idea_kd']
  alone = experiment.run_experiment(kd_plan['config'], str(tmp_path / 'alone'), do_export=False)
  assert alone['val_loss'] == kd['val_loss']
  assert set(kd['kd_means']) == {'ce', 'teacher_ce', 'kl'} and 'kd_means' not in idea
  assert f"{row['pipelines']['idea_kd']['kd_means']['teacher_ce']:.4f} |" in md
  # A rerun reads the finished runs' reports instead of training again.
  mtimes = {r['dir']: os.path.getmtime(os.path.join(r['dir'], 'report.json'))
            for r in saved['runs']}
  again = _sweep(c, workdir)
  assert [r['val_loss'] for r in again['runs']] == [r['val_loss'] for r in saved['runs']]
  assert all(os.path.getmtime(os.path.join(d, 'report.json')) == t for d, t in mtimes.items())
  # sweep.collect summarises the finished runs under the workdir, running nothing.
  c.sweep.collect = True
  collected = _sweep(c, workdir)
  assert json.loads(json.dumps(collected['budgets'])) == json.loads(json.dumps(again['budgets']))
  assert [r['pipeline'] for r in collected['runs']] == ['idea', 'idea_kd']


def test_ablation_axes_vary_one_field_each_around_the_config():
  c = _config(budgets='1', pipelines='idea,naive,scratch', lrs='1e-3', seeds=2,
              enlarge='2,4', t_starts='0.3', windows='0.4')
  c.prune.update(t_start=0.5, t_end=0.7)
  plan = _runs(c, '/s')
  by_label = {}
  for r in plan:
    by_label.setdefault(r['pipeline'], []).append(r)
  assert sorted(by_label) == ['idea', 'idea@e2', 'idea@e4', 'idea@ts0.3', 'idea@w0.4', 'naive',
                              'naive@e2', 'naive@e4', 'scratch']
  assert all(len(rs) == 2 for rs in by_label.values())  # every label on both seeds
  cfg = lambda label: by_label[label][0]['config']
  target = cfg('idea').prune.target_ffn  # 32 in micro:test
  assert cfg('idea@e2').model.ffn_dim == cfg('naive@e2').model.ffn_dim == 2 * target
  assert cfg('idea@e4').model.ffn_dim == 4 * target
  assert cfg('idea@e2').prune == cfg('idea').prune  # only the enlargement moved
  assert (cfg('idea@ts0.3').prune.t_start, cfg('idea@ts0.3').prune.t_end) == pytest.approx(
      (0.3, 0.5))  # the window length kept
  assert (cfg('idea@w0.4').prune.t_start, cfg('idea@w0.4').prune.t_end) == pytest.approx(
      (0.5, 0.9))
  assert cfg('idea@w0.4').model == cfg('idea').model
  assert len({r['dir'] for r in plan}) == len(plan)


@pytest.mark.parametrize('field,value,match', [
    ('enlarge', '1,2', r'config.sweep.enlarge=.*leaves nothing to prune'),
    ('windows', '0.6', r'config.sweep.windows: the w0.6 variant is not a valid run'),
    ('t_starts', 'x', r'config.sweep.t_starts')])
def test_bad_ablation_values_name_their_field(field, value, match):
  c = _config(budgets='1', pipelines='idea,naive,scratch', seeds=1, **{field: value})
  with pytest.raises(ConfigError, match=match):
    _runs(c, '/s')


def test_table_gaps_each_ablation_against_scratch_and_its_naive(tmp_path):
  results = [_result(1, 'scratch', 1e-3, s, 3.0 + s * 0.1) for s in (0, 1)]
  results += [_result(1, 'idea@e2', 1e-3, s, 2.9 + s * 0.1) for s in (0, 1)]
  results += [_result(1, 'naive@e2', 1e-3, s, 2.95 + s * 0.12) for s in (0, 1)]
  results += [_result(1, 'idea@ts0.3', 1e-3, s, 3.05 + s * 0.1) for s in (0, 1)]
  results += [_result(1, 'idea', 2e-3, s, 2.92 + s * 0.15) for s in (0, 1)]
  (row,) = sweep.table(results, params_target=100)
  gaps = row['ablations']
  assert gaps['idea@e2']['scratch']['gap'] == pytest.approx(-0.1)
  assert gaps['idea@e2']['naive']['gap'] == pytest.approx(-0.06)  # -0.05 and -0.07
  assert gaps['idea@ts0.3']['scratch']['gap'] == pytest.approx(0.05)
  assert 'naive' not in gaps['idea@ts0.3']  # no naive@ts0.3: naive has no window to move
  assert gaps['naive@e2']['scratch']['gap'] == pytest.approx(-0.04)
  assert gaps['idea@e2']['idea']['gap'] == pytest.approx(-0.045)  # -0.02 and -0.07
  assert 'idea' not in gaps['naive@e2']
  sweep.write(str(tmp_path), {'params_target': 100, 'runs': results, 'budgets': [row]})
  md = (tmp_path / 'sweep.md').read_text()
  assert ('| 1× | idea@e2 | 2.9500 ± 0.0707 | -0.1000 ± 0.0000 | -0.0600 ± 0.0141 | '
          '-0.0450 ± 0.0354 | 2 |') in md


def test_tag_labels_a_commands_runs_to_share_a_workdir_with_another_config():
  c = _config(budgets='1', pipelines='idea,naive', lrs='1e-3,2e-3', lr_pipelines='idea,naive',
              seeds=2, tag='wide')
  c.model.ffn_dim = 128
  plan = _runs(c, '/s')
  assert sorted({(r['pipeline'], r['lr']) for r in plan}) == [
      (n, lr) for n in ('idea@wide', 'naive@wide') for lr in (1e-3, 2e-3)]
  assert all(r['dir'].startswith('/s/x1/') and '@wide/lr' in r['dir'] for r in plan)
  assert {r['config'].pipeline for r in plan} == {'idea', 'naive'}
  assert {r['config'].model.ffn_dim for r in plan} == {128}


@pytest.mark.parametrize('fields,match', [
    ({'tag': 'a b'}, r'config.sweep.tag=.a b.: use letters'),
    ({'tag': 'x@y'}, r'config.sweep.tag'),
    ({'tag': 'w', 'enlarge': '2'}, r'labels a whole command'),
    ({'tag': 'w', 'pipelines': 'idea,idea_kd'}, r'labels a whole command')])
def test_bad_tags_name_the_field(fields, match):
  with pytest.raises(ConfigError, match=match):
    _runs(_config(budgets='1', seeds=1, **{'pipelines': 'idea,scratch', **fields}), '/s')
