"""Ahead-of-time compilation of every step a run executes, for a pod slice, on this machine.

  idea-prune compile-check --config configs/paper_2p8b_to_1p3b.py:v5p64 --topology v5p-64
  idea-prune compile-check --config configs/paper_2p8b_to_1p3b.py --devices 64   # fake CPUs

With libtpu (the `tpu` extra) `--topology` compiles with the real TPU compiler for that slice's
devices (`jax.experimental.topologies`); without it, or with `--devices N`, for N fake CPU devices
(XLA:CPU buffer assignment, an estimate). Nothing is allocated or run: state and batch are
ShapeDtypeStructs carrying their shardings, and each step (the jitted, donated function the run
uses) is only lowered and compiled. The compiled SPMD program is one device's program, so its
memory and cost analyses read per chip.
"""

import concurrent.futures
import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from idea_prune_jax.data import batch as batch_lib
from idea_prune_jax.model import attention as attention_lib
from idea_prune_jax.io import checkpoint as ckpt_lib
from idea_prune_jax.tools import hlo_cost
from idea_prune_jax.prune import importance
from idea_prune_jax.prune import masks as masks_lib
from idea_prune_jax.model import model as model_lib
from idea_prune_jax.train import pipeline
from idea_prune_jax.train import plan as plan_lib
from idea_prune_jax.train import sharding as sharding_lib
from idea_prune_jax.prune import structure
from idea_prune_jax.train import state as state_lib
from idea_prune_jax.train import step as step_lib
from idea_prune_jax.experiments.config import IDEA_KD_ALPHA
from idea_prune_jax.train.config import ConfigError, RunConfig, check_devices, override
from idea_prune_jax.train.targets import prune_structure, target_model

GIB = 2 ** 30


def parse_mesh(spec: str) -> dict[str, int]:
  """'data=1,fsdp=16,tensor=4' -> {'data': 1, 'fsdp': 16, 'tensor': 4}; unnamed axes keep the
  config's."""
  out = {}
  for item in (s.strip() for s in spec.split(',') if s.strip()):
    name, eq, value = item.partition('=')
    name = name.strip()
    if not eq or name not in sharding_lib.AXES:
      raise ConfigError(f'--mesh={spec!r}: {item!r} is not AXIS=SIZE with AXIS one of '
                        f'{",".join(sharding_lib.AXES)} (e.g. data=1,fsdp=16,tensor=4)')
    try:
      out[name] = int(value)
    except ValueError:
      raise ConfigError(f'--mesh={spec!r}: mesh.{name}={value.strip()!r} is not an integer'
                        ) from None
    if out[name] != -1 and out[name] < 1:
      raise ConfigError(f'--mesh={spec!r}: mesh.{name}={out[name]} must be >= 1 (or -1)')
  if not out:
    raise ConfigError(f'--mesh={spec!r}: empty; e.g. data=1,fsdp=16,tensor=4')
  return out


def kd_run(run: RunConfig) -> RunConfig:
  """The idea pipeline with KD in its prune phase; recovery stays as the config runs it.

  A config without KD gets idea_kd's alpha (IDEA_KD_ALPHA) on the prune phase only, so the prune
  step holds masks, scores and the teacher while the recovery step is still the plain shrunk one.
  """
  changes = {'pipeline': 'idea'}
  if run.distill.alpha <= 0:
    changes.update({'distill.alpha': IDEA_KD_ALPHA, 'distill.phases': 'prune'})
  elif run.distill.phases == 'recovery':
    changes['distill.phases'] = 'both'
  return override(run, changes)


def abstract_batch(run: RunConfig, mesh) -> batch_lib.Batch:
  shape = (run.train.batch_size, run.data.seq_len)
  leaf = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding_lib.batch_sharding(mesh))
  weights = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=leaf.sharding)
  if run.data.attention == 'document':  # packed documents: segment ids and positions
    return batch_lib.make(leaf, leaf, weights, segment_ids=leaf, positions=leaf)
  return batch_lib.make(leaf, leaf, weights)


def _name(path) -> str:
  return '/'.join(structure.key_names(path))


