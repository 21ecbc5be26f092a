"""Run reports (metrics.jsonl + importance snapshots -> report.json/md + PNGs) and the comparison
of pipelines across seeds (compare.json/md/png)."""

import io
import json
import math
import os

import numpy as np
# Figure without pyplot: no global backend or figure registry, so reports are safe from any thread.
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from idea_prune_jax.data import storage

SUMMARY_KEYS = ('pipeline', 'params_enlarged', 'params_final', 'ffn_enlarged', 'ffn_final',
                'tokens', 'steps', 'val_loss', 'val_ppl', 'wall_s', 'export_dir')
# Snapshot tags in pipeline order; any other tag follows alphabetically.
TAG_ORDER = ('t_start', 't_mid', 't_end')
KD_KEYS = ('ce', 'teacher_ce', 'kl')  # what a distilling step logs besides its loss


def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
  """(train_rows, eval_rows) of W/metrics.jsonl by step, one per step (the last written wins)."""
  by_kind = {'train': {}, 'eval': {}}
  for line in storage.read_text(storage.join(workdir, 'metrics.jsonl')).splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue  # a run killed mid-write leaves a torn last line
    kind = 'train' if 'loss' in row else 'eval' if 'val_loss' in row else None
    if kind and 'step' in row:
      # A resumed run re-logs the steps after its checkpoint; those rows describe the run we kept.
      by_kind[kind][int(row['step'])] = row
  train, evals = ([rows[s] for s in sorted(rows)] for rows in by_kind.values())
  return train, evals


def phase_boundaries(rows: list[dict]) -> list[dict]:
  """{'step', 'tokens_seen', 'from', 'to'} at every logged row whose phase differs from the last."""
  return [{'step': row['step'], 'tokens_seen': row.get('tokens_seen'),
           'from': prev.get('phase'), 'to': row.get('phase')}
          for prev, row in zip(rows, rows[1:]) if row.get('phase') != prev.get('phase')]


def plan_boundaries(phases: list[dict], tokens_per_step: int) -> list[dict]:
  """The exact boundaries of a run's plan ({'name', 'start', ...} per phase), as phase_boundaries."""
  return [{'step': nxt['start'], 'tokens_seen': nxt['start'] * tokens_per_step,
           'from': prev['name'], 'to': nxt['name']} for prev, nxt in zip(phases, phases[1:])]


def _series(rows, x, y):
  pts = [(r[x], r[y]) for r in rows if r.get(x) is not None and r.get(y) is not None]
  pts = [(a, b) for a, b in pts if math.isfinite(a) and math.isfinite(b)]
  return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)


def _mark_phases(ax, bounds, key):
  for b in bounds:
    if b.get(key) is None:
      continue
    ax.axvline(b[key], ls='--', lw=1, color='0.45')
    ax.text(b[key], 0.98, f' {b["to"]}', transform=ax.get_xaxis_transform(), rotation=90,
            va='top', ha='left', fontsize=8, color='0.3',
            bbox={'fc': 'white', 'ec': 'none', 'alpha': 0.7, 'pad': 1})


def _log_y(ax):
  # Log scale keeps the early loss and the final nats in one panel; plain numbers read better
  # than 3×10^0 on every minor tick.
  ax.set_yscale('log')
  for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
    axis(FuncFormatter(lambda v, _: f'{v:g}'))


def read_attempts(workdir: str) -> list[dict]:
  """The goodput row each attempt of the run (first, and every resume) wrote at its end."""
  rows = []
  for line in storage.read_text(storage.join(workdir, 'metrics.jsonl')).splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if 'goodput' in row:
      rows.append(row)
  return rows


def save_figure(fig, workdir, name):
  buf = io.BytesIO()
  fig.savefig(buf, dpi=110, format='png')
  storage.write_bytes(storage.join(workdir, name), buf.getvalue())
  return name


