"""Step time of a model shrunk on each pruned axis, against its analytic FLOP ratio.

The pruning core shrinks four width axes: the FFN (ffn_dim), whole KV groups (n_kv_heads, each
with its query heads), query heads per group, and the hidden size (d_model, head_dim fixed); and
depth (whole layers). A pruned model is only as fast as its shapes, so each shrunk model here is
its ModelConfig built directly (dataclasses.replace on the base): the base, each axis alone at
half, and all four widths at once. For each: the dense jitted train step (AdamW from
configs/tiny.py, one fixed batch), analytic FLOPs per step (`model.flops_per_token` x tokens),
the median step time, and

  (step time / base step time) / (FLOPs / base FLOPs)     -- 1.00: the step shrinks with its FLOPs

Measurements are interleaved (every model, then every model in reverse, ...) so background load
hits all of them alike; a model's time is the median over rounds of each round's median step.
XLA's bytes accessed per step (its cost analysis) shows what the FLOPs leave out: the work that
does not shrink with d_model (the vocab softmax, the attention scores, the FFN activations).
User CPU seconds leave out the kernel's (zeroing the fresh pages XLA:CPU's large buffers get
every step), which grow faster than the model does.
`--d_model` scales the base (heads, KV groups and FFN with it). At 256 and 512 with head_dim 32
the step is memory-bound and d_model / 2 misses its FLOP ratio by 15-40%; at the paper's
head_dim (128) and d_model 1024 the matmuls dominate and every axis lands within 10%; at 2048 the
halved models beat their FLOP ratio, as the base pays the kernel for more fresh pages
(BENCHMARKS.md).

  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot .venv/bin/python \
      benchmarks/multi_axis_steps.py [--d_model 512]   # 3 min (256) on 2 cores; appends to
                                                       # BENCHMARKS.md
  ... benchmarks/multi_axis_steps.py --d_model 1024 --head_dim 128 --batch_size 8 --rounds 7 \
      --steps 2                                        # 3.5 min; --d_model 2048 --batch_size 4
                                                       # --rounds 5: 6 min, 4 GiB of AdamW state

A CPU step at seq_len 128 says nothing of the L x L attention traffic of a TPU step at 2048.
`--topology v5p-8` asks the TPU compiler about that one (libtpu, the `tpu` extra; nothing runs):
each model's train step compiled for one chip at head_dim 128, its cost analysis' own step-time
estimate (`optimal_seconds`) against the FLOP ratio. An estimate, not a measurement:

  .venv/bin/python benchmarks/multi_axis_steps.py --topology v5p-8 --d_model 2048 \
      --batch_size 8 --seq_len 2048    # 13 min of compiles on a loaded 2-core CPU; also
                                       # --batch_size 32 --seq_len 512 (a quarter of the L x L)
"""

import argparse
import dataclasses
import os
import resource
import subprocess
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from idea_prune_jax import settings  # noqa: E402
from idea_prune_jax.data import batch as batch_lib  # noqa: E402
from idea_prune_jax.model import model as model_lib  # noqa: E402
from idea_prune_jax.model.config import ModelConfig  # noqa: E402
from idea_prune_jax.train import optim, sharding  # noqa: E402
from idea_prune_jax.train import state as state_lib  # noqa: E402
from idea_prune_jax.train import step as step_lib  # noqa: E402


def base_model(d_model: int, head_dim: int = 32, vocab_size: int = 4096,
               dtype: str = 'float32') -> ModelConfig:
  """configs/small.py's proportions (FFN 4x, heads in pairs per KV group) at d_model: its own
  step is 5-10 s on a 2-core CPU, too slow for interleaved rounds."""
  return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=4,
                     n_heads=d_model // head_dim, n_kv_heads=d_model // (2 * head_dim),
                     head_dim=head_dim, ffn_dim=4 * d_model, unroll_layers=True, dtype=dtype)


