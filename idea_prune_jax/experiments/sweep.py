"""The regime study (`idea-prune sweep`): pipelines × token budgets × peak LRs × seeds.

Where does enlarge-and-prune pay off? A budget multiplies train.steps; `scratch_flops` is the
target model trained on as many FLOPs as idea spends at that budget. A pipeline's figure at a
budget is its best peak LR (lowest mean validation loss over seeds), so one shared peak cannot
decide the ranking. `idea_kd` runs once per KD setting of sweep.kd_alphas × kd_taus × kd_phases
and each is tabled against idea. The paper's ablations (sweep.enlarge, sweep.t_starts,
sweep.windows) add idea (and naive, for the enlargement) variants, each tabled against scratch
and naive at the same tag. Writes sweep.json, sweep.md and sweep.png (the val-loss gaps
idea − scratch, idea − scratch_flops and idea − naive, seed by seed, against tokens per target
parameter). A rerun skips finished runs.
"""

import json
import os
import re

import jax
from jax.experimental import multihost_utils
from matplotlib.figure import Figure

from idea_prune_jax.io import checkpoint as ckpt_lib
from idea_prune_jax.prune import distill
from idea_prune_jax.experiments import experiment
from idea_prune_jax.model import model as model_lib
from idea_prune_jax.train import plan as plan_lib
from idea_prune_jax.tools import report
from idea_prune_jax.data import storage
from idea_prune_jax.experiments.config import SweepConfig
from idea_prune_jax.train.config import (ConfigError, DistillConfig, RunConfig, check_devices,
                                         override)
from idea_prune_jax.train.targets import target_model

GAPS = (('idea', 'scratch'), ('idea', 'scratch_flops'), ('idea', 'naive'))


def _numbers(field: str, text: str, default: float) -> list[float]:
  items = [t.strip() for t in str(text).split(',') if t.strip()]
  try:
    values = [float(t) for t in items] or [default]
  except ValueError:
    raise ConfigError(f'config.{field}={text!r}: not a comma-separated list of numbers') from None
  if any(not v > 0 for v in values):
    raise ConfigError(f'config.{field}={text!r}: every value must be > 0')
  return values


def _kd_alpha(item: str) -> dict:
  """'0.5' -> a constant alpha; '0.9:0.5[:kind]' -> a schedule from 0.9 to 0.5 (cosine default)."""
  parts = [t.strip() for t in item.split(':')]
  kind = parts[2] if len(parts) == 3 else 'cosine' if len(parts) == 2 else 'constant'
  try:
    values = [float(t) for t in parts[:2]]
  except ValueError:
    values = []
  if (not values or len(parts) > 3 or kind not in distill.SCHEDULES
      or not all(0 <= v <= 1 for v in values)):
    raise ConfigError(f'config.sweep.kd_alphas: {item!r} is not an alpha in [0, 1] or '
                      f'START:END[:KIND] with KIND one of {",".join(distill.SCHEDULES)}')
  if len(values) == 1:
    return {'alpha': values[0], 'alpha_schedule': 'constant'}
  return {'alpha': values[0], 'alpha_end': values[1], 'alpha_schedule': kind}


def kd_settings(sw: SweepConfig, k: DistillConfig) -> list[tuple[str, dict]]:
  """(pipeline label, distill field changes) for each KD setting the sweep's idea_kd runs."""
  alphas = [_kd_alpha(a) for a in str(sw.kd_alphas).split(',') if a.strip()]
  taus = _numbers('sweep.kd_taus', sw.kd_taus, k.tau) if str(sw.kd_taus).strip() else []
  phases = [p.strip() for p in str(sw.kd_phases).split(',') if p.strip()]
  if set(phases) - {'prune', 'recovery', 'both'}:
    raise ConfigError(f'config.sweep.kd_phases={sw.kd_phases!r}: use prune, recovery or both')
  if not (alphas or taus or phases):
    return [('idea_kd', {})]  # the distill config as it is
  out = []
  for alpha in alphas or [{}]:
    for tau in taus or [None]:
      for phase in phases or [None]:
        over = {**alpha, **({'tau': tau, 'tau_schedule': 'constant'} if tau else {}),
                **({'phases': phase} if phase else {})}
        tags = ['idea_kd']
        if alpha:  # e.g. a0.5, or a0.9-0.5cos for a schedule
          tags.append(f'a{over["alpha"]:g}' + (f'-{over["alpha_end"]:g}{over["alpha_schedule"][:3]}'
                                               if 'alpha_end' in over else ''))
        tags += [f't{tau:g}'] if tau else []
        tags += [phase] if phase else []
        out.append(('_'.join(tags), {f'distill.{k}': v for k, v in over.items()}))
  return out


