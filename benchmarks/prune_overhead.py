"""What pruning costs per step on the small config, as ratios within one run.

  .venv/bin/python benchmarks/prune_overhead.py          # 16 x 256 tokens; appends to BENCHMARKS.md
  .venv/bin/python benchmarks/prune_overhead.py --quick  # 2 x 128 tokens, < 90 s; prints only

Five steps, each the idea pipeline's own jitted step (`pipeline.parts` + `pipeline.step_fn`) on
one fixed batch of random tokens:

  dense     phase 'enlarged': train.train_step, no masks (FFN f_E).
  masked    phase 'prune' with score='magnitude' and its window moved past the run, so the step
            is the prune step minus scoring: `prune_optimizer`'s masks.zero_pruned on the
            updates, the width metric, and a lax.cond whose predicate is always false. 'magnitude' has no state (importance.update returns its input) and its scores
            are computed only inside the never-taken refresh branch.
  prune     phase 'prune' as configured (platon): masked step + score update every step.
            Timed at a non-refresh step (t_s + 1) and at a refresh step (t_s + ΔT), where the
            lax.cond also computes scores and re-ranks every layer (3-key sort) against k(t).
  shrunk    phase 'recovery': the dense step of the target-width model (FFN f_T).

--quick runs 256 tokens a step instead of 4096: there the passes over the weights (optimizer,
masks, scores) weigh ~16x more against the matmuls, so its ratios are a smoke check of the
script, not figures to hold against the targets.

The step donates its state, so each step's output state is the next call's input; the prune
steps get `state.step` and the prune optimizer's count reset before every call (the step is traced: no recompile). A round runs
every step once, in an order rotated each round; a ratio is the median over rounds of the two
steps' times within the same round (the machine is shared and noisy), of wall time and of process
CPU time (all threads), which moves much less when other jobs take the cores. The jit cache of the
prune step is read after it has run at refresh steps spread over the whole window (k moves at
each), and the backend compilations during that window are counted.
"""

import argparse
import dataclasses
import os
import re
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from benchmarks.train_step import load_config  # noqa: E402
from idea_prune_jax import settings  # noqa: E402
from idea_prune_jax.train.config import check_devices, override  # noqa: E402
from idea_prune_jax.data import batch as batch_lib  # noqa: E402
from idea_prune_jax import importance  # noqa: E402
from idea_prune_jax.train import pipeline, sharding  # noqa: E402
from idea_prune_jax.train import plan as plan_lib  # noqa: E402
from idea_prune_jax import masks as masks_lib  # noqa: E402
from idea_prune_jax.model import model as model_lib  # noqa: E402
from idea_prune_jax.prune.structure import FFN_STRUCTURE  # noqa: E402

NEVER = 2**30  # a window start no run reaches: the refresh predicate is always false


@dataclasses.dataclass
class Runner:
  """One jitted step and the state chain it carries from call to call (donated each call)."""
  name: str
  fn: object  # jax.jit of train_step, state donated
  chain: dict  # {'state': TrainState}; runners of one step function share it
  step_sharding: object
  at: int | None = None  # reset state.step to this before every call
  times: list = dataclasses.field(default_factory=list)  # wall seconds per measured call
  cpu: list = dataclasses.field(default_factory=list)  # process CPU seconds per measured call

  def call(self, batch, record=False):
    state = self.chain['state']
    if self.at is not None:
      at = lambda: jax.device_put(np.int32(self.at), self.step_sharding)
      state = state.replace(step=at(), opt_state=state.opt_state._replace(count=at()))
    wall, cpu, (self.chain['state'], metrics) = common.timed(self.fn, state, batch)
    if record:
      self.times.append(wall)
      self.cpu.append(cpu)
    return metrics


def build(run, mesh):
  phases = {ph.name: ph for ph in plan_lib.plan(run)}
  prune_ph = phases['prune']
  never = dataclasses.replace(prune_ph.prune, t_start=NEVER, t_end=NEVER + 1)
  variants = [('dense', run, phases['enlarged']),
              ('masked', override(run, {'prune.score': 'magnitude'}),
               dataclasses.replace(prune_ph, prune=never)),
              ('prune', run, prune_ph),
              ('shrunk', run, phases['recovery'])]
  out = {}
  for i, (name, cfg, phase) in enumerate(variants):
    parts = pipeline.parts(cfg, phase, mesh)
    state = jax.jit(parts.init_fn, out_shardings=parts.shardings)(jax.random.key(i))
    out[name] = (pipeline.step_fn(cfg, phase, parts, mesh), state, parts, phase)
  return out


