"""lm-evaluation-harness on our models: the `idea-prune` LM, offline task checks, and task runs.

  python -m idea_prune_jax.eval.harness --model idea-prune \\
      --model_args checkpoint=W/export,batch_size=16 --tasks T1,T2 [--include_path DIR]
  idea-prune eval --checkpoint W/export --tasks T1,T2 --output results.json     # the same, wrapped

lm-eval 0.4.13 knows a third-party model only once the module defining it is imported (it reads no
entry points for models), so the bare `lm_eval` command cannot find `idea-prune`. This module's
CLI is lm-eval's own CLI with the model registered, and `import idea_prune_jax.eval.harness`
registers it for `lm_eval.simple_evaluate(model='idea-prune', ...)`.

Tokens are what lm-eval's `hf` model gets from our HF export (`export/hf`, LlamaTokenizer with
add_bos_token=True): BOS, then a text's SentencePiece pieces, as prepare-data starts every
training document. BOS also prefixes an empty context and the first rolling window (EOS where a
tokenizer has no BOS), which is the `hf` model's default prefix; EOS ends a generation.

Nothing is downloaded: a task whose data lives on the Hugging Face Hub and is not cached here is
refused, by name, before the model is loaded.
"""

import glob
import json
import os
import sys

# The built-in models first: lm-eval's get_model imports them only while its registry is empty.
import lm_eval.models  # noqa: F401
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models import utils as lm_utils
from lm_eval import utils as lm_eval_utils

MODEL_NAME = 'idea-prune'
# datasets builders that read local files named in dataset_kwargs.data_files
LOCAL_BUILDERS = ('json', 'csv', 'text', 'parquet', 'arrow', 'pandas')
DEFAULT_MAX_LENGTH = 2048  # when the export does not record the training seq_len


class HarnessError(ValueError):
  """A task or model argument the harness cannot run; one line, naming it."""