def ablations(run: RunConfig, sw: SweepConfig) -> list[tuple[str, str, dict, tuple[str, ...]]]:
  """(tag, the sweep field it comes from, field changes, the pipelines it applies to) for each
  value of sweep.enlarge, sweep.t_starts and sweep.windows, each axis varied alone around run."""
  p = run.prune
  window = p.t_end - p.t_start
  out = []
  for ratio in (_numbers('sweep.enlarge', sw.enlarge, 1.0) if sw.enlarge.strip() else []):
    ffn = max(int(round(ratio * p.target_ffn / p.round_to)), 1) * p.round_to
    if ffn <= p.target_ffn:
      raise ConfigError(f'config.sweep.enlarge={sw.enlarge!r}: {ratio:g} x prune.target_ffn='
                        f'{p.target_ffn} leaves nothing to prune; use ratios above 1')
    out.append((f'e{ratio:g}', 'enlarge', {'model.ffn_dim': ffn}, ('idea', 'naive')))
  for t_start in (_numbers('sweep.t_starts', sw.t_starts, 1.0) if sw.t_starts.strip() else []):
    out.append((f'ts{t_start:g}', 't_starts',
                {'prune.t_start': t_start, 'prune.t_end': t_start + window}, ('idea',)))
  for length in (_numbers('sweep.windows', sw.windows, 1.0) if sw.windows.strip() else []):
    out.append((f'w{length:g}', 'windows', {'prune.t_end': p.t_start + length}, ('idea',)))
  return out


def _ablation(c: RunConfig, tag: str, changes: dict, field_name: str) -> RunConfig:
  try:
    return override(c, changes)
  except ConfigError as e:
    raise ConfigError(f'config.sweep.{field_name}: the {tag} variant is not a valid run: {e}'
                      ) from None


def runs(run: RunConfig, sw: SweepConfig, workdir: str) -> list[dict]:
  """Every run of the sweep, in execution order, each with its pipeline's RunConfig ('config'),
  checked."""
  budgets = _numbers('sweep.budgets', sw.budgets, 1.0)
  lrs = _numbers('sweep.lrs', sw.lrs, run.train.lr)
  names = experiment.pipeline_names('sweep.pipelines', sw.pipelines)
  tuned = (set(experiment.pipeline_names('sweep.lr_pipelines', sw.lr_pipelines))
           if sw.lr_pipelines else set())
  if sw.seeds < 1:
    raise ConfigError(f'config.sweep.seeds={sw.seeds}: must be >= 1')
  kd = kd_settings(sw, run.distill) if 'idea_kd' in names else []
  variants = ablations(run, sw)
  if sw.tag and not re.fullmatch(r'[A-Za-z0-9._-]+', sw.tag):
    raise ConfigError(f'config.sweep.tag={sw.tag!r}: use letters, digits, ".", "_" or "-"')
  if sw.tag and (variants or kd):
    raise ConfigError(f'config.sweep.tag={sw.tag!r} labels a whole command: run the ablation '
                      'axes and idea_kd in commands of their own')
  suffix = f'@{sw.tag}' if sw.tag else ''
  # idea_kd is idea until t_start (no KD phase starts earlier): each idea_kd run starts from
  # its idea run's checkpoint at t_start, which that run keeps, so idea must run first.
  branched = 'idea' in names and 'idea_kd' in names
  names = sorted(names, key=lambda n: n == 'idea_kd')
  out = []
  for budget in budgets:
    steps = max(1, int(round(run.train.steps * budget)))
    base = override(run, {'train.steps': steps})
    flops_steps = experiment.flops_matched_steps(base)  # FLOPs do not depend on the LR
    at = lambda label, lr, seed: {  # what every run of this budget records, and where
        'budget': budget, 'pipeline': label, 'lr': lr, 'seed': seed,
        'budget_tokens': steps * run.train.batch_size * run.data.seq_len,
        'dir': os.path.join(workdir, f'x{budget:g}', label, f'lr{lr:g}', f'seed{seed}')}
    for lr in lrs:
      for seed in range(run.seed, run.seed + sw.seeds):
        source = None  # this LR and seed's idea run, the one its idea_kd runs start from
        for name in names:
          if lr != lrs[0] and name not in tuned:
            continue  # one LR (the first) for pipelines the LR study leaves out
          for label, distill_changes in (kd if name == 'idea_kd' else [(name + suffix, {})]):
            c = experiment.variant(base, name, seed,
                                   flops_steps if name == 'scratch_flops' else None)
            c = override(c, {'train.lr': lr, **distill_changes})
            entry = at(label, lr, seed)
            if branched and name == 'idea':
              source = {'dir': entry['dir'], 'step': plan_lib.plan(c)[0].end}  # t_start
              c = override(c, {'train.keep_steps': str(source['step'])})
            elif branched and name == 'idea_kd' and source:
              entry['start_from'] = dict(source)
            out.append(entry | {'config': c})
          for tag, axis, changes, applies_to in variants:
            if name in applies_to:
              c = _ablation(override(experiment.variant(base, name, seed), {'train.lr': lr}),
                            tag, changes, axis)
              out.append(at(f'{name}@{tag}', lr, seed) | {'config': c})
  return out


