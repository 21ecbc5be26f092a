"""Tokens/s and MFU of the jitted dense train step, against this machine's f32 GEMM peak measured
in the same run.

  .venv/bin/python benchmarks/train_step.py             # tiny + small; appends to BENCHMARKS.md
  .venv/bin/python benchmarks/train_step.py --quick     # tiny only, < 60 s; prints only
  .venv/bin/python benchmarks/train_step.py --configs configs/small.py --set train.batch_size=4

MFU = model.flops_per_token(cfg, L) * B * L / step time / peak, where peak is the best f32 GEMM
throughput over a few shapes (the model's own matmuls and two squares). Per config the run
alternates peak, step, peak, step, ..., peak, so "paired MFU" divides each round's step rate by
the peak measured on either side of it: with other jobs on the machine that ratio moves much
less than either figure alone. "MFU per CPU-second" divides by process CPU time instead of wall
time (step and GEMM alike): nearly immune to other jobs, but blind to cores left idle.
"""

import argparse
import ast
import dataclasses
import os
import sys
import time
from typing import Any

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from idea_prune_jax import settings  # noqa: E402
from idea_prune_jax.model.config import ModelConfig  # noqa: E402
from idea_prune_jax.train.config import check_devices  # noqa: E402
from idea_prune_jax.data import batch as batch_lib  # noqa: E402
from idea_prune_jax.model import model as model_lib  # noqa: E402
from idea_prune_jax.train import sharding  # noqa: E402
from idea_prune_jax.train import optim  # noqa: E402
from idea_prune_jax.train import state as state_lib  # noqa: E402
from idea_prune_jax.train import step as step_lib  # noqa: E402

SQUARES = ((1024, 1024, 1024), (2048, 2048, 2048))


@dataclasses.dataclass
class Bench:
  name: str
  model_cfg: ModelConfig
  batch_size: int
  seq_len: int
  step: Any  # compiled (state, batch) -> (state, metrics), state donated
  state: Any
  batch: Any
  compile_s: float
  rounds: list = dataclasses.field(default_factory=list)  # per round: [(wall s, CPU s)] per step
  peaks: list = dataclasses.field(default_factory=list)  # peak FLOP/s before each round, + last

  @property
  def tokens(self) -> int:
    return self.batch_size * self.seq_len

  @property
  def flops(self) -> float:
    return model_lib.flops_per_token(self.model_cfg, self.seq_len) * self.tokens

  def gemm_shapes(self):
    """[B*L, D] @ [D, F], [B*L, F] @ [F, D] and the head [B*L, D] @ [D, V]."""
    n, c = self.tokens, self.model_cfg
    return [(n, c.d_model, c.ffn_dim), (n, c.ffn_dim, c.d_model), (n, c.d_model, c.vocab_size)]

  def run_step(self) -> tuple[float, float]:
    wall, cpu, (self.state, _) = common.timed(self.step, self.state, self.batch)
    return wall, cpu


def load_config(spec: str, overrides):
  config = settings.load(spec)
  for item in overrides:
    key, _, value = item.partition('=')
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    node = config
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def random_batch(B: int, L: int, vocab_size: int) -> dict:
  """Tokens in [1, V), one sequence per row: no padding, so every position counts as a token."""
  x = np.random.RandomState(0).randint(1, vocab_size, (B, L + 1)).astype(np.int32)
  return batch_lib.from_rows(x)


def build(spec: str, overrides, make_batch=random_batch) -> Bench:
  """The step exactly as the trainer builds it (tests/sharded_train_check.py), compiled ahead for
  make_batch(B, L, vocab_size)'s batch."""
  config = settings.read(load_config(spec, overrides)).run
  mesh = sharding.make_mesh(config.mesh)
  check_devices(config, mesh.devices.size)
  model_cfg = config.model
  schedule = optim.lr_schedule(config.train)
  optimizer = optim.make_optimizer(config.train, schedule)
  state, shardings = state_lib.init_state(model_cfg, optimizer, mesh, jax.random.key(0))
  step = step_lib.jit_step(step_lib.train_step, shardings, mesh,
                            model=model_lib.Transformer(model_cfg), optimizer=optimizer,
                            schedule=schedule)
  B, L = config.train.batch_size, config.data.seq_len
  batch = jax.device_put(make_batch(B, L, model_cfg.vocab_size), sharding.batch_sharding(mesh))
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  name = os.path.splitext(os.path.basename(spec.partition(':')[0]))[0]
  name += (':' + spec.partition(':')[2]) if ':' in spec else ''
  return Bench(name, model_cfg, B, L, compiled, state, batch, compile_s)