def hlo_cost(fn, state, batch, ffn_shapes) -> dict:
  """XLA's cost analysis of the compiled step, and its FFN-weight-sized passes.

  Cost analysis counts the body of the layer loop (nn.scan) once, so its totals undercount the
  layers; what pruning adds (masks.apply, score update, optimizer passes) is outside the loop and
  counted in full. 'passes': instructions of the entry computation that write an array shaped
  like an FFN weight ([L, D, F] or [L, F, D]): each is one full read-and-write over that weight.
  """
  compiled = fn.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  entry = compiled.as_text().split('\nENTRY ', 1)[-1]
  passes = 0
  for m in re.finditer(r'= \w+\[([\d,]+)\]\{[^}]*\} ([\w-]+)\(', entry):
    shape = tuple(int(d) for d in m.group(1).split(','))
    passes += shape in ffn_shapes and m.group(2) not in ('parameter', 'get-tuple-element',
                                                          'bitcast', 'tuple')
  return {'flops': float(cost.get('flops', 0.0)), 'bytes': float(cost.get('bytes accessed', 0.0)),
          'passes': passes}


def micro(prune_state, ps, kind, repeats):
  """Standalone (unfused) costs of the pieces the prune step adds, seconds (median)."""
  # Only the FFN weights: the other leaves are untouched by pruning (and would be copied out).
  params = {'layers': {'mlp': prune_state.params['layers']['mlp']}}
  masks, scores = prune_state.masks, prune_state.importance
  grads = jax.tree.map(lambda x: x * 1e-3, params)  # any tree shaped like params will do
  k = ps.keep_k(ps.t_start + ps.every)
  pieces = {
      'masks.apply (gate, up, down; once)':
          (jax.jit(lambda p, m: masks_lib.apply(p, m, FFN_STRUCTURE)), (params, masks)),
      f'importance.update ({kind})':
          (jax.jit(lambda s, p, g: importance.update(s, kind, params=p, grads=g,
                                                     structure=FFN_STRUCTURE)),
           (scores, params, grads)),
      'scores + masks.refresh (3-key sort)':
          (jax.jit(lambda m, s, p, k: masks_lib.refresh(
              m, importance.scores(s, kind, params=p, structure=FFN_STRUCTURE), k)),
           (masks, scores, params, k)),
  }
  out = {}
  for name, (fn, args) in pieces.items():
    jax.block_until_ready(fn(*args))
    out[name] = common.median([common.timed(fn, *args)[0] for _ in range(repeats)])
  return out