def variants(base: ModelConfig) -> dict:
  """name -> ModelConfig: the base, each axis halved alone, all four widths halved together,
  and half the layers (depth)."""
  hpg = base.n_heads // base.n_kv_heads
  half = {
      'ffn / 2': dict(ffn_dim=base.ffn_dim // 2),
      'KV groups / 2': dict(n_kv_heads=base.n_kv_heads // 2, n_heads=base.n_heads // 2),
      'heads per group / 2': dict(n_heads=base.n_kv_heads * (hpg // 2)),
      'd_model / 2': dict(d_model=base.d_model // 2),
  }
  together = {k: v for change in half.values() for k, v in change.items()}
  together['n_heads'] = (base.n_kv_heads // 2) * (hpg // 2)
  out = {'base': base}
  out.update({name: dataclasses.replace(base, **change) for name, change in half.items()})
  out['all four / 2'] = dataclasses.replace(base, **together)
  out['layers / 2'] = dataclasses.replace(base, n_layers=base.n_layers // 2)
  return out


def shape(c: ModelConfig) -> str:
  """'d_model / ffn / KV groups x heads per group / layers', the table's shape column."""
  return (f'{c.d_model} / {c.ffn_dim} / {c.n_kv_heads} x {c.n_heads // c.n_kv_heads} / '
          f'{c.n_layers}')


def build(cfg: ModelConfig, run, mesh, B: int, L: int):
  """(compiled step, state, batch, XLA's bytes accessed per step): the dense train step as the
  trainer builds it."""
  schedule = optim.lr_schedule(run.train)
  optimizer = optim.make_optimizer(run.train, schedule)
  state, shardings = state_lib.init_state(cfg, optimizer, mesh, jax.random.key(0))
  step = step_lib.jit_step(step_lib.train_step, shardings, mesh, model=model_lib.Transformer(cfg),
                            optimizer=optimizer, schedule=schedule)
  rows = np.random.RandomState(0).randint(1, cfg.vocab_size, (B, L + 1)).astype(np.int32)
  batch = jax.device_put(batch_lib.from_rows(rows), sharding.batch_sharding(mesh))
  compiled = step.lower(state, batch).compile()
  for _ in range(2):  # first executions: buffer allocation, page faults
    state, _ = jax.block_until_ready(compiled(state, batch))
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled, state, batch, float(cost.get('bytes accessed', float('nan')))


def tpu_estimates(cfgs: dict, run, topology: str, B: int, L: int) -> dict:
  """name -> the TPU compiler's figures for the dense train step on one chip of topology:
  'optimal_seconds' (its own step-time estimate), 'flops', 'bytes accessed'. Nothing runs: the
  step is compiled by libtpu on this host (compile-check's machinery); layers are unrolled, so
  no loop body is counted once."""
  from idea_prune_jax.tools import compile_check as check
  from idea_prune_jax.train import chips
  from idea_prune_jax.train import plan as plan_lib
  from idea_prune_jax.train.config import override
  devices = chips.topology_devices(chips.parse_slice(topology))[:1]
  mesh = sharding.make_mesh(run.mesh, devices)
  out = {}
  for name, cfg in cfgs.items():
    fields = {f'model.{f.name}': getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    r = override(run, {**fields, 'pipeline': 'train', 'train.batch_size': B, 'data.seq_len': L})
    step = check.train_program(r, plan_lib.plan(r)[0], mesh)
    cost = step.fn.lower(*step.args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out[name] = {k: float(cost[k]) for k in ('optimal_seconds', 'flops', 'bytes accessed')}
    print(f'{name}: {out[name]}', flush=True)
  return out


def tpu_main(args):
  """--topology: the compiler's estimate per axis (no timing; this host has no TPU)."""
  from idea_prune_jax import cli
  cli.use_tpu_compiler()
  B, L = args.batch_size, args.seq_len
  wall = time.perf_counter()
  run = settings.read(settings.load(os.path.join(common.REPO, 'configs/tiny.py'))).run
  # XLA attention, not splash: the compiler's cost analysis cannot see inside a Pallas kernel.
  base = dataclasses.replace(
      base_model(args.d_model, head_dim=128, vocab_size=32000, dtype='bfloat16'), attention='xla')
  cfgs = variants(base)
  est = tpu_estimates(cfgs, run, args.topology, B, L)
  flops = {n: model_lib.flops_per_token(c, L) * B * L for n, c in cfgs.items()}
  rows = []
  for name, c in cfgs.items():
    f_ratio = flops[name] / flops['base']
    ratio = lambda k: est[name][k] / est['base'][k]  # noqa: E731
    rows.append([name, shape(c),
                 f'{flops[name] / 1e12:.2f}', f'{f_ratio:.3f}', f'{ratio("flops"):.3f}',
                 f'{1e3 * est[name]["optimal_seconds"]:.2f}', f'{ratio("optimal_seconds"):.3f}',
                 f'**{ratio("optimal_seconds") / f_ratio:.2f}**',
                 f'{ratio("bytes accessed"):.3f}'])
  headers = ['model', 'd_model / ffn / KV groups x heads / layers', 'TFLOP/step', 'FLOP ratio',
             "compiler's FLOP ratio", "compiler's step estimate, ms", 'estimate ratio',
             'estimate ratio / FLOP ratio', "compiler's bytes accessed ratio"]
  body = common.table(headers, rows) + (
      f'\n\nThe TPU compiler (libtpu, on this CPU host) compiling the dense train step for one '
      f'chip of {args.topology}: `optimal_seconds` of its cost analysis is its own step-time '
      f'estimate, not a measurement. Base: {base.n_layers} layers (unrolled), vocab '
      f'{base.vocab_size}, head_dim {base.head_dim} (fixed on every axis), bf16 compute, f32 '
      f'params, XLA attention; batch {B} x {L} tokens; AdamW. Whole run '
      f'{time.perf_counter() - wall:.0f} s.')
  print(body)
  if args.append:
    title = (f"The TPU compiler's step-time estimate against the FLOP ratio, per pruned axis "
             f'({time.strftime("%Y-%m-%d")})')
    common.append_section(title, body, facts=machine_facts())


def machine_facts() -> dict:
  cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo')
              if line.startswith('model name')), '?')
  facts = {'nproc': os.cpu_count(), 'cpu': cpu, 'jax': jax.__version__,
           'XLA_FLAGS': os.environ.get('XLA_FLAGS', ''),
           'load average (1 min)': f'{os.getloadavg()[0]:.2f}'}
  studies = subprocess.run(['pgrep', '-fc', 'idea-prune (sweep|run)'], capture_output=True,
                           text=True).stdout.strip()
  if studies not in ('', '0'):
    facts['note'] = f'{studies} background studies (idea-prune sweep or run) were running'
  return facts


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--d_model', type=int, default=256,
                      help="the base's width (a multiple of 128); the others scale with it")
  parser.add_argument('--head_dim', type=int, default=32,
                      help='fixed on every axis (CPU timing; --topology uses 128)')
  parser.add_argument('--vocab_size', type=int, default=4096, help='CPU timing')
  parser.add_argument('--batch_size', type=int, default=4)
  parser.add_argument('--seq_len', type=int, default=128)
  parser.add_argument('--rounds', type=int, default=11, help='passes over all the models')
  parser.add_argument('--steps', type=int, default=3, help='timed steps per model per round')
  parser.add_argument('--append', action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument('--topology', default='',
                      help="e.g. v5p-8: the TPU compiler's estimate for one chip instead of CPU "
                      'timing (needs libtpu, the tpu extra; use --d_model 2048 --batch_size 8 '
                      '--seq_len 2048)')
  args = parser.parse_args()
  if args.topology:
    return tpu_main(args)
  B, L = args.batch_size, args.seq_len
  wall = time.perf_counter()
  run = settings.read(settings.load(os.path.join(common.REPO, 'configs/tiny.py'))).run
  mesh = sharding.make_mesh(run.mesh)
  base = base_model(args.d_model, head_dim=args.head_dim, vocab_size=args.vocab_size)
  cfgs = variants(base)
  benches = {name: list(build(cfg, run, mesh, B, L)) for name, cfg in cfgs.items()}
  times = {name: [] for name in cfgs}  # per round: median wall s, CPU s, kernel CPU s
  for r in range(args.rounds):  # every other round backwards: no model always follows another
    for name in (list(benches) if r % 2 == 0 else list(benches)[::-1]):
      bench, samples = benches[name], []
      for _ in range(args.steps):
        kernel = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        w, c, (bench[1], _) = common.timed(bench[0], bench[1], bench[2])
        samples.append((w, c, resource.getrusage(resource.RUSAGE_SELF).ru_stime - kernel))
      times[name].append(tuple(common.median([s[i] for s in samples]) for i in range(3)))
  wall = time.perf_counter() - wall

  flops = {n: model_lib.flops_per_token(c, L) * B * L for n, c in cfgs.items()}
  moved = {n: b[3] for n, b in benches.items()}
  step = {n: common.median([t[0] for t in ts]) for n, ts in times.items()}
  cpu = {n: common.median([t[1] for t in ts]) for n, ts in times.items()}
  kernel = {n: common.median([t[2] for t in ts]) for n, ts in times.items()}
  rows = []
  for name, c in cfgs.items():
    f_ratio = flops[name] / flops['base']
    t_ratio, c_ratio = step[name] / step['base'], cpu[name] / cpu['base']
    u_ratio = (cpu[name] - kernel[name]) / (cpu['base'] - kernel['base'])
    rounds = [t[0] for t in times[name]]
    rows.append([name, shape(c),
                 f'{flops[name] / 1e9:.2f}', f'{f_ratio:.3f}',
                 f'{step[name]:.3f} [{min(rounds):.3f}, {max(rounds):.3f}]', f'{t_ratio:.3f}',
                 f'**{t_ratio / f_ratio:.2f}**', f'{c_ratio / f_ratio:.2f}',
                 f'{u_ratio / f_ratio:.2f}', f'{kernel[name]:.2f}',
                 f'{moved[name] / moved["base"]:.3f}'])
  headers = ['model', 'd_model / ffn / KV groups x heads / layers', 'GFLOP/step', 'FLOP ratio',
             'step s, median of rounds [min, max]', 'time ratio', 'time ratio / FLOP ratio',
             'same, CPU s', 'same, user CPU s', 'kernel CPU s / step',
             "XLA's bytes accessed ratio"]
  body = common.table(headers, rows) + (
      f'\n\nBase: {base.n_layers} layers, vocab {base.vocab_size}, head_dim {base.head_dim} '
      f'(fixed on every axis), tied embeddings, unrolled layers; batch {B} x {L} tokens; AdamW '
      f'dense train step. {args.rounds} interleaved rounds of {args.steps} steps per model after '
      f'2 warm-up steps; whole run {wall:.0f} s.')
  print(body)
  facts = machine_facts()
  print('\nmachine: ' + ', '.join(f'{k}: {v}' for k, v in facts.items() if v != ''))
  if args.append:
    title = (f'Shrunk model step time against its FLOP ratio, per pruned axis '
             f'({time.strftime("%Y-%m-%d")})')
    common.append_section(title, body, facts=facts)


if __name__ == '__main__':
  main()