def measure(bench: Bench, meter: common.PeakMeter, repeats: int) -> None:
  """peak, step(s), peak, step(s), ..., peak. A round has enough steps to last about a second."""
  warm, _ = bench.run_step()  # first execution: buffer allocation, page faults
  per_round = max(1, int(1.0 / warm))
  bench.peaks.append(meter.sample())
  for _ in range(repeats):
    bench.rounds.append([bench.run_step() for _ in range(per_round)])
    bench.peaks.append(meter.sample())


def summarize(bench: Bench, peak: float, cpu_peak: float) -> dict:
  steps = [t[0] for r in bench.rounds for t in r]
  step_s = common.median(steps)
  cpu_s = common.median([t[1] for r in bench.rounds for t in r])
  round_s = [common.median([t[0] for t in r]) for r in bench.rounds]
  paired = [bench.flops / s / ((bench.peaks[i] + bench.peaks[i + 1]) / 2)
            for i, s in enumerate(round_s)]
  return {
      'config': bench.name,
      'B x L': f'{bench.batch_size} x {bench.seq_len}',
      'GFLOP/step': f'{bench.flops / 1e9:.1f}',
      'compile s': f'{bench.compile_s:.1f}',
      'step s (median [min, max])': f'{step_s:.3f} [{min(steps):.3f}, {max(steps):.3f}]',
      'tokens/s': f'{bench.tokens / step_s:,.0f}',
      'GFLOP/s': f'{bench.flops / step_s / 1e9:.1f}',
      'MFU vs run peak': f'{bench.flops / step_s / peak:.1%}',
      'paired MFU (median [min, max])':
          f'{common.median(paired):.1%} [{min(paired):.1%}, {max(paired):.1%}]',
      'CPU s/step': f'{cpu_s:.3f}',
      'MFU per CPU-second': f'{bench.flops / cpu_s / cpu_peak:.1%}',
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default='configs/tiny.py,configs/small.py',
                      help='comma-separated config specs (path[:variant])')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='config override for every config, e.g. train.batch_size=4')
  parser.add_argument('--repeats', type=int, default=5, help='measured rounds per config')
  parser.add_argument('--peak_repeats', type=int, default=3, help='GEMM calls per shape per sample')
  parser.add_argument('--quick', action='store_true',
                      help='tiny only, 3 rounds, fewer GEMM shapes; a smoke check under 60 s')
  parser.add_argument('--append', action=argparse.BooleanOptionalAction, default=None,
                      help='append a section to BENCHMARKS.md (default: yes, except --quick)')
  args = parser.parse_args(argv)
  if args.quick:
    args.configs, args.repeats, args.peak_repeats = 'configs/tiny.py', 3, 2
  append = (not args.quick) if args.append is None else args.append

  wall = time.perf_counter()
  benches = [build(spec, args.set) for spec in args.configs.split(',')]
  shapes = [s for b in benches for s in b.gemm_shapes()] + list(SQUARES[:1 if args.quick else 2])
  meter = common.PeakMeter(shapes, repeats=args.peak_repeats)
  for bench in benches:
    measure(bench, meter, args.repeats)
  peak, cpu_peak = meter.peak(), meter.peak(cpu=True)
  rows = [summarize(b, peak, cpu_peak) for b in benches]
  wall = time.perf_counter() - wall

  peak_rows = []
  per_cpu = meter.by_shape(cpu=True)
  for shape, flops in meter.by_shape().items():
    each = [s[shape] / 1e9 for s in meter.samples]
    peak_rows.append(['[{}, {}] @ [{}, {}]'.format(shape[0], shape[1], shape[1], shape[2]),
                      f'{flops / 1e9:.1f}', f'{min(each):.1f}', f'{max(each):.1f}',
                      f'{per_cpu[shape] / 1e9:.1f}'])
  body = '\n\n'.join([
      f'Peak (best shape, median of {len(meter.samples)} interleaved samples): '
      f'**{peak / 1e9:.1f} GFLOP/s** f32 per wall second, {cpu_peak / 1e9:.1f} per CPU second.',
      common.table(['f32 GEMM', 'GFLOP/s median', 'min', 'max', 'GFLOP per CPU-s'], peak_rows),
      common.table(list(rows[0]), [list(r.values()) for r in rows]),
      f'{args.repeats} rounds per config after one warm-up step; model FLOPs from '
      f'`model.flops_per_token`; whole run {wall:.0f} s.',
  ])
  print(body)
  if append:
    common.append_section('Train step: tokens/s and MFU (benchmarks/train_step.py)', body)


if __name__ == '__main__':
  main()
