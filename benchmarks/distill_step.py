"""The KD step: one fused jit vs. teacher forward + student step run separately; chunked KL memory.

  .venv/bin/python benchmarks/distill_step.py             # both parts; appends to BENCHMARKS.md
  .venv/bin/python benchmarks/distill_step.py --quick     # fewer repeats; prints only

(1) Time. `train.train_step` with `kd=KDOptions(...)` (teacher forward from the state's teacher and
student forward+backward+AdamW in one program) against the two-program alternative: a jitted
teacher forward that returns [B, L, V] logits, then a jitted student step that takes them as an
input. Both unchunked, both donate the state; a third row times the fused step with chunked KD
logits (the price of the recompute).
Rounds interleave the variants so load changes on this shared machine hit all; the figure is the
median of per-round ratios to separate (<= 1.0 means fusing does not cost), in wall and in
process CPU seconds.
(2) Memory. Compiled temporary memory (`memory_analysis().temp_size_in_bytes`) of the fused step
at vocab 32000 with and without sequence-chunked KD logits; compile only, nothing runs.
"""

import argparse
import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from idea_prune_jax.train.config import TrainConfig  # noqa: E402
from idea_prune_jax import distill  # noqa: E402
from idea_prune_jax.data import batch as batch_lib  # noqa: E402
from idea_prune_jax.model import model as model_lib  # noqa: E402
from idea_prune_jax.model.config import ModelConfig  # noqa: E402
from idea_prune_jax.train import optim  # noqa: E402
from idea_prune_jax.train import state as state_lib  # noqa: E402
from idea_prune_jax.train import step as step_lib  # noqa: E402

ALPHA, TAU = 0.5, 2.0


def _cfgs(vocab, student_ffn=768, ratio=3):
  base = dict(vocab_size=vocab, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2)
  return (ModelConfig(**base, ffn_dim=student_ffn),
          ModelConfig(**base, ffn_dim=ratio * student_ffn))


def _optimizer():
  """(AdamW as in train/optim.py, its schedule); a constant LR: only speed and memory are measured."""
  schedule = optax.constant_schedule(1e-3)
  return optim.make_optimizer(TrainConfig(), schedule), schedule


def _setup(student_cfg, teacher_cfg, batch_size, seq_len, optimizer):
  """(student state without a teacher, teacher params, batch) with random params and tokens."""
  init = lambda cfg, seed: nn.unbox(model_lib.init_params(cfg, jax.random.key(seed)))
  params = jax.jit(functools.partial(init, student_cfg), static_argnums=0)(0)
  teacher = jax.jit(functools.partial(init, teacher_cfg), static_argnums=0)(1)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=optimizer.init(params))
  rows = jnp.asarray(np.random.default_rng(0).integers(
      1, student_cfg.vocab_size, (batch_size, seq_len + 1)), jnp.int32)
  batch = batch_lib.make(rows[:, :-1], rows[:, 1:], jnp.ones((batch_size, seq_len), jnp.float32))
  return state, teacher, batch


def _kd_step(model, teacher_model, optimizer, schedule, chunk):
  """The fused KD step (the trainer's), jitted with a donated state that holds the teacher."""
  kd = step_lib.KDOptions(teacher_model, ALPHA, TAU, chunk)
  return jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=optimizer,
                                   schedule=schedule, kd=kd), donate_argnums=(0,))


def _student_step(state, batch, teacher_logits, *, model, optimizer, schedule):
  """The separate path's second program: the KD step given precomputed teacher logits."""
  def loss_fn(params):
    logits = model.apply({'params': params}, batch['inputs'])
    return distill.kd_loss(logits, teacher_logits, batch['targets'], batch['weights'], alpha=ALPHA,
                           tau=TAU)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), {'loss': loss}


def time_fused_vs_separate(rounds, steps_per_round, batch_size=8, seq_len=256, chunk=64):
  student_cfg, teacher_cfg = _cfgs(8192)
  model, teacher_model = model_lib.Transformer(student_cfg), model_lib.Transformer(teacher_cfg)
  optimizer, schedule = _optimizer()
  state, teacher, batch = _setup(student_cfg, teacher_cfg, batch_size, seq_len, optimizer)
  fused = {c: _kd_step(model, teacher_model, optimizer, schedule, c) for c in (0, chunk)}
  teacher_fwd = jax.jit(lambda p, inputs: teacher_model.apply({'params': p}, inputs))
  student = jax.jit(functools.partial(_student_step, model=model, optimizer=optimizer,
                                      schedule=schedule), donate_argnums=(0,))
  copy = lambda s: jax.tree.map(jnp.copy, s)
  runs = {'fused': lambda s: fused[0](s, batch)[0],
          'separate': lambda s: student(s, batch, teacher_fwd(teacher, batch['inputs']))[0],
          'chunked': lambda s: fused[chunk](s, batch)[0]}
  # The fused steps donate their state, teacher included: each gets its own copy of the teacher.
  states = {name: copy(state if name == 'separate' else state.replace(teacher=teacher))
            for name in runs}
  for name, fn in runs.items():  # compile and warm up
    states[name] = jax.block_until_ready(fn(states[name]))
  wall, cpu = ({name: [] for name in runs} for _ in range(2))
  for r in range(rounds):
    # Alternate the order so a load change mid-round does not always favour one variant.
    for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
      w = c = 0.0
      for _ in range(steps_per_round):
        dw, dc, states[name] = common.timed(runs[name], states[name])
        w, c = w + dw, c + dc
      wall[name].append(w / steps_per_round)
      cpu[name].append(c / steps_per_round)
  ratio = lambda t, name: [a / b for a, b in zip(t[name], t['separate'])]
  return {'student': student_cfg, 'teacher': teacher_cfg, 'batch': batch_size, 'seq': seq_len,
          'chunk': chunk, 'wall_s': {name: common.median(t) for name, t in wall.items()},
          'cpu_s': {name: common.median(t) for name, t in cpu.items()},
          'ratio': {name: common.median(ratio(wall, name)) for name in runs},
          'cpu_ratio': {name: common.median(ratio(cpu, name)) for name in runs},
          'ratios': {name: ratio(wall, name) for name in runs}}