class IdeaPruneLM(TemplateLM):
  """An lm-eval LM over our sharded JAX model (a dense export, or params already in memory)."""

  def __init__(self, checkpoint: str | None = None, batch_size: int | str = 16,
               max_length: int | None = None, max_gen_toks: int = 256,
               prefix_token_id: int | None = None, tokenizer: str | None = None,
               fsdp: int = 1, tensor: int = 1, scorer=None, sp=None, **unused):
    super().__init__()
    unknown = set(unused) - {'device', 'max_batch_size'}  # lm-eval passes these to every model
    if unknown:
      raise HarnessError(f'{MODEL_NAME}: unknown model_args {sorted(unknown)}; use checkpoint, '
                         'batch_size, max_length, max_gen_toks, prefix_token_id, tokenizer, '
                         'fsdp, tensor')
    if scorer is None:
      scorer, sp = load(checkpoint, _positive_int(batch_size, 'batch_size'), max_length,
                        tokenizer, int(fsdp), int(tensor))
    self.scorer, self.sp = scorer, sp
    self._max_gen_toks = int(max_gen_toks)
    default_prefix = sp.bos_id() if sp.bos_id() >= 0 else sp.eos_id()
    self._prefix = default_prefix if prefix_token_id is None else int(prefix_token_id)

  @classmethod
  def create_from_arg_obj(cls, arg_dict, additional_config=None):
    # --model_args win over lm-eval's own --batch_size (which defaults to 1).
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
    return cls(**{**extra, **arg_dict})

  @classmethod
  def create_from_arg_string(cls, arg_string, additional_config=None):
    return cls.create_from_arg_obj(lm_eval_utils.simple_parse_args_string(arg_string),
                                   additional_config)

  @property
  def eot_token_id(self) -> int:
    return self.sp.eos_id()

  @property
  def prefix_token_id(self) -> int:
    return self._prefix

  @property
  def max_length(self) -> int:
    return self.scorer.max_length

  @property
  def tokenizer_name(self) -> str:
    return 'sentencepiece'

  def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
    # BOS first unless lm-eval asks for none: training starts every document with it, and the
    # HF export's tokenizer (add_bos_token) adds it the same way.
    bos = [self.sp.bos_id()] if self.sp.bos_id() >= 0 and add_special_tokens is not False else []
    return bos + self.sp.encode(string)

  def tok_decode(self, tokens) -> str:
    return self.sp.decode(list(tokens))

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    results = self.scorer.loglikelihood([(ctx, cont) for _, ctx, cont in requests])
    for (key, _, _), answer in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial('loglikelihood', key, answer)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each text's whole log-likelihood, in windows of max_length tokens as lm-eval's hf model."""
    windows, owner = [], []
    for i, (text,) in enumerate(r.args for r in requests):
      for ctx, cont in map(lm_eval_utils.make_disjoint_window,
                           lm_eval_utils.get_rolling_token_windows(
                               token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                               max_seq_len=self.max_length, context_len=1)):
        windows.append((ctx, cont))
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owner, self.scorer.loglikelihood(windows) if windows else []):
      totals[i] += logp
    for r, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', r.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy text up to a stop sequence, EOS or max_gen_toks; grouped by generation settings."""
    eos_text = self.sp.id_to_piece(self.eot_token_id)
    groups = {}
    for i, (context, gen_kwargs) in enumerate(r.args for r in requests):
      groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(
          (i, context, gen_kwargs))
    out = [None] * len(requests)
    for members in groups.values():
      kwargs = lm_utils.normalize_gen_kwargs(dict(members[0][2]), self._max_gen_toks)
      if kwargs.get('do_sample'):
        raise HarnessError(f'{MODEL_NAME}: generation is greedy only; the task asks for '
                           f'do_sample=True ({members[0][2]})')
      until = lm_utils.handle_stop_sequences(kwargs.get('until'), eos=eos_text)
      stops = [s for s in until if s]

      def done(tokens, stops=stops):
        text = self.sp.decode(tokens)
        return any(s in text for s in stops)

      tokens = self.scorer.generate([self.tok_encode(c) for _, c, _ in members],
                                    int(kwargs['max_gen_toks']), self.eot_token_id, done)
      for (i, context, gen_kwargs), toks in zip(members, tokens):
        text = lm_utils.postprocess_generated_text(self.sp.decode(toks), until, None)
        out[i] = text
        self.cache_hook.add_partial('generate_until', (context, gen_kwargs), text)
    return out

  def get_model_info(self) -> dict:
    import jax
    return {'model_num_parameters': sum(x.size for x in jax.tree.leaves(self.scorer.params))}


def _positive_int(value, name) -> int:
  try:
    n = int(value)
  except (TypeError, ValueError):
    n = 0
  if n < 1:
    raise HarnessError(f'{name}={value!r}: pass a positive number of rows ("auto" is not '
                       'supported: batches have one fixed size so compilations stay bounded)')
  return n


def load(checkpoint: str, batch_size: int, max_length: int | None = None,
         tokenizer: str | None = None, fsdp: int = 1, tensor: int = 1):
  """(Scorer, SentencePiece) for a dense export, its params sharded over all devices."""
  import sentencepiece as spm
  from idea_prune_jax.io import export
  from idea_prune_jax.eval import scoring
  from idea_prune_jax.model.config import ModelConfig
  if not checkpoint:
    raise HarnessError(f'{MODEL_NAME}: pass checkpoint=DIR, a dense export such as W/export')
  if (not os.path.isfile(os.path.join(checkpoint, 'config.json'))
      and os.path.isfile(os.path.join(checkpoint, 'export', 'config.json'))):
    raise HarnessError(f'{checkpoint}: a run directory, not an export; pass {checkpoint}/export')
  info = export.export_info(checkpoint)  # one line if there is no config.json
  if info.get('format') != export.DENSE_FORMAT:
    raise export.ExportError(f'{checkpoint}: not an idea_prune_jax dense export (config.json has '
                             f'no format={export.DENSE_FORMAT!r}); pass W/export')
  model_cfg = ModelConfig.from_dict(info['model'])
  tokenizer = tokenizer or info.get('tokenizer')
  if not tokenizer or not os.path.isfile(tokenizer):
    raise HarnessError(f'{checkpoint}: no tokenizer ({tokenizer or "tokenizer.model missing"}); '
                       'pass tokenizer=PATH to a SentencePiece .model')
  sp = spm.SentencePieceProcessor(model_file=tokenizer)
  check_tokenizer(sp, model_cfg.vocab_size, tokenizer)
  mesh = scoring.make_mesh(fsdp, tensor)
  rows = mesh.shape['data'] * mesh.shape['fsdp']
  if batch_size % rows:
    raise HarnessError(f'batch_size={batch_size}: not divisible by the {rows} data-parallel '
                       'devices; pass a multiple')
  from idea_prune_jax.train import sharding as sharding_lib
  shardings = sharding_lib.param_shardings(scoring.abstract_params(model_cfg), mesh)
  params, _ = export.load_dense(checkpoint, shardings)
  max_length = int(max_length or info.get('extra', {}).get('seq_len') or DEFAULT_MAX_LENGTH)
  return scoring.Scorer(params, model_cfg, mesh, batch_size, max_length), sp