def _plot_loss(workdir, train, evals, bounds):
  fig = Figure(figsize=(9, 7.5), layout='constrained')
  full, zoom = fig.subplots(2, 1)
  tx, ty = _series(train, 'tokens_seen', 'loss')
  ex, ey = _series(evals, 'tokens_seen', 'val_loss')
  # Early losses are several nats above the end of the run; the zoom starts where pruning does
  # (or halfway when there are no phases) so the pruning bump and the recovery stay visible.
  x0 = bounds[0]['tokens_seen'] if bounds and bounds[0]['tokens_seen'] is not None else (
      np.max(tx, initial=0) / 2)
  for ax, lo, title in ((full, -np.inf, 'whole run (log scale)'),
                        (zoom, x0, 'from first phase change' if bounds else 'second half')):
    ax.plot(tx[tx >= lo], ty[tx >= lo], lw=0.9, alpha=0.8, label='train loss')
    ax.plot(ex[ex >= lo], ey[ex >= lo], 'o-', ms=3, lw=1.5, label='val loss')
    _mark_phases(ax, [b for b in bounds if (b['tokens_seen'] or 0) >= lo], 'tokens_seen')
    ax.set(title=f'Loss vs tokens: {title}', xlabel='tokens seen', ylabel='loss (nats/token)')
    ax.legend(loc='upper right')
    ax.grid(alpha=0.3)
  _log_y(full)
  return save_figure(fig, workdir, 'loss.png')


def _plot_vs_step(workdir, train, bounds, keys, ylabel, title, name):
  fig = Figure(figsize=(9, 4), layout='constrained')
  ax = fig.subplots()
  for key in keys:
    x, y = _series(train, 'step', key)
    ax.plot(x, y, lw=1.5, label=key)
  _mark_phases(ax, bounds, 'step')
  ax.set(title=title, xlabel='step', ylabel=ylabel)
  ax.ticklabel_format(axis='y', style='sci', scilimits=(-3, 5))
  ax.legend(loc='best')
  ax.grid(alpha=0.3)
  return save_figure(fig, workdir, name)


def load_importance(workdir: str) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
  """[(tag, scores [n_layers, F], mask [n_layers, F] or None)] from W/importance/*.npz."""
  snaps = []
  for path in storage.path(workdir).glob('importance/*.npz'):
    with np.load(io.BytesIO(path.read_bytes())) as z:
      mask = np.asarray(z['mask']) > 0 if 'mask' in z.files else None
      snaps.append((path.name[:-4], np.asarray(z['scores'], np.float64), mask))
  order = {t: i for i, t in enumerate(TAG_ORDER)}
  return sorted(snaps, key=lambda s: (order.get(s[0], len(order)), s[0]))


def _plot_importance(workdir, snaps):
  n_layers = max(s.shape[0] for _, s, _ in snaps)
  ncols = min(4, n_layers)
  nrows = -(-n_layers // ncols)
  fig = Figure(figsize=(3.8 * ncols, 2.8 * nrows + 0.8), layout='constrained')
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  colors = [f'C{i}' for i in range(len(snaps))]
  for layer, ax in enumerate(axes):
    if layer >= n_layers:
      ax.set_visible(False)
      continue
    # Pruned neurons get zero gradient, so their scores decay to 0: log only the positive ones.
    logs = [np.log10(s[layer][s[layer] > 0]) if layer < len(s) else np.array([])
            for _, s, _ in snaps]
    both = np.concatenate(logs)
    edges = np.histogram_bin_edges(both if both.size else [0.0], bins=40)
    kept_note = ''
    for (tag, scores, mask), lg, c in zip(snaps, logs, colors):
      ax.hist(lg, bins=edges, histtype='stepfilled', alpha=0.35, color=c, edgecolor=c, label=tag)
      if mask is not None and layer < len(mask) and 0 < mask[layer].sum() < mask[layer].size:
        kept = scores[layer][mask[layer]]
        if (kept > 0).any():
          ax.axvline(np.log10(kept[kept > 0].min()), color=c, ls='--', lw=1.5,
                     label=f'{tag} kept threshold')
        kept_note = f' (kept {int(mask[layer].sum())}/{mask[layer].size} at {tag})'
    ax.set(title=f'layer {layer}{kept_note}', xlabel='log10 score', ylabel='neurons')
    ax.title.set_fontsize(9)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='outside lower center', ncols=max(len(labels), 1))
  fig.suptitle('FFN neuron importance per layer (histograms of log10 score)')
  return save_figure(fig, workdir, 'importance.png')