def compiled_temp_bytes(chunks, batch_size=2, seq_len=1024, vocab=32000):
  """chunk -> temp bytes of the compiled fused KD step (plus the plain train step, as 'lm')."""
  student_cfg, teacher_cfg = _cfgs(vocab)
  model, teacher_model = model_lib.Transformer(student_cfg), model_lib.Transformer(teacher_cfg)
  optimizer, schedule = _optimizer()
  # Shapes only: nothing is allocated or run, the steps are just compiled.
  state, teacher, batch = jax.eval_shape(
      lambda: _setup(student_cfg, teacher_cfg, batch_size, seq_len, optimizer))
  out = {}
  lm = jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=optimizer,
                                 schedule=schedule), donate_argnums=(0,))
  out['lm'] = lm.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
  for chunk in chunks:
    step = _kd_step(model, teacher_model, optimizer, schedule, chunk)
    out[chunk] = step.lower(state.replace(teacher=teacher),
                            batch).compile().memory_analysis().temp_size_in_bytes
  return {'student': student_cfg, 'batch': batch_size, 'seq': seq_len, 'vocab': vocab,
          'temp': out}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='3 rounds of 1 step; print only')
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--steps', type=int, default=2, help='steps per round and variant')
  parser.add_argument('--no-write', action='store_true', help='print only')
  args = parser.parse_args()
  rounds, steps = (3, 1) if args.quick else (args.rounds, args.steps)

  t = time_fused_vs_separate(rounds, steps)
  s, te = t['student'], t['teacher']
  model_line = (f'd_model {s.d_model}, {s.n_layers} layers, {s.n_heads} heads ({s.n_kv_heads} kv), '
                f'vocab {s.vocab_size}, student ffn {s.ffn_dim}, teacher ffn {te.ffn_dim}, '
                f'batch {t["batch"]} x seq {t["seq"]}, alpha {ALPHA}, tau {TAU}, f32')
  labels = {'fused': 'fused: one jit (teacher fwd + student step), unchunked',
            'separate': 'separate: jit teacher fwd -> logits, then jit student step',
            'chunked': f'fused, KD logits in chunks of {t["chunk"]}'}
  time_table = common.table(
      ['variant', 'median step, wall (s)', 'median step, CPU (s)', 'ratio to separate, wall',
       'ratio to separate, CPU'],
      [[labels[k], f'{t["wall_s"][k]:.3f}', f'{t["cpu_s"][k]:.3f}', f'{t["ratio"][k]:.3f}',
        f'{t["cpu_ratio"][k]:.3f}'] for k in labels])
  per_round = '; '.join(f'{k}: ' + ' '.join(f'{r:.3f}' for r in t['ratios'][k])
                        for k in ('fused', 'chunked'))
  print(model_line)
  print(time_table)
  print('per-round wall ratios to separate:', per_round)

  m = compiled_temp_bytes([0, 256, 128, 64])
  mib = lambda b: f'{b / 2**20:.0f}'
  mem_line = (f'same model at vocab {m["vocab"]}, batch {m["batch"]} x seq {m["seq"]}; '
              f'one [B, L, V] f32 logits tensor = '
              f'{mib(4 * m["batch"] * m["seq"] * m["vocab"])} MiB')
  rows = [['plain LM train step (no teacher)', mib(m['temp']['lm'])]]
  rows += [[f'KD step, chunk {c}' if c else 'KD step, unchunked', mib(v)]
           for c, v in m['temp'].items() if c != 'lm']
  mem_table = common.table(['program', 'compiled temp (MiB)'], rows)
  print(mem_line)
  print(mem_table)

  if not (args.quick or args.no_write):
    body = (f'Fused vs. separate KD step ({rounds} interleaved rounds x {steps} steps each): '
            f'{model_line}.\n\n{time_table}\n\nRatios are medians of per-round ratios; CPU = '
            'process CPU seconds (all threads), which move less than wall time when other jobs '
            f'take the cores. Per-round wall ratios to separate: {per_round}.\n\n'
            f'Compiled temporary memory of the KD step ({mem_line}); compile only:\n\n'
            f'{mem_table}\n')
    common.append_section('KD step: fused vs. separate, chunked KL memory', body)


if __name__ == '__main__':
  main()