def _check_divisible(state, mesh) -> None:
  """One line naming the mesh field, where jit would raise many, for a dim split unevenly."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    for dim, (size, axes) in enumerate(zip(leaf.shape, leaf.sharding.spec)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      ways = math.prod(mesh.shape[a] for a in axes)
      if size % ways:
        raise ConfigError(f'config.mesh.{axes[-1]}={mesh.shape[axes[-1]]}: {_name(path)} dim '
                          f'{dim} (size {size}) does not split {ways} ways over mesh axes {axes}')


def _state_bytes(state) -> dict:
  """Per-device state bytes from the shardings, and what of it every device holds in full."""
  total = replicated = 0
  largest = ('', 0)
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    nbytes = math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    total += nbytes
    if leaf.sharding.is_fully_replicated and leaf.sharding.num_devices > 1:
      replicated += nbytes
      largest = max(largest, (_name(path), nbytes), key=lambda t: t[1])
  return {'state_bytes': total, 'replicated_state_bytes': replicated,
          'largest_replicated': largest[0]}


@dataclasses.dataclass(frozen=True)
class Step:
  """One program the run executes: its jitted function, abstract arguments and model FLOPs."""
  name: str
  fn: Any  # a jitted function (or sharding.MeshJit) with .lower(*args)
  args: tuple
  model_flops: float  # analytic model FLOPs of one call, whole mesh (6N per token for training)
  info: dict
  kernel_flops: float = 0.0  # Pallas kernels' FLOPs, whole mesh: cost_analysis() cannot see them


def _abstract_state(p: pipeline.Parts, mesh):
  state = ckpt_lib.abstract_like(jax.eval_shape(p.init_fn, jax.random.key(0)), p.shardings)
  _check_divisible(state, mesh)
  return state


def _tokens(run: RunConfig) -> int:
  return run.train.batch_size * run.data.seq_len


def _train_flops(run: RunConfig, phase: plan_lib.Phase) -> float:
  """Model FLOPs of one step, as the run's own logs count them (`plan.step_flops`)."""
  return plan_lib.step_flops(run, phase, pipeline.teacher_config(run))


def _splash_flops(run: RunConfig, mesh, passes: float, teacher: bool = False) -> float:
  """FLOPs of the splash kernels of one call (0 unless attention resolves to splash).

  passes: attention passes per layer in units of one forward (QK^T and PV, 4·H·K·L per token):
  a training step is 3 (forward + backward, the PaLM count model_flops uses), plus 1 when remat
  recomputes the forward; teacher adds the KD teacher's forward.
  """
  m = run.model
  platform = mesh.devices.flat[0].platform
  if attention_lib.resolve(m.attention, platform, run.data.seq_len, m.dtype, m.n_kv_heads,
                           mesh.shape['tensor']) != 'splash':
    return 0.0
  fwd = lambda c: 4 * c.n_layers * c.n_heads * c.head_dim * run.data.seq_len * _tokens(run)
  return passes * fwd(m) + (fwd(pipeline.teacher_config(run)) if teacher else 0.0)


def _train_passes(run: RunConfig) -> float:
  recompute = run.model.remat_policy in ('full', 'dots_saveable')
  return 3.0 + recompute


def train_program(run: RunConfig, phase: plan_lib.Phase, mesh, name: str | None = None) -> Step:
  """The phase's jitted, donated train step (`pipeline.step_fn`)."""
  p = pipeline.parts(run, phase, mesh)
  fn = pipeline.step_fn(run, phase, p, mesh)
  info = {'ffn_dim': phase.model.ffn_dim, 'kd': phase.kd, 'teacher': phase.teacher,
          'masks': phase.prune is not None}
  state = _abstract_state(p, mesh)
  return Step(name or phase.name, fn, (state, abstract_batch(run, mesh)),
              _train_flops(run, phase), {**info, **_state_bytes(state)},
              _splash_flops(run, mesh, _train_passes(run), teacher=phase.kd))


def naive_score_program(run: RunConfig, mesh) -> Step:
  """naive one-shot's scoring step at the enlarged width (`pipeline.oneshot_score_fn`)."""
  phase = plan_lib.plan(run)[0]
  p = pipeline.parts(run, phase, mesh)
  params = _abstract_state(p, mesh).params
  kind = run.prune.score
  unit_structure = prune_structure(run, p.model_cfg)
  scores = jax.eval_shape(lambda ps: importance.init(masks_lib.init(ps, unit_structure), kind),
                          params)
  scores = ckpt_lib.abstract_like(scores, state_lib.unit_shardings(scores, mesh))
  return Step('naive_score', pipeline.oneshot_score_fn(run, p.model_cfg, mesh),
              (scores, params, abstract_batch(run, mesh)), _train_flops(run, phase),
              {'ffn_dim': phase.model.ffn_dim, 'kd': False, 'teacher': False, 'masks': False,
               **_state_bytes(scores)}, _splash_flops(run, mesh, _train_passes(run)))


