"""The one config schema: defaults, the model dataclass, and up-front validation."""

import dataclasses
import math

import ml_collections

from idea_prune_jax.prune.distill import SCHEDULES as KD_SCHEDULES
from idea_prune_jax.prune.importance import KINDS as SCORE_KINDS
from idea_prune_jax.prune.schedules import WIDTH_SCHEDULES, PruneSchedule
from idea_prune_jax.model.config import ModelConfig  # noqa: F401  (re-exported for now)


# idea_kd's distill.alpha where the config has none (compare, sweep; compile-check's KD step):
# the best alpha of the KD grid at tiny (README, results/kd_tiny), with tau 1 over both phases.
IDEA_KD_ALPHA = 0.1


class ConfigError(ValueError):
  """A bad config value; the message names the field and how to fix it."""


def base() -> ml_collections.ConfigDict:
  """Every field the project reads, with defaults; `configs/*.py` override these."""
  c = ml_collections.ConfigDict()
  c.pipeline = 'idea'  # idea | naive | scratch
  c.seed = 0

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 4096
  m.d_model = 192
  m.n_layers = 4
  m.n_heads = 6
  m.n_kv_heads = 2
  m.ffn_dim = 1152  # the enlarged width for idea/naive; the model's width for `train`
  m.tie_embeddings = True
  m.rope_theta = 10000.0
  m.norm_eps = 1e-5
  m.dtype = 'float32'  # compute dtype; bfloat16 on TPU
  m.param_dtype = 'float32'
  m.attention = 'auto'  # auto (splash on TPU, cudnn on GPU, xla on CPU) | xla | splash | cudnn
  m.remat_policy = 'none'  # none | full | dots_saveable | save_attn_proj (see model.remat_policy)
  m.loss_chunk = 0  # LM-head cross-entropy in sequence chunks of this size; 0 = whole logits
  m.unroll_layers = False  # layers unrolled instead of nn.scan (to check compile-check's counts)

  c.data = d = ml_collections.ConfigDict()
  # Training reads prepared ArrayRecord shards (idea-prune prepare-data). Any other source is
  # prepared into workdir/data on the first run, once.
  d.source = 'embedded'  # prepared | embedded | files | tfds
  d.prepared_dir = ''  # source=prepared: a prepare-data --output dir (local or gs://)
  d.files = ''  # source=files: comma-separated paths/globs (text, JSONL, Parquet)
  d.val_files = ''  # source=files: held-out files; else data.val_fraction of the documents
  d.val_fraction = 0.05  # source=files without val_files: documents held out (by content hash)
  d.val_works = 'julius_caesar,tempest'  # embedded corpus: works held out for validation
  d.tokenizer = ''  # a SentencePiece .model; empty trains one on the training split
  d.tfds_name = ''
  d.tfds_data_dir = ''
  d.tfds_train_split = 'train'
  d.tfds_val_split = 'validation'
  d.text_key = 'text'  # JSONL/Parquet/TFDS field holding the text
  d.max_docs = 0  # cap on documents prepared from a source (0 = all)
  d.split = 'auto'  # texts/records into documents: auto | file | paragraphs | chunk:N (split.py)
  d.seq_len = 128
  d.attention = 'document'  # causal: one causal sequence per row | document: masked per document
  d.shards = 0  # document shards of the train stream; 0 = one per process (see data.py)
  d.read_threads = 2  # grain threads reading records
  d.prefetch = 2  # batches prefetched by a thread (0: none)
  d.workers = 0  # grain worker processes (0: read in the training process)

  c.train = t = ml_collections.ConfigDict()
  t.steps = 600
  t.batch_size = 16  # global, in sequences
  t.lr = 1e-3
  t.warmup_steps = 30
  t.min_lr_ratio = 0.1
  t.weight_decay = 0.1
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.clip_norm = 1.0
  t.log_every = 10
  t.eval_every = 100
  t.eval_batches = 8
  t.ckpt_every = 200
  # Also a checkpoint once this many minutes of wall time passed since the last one (0 = off):
  # bounds the work a preemption loses when steps are slow. Process 0's clock decides.
  t.ckpt_minutes = 0.0
  t.keep_ckpts = 2
  t.keep_steps = ''  # checkpoints never deleted, e.g. '1000,1400' (the sweep keeps t_start)
  t.async_ckpt = True  # training goes on while a checkpoint is written
  # Compiled steps persist here, so a resumed run does not compile them again ('' = W/jax_cache,
  # 'none' = off); gs:// works.
  t.compilation_cache = ''

  c.profile = pf = ml_collections.ConfigDict()
  pf.start_step = -1  # first step of a jax.profiler trace into W/profile; -1 = no trace
  pf.steps = 5

  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = -1  # -1: whatever is left of the devices
  ms.fsdp = 1
  ms.tensor = 1
  ms.distributed = False  # jax.distributed.initialize(); also IDEA_PRUNE_DISTRIBUTED=1
  # XLA:TPU flags for this run (and compile-check), added to LIBTPU_INIT_ARGS before libtpu starts
  ms.libtpu_args = ''

  c.prune = p = ml_collections.ConfigDict()
  p.target_ffn = 384
  p.t_start = 0.5  # fraction of train.steps
  p.t_end = 0.7
  p.every = 10  # ΔT: mask refresh cadence inside the window
  p.schedule = 'cubic'  # cubic | linear
  p.score = 'platon'  # platon | sensitivity_ema | magnitude | activation
  p.beta1 = 0.85
  p.beta2 = 0.95
  p.round_to = 1  # 128 on TPU

  c.naive = n = ml_collections.ConfigDict()
  n.split = 0.5  # fraction of train.steps for the enlarged model's own cosine
  n.prune = 'oneshot'  # oneshot (scores from a few batches) | iterative (a short window)
  n.window = 0.1  # iterative: window length as a fraction of train.steps
  n.score_batches = 8  # oneshot: batches of gradients the scores are accumulated over

  c.compare = cp = ml_collections.ConfigDict()
  cp.seeds = 2
  cp.pipelines = 'idea,idea_kd,naive,scratch,scratch_flops'

  c.sweep = sw = ml_collections.ConfigDict()  # idea-prune sweep (sweep.py)
  sw.budgets = '1,4,16'  # token budgets as multiples of train.steps
  sw.pipelines = 'idea,naive,scratch,scratch_flops'
  sw.lrs = ''  # peak LRs; empty: train.lr
  sw.lr_pipelines = 'idea,scratch,scratch_flops'  # those run at every LR; others at the first
  sw.seeds = 2
  # idea_kd runs once per KD setting: alphas x taus x phases (each empty: the distill config's).
  # An alpha is a value or START:END[:KIND], a schedule over the distilling steps (cosine default).
  sw.kd_alphas = ''  # e.g. '0.1,0.3,0.5,0.9:0.5'
  sw.kd_taus = ''  # e.g. '1,2'
  sw.kd_phases = ''  # e.g. 'prune,recovery,both'

  c.eval = e = ml_collections.ConfigDict()  # lm-eval tasks on the final model, by `run`
  e.tasks = ''  # comma-separated task names; empty: none (needs the `eval` extra)
  e.num_fewshot = -1  # -1: each task's own default
  e.limit = 0  # at most this many docs per task; 0: all
  e.include_path = ''  # a directory of task YAMLs (local tasks, e.g. tests/data/harness)
  e.batch_size = 16  # requests per batch; a multiple of mesh.data * mesh.fsdp

  c.distill = k = ml_collections.ConfigDict()
  k.alpha = 0.0  # 0 disables KD; with alpha_schedule, the value the distilling steps start at
  k.tau = 1.0
  # constant | linear | cosine from alpha (tau) to alpha_end (tau_end) over the distilling steps
  k.alpha_schedule = 'constant'
  k.alpha_end = 0.0
  k.tau_schedule = 'constant'
  k.tau_end = 1.0
  k.chunk = 0  # sequence chunk for the KL; 0 = unchunked
  k.phases = 'both'  # prune | recovery | both
  k.teacher = ''  # checkpoint path; empty = the pipeline's own enlarged model
  return c


