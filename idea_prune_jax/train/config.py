"""What a run is, as frozen dataclasses, and every check that can be made before compute.

`settings.read` builds a `RunConfig` from the CLI's ConfigDict; below it every function takes the
section it needs (`run.train`, `run.mesh`, ...). The field defaults here are the project's
defaults (`settings.base` is made from them); `configs/*.py` override them.
"""

import dataclasses
import math
from typing import Any

from idea_prune_jax.data import split, storage
from idea_prune_jax.data.config import DataConfig
from idea_prune_jax.model.config import ModelConfig
from idea_prune_jax.prune.distill import SCHEDULES as KD_SCHEDULES
from idea_prune_jax.prune.importance import KINDS as SCORE_KINDS
from idea_prune_jax.prune.schedules import WIDTH_SCHEDULES
from idea_prune_jax.prune import structure as structure_lib
from idea_prune_jax.train import budget
from idea_prune_jax.train.targets import (BUDGET_CRITERIA, TARGET_FIELDS, budget_constraints,
                                          budget_units, prune_schedule, pruned_units,
                                          target_model)


class ConfigError(ValueError):
  """A bad config value; the message names the field and how to fix it."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 600
  batch_size: int = 16  # global, in sequences
  lr: float = 1e-3
  warmup_steps: int = 30
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 8
  ckpt_every: int = 200
  # Also a checkpoint once this many minutes of wall time passed since the last one (0 = off):
  # bounds the work a preemption loses when steps are slow. Process 0's clock decides.
  ckpt_minutes: float = 0.0
  keep_ckpts: int = 2
  keep_steps: str = ''  # checkpoints never deleted, e.g. '1000,1400' (the sweep keeps t_start)
  async_ckpt: bool = True  # training goes on while a checkpoint is written
  # Compiled steps persist here, so a resumed run does not compile them again ('' = W/jax_cache,
  # 'none' = off); gs:// works.
  compilation_cache: str = ''


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
  start_step: int = -1  # first step of a jax.profiler trace into W/profile; -1 = no trace
  steps: int = 5


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1  # -1: whatever is left of the devices
  fsdp: int = 1
  tensor: int = 1
  # Join the other hosts (cli.initialize_distributed); also with IDEA_PRUNE_DISTRIBUTED=1.
  distributed: bool = False
  # XLA:TPU flags for this run (and compile-check), added to LIBTPU_INIT_ARGS by the entry point
  # before libtpu starts
  libtpu_args: str = ''


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  target_ffn: int = 384
  # The target's other widths (0: the enlarged model's, that axis not pruned); head_dim stays.
  target_kv_heads: int = 0  # whole KV groups, each with its query heads
  target_heads_per_group: int = 0  # query heads kept in every KV group
  target_d_model: int = 0  # hidden size (a multiple of round_to)
  target_layers: int = 0  # whole layers of the stack (depth)
  # > 0: a parameter count; the run chooses every target_* above (target_ffn included) at the
  # start of pruning, narrowing the axes in `units` to within `tolerance` of it (train/budget.py).
  target_params: int = 0
  units: str = 'ffn,kv_groups,heads,hidden'
  tolerance: float = 0.005
  budget: str = 'importance'  # importance | lookahead: how the shape is chosen (BUDGET_CRITERIA)
  budget_batches: int = 8  # batches the choice scores (and, for lookahead, evaluates) on
  t_start: float = 0.5  # fraction of train.steps
  t_end: float = 0.7
  every: int = 10  # ΔT: mask refresh cadence inside the window
  schedule: str = 'cubic'  # cubic | linear
  score: str = 'platon'  # platon | sensitivity_ema | magnitude | activation
  beta1: float = 0.85
  beta2: float = 0.95
  round_to: int = 1  # 128 on TPU


@dataclasses.dataclass(frozen=True)
class NaiveConfig:
  split: float = 0.5  # fraction of train.steps for the enlarged model's own cosine
  prune: str = 'oneshot'  # oneshot (scores from a few batches) | iterative (a short window)
  window: float = 0.1  # iterative: window length as a fraction of train.steps
  score_batches: int = 8  # oneshot: batches of gradients the scores are accumulated over


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  alpha: float = 0.0  # 0 disables KD; with alpha_schedule, the value the distilling steps start at
  tau: float = 1.0
  # constant | linear | cosine from alpha (tau) to alpha_end (tau_end) over the distilling steps
  alpha_schedule: str = 'constant'
  alpha_end: float = 0.0
  tau_schedule: str = 'constant'
  tau_end: float = 1.0
  chunk: int = 0  # sequence chunk for the KL; 0 = unchunked
  phases: str = 'both'  # prune | recovery | both
  teacher: str = ''  # checkpoint path; empty = the pipeline's own enlarged model


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """lm-eval tasks on the final model, by `run`."""
  tasks: str = ''  # comma-separated task names; empty: none (needs the `eval` extra)
  num_fewshot: int = -1  # -1: each task's own default
  limit: int = 0  # at most this many docs per task; 0: all
  include_path: str = ''  # a directory of task YAMLs (local tasks, e.g. tests/data/harness)
  batch_size: int = 16  # requests per batch; a multiple of mesh.data * mesh.fsdp


@dataclasses.dataclass(frozen=True)
class RunConfig:
  pipeline: str = 'idea'  # idea | naive | scratch (train: dense `model` for all steps)
  seed: int = 0
  # ffn_dim: the enlarged width for idea/naive; the model's width for `train`
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  profile: ProfileConfig = ProfileConfig()
  mesh: MeshConfig = MeshConfig()
  prune: PruneConfig = PruneConfig()
  naive: NaiveConfig = NaiveConfig()
  distill: DistillConfig = DistillConfig()
  eval: EvalConfig = EvalConfig()


def field(run: RunConfig, name: str) -> Any:
  """run's value of a dotted field name ('prune.t_end')."""
  value = run
  for part in name.split('.'):
    value = getattr(value, part)
  return value