def _fmt(v):
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return '—'
  if isinstance(v, (bool, str)):
    return str(v)
  if isinstance(v, (int, np.integer)):
    return f'{int(v):,}'
  if isinstance(v, (float, np.floating)):
    v = float(v)
    if not math.isfinite(v) or abs(v) >= 1e9:
      return f'{v:.3e}'
    return f'{v:,.0f}' if abs(v) >= 1e4 else f'{v:.1f}' if abs(v) >= 100 else f'{v:.4f}'
  return str(v)


def _jsonable(v):
  if isinstance(v, (np.generic, np.ndarray)):
    return v.tolist()
  return str(v)


def kd_means(train: list[dict]) -> dict | None:
  """Student CE, teacher CE and KL averaged over the logged distilling steps (None: no KD)."""
  rows = [r for r in train if r.get('teacher_ce') is not None]
  return {k: float(np.mean([r[k] for r in rows])) for k in KD_KEYS} if rows else None


def write_report(workdir: str, summary: dict) -> None:
  """Writes the PNG plots of one run, W/report.md, then W/report.json: last, because it says the
  run is done (supervise.sh deletes the slice once it is there)."""
  train, evals = read_metrics(workdir)
  # The plan knows where phases start; logged rows only see it at the next log_every step.
  exact = bool(summary.get('phases')) and bool(summary.get('steps'))
  bounds = (plan_boundaries(summary['phases'], summary['tokens'] // summary['steps']) if exact
            else phase_boundaries(train or evals))
  plots = []
  if train or evals:
    plots.append(_plot_loss(workdir, train, evals, bounds))
  if any(r.get('lr') is not None for r in train):
    plots.append(_plot_vs_step(workdir, train, bounds, ('lr',), 'learning rate', 'Learning rate',
                               'lr.png'))
  if any(r.get('ffn_width') is not None for r in train):
    plots.append(_plot_vs_step(workdir, train, bounds, ('ffn_width',), 'kept FFN neurons per layer',
                               'FFN width (mean kept neurons per layer)', 'ffn_width.png'))
  if train and train[-1].get('epochs') is not None:  # passes over the train split, fractional
    summary = {**summary, 'epochs': train[-1]['epochs']}
  kd = kd_means(train)
  if kd:
    plots.append(_plot_vs_step(workdir, train, bounds, KD_KEYS, 'nats per token',
                               'Distillation (train batches): student CE, teacher CE, KL',
                               'kd.png'))
    summary = {**summary, 'kd_means': kd}
  snaps = load_importance(workdir)
  if snaps:
    plots.append(_plot_importance(workdir, snaps))
  attempts = read_attempts(workdir)
  keys = list(SUMMARY_KEYS) + [k for k in summary if k not in SUMMARY_KEYS and
                                      not isinstance(summary[k], (dict, list, tuple))]
  lines = [f'# Run report: {summary.get("pipeline", os.path.basename(workdir))}', '',
           '| figure | value |', '|---|---|']
  lines += [f'| {k} | {_fmt(summary.get(k))} |' for k in keys]
  lines += ['', '## Phase boundaries', '']
  if bounds:
    lines += ['First step of each new phase.' if exact else 'First logged step of each new phase.',
              '', '| phase change | step | tokens seen |', '|---|---|---|']
    lines += [f'| {b["from"]} → {b["to"]} | {b["step"]} | {_fmt(b["tokens_seen"])} |'
              for b in bounds]
  else:
    phase = (train or evals or [{}])[0].get('phase', '—')
    lines.append(f'One phase only: {phase}.')
  if summary.get('downstream'):
    lines += ['', '## Downstream tasks (lm-eval)', '', '| task | metric | value |', '|---|---|---|']
    lines += [f'| {task} | {metric} | {_fmt(v)} |'
              for task, metrics in summary['downstream'].items()
              for metric, v in metrics.items() if metric != 'sample_len']
  lines += _goodput_lines(summary.get('goodput'), attempts)
  lines += ['', '## Plots', ''] + [f'![{p[:-4]}]({p})\n' for p in plots]
  storage.write_text(storage.join(workdir, 'report.md'), '\n'.join(lines) + '\n')
  storage.write_text(storage.join(workdir, 'report.json'),
                     json.dumps({**summary, 'attempts': attempts, 'plots': plots}, indent=2,
                                default=_jsonable))


def _goodput_lines(last: dict | None, attempts: list[dict]) -> list[str]:
  """Where the wall time went: this attempt (to the report) and every attempt's own row."""
  if not last and not attempts:
    return []
  kinds = ('train', 'compile', 'data', 'eval', 'checkpoint', 'restore', 'other')
  lines = ['', '## Goodput', '',
           'Share of wall time in training steps; the rest went to compiling, waiting for data, '
           'evaluation, checkpoints (and the export), restoring, and other host work (setup, '
           'data preparation). One row per attempt: a preemption starts a new one.', '',
           '| attempt | last step | goodput | wall s | ' + ' | '.join(f'{k} s' for k in kinds) +
           ' |', '|---' * (4 + len(kinds)) + '|']
  rows = [(str(i + 1), a) for i, a in enumerate(attempts)]
  if last:
    rows.append(('last, with export', last))
  for name, a in rows:
    lines.append(f'| {name} | {_fmt(a.get("step"))} | {a.get("goodput", 0):.1%} | ' +
                 ' | '.join(f'{a.get(f"{k}_s", 0):.1f}' for k in ('wall',) + kinds) + ' |')
  return lines


def mean_std(xs):
  xs = np.asarray(xs, np.float64)
  if xs.size == 0:
    return math.nan, math.nan
  # Sample std (ddof=1): with 2-3 seeds the population std understates the spread.
  return float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else 0.0


# The metric a task's compare column shows: the first of these it reports.
HEADLINE_METRICS = ('acc', 'exact_match', 'acc_norm', 'word_perplexity', 'bits_per_byte')


def headline(metrics: dict) -> tuple[str, float] | None:
  """(metric, value) a task is summarised by in the comparison."""
  names = [m for m in HEADLINE_METRICS if m in metrics] or [m for m in metrics
                                                            if m != 'sample_len']
  return (names[0], metrics[names[0]]) if names else None


def _downstream_means(runs: list[dict]) -> dict:
  """{task: {'metric', 'mean', 'values'}} over seeds from each seed's {task: {metric: value}}."""
  out = {}
  for run in runs:
    for task, metrics in run.items():
      pick = headline(metrics)
      if pick:
        out.setdefault(task, {'metric': pick[0], 'values': []})['values'].append(pick[1])
  for row in out.values():
    row['mean'] = float(np.mean(row['values']))
  return out


def compare_table(results: dict) -> dict:
  """Per pipeline: seed means/stds and costs, ordered by mean val loss (best first)."""
  table = {}
  for name, r in results.items():
    loss_mean, loss_std = mean_std(r.get('val_loss', []))
    table[name] = {
        'val_loss_mean': loss_mean, 'val_loss_std': loss_std,
        'val_loss': [float(v) for v in r.get('val_loss', [])],
        'val_ppl_mean': mean_std(r.get('val_ppl', []))[0],
        'val_ppl': [float(v) for v in r.get('val_ppl', [])],
        'params_final': r.get('params_final'), 'tokens': r.get('tokens'),
        'train_flops': r.get('train_flops'),
        'wall_s_mean': mean_std(r.get('wall_s', []))[0],
        'wall_s': [float(v) for v in r.get('wall_s', [])],
        'n_seeds': len(r.get('val_loss', [])), 'workdirs': list(r.get('workdirs', [])),
        'downstream': _downstream_means(r.get('downstream', []))}
  # NaN means (no finished seed) sort last instead of poisoning the order.
  return dict(sorted(table.items(), key=lambda kv: (math.isnan(kv[1]['val_loss_mean']),
                                                    kv[1]['val_loss_mean'])))


def _verdict(table):
  """The winner against the runner-up, seed by seed: compare runs every pipeline on each seed,
  and a seed fixes the batches' order for all of them, so the spread common to both cancels."""
  names = list(table)
  if len(names) < 2:
    return f'Only one pipeline: {names[0]}.' if names else 'No pipelines.'
  a, b = table[names[0]], table[names[1]]
  diffs = [lb - la for la, lb in zip(a['val_loss'], b['val_loss'])]
  gap, spread = mean_std(diffs)
  line = (f'**{names[0]}** wins: val loss {gap:.4f} nats below **{names[1]}** (next best), '
          f'seed by seed')
  if len(diffs) < 2:
    return line + '; one seed, so the seed spread is unknown.'
  wins = sum(d > 0 for d in diffs)
  return line + (f' ± {spread:.4f} over {len(diffs)} seeds; ' +
                 ('it is ahead on every seed.' if wins == len(diffs) else
                  f'it is ahead on {wins} of {len(diffs)} seeds, so the win is not clear.'))


def _plot_compare(workdir, results, table):
  fig = Figure(figsize=(13, 5), layout='constrained')
  curves, finals = fig.subplots(1, 2, width_ratios=(2, 1))
  colors = {name: f'C{i % 10}' for i, name in enumerate(results)}
  for name, r in results.items():
    for seed, wd in enumerate(r.get('workdirs', [])):
      if not storage.exists(storage.join(wd, 'metrics.jsonl')):
        continue
      x, y = _series(read_metrics(wd)[1], 'tokens_seen', 'val_loss')
      curves.plot(x, y, '-', marker='o', ms=2.5, lw=1.2, color=colors[name], alpha=0.85,
                  label=name if seed == 0 else None)
  curves.set(title='Validation loss vs tokens (one line per seed)', xlabel='tokens seen',
             ylabel='val loss (nats/token)')
  _log_y(curves)
  curves.grid(alpha=0.3)
  if curves.get_legend_handles_labels()[0]:
    curves.legend()
  # The final-loss panel shows the gaps the log-scale curves compress, with every seed as a dot.
  for i, (name, row) in enumerate(table.items()):
    finals.errorbar(i, row['val_loss_mean'], yerr=row['val_loss_std'], fmt='s', ms=7, capsize=5,
                    color=colors[name])
    finals.plot([i] * len(row['val_loss']), row['val_loss'], 'o', mfc='none', color=colors[name])
  finals.set_xticks(range(len(table)), list(table), rotation=30, ha='right')
  finals.set(title='Final val loss (mean ± std, seeds as circles)', ylabel='val loss (nats/token)')
  finals.grid(alpha=0.3, axis='y')
  return save_figure(fig, workdir, 'compare.png')


def write_compare(workdir: str, results: dict) -> None:
  """Writes W/compare.png, W/compare.md, then W/compare.json (last: it says the compare is done)
  for {pipeline: per-seed results}."""
  table = compare_table(results)
  _plot_compare(workdir, results, table)
  # One column per downstream task (its headline metric, mean over seeds), when run had any.
  tasks = {}
  for r in table.values():
    for task, row in r['downstream'].items():
      tasks.setdefault(task, row['metric'])
  lines = ['# Pipeline comparison', '', 'Sorted by mean validation loss; ± is the seed std.', '',
           '| rank | pipeline | val loss | seeds | val ppl | params | tokens | train FLOPs '
           '| wall s |' + ''.join(f' {t} {m} |' for t, m in tasks.items()),
           '|---|---|---|---|---|---|---|---|---|' + '---|' * len(tasks)]
  for rank, (name, r) in enumerate(table.items(), 1):
    seeds = ', '.join(f'{v:.4f}' for v in r['val_loss'])
    cells = ''.join(f' {_fmt(r["downstream"].get(t, {}).get("mean"))} |' for t in tasks)
    lines.append(f'| {rank} | {name} | {r["val_loss_mean"]:.4f} ± {r["val_loss_std"]:.4f} | '
                 f'{seeds} | {_fmt(r["val_ppl_mean"])} | {_fmt(r["params_final"])} | '
                 f'{_fmt(r["tokens"])} | {_fmt(r["train_flops"])} | {_fmt(r["wall_s_mean"])} |'
                 + cells)
  lines += ['', _verdict(table), '', '![compare](compare.png)']
  storage.write_text(storage.join(workdir, 'compare.md'), '\n'.join(lines) + '\n')
  storage.write_text(storage.join(workdir, 'compare.json'),
                     json.dumps(table, indent=2, default=_jsonable))