def _fail(field, value, why):
  raise ConfigError(f'config.{field}={value!r}: {why}')


def mesh_shape(config, n_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor), with one -1 filled from the device count."""
  dims = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
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


def validate_model(config) -> None:
  m = config.model
  for f in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'ffn_dim'):
    if m[f] < 1:
      _fail(f'model.{f}', m[f], 'must be a positive integer')
  if m.d_model % m.n_heads:
    _fail('model.d_model', m.d_model, f'not divisible by model.n_heads={m.n_heads}')
  if (m.d_model // m.n_heads) % 2:
    _fail('model.d_model', m.d_model, 'head_dim = d_model / n_heads must be even for RoPE')
  if m.n_heads % m.n_kv_heads:
    _fail('model.n_heads', m.n_heads, f'not a multiple of model.n_kv_heads={m.n_kv_heads}')
  for f in ('dtype', 'param_dtype'):
    if m[f] not in ('float32', 'bfloat16', 'float16'):
      _fail(f'model.{f}', m[f], 'use float32, bfloat16 or float16')
  if m.attention not in ('auto', 'xla', 'splash', 'cudnn'):
    _fail('model.attention', m.attention, 'use auto, xla, splash or cudnn')
  if m.remat_policy not in ('none', 'full', 'dots_saveable', 'save_attn_proj'):
    _fail('model.remat_policy', m.remat_policy, 'use none, full, dots_saveable or save_attn_proj')
  if m.loss_chunk < 0:
    _fail('model.loss_chunk', m.loss_chunk, 'must be >= 0 (0 = unchunked)')


def keep_steps(config) -> tuple[int, ...]:
  """config.train.keep_steps ('1000,1400') as step numbers."""
  text = str(config.train.keep_steps)
  try:
    steps = tuple(int(s) for s in text.split(',') if s.strip())
  except ValueError:
    steps = (-1,)
  if any(s < 1 for s in steps):
    _fail('train.keep_steps', text, 'must be comma-separated step numbers >= 1, e.g. 1000,1400')
  return steps


# Fields holding a path (or comma-separated paths) that may be gs://.
PATH_FIELDS = ('data.prepared_dir', 'data.files', 'data.val_files', 'data.tokenizer',
               'data.tfds_data_dir', 'train.compilation_cache', 'distill.teacher',
               'eval.include_path')


def validate_paths(config) -> None:
  """A gs:// path with a bucket name GCS rejects fails here, not in tensorstore after retries."""
  from idea_prune_jax.data import storage  # lazy: etils is not needed to read a config
  for field in PATH_FIELDS:
    group, name = field.split('.')
    for p in str(config[group][name]).split(','):
      if problem := storage.bucket_problem(p.strip()):
        _fail(field, config[group][name], problem)