def eval_program(run: RunConfig, mesh) -> Step:
  """The evaluation forward at the enlarged width (the wider of the two models)."""
  phase = plan_lib.plan(run)[0]
  p = pipeline.parts(run, phase, mesh)
  params = _abstract_state(p, mesh).params
  fn = step_lib.jit_eval(p.model, p.shardings.params, mesh)
  return Step('eval', fn, (params, abstract_batch(run, mesh), None),
              _train_flops(run, phase) / 3,
              {'ffn_dim': phase.model.ffn_dim, 'kd': False, 'teacher': False, 'masks': False,
               **_state_bytes(params)}, _splash_flops(run, mesh, 1.0))


def _kd_phase(run: RunConfig, name):
  return next(ph for ph in plan_lib.plan(run) if ph.name == name)


def prune_nokd_program(run: RunConfig, mesh) -> Step:
  """idea's prune step without a teacher (run as compiled has KD in its prune phase)."""
  plain = override(run, {'distill.alpha': 0.0})
  return train_program(plain, _kd_phase(plain, 'prune'), mesh, name='prune_nokd')


# Every program a run executes, by name, each built from the run `kd_run` returns (the idea
# pipeline with KD in its prune phase). naive's own train steps are the same programs as
# enlarged and recovery (its recovery starts a fresh optimizer of the same shapes).
STEPS: tuple[tuple[str, Callable[[Any, Any], Step]], ...] = (
    ('enlarged', lambda c, mesh: train_program(c, _kd_phase(c, 'enlarged'), mesh)),
    ('prune', lambda c, mesh: train_program(c, _kd_phase(c, 'prune'), mesh)),  # with KD
    ('prune_nokd', prune_nokd_program),
    ('recovery', lambda c, mesh: train_program(c, _kd_phase(c, 'recovery'), mesh)),
    ('naive_score', naive_score_program),
    ('eval', eval_program),
)