def start_from_source(entry: dict) -> bool:
  """Starts a run in its dir from entry['start_from']: that dir's checkpoint (and metrics) at
  its step.

  Only a run with no checkpoint of its own starts so; False when the source does not hold the
  step (it ran before it kept it): the run then starts from step 0.
  """
  src, step, dst = entry['start_from']['dir'], entry['start_from']['step'], entry['dir']
  if storage.exists(storage.join(dst, 'checkpoints')):
    return False
  if not ckpt_lib.copy_step(src, dst, step):
    return False
  rows = [line for line in storage.read_text(storage.join(src, 'metrics.jsonl')).splitlines()
          if line and json.loads(line)['step'] < step]
  storage.write_text(storage.join(dst, 'metrics.jsonl'), ''.join(r + '\n' for r in rows))
  return True


def _finished(run_dir: str) -> dict | None:
  path = storage.join(run_dir, 'report.json')
  return json.loads(storage.read_text(path)) if storage.exists(path) else None


def collect(run: RunConfig, workdir: str) -> list[dict]:
  """Every finished run under workdir (x{budget}/{label}/lr{lr}/seed{seed}/report.json) as the
  sweep's run entries, idea first, then the baselines in COMPARE_PIPELINES' order."""
  order = {name: i for i, name in enumerate(experiment.COMPARE_PIPELINES)}
  found = []
  for path in storage.path(workdir).glob('x*/*/lr*/seed*/report.json'):
    seed_dir = path.parent
    label, lr, budget = seed_dir.parent.parent.name, seed_dir.parent.name, seed_dir.parents[2].name
    summary = json.loads(path.read_text())
    budget = float(budget[1:])
    steps = max(1, int(round(run.train.steps * budget)))
    entry = {'budget': budget, 'pipeline': label, 'lr': float(lr[2:]),
             'seed': int(seed_dir.name[4:]), 'dir': str(seed_dir),
             'budget_tokens': steps * run.train.batch_size * run.data.seq_len}
    found.append(entry | {k: summary[k] for k in ('val_loss', 'tokens', 'train_flops', 'steps',
                                                  'wall_s', 'params_final', 'kd_means')
                          if k in summary})
  base = lambda label: 'idea_kd' if label.startswith('idea_kd') else label.split('@')[0]
  return sorted(found, key=lambda r: (r['budget'], order[base(r['pipeline'])], r['pipeline'],
                                      r['lr'], r['seed']))


def sweep(run: RunConfig, sw: SweepConfig, workdir: str) -> dict:
  """Runs (or resumes) every run of the sweep; writes and returns the sweep's summary
  (sw.collect: of every finished run under workdir, running nothing)."""
  experiment.one_shape(run, 'sweep')
  if sw.collect:
    target = model_lib.param_count(target_model(run))
    results = collect(run, workdir)
    out = {'params_target': target, 'runs': results, 'budgets': table(results, target)}
    if jax.process_index() == 0:
      write(workdir, out)
    return out
  run = experiment.prepared_once(run, workdir)
  plan = runs(run, sw, workdir)
  for r in plan:  # every run is checked against the devices before the first one computes
    check_devices(r['config'], jax.device_count())
  experiment.check_downstream(run)
  results = []
  for r in plan:
    summary = _finished(r['dir'])
    if summary is None:
      if 'start_from' in r:
        if jax.process_index() == 0:
          r['start_from']['done'] = start_from_source(r)
        multihost_utils.sync_global_devices('idea_prune_jax:sweep_start_from')
      ran = experiment.run_experiment(r['config'], r['dir'], do_export=False)
      summary = _finished(r['dir']) or ran  # the report adds what it reads back (kd_means)
    results.append({k: v for k, v in r.items() if k != 'config'} | {
        k: summary[k] for k in ('val_loss', 'tokens', 'train_flops', 'steps', 'wall_s',
                                'params_final', 'kd_means') if k in summary})
  target = model_lib.param_count(target_model(run))
  out = {'params_target': target, 'runs': results, 'budgets': table(results, target)}
  if jax.process_index() == 0:
    write(workdir, out)
  return out