def validate(config, n_devices: int) -> tuple[int, int, int]:
  """Checks everything that can be checked before compute; returns the mesh shape."""
  validate_model(config)
  if config.pipeline not in ('idea', 'naive', 'scratch', 'train'):
    _fail('pipeline', config.pipeline, 'use idea, naive or scratch (train: dense config.model)')
  t = config.train
  if t.steps < 1:
    _fail('train.steps', t.steps, 'must be >= 1')
  if not 0 <= t.warmup_steps <= t.steps:
    _fail('train.warmup_steps', t.warmup_steps, f'must lie in [0, train.steps={t.steps}]')
  for f in ('log_every', 'eval_every', 'ckpt_every'):
    if t[f] < 1:
      _fail(f'train.{f}', t[f], 'must be >= 1 (a cadence in steps)')
  if t.ckpt_minutes < 0:
    _fail('train.ckpt_minutes', t.ckpt_minutes, 'must be >= 0 (0 = no wall-time checkpoints)')
  keep_steps(config)
  if config.profile.start_step >= 0 and config.profile.steps < 1:
    _fail('profile.steps', config.profile.steps, 'must be >= 1 when profile.start_step is set')
  if config.data.seq_len < 2:
    _fail('data.seq_len', config.data.seq_len, 'must be >= 2')
  d = config.data
  if d.source not in ('prepared', 'embedded', 'files', 'tfds'):
    _fail('data.source', d.source, 'use prepared, embedded, files or tfds')
  if d.source == 'prepared' and not d.prepared_dir:
    _fail('data.prepared_dir', d.prepared_dir, 'source=prepared needs a prepare-data --output dir')
  if d.attention not in ('causal', 'document'):
    _fail('data.attention', d.attention, 'use causal or document')
  from idea_prune_jax.data import split as split_lib  # standard library only
  try:
    split_lib.parse(d.split, 'config.data.split')
  except split_lib.SplitError as e:
    raise ConfigError(str(e)) from None
  if not 0 <= d.val_fraction < 1:
    _fail('data.val_fraction', d.val_fraction, 'must lie in [0, 1)')
  for f in ('shards', 'read_threads', 'prefetch', 'workers', 'max_docs'):
    if d[f] < 0:
      _fail(f'data.{f}', d[f], 'must be >= 0')
  validate_paths(config)
  n = config.naive
  if not 0 < n.split < 1:
    _fail('naive.split', n.split, 'must lie in (0, 1)')
  if n.prune not in ('oneshot', 'iterative'):
    _fail('naive.prune', n.prune, 'use oneshot or iterative')
  if n.score_batches < 1:
    _fail('naive.score_batches', n.score_batches, 'must be >= 1 (one-shot scores need gradients)')
  if n.prune == 'iterative' and not 0 < n.window < 1 - n.split:
    _fail('naive.window', n.window, f'must lie in (0, 1 - naive.split={1 - n.split})')
  k = config.distill
  if not 0 <= k.alpha <= 1:
    _fail('distill.alpha', k.alpha, 'must lie in [0, 1]')
  if k.tau <= 0:
    _fail('distill.tau', k.tau, 'must be > 0')
  for name in ('alpha', 'tau'):
    if k[f'{name}_schedule'] not in KD_SCHEDULES:
      _fail(f'distill.{name}_schedule', k[f'{name}_schedule'], f'use {", ".join(KD_SCHEDULES)}')
  if k.alpha_schedule != 'constant' and not 0 <= k.alpha_end <= 1:
    _fail('distill.alpha_end', k.alpha_end, 'must lie in [0, 1]')
  if k.tau_schedule != 'constant' and k.tau_end <= 0:
    _fail('distill.tau_end', k.tau_end, 'must be > 0')
  if k.phases not in ('prune', 'recovery', 'both'):
    _fail('distill.phases', k.phases, 'use prune, recovery or both')
  if k.chunk and config.data.seq_len % k.chunk:
    _fail('distill.chunk', k.chunk, f'must divide data.seq_len={config.data.seq_len}')
  seq_len = config.data.seq_len
  if config.model.loss_chunk and seq_len % config.model.loss_chunk:
    _fail('model.loss_chunk', config.model.loss_chunk, f'must divide data.seq_len={seq_len}')
  if config.model.attention == 'splash' and seq_len % 128:
    _fail('model.attention', 'splash', f'splash tiles the sequence in blocks of 128; '
          f'data.seq_len={seq_len} is not a multiple (use xla, or a multiple of 128)')
  data, fsdp, tensor = shape = mesh_shape(config, n_devices)
  e = config.eval
  if e.tasks and e.batch_size % (data * fsdp):
    _fail('eval.batch_size', e.batch_size,
          f'not divisible by the data-parallel size data*fsdp={data * fsdp}')
  if config.model.attention == 'splash' and config.model.n_kv_heads % tensor:
    _fail('model.n_kv_heads', config.model.n_kv_heads,
          f'splash attention splits heads over mesh.tensor={tensor}; use a divisor of it')
  if t.batch_size % (data * fsdp):
    _fail('train.batch_size', t.batch_size,
          f'not divisible by the data-parallel size data*fsdp={data * fsdp}')
  return shape