_USED = re.compile(r'Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm')
_TEMPS = re.compile(r'([\d.]+)([KMGT]) temporaries|temporaries \(([\d.]+)([KMGT])\)')
_SCALE = {'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}


def needed_bytes(message: str) -> int | None:
  """The HBM a RESOURCE_EXHAUSTED compile error says the program needs, in bytes."""
  found = _USED.search(message) or _TEMPS.search(message)
  if not found:
    return None
  size, unit = [g for g in found.groups() if g is not None][:2]
  return int(float(size) * _SCALE[unit])


def _cost(compiled) -> dict:
  """The compiler's FLOPs and bytes per chip, every loop iteration counted (`hlo_cost`).

  cost_analysis() counts a loop body once (one layer of a scanned stack, one chunk of a chunked
  loss); what the other iterations add is XLA's cost analysis of the same compiled bodies.
  """
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  out = {'flops': float(cost.get('flops', 0.0)),
         'bytes_accessed': float(cost.get('bytes accessed', 0.0))}
  try:
    counted = hlo_cost.loop_cost(compiled.as_text())
  except Exception as e:  # an HLO text the parser cannot read: the loops stay counted once
    return {**out, 'loops_counted': False,
            'cost_source': f'cost_analysis, loops counted once ({type(e).__name__}: {e})'[:300]}
  unknown = [body for body, trips in counted['loops'] if trips is None]
  for key in out:
    out[key] += counted[key] - counted['once'][key]
  out['collective_bytes'] = {kind: n for kind, n in counted['collectives'].items() if n}
  out['ici_bytes'] = sum(counted['collectives'].values())
  out['loop_trips'] = sorted(trips for _, trips in counted['loops'] if trips is not None)
  out['loops_counted'] = not unknown
  out['cost_source'] = ('cost_analysis, every loop iteration counted' if not unknown else
                        f'cost_analysis, loops {unknown} counted once (trip count not found)')
  return out


def _memory(compiled, hbm_gib: float) -> dict:
  mem = compiled.memory_analysis()
  if mem is None:  # some backends report nothing
    return {}
  out = {f'{key}_bytes': int(getattr(mem, f'{key}_size_in_bytes', 0))
         for key in ('argument', 'output', 'temp', 'alias', 'generated_code')}
  total = out['argument_bytes'] + out['output_bytes'] + out['temp_bytes'] - out['alias_bytes']
  return {**out, 'total_bytes': total, 'total_gib': round(total / GIB, 3),
          'hbm_fraction': round(total / (hbm_gib * GIB), 3), 'fits_hbm_gib': total <= hbm_gib * GIB}


def _lower(step: Step) -> tuple[dict, Any]:
  t0 = time.perf_counter()
  lowered = step.fn.lower(*step.args)
  return {**step.info, 'lower_s': round(time.perf_counter() - t0, 2)}, lowered


def _compile(lowered, hbm_gib: float) -> tuple[dict, Any]:
  """Compiles a lowered step; its per-chip memory (or why it does not fit) and the executable."""
  t0 = time.perf_counter()
  out = {'chip_hbm_gib': hbm_gib}
  try:
    compiled = lowered.compile()
  except Exception as e:  # XlaRuntimeError; TPU compiles fail here when HBM is too small
    need = needed_bytes(str(e))
    if 'RESOURCE_EXHAUSTED' not in str(e) or need is None:
      raise
    out.update(compile_s=round(time.perf_counter() - t0, 2), fits_hbm_gib=False,
               needs_gib=round(need / GIB, 2), total_gib=None,
               error=f'does not fit, needs {need / GIB:.2f} GiB of {hbm_gib:g} GiB')
    return out, None
  out['compile_s'] = round(time.perf_counter() - t0, 2)
  out.update(_memory(compiled, hbm_gib))
  return out, compiled


def roofline(flops: float, bytes_accessed: float, model_flops: float, chip,
             ici_bytes: float = 0.0) -> dict:
  """Step time from compute, HBM traffic and collectives, and the MFU each allows.

  roofline_step_s = max(compute, HBM): the chip alone. With the collectives' bytes priced at the
  chip's ICI bandwidth (every port busy, `Chip.collective_gbps`), the step lies between every
  part overlapped (max of the three) and nothing overlapped (their sum): step_s_range.
  """
  peak = chip.bf16_tflops * 1e12
  compute_s = flops / peak
  memory_s = bytes_accessed / (chip.hbm_gbps * 1e9)
  ici_s = ici_bytes / (chip.collective_gbps * 1e9)
  step_s = max(compute_s, memory_s)
  span = (max(step_s, ici_s), compute_s + memory_s + ici_s)
  mfu = lambda s: round(model_flops / (s * peak), 4) if s else None
  bound = max((('compute', compute_s), ('memory', memory_s), ('ici', ici_s)), key=lambda kv: kv[1])
  return {'compute_s': compute_s, 'memory_s': memory_s, 'ici_s': ici_s, 'roofline_step_s': step_s,
          'bound': bound[0], 'mfu_ceiling': mfu(step_s), 'step_s_range': list(span),
          'mfu_range': [mfu(span[1]), mfu(span[0])]}


def compile_check(run: RunConfig, devices, hbm_gib: float | None = None, chip=None,
                  only: tuple[str, ...] = ()) -> dict:
  """Compiles every step of run for a mesh over devices; per-chip memory, cost and roofline.

  chip: a `chips.Chip` for the roofline (None: memory only). only: step names to compile.
  """
  n_devices = len(devices)
  run = kd_run(run)
  check_devices(run, n_devices)
  hbm_gib = hbm_gib or (chip.hbm_gib if chip else 95.0)
  mesh = sharding_lib.make_mesh(run.mesh, devices)
  # Lowering is Python (one at a time); XLA compiles release the GIL, so they run in threads,
  # one per core: the paper pair's steps take minutes each.
  jobs = {}  # step name -> (step, row, lowered)
  for name, make in STEPS:
    if not only or name in only:
      step = make(run, mesh)
      jobs[name] = (step, *_lower(step))
  with concurrent.futures.ThreadPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
    results = {name: pool.submit(_compile, lowered, hbm_gib)
               for name, (_, _, lowered) in jobs.items()}
    results = {name: f.result() for name, f in results.items()}
  out_steps = {}
  for name, (step, row, _) in jobs.items():
    more, compiled = results[name]
    row = {**row, **more, 'model_flops': step.model_flops / n_devices}
    if compiled is not None:
      row.update(_cost(compiled))
      if step.kernel_flops:
        row['kernel_flops'] = step.kernel_flops / n_devices
        row['flops'] += row['kernel_flops']
        row['cost_source'] += ' + analytic splash-kernel FLOPs (kernel_flops)'
      if chip is not None and row['loops_counted']:  # a loop counted once: the bound means nothing
        # A guard: below the model's own FLOPs the count is known short (a loop the analysis
        # missed), so the bound uses the model's FLOPs.
        row['flops_below_model'] = row['flops'] < row['model_flops']
        row.update(roofline(max(row['flops'], row['model_flops']), row['bytes_accessed'],
                            row['model_flops'], chip, row['ici_bytes']))
    out_steps[name] = row
  del results
  m = run.model
  return {
      'config': {
          'devices': n_devices, 'platform': devices[0].platform,
          'device_kind': devices[0].device_kind,
          'mesh': dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape))),
          'batch': run.train.batch_size, 'seq_len': run.data.seq_len,
          'dtype': m.dtype, 'param_dtype': m.param_dtype,
          'attention': attention_lib.resolve(m.attention, devices[0].platform, run.data.seq_len,
                                             m.dtype, m.n_kv_heads, mesh.shape['tensor']),
          'remat_policy': m.remat_policy, 'loss_chunk': m.loss_chunk,
          'distill_alpha': run.distill.alpha, 'distill_phases': run.distill.phases,
          'distill_chunk': run.distill.chunk,
          'params_enlarged': model_lib.param_count(run.model),
          'params_target': model_lib.param_count(target_model(run)),
          'jax': jax.__version__},
      'chip': dataclasses.asdict(chip) if chip else None,
      'hbm_gib': hbm_gib,
      'steps': out_steps,
      'fits_hbm_gib': {name: s.get('fits_hbm_gib') for name, s in out_steps.items()},
  }