def override(run: RunConfig, changes: dict[str, Any]) -> RunConfig:
  """A checked copy of run with dotted fields changed: {'train.steps': 50, 'pipeline': 'naive'}."""
  sections: dict[str, dict] = {}
  top = {}
  for name, value in changes.items():
    section, _, leaf = name.rpartition('.')
    if section:
      sections.setdefault(section, {})[leaf] = value
    else:
      top[leaf] = value
  new = dataclasses.replace(run, **top, **{
      s: dataclasses.replace(getattr(run, s), **values) for s, values in sections.items()})
  validate(new)
  return new


def _fail(field_name, value, why):
  raise ConfigError(f'config.{field_name}={value!r}: {why}')


def keep_steps(train: TrainConfig) -> tuple[int, ...]:
  """train.keep_steps ('1000,1400') as step numbers."""
  text = str(train.keep_steps)
  try:
    steps = tuple(int(s) for s in text.split(',') if s.strip())
  except ValueError:
    steps = (-1,)
  if any(s < 1 for s in steps):
    _fail('train.keep_steps', text, 'must be comma-separated step numbers >= 1, e.g. 1000,1400')
  return steps


def mesh_shape(mesh: MeshConfig, n_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor), with one -1 filled from the device count."""
  dims = [mesh.data, mesh.fsdp, mesh.tensor]
  names = ('mesh.data', 'mesh.fsdp', 'mesh.tensor')
  if dims.count(-1) > 1:
    _fail('mesh', tuple(dims), 'at most one mesh axis may be -1')
  for name, d in zip(names, dims):
    if d != -1 and d < 1:
      _fail(name, d, 'mesh axis sizes must be >= 1 (or -1 for the rest)')
  known = math.prod(d for d in dims if d != -1)
  if -1 in dims:
    if n_devices % known:
      _fail('mesh', tuple(dims), f'{n_devices} devices do not divide by {known}')
    dims[dims.index(-1)] = n_devices // known
  if math.prod(dims) != n_devices:
    _fail('mesh', tuple(dims), f'product {math.prod(dims)} != {n_devices} devices; '
          'set the axes so their product is the device count (or one to -1)')
  return tuple(dims)


def check_devices(run: RunConfig, n_devices: int) -> tuple[int, int, int]:
  """The checks that need the device count (known once the processes have joined); returns the
  mesh shape."""
  data, fsdp, tensor = shape = mesh_shape(run.mesh, n_devices)
  m = run.model
  if run.eval.tasks and run.eval.batch_size % (data * fsdp):
    _fail('eval.batch_size', run.eval.batch_size,
          f'not divisible by the data-parallel size data*fsdp={data * fsdp}')
  if m.attention == 'splash' and m.n_kv_heads % tensor:
    _fail('model.n_kv_heads', m.n_kv_heads,
          f'splash attention splits heads over mesh.tensor={tensor}; use a divisor of it')
  if run.train.batch_size % (data * fsdp):
    _fail('train.batch_size', run.train.batch_size,
          f'not divisible by the data-parallel size data*fsdp={data * fsdp}')
  if run.pipeline in ('idea', 'naive'):
    if run.prune.target_ffn % tensor:
      _fail('prune.target_ffn', run.prune.target_ffn,
            f'not a multiple of the tensor-parallel degree {tensor}')
    if m.ffn_dim % tensor:
      _fail('model.ffn_dim', m.ffn_dim, f'not a multiple of the tensor-parallel degree {tensor}')
    target, units = target_model(run), pruned_units(run)
    if ({'kv_groups', 'heads'} & set(units)) and (target.n_kv_heads % tensor
                                                  or target.n_heads % tensor):
      name = 'target_kv_heads' if 'kv_groups' in units else 'target_heads_per_group'
      _fail(f'prune.{name}', getattr(run.prune, name),
            f'the target has {target.n_kv_heads} KV heads, {target.n_heads} query heads: both '
            f'must divide by the tensor-parallel degree {tensor}')
    if run.prune.target_params:  # an unreachable budget fails here, before any compute
      budget.candidates(run.model, run.prune.target_params, budget_constraints(run, tensor, fsdp))
    if 'hidden' in units and target.d_model % fsdp:
      _fail('prune.target_d_model', run.prune.target_d_model,
            f'not a multiple of mesh.fsdp={fsdp} (d_model is sharded over it)')
  return shape


def validate_model(m: ModelConfig) -> None:
  for f in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'ffn_dim'):
    if getattr(m, f) < 1:
      _fail(f'model.{f}', getattr(m, f), 'must be a positive integer')
  if m.head_dim == 0:  # not given, and d_model / n_heads is not an integer
    _fail('model.d_model', m.d_model, f'not divisible by model.n_heads={m.n_heads} (or set '
          'model.head_dim)')
  if m.head_dim < 0 or m.head_dim % 2:
    _fail('model.head_dim', m.head_dim, 'must be even and >= 0 (RoPE rotates pairs; 0: '
          'd_model / n_heads)')
  if m.n_heads % m.n_kv_heads:
    _fail('model.n_heads', m.n_heads, f'not a multiple of model.n_kv_heads={m.n_kv_heads}')
  for f in ('dtype', 'param_dtype'):
    if getattr(m, f) not in ('float32', 'bfloat16', 'float16'):
      _fail(f'model.{f}', getattr(m, f), 'use float32, bfloat16 or float16')
  if m.attention not in ('auto', 'xla', 'splash', 'cudnn'):
    _fail('model.attention', m.attention, 'use auto, xla, splash or cudnn')
  if m.remat_policy not in ('none', 'full', 'dots_saveable', 'save_attn_proj'):
    _fail('model.remat_policy', m.remat_policy, 'use none, full, dots_saveable or save_attn_proj')
  if m.loss_chunk < 0:
    _fail('model.loss_chunk', m.loss_chunk, 'must be >= 0 (0 = unchunked)')


# Fields holding a path (or comma-separated paths) that may be gs://.
PATH_FIELDS = ('data.prepared_dir', 'data.files', 'data.val_files', 'data.tokenizer',
               'data.tfds_data_dir', 'train.compilation_cache', 'distill.teacher',
               'eval.include_path')


def _validate_train(run: RunConfig) -> None:
  t = run.train
  if t.steps < 1:
    _fail('train.steps', t.steps, 'must be >= 1')
  if not 0 <= t.warmup_steps <= t.steps:
    _fail('train.warmup_steps', t.warmup_steps, f'must lie in [0, train.steps={t.steps}]')
  for f in ('log_every', 'eval_every', 'ckpt_every'):
    if getattr(t, f) < 1:
      _fail(f'train.{f}', getattr(t, f), 'must be >= 1 (a cadence in steps)')
  if t.ckpt_minutes < 0:
    _fail('train.ckpt_minutes', t.ckpt_minutes, 'must be >= 0 (0 = no wall-time checkpoints)')
  keep_steps(t)
  if run.profile.start_step >= 0 and run.profile.steps < 1:
    _fail('profile.steps', run.profile.steps, 'must be >= 1 when profile.start_step is set')


def _validate_data(run: RunConfig) -> None:
  d = run.data
  if d.seq_len < 2:
    _fail('data.seq_len', d.seq_len, 'must be >= 2')
  if d.source not in ('prepared', 'embedded', 'files', 'tfds'):
    _fail('data.source', d.source, 'use prepared, embedded, files or tfds')
  if d.source == 'prepared' and not d.prepared_dir:
    _fail('data.prepared_dir', d.prepared_dir, 'source=prepared needs a prepare-data --output dir')
  if d.attention not in ('causal', 'document'):
    _fail('data.attention', d.attention, 'use causal or document')
  try:
    split.parse(d.split, 'config.data.split')
  except split.SplitError as e:
    raise ConfigError(str(e)) from None
  if not 0 <= d.val_fraction < 1:
    _fail('data.val_fraction', d.val_fraction, 'must lie in [0, 1)')
  for f in ('shards', 'read_threads', 'prefetch', 'workers', 'max_docs'):
    if getattr(d, f) < 0:
      _fail(f'data.{f}', getattr(d, f), 'must be >= 0')
  for name in PATH_FIELDS:
    # A bucket name GCS rejects fails here, not in tensorstore after its retries.
    for p in str(field(run, name)).split(','):
      if problem := storage.bucket_problem(p.strip()):
        _fail(name, field(run, name), problem)
  seq_len, m = d.seq_len, run.model
  if m.loss_chunk and seq_len % m.loss_chunk:
    _fail('model.loss_chunk', m.loss_chunk, f'must divide data.seq_len={seq_len}')
  if m.attention == 'splash' and seq_len % 128:
    _fail('model.attention', 'splash', f'splash tiles the sequence in blocks of 128; '
          f'data.seq_len={seq_len} is not a multiple (use xla, or a multiple of 128)')


def _validate_naive_and_distill(run: RunConfig) -> None:
  n = run.naive
  if not 0 < n.split < 1:
    _fail('naive.split', n.split, 'must lie in (0, 1)')
  if n.prune not in ('oneshot', 'iterative'):
    _fail('naive.prune', n.prune, 'use oneshot or iterative')
  if n.score_batches < 1:
    _fail('naive.score_batches', n.score_batches, 'must be >= 1 (one-shot scores need gradients)')
  if n.prune == 'iterative' and not 0 < n.window < 1 - n.split:
    _fail('naive.window', n.window, f'must lie in (0, 1 - naive.split={1 - n.split})')
  k = run.distill
  if not 0 <= k.alpha <= 1:
    _fail('distill.alpha', k.alpha, 'must lie in [0, 1]')
  if k.tau <= 0:
    _fail('distill.tau', k.tau, 'must be > 0')
  for name in ('alpha', 'tau'):
    if getattr(k, f'{name}_schedule') not in KD_SCHEDULES:
      _fail(f'distill.{name}_schedule', getattr(k, f'{name}_schedule'),
            f'use {", ".join(KD_SCHEDULES)}')
  if k.alpha_schedule != 'constant' and not 0 <= k.alpha_end <= 1:
    _fail('distill.alpha_end', k.alpha_end, 'must lie in [0, 1]')
  if k.tau_schedule != 'constant' and k.tau_end <= 0:
    _fail('distill.tau_end', k.tau_end, 'must be > 0')
  if k.phases not in ('prune', 'recovery', 'both'):
    _fail('distill.phases', k.phases, 'use prune, recovery or both')
  if k.chunk and run.data.seq_len % k.chunk:
    _fail('distill.chunk', k.chunk, f'must divide data.seq_len={run.data.seq_len}')


def validate_prune(run: RunConfig) -> None:
  """An impossible pruning config (widths, window, cadence, schedule, score) fails here. The
  window is checked as the pipeline will run it (clamped to the run, `prune_schedule`)."""
  p, ffn = run.prune, run.model.ffn_dim
  for f in ('target_ffn', 'round_to', 'every'):
    if isinstance(getattr(p, f), bool) or not isinstance(getattr(p, f), int):
      _fail(f'prune.{f}', getattr(p, f), 'must be an integer')
  if not 1 <= p.target_ffn <= ffn:
    _fail('prune.target_ffn', p.target_ffn, f'must lie in [1, model.ffn_dim={ffn}]')
  if p.round_to < 1:
    _fail('prune.round_to', p.round_to, 'must be >= 1')
  if p.target_ffn % p.round_to:
    _fail('prune.target_ffn', p.target_ffn, f'not a multiple of prune.round_to={p.round_to}')
  enlarged = budget.widths(run.model)
  for unit, f in TARGET_FIELDS.items():
    value = getattr(p, f)
    if unit != 'ffn' and (isinstance(value, bool) or not isinstance(value, int)
                          or not 0 <= value <= enlarged[unit]):
      _fail(f'prune.{f}', value, f'must be 0 (not pruned) or an integer in [1, {enlarged[unit]}] '
            'of the enlarged model')
  if p.target_d_model % p.round_to:
    _fail('prune.target_d_model', p.target_d_model,
          f'not a multiple of prune.round_to={p.round_to}')
  target = target_model(run)
  if not p.target_params and target.d_model % target.n_heads:
    _fail('prune.target_d_model', p.target_d_model,
          f"not a multiple of the target's {target.n_heads} query heads (a Llama transformers "
          'loads has hidden_size % num_attention_heads == 0)')
  if p.target_params:
    _validate_budget(run)
  axes = set(budget_units(run)) if p.target_params else set(pruned_units(run))
  multi_axis = bool(axes - {'ffn'})
  if p.score == 'activation' and multi_axis:
    _fail('prune.score', p.score, 'activation importance scores FFN neurons only; use platon, '
          'sensitivity_ema or magnitude to prune heads or the hidden size')
  if not 0 <= p.t_start < p.t_end <= 1:
    name = 'prune.t_start' if not 0 <= p.t_start < 1 else 'prune.t_end'
    _fail(name, field(run, name),
          f'need 0 <= prune.t_start < prune.t_end <= 1 (got {p.t_start}, {p.t_end})')
  if p.every < 1:
    _fail('prune.every', p.every, 'must be >= 1')
  if p.schedule not in WIDTH_SCHEDULES:
    _fail('prune.schedule', p.schedule, f"use one of {', '.join(WIDTH_SCHEDULES)}")
  if p.score not in SCORE_KINDS:
    _fail('prune.score', p.score, f"use one of {', '.join(SCORE_KINDS)}")
  for beta in ('beta1', 'beta2'):
    if not 0 <= getattr(p, beta) < 1:
      _fail(f'prune.{beta}', getattr(p, beta), 'must lie in [0, 1)')
  sched = prune_schedule(run)
  if sched is not None and sched.t_end - sched.t_start < 1:
    name, value = (('prune.t_end', p.t_end) if run.pipeline == 'idea'
                   else ('naive.window', run.naive.window))
    _fail(name, value, f'window [{sched.t_start}, {sched.t_end}] of train.steps='
          f'{run.train.steps} (t_end clamped to the last step) is shorter than one step')


def _validate_budget(run: RunConfig) -> None:
  p = run.prune
  if isinstance(p.target_params, bool) or not isinstance(p.target_params, int) or (
      p.target_params < 0):
    _fail('prune.target_params', p.target_params, 'must be a parameter count (0: off)')
  units = budget_units(run)
  if not units or set(units) - set(structure_lib.UNIT_KINDS):
    _fail('prune.units', p.units, f"use some of {','.join(structure_lib.UNIT_KINDS)}")
  if not 0 < p.tolerance <= 0.1:
    _fail('prune.tolerance', p.tolerance, 'must lie in (0, 0.1]')
  if p.budget not in BUDGET_CRITERIA:
    _fail('prune.budget', p.budget, f"use one of {', '.join(BUDGET_CRITERIA)}")
  if p.budget_batches < 1:
    _fail('prune.budget_batches', p.budget_batches, 'must be >= 1')


def validate(run: RunConfig) -> None:
  """Every check that does not need the devices (those are `check_devices`)."""
  validate_model(run.model)
  if run.pipeline not in ('idea', 'naive', 'scratch', 'train'):
    _fail('pipeline', run.pipeline, 'use idea, naive or scratch (train: dense config.model)')
  _validate_train(run)
  _validate_data(run)
  _validate_naive_and_distill(run)
  if any(not a.startswith('--') for a in run.mesh.libtpu_args.split()):
    _fail('mesh.libtpu_args', run.mesh.libtpu_args,
          'flags start with --, e.g. --xla_tpu_enable_windowed_einsum_for_all_gather=false')
  if run.pipeline in ('idea', 'naive'):
    validate_prune(run)
  elif run.prune.target_params:
    _fail('prune.target_params', run.prune.target_params,
          f'{run.pipeline} trains a given shape: set prune.target_* (an idea run chooses one '
          'and writes it to its budget.json)')