def prune_schedule(config) -> PruneSchedule | None:
  """The width schedule the pipeline runs (idea's window, or naive-iterative's), None otherwise.

  t_end is clamped to the last step (train.steps - 1): the window, its final refresh to f_T and
  the shrink all happen inside the run, never after it.
  """
  p, T = config.prune, config.train.steps
  if config.pipeline == 'idea':
    t_start, t_end = int(round(p.t_start * T)), int(round(p.t_end * T))
  elif config.pipeline == 'naive' and config.naive.prune == 'iterative':
    t_start = int(round(config.naive.split * T))
    t_end = t_start + max(int(round(config.naive.window * T)), 1)
  else:
    return None
  t_end = min(t_end, T - 1)
  return PruneSchedule(t_start=t_start, t_end=max(t_end, t_start), every=int(p.every),
                       ffn_enlarged=int(config.model.ffn_dim), ffn_target=int(p.target_ffn),
                       kind=p.schedule)


def validate_prune(config, tensor_parallel: int | None = None) -> None:
  """Raises ConfigError (one line naming the field) for an impossible pruning config.

  tensor_parallel defaults to config.mesh.tensor (1 when that is -1, i.e. not yet known).
  The window is checked as the pipeline will run it (clamped to the run, `prune_schedule`).
  """
  p, ffn = config.prune, config.model.ffn_dim
  tp = tensor_parallel if tensor_parallel is not None else max(int(config.mesh.tensor), 1)
  for field in ('target_ffn', 'round_to', 'every'):
    if isinstance(p[field], bool) or not isinstance(p[field], int):
      _fail(f'prune.{field}', p[field], 'must be an integer')
  if not 1 <= p.target_ffn <= ffn:
    _fail('prune.target_ffn', p.target_ffn, f'must lie in [1, model.ffn_dim={ffn}]')
  if p.round_to < 1:
    _fail('prune.round_to', p.round_to, 'must be >= 1')
  if p.target_ffn % p.round_to:
    _fail('prune.target_ffn', p.target_ffn, f'not a multiple of prune.round_to={p.round_to}')
  if p.target_ffn % tp:
    _fail('prune.target_ffn', p.target_ffn, f'not a multiple of the tensor-parallel degree {tp}')
  if ffn % tp:
    _fail('model.ffn_dim', ffn, f'not a multiple of the tensor-parallel degree {tp}')
  if not 0 <= p.t_start < p.t_end <= 1:
    field = 'prune.t_start' if not 0 <= p.t_start < 1 else 'prune.t_end'
    _fail(field, p[field.split('.')[1]],
          f'need 0 <= prune.t_start < prune.t_end <= 1 (got {p.t_start}, {p.t_end})')
  if p.every < 1:
    _fail('prune.every', p.every, 'must be >= 1')
  if p.schedule not in WIDTH_SCHEDULES:
    _fail('prune.schedule', p.schedule, f"use one of {', '.join(WIDTH_SCHEDULES)}")
  if p.score not in SCORE_KINDS:
    _fail('prune.score', p.score, f"use one of {', '.join(SCORE_KINDS)}")
  for beta in ('beta1', 'beta2'):
    if not 0 <= p[beta] < 1:
      _fail(f'prune.{beta}', p[beta], 'must lie in [0, 1)')
  sched = prune_schedule(config)
  if sched is not None and sched.t_end - sched.t_start < 1:
    field, value = (('prune.t_end', p.t_end) if config.pipeline == 'idea'
                    else ('naive.window', config.naive.window))
    _fail(field, value, f'window [{sched.t_start}, {sched.t_end}] of train.steps='
          f'{config.train.steps} (t_end clamped to the last step) is shorter than one step')


def load(spec: str) -> ml_collections.ConfigDict:
  """'configs/tiny.py:test' -> that file's get_config('test'), as the CLI would load it."""
  import importlib.util
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_idea_prune_config', path)
  if module_spec is None:
    raise ConfigError(f'--config={spec!r}: no such config file')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg)