def table(results: list[dict], params_target: int) -> list[dict]:
  """Per budget: each pipeline's loss by LR, its best LR, and the idea gaps at the best LRs."""
  rows = []
  for budget in sorted({r['budget'] for r in results}):
    at = [r for r in results if r['budget'] == budget]
    tokens = at[0]['budget_tokens']  # equal-token pipelines' tokens (scratch_flops: more)
    row = {'budget': budget, 'tokens': tokens, 'tokens_per_param': tokens / params_target,
           'pipelines': {}}
    for name in dict.fromkeys(r['pipeline'] for r in at):
      by_lr = {}
      for r in at:
        if r['pipeline'] == name:
          by_lr.setdefault(r['lr'], []).append(r['val_loss'])
      stats = {lr: report.mean_std(v) for lr, v in by_lr.items()}
      best = min(stats, key=lambda lr: stats[lr][0])
      row['pipelines'][name] = {
          'best_lr': best, 'val_loss_mean': stats[best][0], 'val_loss_std': stats[best][1],
          'val_loss': by_lr[best], 'by_lr': {f'{lr:g}': stats[lr][0] for lr in sorted(stats)},
          'train_flops': next(r['train_flops'] for r in at if r['pipeline'] == name)}
      kd = [r['kd_means'] for r in at if r['pipeline'] == name and r['lr'] == best
            and r.get('kd_means')]
      if kd:  # why KD does (not) help: the teacher's CE against the student's while distilling
        row['pipelines'][name]['kd_means'] = {k: sum(m[k] for m in kd) / len(kd)
                                              for k in report.KD_KEYS}
    p = row['pipelines']
    for a, b in GAPS:  # each at its best LR, seed by seed: a seed fixes the batches for both
      if a in p and b in p:
        row[f'{a}-{b}'] = _paired(at, a, b, p[a]['best_lr'], p[b]['best_lr'])
    ablated = {}  # idea@tag − scratch, − naive@tag and − idea; naive@tag − scratch
    for name in (n for n in p if '@' in n):
      base, tag = name.split('@')
      gaps = {}
      if 'scratch' in p:
        gaps['scratch'] = _paired(at, name, 'scratch', p[name]['best_lr'], p['scratch']['best_lr'])
      if base == 'idea' and f'naive@{tag}' in p:
        gaps['naive'] = _paired(at, name, f'naive@{tag}', p[name]['best_lr'],
                                p[f'naive@{tag}']['best_lr'])
      if base == 'idea' and 'idea' in p:
        gaps['idea'] = _paired(at, name, 'idea', p[name]['best_lr'], p['idea']['best_lr'])
      ablated[name] = gaps
    if ablated:
      row['ablations'] = ablated
    if 'idea' in p:  # what each KD setting adds to idea (negative: KD helps)
      row['kd-idea'] = {n: _paired(at, n, 'idea', p[n]['best_lr'], p[n]['best_lr'])
                        for n in p if n.startswith('idea_kd')}
    rows.append(row)
  return rows


def _paired(at: list[dict], a: str, b: str, lr_a: float, lr_b: float) -> dict:
  """a at lr_a − b at lr_b seed by seed: over the seeds both ran, the differences' mean and std.

  A seed fixes the training batches' order for every pipeline, and an idea_kd run shares
  everything with the idea run of its seed up to t_start: most of the seed-to-seed spread is
  common to both sides and cancels in the difference.
  """
  loss = {name: {r['seed']: r['val_loss'] for r in at if r['pipeline'] == name and r['lr'] == lr}
          for name, lr in ((a, lr_a), (b, lr_b))}
  diffs = [loss[a][seed] - loss[b][seed] for seed in sorted(loss[a]) if seed in loss[b]]
  mean, std = report.mean_std(diffs)
  return {'gap': mean, 'spread': std, 'seeds': len(diffs)}


def _plot(workdir, rows):
  fig = Figure(figsize=(7, 4.5), layout='constrained')
  ax = fig.subplots()
  for i, (a, b) in enumerate(GAPS):
    pts = [(r['tokens_per_param'], r[f'{a}-{b}']) for r in rows if f'{a}-{b}' in r]
    if pts:
      ax.errorbar([p[0] for p in pts], [p[1]['gap'] for p in pts],
                  yerr=[p[1]['spread'] for p in pts], fmt='o-', capsize=4, color=f'C{i}',
                  label=f'{a} − {b}')
  ax.axhline(0.0, color='k', lw=0.8)
  ax.set_xscale('log')
  ax.set(xlabel='training tokens per target parameter',
         ylabel='val-loss gap (nats; < 0: idea better)',
         title='idea against each baseline, each at its best peak LR')
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend()
  return report.save_figure(fig, workdir, 'sweep.png')