def ratio_cell(xs, fmt='{:.3f}'):
  return f'{fmt.format(common.median(xs))} [{fmt.format(min(xs))}, {fmt.format(max(xs))}]'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/small.py')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='config override, e.g. train.batch_size=4')
  parser.add_argument('--rounds', type=int, default=7, help='interleaved rounds')
  parser.add_argument('--refreshes', type=int, default=6,
                      help='refresh steps spread over the window for the recompilation check')
  parser.add_argument('--quick', action='store_true',
                      help='batch 2 x 128, 3 rounds, 3 refreshes, no cost analysis: under 90 s')
  parser.add_argument('--append', action=argparse.BooleanOptionalAction, default=None,
                      help='append a section to BENCHMARKS.md (default: yes, except --quick)')
  args = parser.parse_args(argv)
  overrides = list(args.set)
  if args.quick:
    overrides = ['train.batch_size=2', 'data.seq_len=128'] + overrides
    args.rounds, args.refreshes = 3, 3
  append = (not args.quick) if args.append is None else args.append

  wall = time.perf_counter()
  compiles = []  # (function name, seconds) of every XLA compilation in this process
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: compiles.append((kw.get('fun_name'), secs))
      if event == '/jax/core/compile/backend_compile_duration' else None)

  config = load_config(args.config, overrides)
  config.pipeline = 'idea'
  run = settings.read(config).run
  mesh = sharding.make_mesh(run.mesh)
  check_devices(run, mesh.devices.size)
  built = build(run, mesh)
  ps = built['prune'][3].prune
  B, L = config.train.batch_size, config.data.seq_len
  x = np.random.RandomState(0).randint(1, config.model.vocab_size, (B, L + 1)).astype(np.int32)
  batch = jax.device_put(batch_lib.from_rows(x),
                         sharding.batch_sharding(mesh))

  refresh_at = ps.t_start + ps.every
  assert bool(ps.is_refresh(refresh_at)) and not bool(ps.is_refresh(ps.t_start + 1))
  chains = {name: {'state': b[1]} for name, b in built.items()}
  runners = []
  for label, name, at in (('dense', 'dense', None), ('masked', 'masked', None),
                          ('prune (no refresh)', 'prune', ps.t_start + 1),
                          ('prune (refresh)', 'prune', refresh_at), ('shrunk', 'shrunk', None)):
    runners.append(Runner(label, built[name][0], chains[name], built[name][2].shardings.step, at))
  start, compile_s = time.perf_counter(), {}
  for r in runners:  # the first call compiles and warms (buffer pools, page faults)
    before = len(compiles)
    r.call(batch)
    compile_s[r.name] = sum(t for n, t in compiles[before:] if n == 'jit(train_step)')
  warm_s = time.perf_counter() - start
  for i in range(args.rounds):
    for r in runners[i % len(runners):] + runners[:i % len(runners)]:
      r.call(batch, record=True)
  by = {r.name: r for r in runners}

  # Recompilation check: refresh steps spread over the whole window, k moving at every one.
  prune_fn = built['prune'][0]
  n_windows = (ps.t_end - ps.t_start) // ps.every
  steps = sorted({ps.t_start + ps.every * int(round(j * n_windows / max(args.refreshes - 1, 1)))
                  for j in range(args.refreshes)} | {ps.t_end})
  ks = [int(ps.keep_k(t)) for t in steps]
  prune_shardings = built['prune'][2].shardings
  state = chains['prune']['state']  # masks back to all-ones: the window starts at f_E
  chains['prune']['state'] = state.replace(opt_state=state.opt_state._replace(masks=jax.device_put(
      masks_lib.init(state.params, FFN_STRUCTURE), prune_shardings.opt_state.masks)))
  window = Runner('window', prune_fn, chains['prune'], prune_shardings.step)
  before, widths = len(compiles), []
  for t in steps:
    window.at = t
    widths.append(window.call(batch)['ffn_width'])
  widths = [float(w) for w in widths]
  # Only the step's own compilations count (eager ops around it compile tiny programs too).
  window_compiles = sum(name == 'jit(train_step)' for name, _ in compiles[before:])
  cache = {name: built[name][0]._cache_size() for name in built}

  flops_e = model_lib.flops_per_token(built['dense'][2].model_cfg, L)
  flops_t = model_lib.flops_per_token(built['shrunk'][2].model_cfg, L)
  flop_ratio = flops_t / flops_e

  def paired(a, b, field='times'):
    return [x / y for x, y in zip(getattr(by[a], field), getattr(by[b], field))]

  ok = lambda cond: 'yes' if cond else '**no**'
  figures = []
  for label, a, b, target, test in (
      ('masked / dense', 'masked', 'dense', '<= 1.03', lambda r: r <= 1.03),
      ('prune (no refresh) / masked', 'prune (no refresh)', 'masked', '<= 1.05',
       lambda r: r <= 1.05),
      ('prune (refresh) / masked', 'prune (refresh)', 'masked', '<= 1.05', lambda r: r <= 1.05),
      (f'shrunk / masked (FLOP ratio {flop_ratio:.3f})', 'shrunk', 'masked',
       f'{0.9 * flop_ratio:.3f} .. {1.1 * flop_ratio:.3f}',
       lambda r: abs(r / flop_ratio - 1) <= 0.10)):
    wall_r, cpu_r = paired(a, b), paired(a, b, 'cpu')
    figures.append([label, ratio_cell(wall_r), ratio_cell(cpu_r), target,
                    f'{ok(test(common.median(wall_r)))} / {ok(test(common.median(cpu_r)))}'])
  for base in ('masked', 'dense'):
    figures.append([f'(shrunk / {base}) / FLOP ratio',
                    f'{common.median(paired("shrunk", base)) / flop_ratio:.3f}',
                    f'{common.median(paired("shrunk", base, "cpu")) / flop_ratio:.3f}',
                    '0.90 .. 1.10' if base == 'masked' else '', ''])
  figures += [
      [f'prune-step jit cache entries after {len(steps)} refreshes + {args.rounds} rounds',
       str(cache['prune']), '', '1', ok(cache['prune'] == 1)],
      ['XLA compilations of the step during the window', str(window_compiles), '', '0',
       ok(window_compiles == 0)],
  ]
  step_rows = [[r.name, f'{common.median(r.times):.3f}', f'{min(r.times):.3f}',
                f'{max(r.times):.3f}', f'{common.median(r.cpu):.3f}'] for r in runners]

  sections = [
      f'small config (`{args.config}`{"".join(" --set " + s for s in overrides)}), pipeline '
      f'idea: B x L = {B} x {L}, FFN f_E = {ps.width_enlarged} -> f_T = {ps.width_target}, '
      f'window [{ps.t_start}, {ps.t_end}], ΔT = {ps.every}, score {config.prune.score}; '
      f'{args.rounds} interleaved rounds (order rotated per round) after one compiling, warming '
      'call each; a ratio cell is the median over rounds of the within-round ratio [min, max], '
      'of wall time and of process CPU time (which moves less when other jobs take the cores). '
      'masked = the prune step with stateless magnitude scores and a refresh that never fires.',
      common.table(['figure', 'wall ratio median [min, max]', 'CPU-time ratio median [min, max]',
                    'target', 'met (wall / CPU)'], figures),
      common.table(['step', 'wall s median', 'min', 'max', 'CPU s median'], step_rows),
      f'Window check: prune step at steps {steps}, k(t) = {ks}, mean kept width after the step '
      f'= {[round(w) for w in widths]}; jit cache entries per step function: {cache}.',
  ]
  if not args.quick:
    costs = {}
    for name, (fn, _, parts, _) in built.items():
      c = parts.model_cfg
      ffn_shapes = {(c.n_layers, c.d_model, c.ffn_dim), (c.n_layers, c.ffn_dim, c.d_model)}
      costs[name] = hlo_cost(fn, chains[name]['state'], batch, ffn_shapes)
    micro_s = micro(chains['prune']['state'], ps, config.prune.score, max(args.rounds, 3))
    masked_s = common.median(by['masked'].times)
    cost_rows = [[n, f'{c["flops"] / 1e9:.1f}', f'{c["bytes"] / 1e9:.2f}',
                  f'{(c["bytes"] - costs["dense"]["bytes"]) / 1e9:+.2f}', str(c['passes'])]
                 for n, c in costs.items()]
    sections += [
        'XLA cost analysis of each compiled step (the layer loop counted once, everything '
        'outside it in full; the prune step includes both branches of its cond), and the '
        'FFN-weight-sized arrays its entry computation writes (outside the layer loop):',
        common.table(['step', 'HLO GFLOP', 'GB accessed', 'vs dense', 'FFN-weight-sized passes'],
                     cost_rows),
        'Standalone (unfused, separately jitted) cost of the pieces pruning adds, vs. the masked '
        'step:',
        common.table(['piece', 'ms', '% of masked step'],
                     [[n, f'{s * 1e3:.1f}', f'{s / masked_s:.1%}'] for n, s in micro_s.items()]),
    ]
  wall = time.perf_counter() - wall
  sections.append('XLA compile s per step function: ' + ', '.join(
      f'{n} {t:.1f}' for n, t in compile_s.items() if t) +
      f'; compile + first calls {warm_s:.0f} s; whole run {wall:.0f} s.')
  body = '\n\n'.join(sections)
  print(body)
  if append:
    common.append_section('Prune overhead (benchmarks/prune_overhead.py)', body)


if __name__ == '__main__':
  main()