def check_tokenizer(sp, vocab_size: int, where: str) -> None:
  """Refuses a tokenizer with ids the model has no embedding for (JAX would clamp them)."""
  if sp.get_piece_size() > vocab_size:
    raise HarnessError(f'tokenizer {where} has {sp.get_piece_size()} pieces but the model\'s '
                       f'vocabulary has {vocab_size}: it is not the tokenizer of this checkpoint')


# ------------------------------------------------------------------------------- tasks, offline


def task_manager(include_path: str | None = None, tasks: list[str] | None = None):
  """lm-eval's TaskManager; only the include_path's tasks when they are all that is asked for
  (indexing lm-eval's ~10k built-in task files takes most of a minute)."""
  from lm_eval.tasks import TaskManager
  if include_path and not os.path.isdir(include_path):
    raise HarnessError(f'--include_path={include_path}: no such directory')
  if include_path and tasks:
    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(t in local.task_index for t in tasks):
      return local
  return TaskManager(include_path=include_path or None)


def _hub_cached(dataset: str) -> bool:
  """Whether a Hub dataset has a local copy (the hub cache or the datasets cache)."""
  hub = os.environ.get('HF_HUB_CACHE') or os.path.join(
      os.environ.get('HF_HOME', os.path.expanduser('~/.cache/huggingface')), 'hub')
  ds = os.environ.get('HF_DATASETS_CACHE') or os.path.join(
      os.environ.get('HF_HOME', os.path.expanduser('~/.cache/huggingface')), 'datasets')
  return (os.path.isdir(os.path.join(hub, 'datasets--' + dataset.replace('/', '--'))) or
          bool(glob.glob(os.path.join(ds, dataset.replace('/', '___') + '*'))))


def _data_files(kwargs) -> list[str]:
  files = (kwargs or {}).get('data_files') or []
  if isinstance(files, dict):
    files = list(files.values())
  flat = []
  for f in ([files] if isinstance(files, str) else files):
    flat += [f] if isinstance(f, str) else list(f)
  return flat


def _leaf_configs(tm, name, seen=None):
  """[(task name, raw config)] of a task, group or tag, best effort (groups nest)."""
  from lm_eval.tasks._index import Kind
  seen = set() if seen is None else seen
  entry = tm.task_index.get(name)
  if entry is None or name in seen:
    return []
  seen.add(name)
  if entry.kind in (Kind.TASK, Kind.PY_TASK):
    return [(name, entry.cfg or {})]
  children = entry.tags if entry.kind == Kind.TAG else (entry.cfg or {}).get('task', [])
  out = []
  for child in ([children] if isinstance(children, str) else children):
    if isinstance(child, dict):
      out += [(child.get('task', name), child)] if 'task' in child else []
    else:
      out += _leaf_configs(tm, child, seen)
  return out