def _range(mfus) -> str:
  """'41-68%': MFU with nothing overlapped, and with compute, HBM and ICI all overlapped."""
  return f'{100 * mfus[0]:.0f}-{100 * mfus[1]:.0f}%' if mfus and None not in mfus else '-'


def table(report: dict) -> str:
  """The report's steps as a fixed-width table (GiB per chip; TFLOP and GB per step and chip)."""
  head = (f'{"step":<12}{"arg":>7}{"out":>7}{"temp":>7}{"total":>8}{"HBM%":>6}  '
          f'{"TFLOP":>8}{"model":>8}{"GB acc":>9}{"GB ICI":>8}{"roof s":>8}{"bound":>8}'
          f'{"MFU<=":>7}{"MFU range":>12}{"comp s":>8}')
  lines = [head]
  g = lambda row, k: f'{row[k] / GIB:7.2f}' if row.get(k) is not None else f'{"-":>7}'
  for name, r in report['steps'].items():
    if r.get('error'):
      lines.append(f'{name:<12}{r["error"]}   (compile {r["compile_s"]} s)')
      continue
    f = lambda k, scale, w=7, p=2: (f'{r[k] / scale:{w}.{p}f}' if r.get(k) is not None
                                    else f'{"-":>{w}}')
    lines.append(f'{name:<12}{g(r, "argument_bytes")}{g(r, "output_bytes")}{g(r, "temp_bytes")}'
                 f'{f("total_bytes", GIB, 8)}{100 * r.get("hbm_fraction", 0):6.0f}  '
                 f'{f("flops", 1e12, 8)}{f("model_flops", 1e12, 8)}'
                 f'{f("bytes_accessed", 1e9, 9, 1)}'
                 f'{f("ici_bytes", 1e9, 8, 1)}'
                 f'{f("roofline_step_s", 1, 8, 3)}{r.get("bound", "-"):>8}'
                 f'{f("mfu_ceiling", 0.01, 7, 1)}{_range(r.get("mfu_range")):>12}'
                 f'{r["compile_s"]:8.1f}')
  c = report['config']
  lines.append(f'{c["devices"]} x {c["device_kind"]} ({c["platform"]}), mesh {c["mesh"]}, batch '
               f'{c["batch"]} x {c["seq_len"]}, attention {c["attention"]}, remat '
               f'{c["remat_policy"]}, loss_chunk {c["loss_chunk"]}; '
               f'HBM {report["hbm_gib"]:g} GiB/chip')
  return '\n'.join(lines)


def libtpu_available() -> bool:
  return importlib.util.find_spec('libtpu') is not None