def write(workdir: str, out: dict) -> None:
  """sweep.json, sweep.md (one row per budget and pipeline) and sweep.png."""
  storage.write_text(storage.join(workdir, 'sweep.json'), json.dumps(out, indent=2))
  _plot(workdir, out['budgets'])
  lines = ['# Sweep: pipelines × token budgets × peak LR', '',
           f'Target model: {out["params_target"]:,} parameters. Each pipeline at its best peak '
           'LR (lowest mean val loss over seeds); ± is the seed std; gaps are idea minus the '
           'baseline seed by seed (negative: idea better), mean ± std over the seeds both ran.', '',
           '| budget | tokens/param | pipeline | best LR | val loss | seeds | loss by LR '
           '| train FLOPs |', '|---|---|---|---|---|---|---|---|']
  for row in out['budgets']:
    for name, p in row['pipelines'].items():
      seeds = ', '.join(f'{v:.4f}' for v in p['val_loss'])
      by_lr = ', '.join(f'{lr}: {v:.4f}' for lr, v in p['by_lr'].items())
      lines.append(f'| {row["budget"]:g}× | {row["tokens_per_param"]:.2f} | {name} | '
                   f'{p["best_lr"]:g} | {p["val_loss_mean"]:.4f} ± {p["val_loss_std"]:.4f} | '
                   f'{seeds} | {by_lr} | {p["train_flops"]:.3e} |')
  lines += ['', '| budget | tokens/param |' + ''.join(f' {a} − {b} |' for a, b in GAPS),
            '|---|---|' + '---|' * len(GAPS)]
  for row in out['budgets']:
    cells = ''.join(f' {row[f"{a}-{b}"]["gap"]:+.4f} ± {row[f"{a}-{b}"]["spread"]:.4f} |'
                    if f'{a}-{b}' in row else ' — |' for a, b in GAPS)
    lines.append(f'| {row["budget"]:g}× | {row["tokens_per_param"]:.2f} |' + cells)
  kd_rows = [(row, n, g) for row in out['budgets'] for n, g in row.get('kd-idea', {}).items()]
  if kd_rows:
    lines += ['', 'Distillation: idea_kd_a{alpha or start-end and schedule}_t{tau}_{phases} '
              'minus the idea run of the same seed and LR (negative: KD helps), mean ± std '
              'over seeds; student CE, teacher CE and KL are means over the distilling steps\' '
              'train batches.', '',
              '| budget | KD setting | val loss | − idea | seeds | student CE | teacher CE | KL |',
              '|---|---|---|---|---|---|---|---|']
    for row, name, g in sorted(kd_rows, key=lambda t: (t[0]['budget'], t[2]['gap'])):
      p = row['pipelines'][name]
      kd = ' | '.join(f'{p["kd_means"][k]:.4f}' if 'kd_means' in p else '—'
                      for k in report.KD_KEYS)
      lines.append(f'| {row["budget"]:g}× | {name} | {p["val_loss_mean"]:.4f} ± '
                   f'{p["val_loss_std"]:.4f} | {g["gap"]:+.4f} ± {g["spread"]:.4f} | '
                   f'{g["seeds"]} | {kd} |')
  ab_rows = [(row, n, g) for row in out['budgets'] for n, g in row.get('ablations', {}).items()]
  if ab_rows:
    lines += ['', 'Ablations (sweep.enlarge, sweep.t_starts, sweep.windows, sweep.tag; each '
              'alone): the variant minus scratch at equal tokens, idea@tag minus naive@tag (the '
              'same enlargement, pruned at the end) and minus idea, seed by seed, mean ± std '
              '(negative: the variant better).', '',
              '| budget | variant | val loss | − scratch | − naive (same tag) | − idea | seeds |',
              '|---|---|---|---|---|---|---|']
    cell = lambda g: f'{g["gap"]:+.4f} ± {g["spread"]:.4f}' if g else '—'
    for row, name, g in ab_rows:
      p = row['pipelines'][name]
      lines.append(f'| {row["budget"]:g}× | {name} | {p["val_loss_mean"]:.4f} ± '
                   f'{p["val_loss_std"]:.4f} | {cell(g.get("scratch"))} | '
                   f'{cell(g.get("naive"))} | {cell(g.get("idea"))} | {len(p["val_loss"])} |')
  lines += ['', '![sweep](sweep.png)']
  storage.write_text(storage.join(workdir, 'sweep.md'), '\n'.join(lines) + '\n')