def check_tasks(tm, tasks: list[str]) -> None:
  """Unknown tasks and tasks whose data would need the network: one line each, before compute."""
  unknown = [t for t in tasks if t not in tm.task_index]
  if unknown:
    hint = {t: [n for n in tm.all_tasks if t.lower() in n.lower()][:3] for t in unknown}
    raise HarnessError(f'unknown task(s) {unknown}; '
                       + ('; '.join(f'{t}: did you mean {h}?' for t, h in hint.items() if h)
                          or 'list them with `lm_eval ls tasks`, or add --include_path DIR')
                       )
  for name in tasks:
    for task, cfg in _leaf_configs(tm, name):
      path = cfg.get('dataset_path')
      if cfg.get('custom_dataset') or path is None:
        continue
      if path in LOCAL_BUILDERS:
        for f in _data_files(cfg.get('dataset_kwargs')):
          if '://' in f:
            raise HarnessError(f'task {task!r} reads {f}, which needs the network; this runs '
                               'offline: copy the file and point data_files at the copy')
          if not glob.glob(f):
            raise HarnessError(f'task {task!r}: data file {f} not found (relative paths are '
                               f'read from the current directory, {os.getcwd()})')
      elif not os.path.exists(path) and not _hub_cached(path):
        raise HarnessError(f'task {task!r} needs dataset {path!r} from the Hugging Face Hub, '
                           'which is not cached here, and this runs offline; download it once '
                           'where there is a network (HF_HOME) or use a local task '
                           '(--include_path)')


def evaluate(lm, tasks: list[str], num_fewshot: int | None = None, limit: int | None = None,
             include_path: str | None = None, tm=None) -> dict:
  """lm-eval's simple_evaluate on our LM; returns its results dict (metrics per task, configs)."""
  import lm_eval
  tm = tm or task_manager(include_path, tasks)
  check_tasks(tm, tasks)
  return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot,
                                 limit=limit or None, task_manager=tm, log_samples=False,
                                 bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                 torch_random_seed=None, fewshot_random_seed=0)


def summary(results: dict) -> dict:
  """{task: {metric: value}} of a simple_evaluate result: numbers only, no stderr entries."""
  out = {}
  for task, metrics in (results or {}).get('results', {}).items():
    out[task] = {k.split(',')[0]: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and '_stderr' not in k and k != 'alias'}
  return out


# What an entry point puts in os.environ (where unset) so nothing is downloaded at run time. It
# must be there before `datasets` and `huggingface_hub` are imported (they read it once), which
# importing this module does not do; lm-eval imports them when it loads a task or an HF model.
OFFLINE_ENV = {'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1'}


def cli(argv=None) -> None:
  """lm-eval's CLI with `idea-prune` registered; task checks first, errors as one line. The
  caller sets OFFLINE_ENV (`python -m` does, below)."""
  from lm_eval.__main__ import cli_evaluate
  argv = list(sys.argv if argv is None else argv)
  tasks = _flag(argv, '--tasks')
  if tasks and _flag(argv, '--model') == MODEL_NAME:
    try:
      check_tasks(task_manager(_flag(argv, '--include_path'), tasks.split(',')),
                  tasks.split(','))
    except HarnessError as e:
      print(f'idea-prune: error: {e}', file=sys.stderr)
      sys.exit(2)
  sys.argv = argv
  try:
    cli_evaluate()
  except (HarnessError, ValueError) as e:
    print(f'idea-prune: error: {str(e).splitlines()[0] if str(e) else e!r}', file=sys.stderr)
    sys.exit(2)


def _flag(argv, name):
  for i, a in enumerate(argv):
    if a == name and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith(name + '='):
      return a.split('=', 1)[1]
  return None


# A placeholder (module path) rather than the class: `python -m` runs this file as __main__ too,
# and both copies must name the same class.
model_registry.register(MODEL_NAME, target='idea_prune_jax.eval.harness:IdeaPruneLM')

if __name__ == '__main__':
  from idea_prune_jax import cli as entry_point
  entry_point.use_offline_hubs()
  cli()
