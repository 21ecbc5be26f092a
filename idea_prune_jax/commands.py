"""The CLI's commands, each from plain values (`main` reads the flags and settles the config).

Part of the entry point: compile-check and the training commands call `cli` (libtpu args,
`jax.distributed`, fake devices) before any compute.
"""

import json
import re
import shlex
import sys
from typing import Callable

from idea_prune_jax import cli
from idea_prune_jax.settings import Settings
from idea_prune_jax.train.config import ConfigError, RunConfig, check_devices
from idea_prune_jax.train.targets import target_model


class UsageError(ValueError):
  """A command line that cannot work (a missing or contradictory flag)."""


def params(run: RunConfig) -> dict:
  from idea_prune_jax.train import budget
  enlarged = budget.shape_dict(run.model)
  if run.prune.target_params:  # the run chooses the shape where pruning starts
    return {'enlarged': enlarged, 'target_params': run.prune.target_params,
            'units': run.prune.units}
  return {'enlarged': enlarged, 'target': budget.shape_dict(target_model(run))}


def train(command: str, s: Settings, workdir: str) -> str:
  """train | run | compare | sweep in workdir; the line (or table) to print."""
  from idea_prune_jax.data import storage
  from idea_prune_jax.experiments import experiment, sweep
  from idea_prune_jax.train import pipeline
  cli.install_sigterm_handler()  # before jax.distributed, which replaces it (see there)
  cli.set_libtpu_args(s.run.mesh)
  cli.initialize_distributed(s.run.mesh)
  cli.use_compilation_cache(s.run.train.compilation_cache, workdir)
  if command == 'train':
    return json.dumps(pipeline.train_dense(s.run, workdir))
  if command == 'run':
    summary = experiment.run_experiment(s.run, workdir)
    return json.dumps({k: v for k, v in summary.items() if k != 'phases'})
  if command == 'compare':
    experiment.compare(s.run, s.compare, workdir)
  else:
    sweep.sweep(s.run, s.sweep, workdir)
  return storage.read_text(storage.join(workdir, f'{command}.md'))


def compile_check(run: RunConfig, n_devices: int | None, topology: str | None,
                  hbm_gib: float | None, steps: str) -> dict:
  """Every step of run compiled for the topology's TPU devices (libtpu), else n_devices fake CPU
  devices; the report (its table goes to stderr)."""
  from idea_prune_jax.tools import compile_check as check
  from idea_prune_jax.train import chips
  chip = tpu_slice = None
  if topology:
    try:
      tpu_slice = chips.parse_slice(topology)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    chip, n_devices = tpu_slice.chip, tpu_slice.chips
  elif n_devices is None or n_devices < 1:
    raise ConfigError(f'--devices={n_devices}: compile-check needs --topology (e.g. v5p-64) or '
                      'the chip count of the slice, e.g. --devices 64')
  check_devices(check.kd_run(run), n_devices)  # a bad mesh fails before the devices start
  if tpu_slice is not None and check.libtpu_available():
    cli.set_libtpu_args(run.mesh)  # the run's XLA:TPU flags: the programs it runs
    cli.use_tpu_compiler()
    devices = chips.topology_devices(tpu_slice)
  else:
    if tpu_slice is not None:
      print(f'idea-prune: libtpu is not installed (pip install -e ".[tpu]"); compiling for '
            f'{n_devices} fake CPU devices instead, with {chip.name} HBM and peaks',
            file=sys.stderr)
    devices = cli.use_host_devices(n_devices)
  only = tuple(name.strip() for name in steps.split(',') if name.strip())
  report = check.compile_check(run, devices, hbm_gib, chip, only)
  if tpu_slice is not None:
    report['config']['topology'] = {'name': topology, 'libtpu': tpu_slice.topology,
                                    'chips': tpu_slice.chips}
  report['command'] = shlex.join(['idea-prune'] + sys.argv[1:])
  print(check.table(report), file=sys.stderr)
  return report


def prepare_data(input_spec: str, output: str, **options) -> dict:
  """prepare.prepare's manifest, shard lists counted (thousands of names: a count will do)."""
  from idea_prune_jax.data import prepare
  if not input_spec or not output:
    raise UsageError('prepare-data needs --input SPEC and --output DIR, e.g. --input embedded '
                     '--output data/shakespeare --vocab_size 4096 --val_fraction 0.05')
  options['shard'] = prepare.parse_shard(options['shard'])
  manifest = prepare.prepare(input_spec, output, **options)
  if 'splits' in manifest:  # a run knows its batch and judges again (data.build)
    from absl import logging
    from idea_prune_jax.data import split as split_lib
    train = manifest['splits']['train']
    if mixing := split_lib.mixing_problem(train, *split_lib.DEFAULT_STEP, '--split'):
      logging.warning('%s (at the default batch)', mixing)
  summary = {'output': output, **manifest}
  for split in summary.get('splits', {}).values():
    split['shards'] = len(split['shards'])
  return summary


def _load_export(command: str, checkpoint: str | None):
  import sentencepiece as spm
  from idea_prune_jax.data import storage
  from idea_prune_jax.io import export
  if not checkpoint:
    raise UsageError(f'{command} needs --checkpoint, an export directory such as W/export')
  params, model_cfg = export.load_dense(checkpoint)
  tokenizer = export.export_info(checkpoint).get('tokenizer')
  if not tokenizer:
    raise UsageError(f'--checkpoint={checkpoint}: the export holds no tokenizer.model')
  return params, model_cfg, spm.SentencePieceProcessor(model_proto=storage.read_bytes(tokenizer))


def perplexity(checkpoint: str | None, files: str | None) -> dict:
  from etils import epath
  from idea_prune_jax.data import inputs
  from idea_prune_jax.eval import evaluate
  params, model_cfg, sp = _load_export('eval', checkpoint)
  if not files:
    raise UsageError('eval needs --files, e.g. --files my.txt')
  texts = [epath.Path(f).read_text(encoding='utf-8')
           for f in inputs.expand_files(files, '--files')]
  return evaluate.perplexity(params, model_cfg, sp, texts, seq_len=128)


def generate(checkpoint: str | None, prompt: str, max_new_tokens: int, seed: int,
             temperature: float, top_p: float) -> str:
  import jax
  from idea_prune_jax.eval import evaluate
  params, model_cfg, sp = _load_export('generate', checkpoint)
  ids = evaluate.generate(params, model_cfg, sp.encode(prompt), max_new_tokens,
                          jax.random.key(seed), temperature, top_p, sp=sp)
  return prompt + sp.decode(ids)


def eval_tasks(checkpoint: str | None, tasks: str, include_path: str | None,
               num_fewshot: int | None, limit: int | None, batch_size: int,
               max_length: int | None, output: str | None) -> dict:
  """lm-eval tasks on an export: {task: {metric: value}}; the full results to output."""
  from idea_prune_jax.eval import harness
  if not checkpoint:
    raise UsageError('eval needs --checkpoint, an export directory such as W/export')
  names = [t.strip() for t in tasks.split(',') if t.strip()]
  tm = harness.task_manager(include_path, names)
  harness.check_tasks(tm, names)  # before the model is loaded
  lm = harness.IdeaPruneLM(checkpoint=checkpoint, batch_size=batch_size, max_length=max_length)
  results = harness.evaluate(lm, names, num_fewshot, limit, tm=tm)
  if output:
    import jax
    if jax.process_index() == 0:
      from lm_eval.utils import handle_non_serializable
      with open(output, 'w') as f:
        json.dump(results, f, indent=2, default=handle_non_serializable)
  return harness.summary(results)


def fail(message: str) -> None:
  """The one line a user sees for a mistake of theirs, and exit status 2."""
  print(f'idea-prune: error: {message}', file=sys.stderr)
  sys.exit(2)


def report_errors(command: Callable[[], None], wants_lm_eval: bool) -> None:
  """Runs command; a user's mistake (bad config, data, export, ...) ends as one line, and a
  preemption as a warning (the rerun resumes)."""
  from absl import logging
  from idea_prune_jax.data.inputs import DataError
  from idea_prune_jax.data.storage import StorageError
  from idea_prune_jax.io.export import ExportError
  from idea_prune_jax.prune.errors import PruneError
  from idea_prune_jax.train import loop
  errors = (UsageError, ConfigError, DataError, ExportError, PruneError, StorageError,
            loop.NonFiniteLoss)
  if wants_lm_eval:
    try:  # lm-eval is an optional extra
      from idea_prune_jax.eval.harness import HarnessError
    except ImportError as e:
      fail(f"lm-eval tasks need the `eval` extra ({e}); pip install 'idea-prune-jax[eval]'")
    cli.use_offline_hubs()
    errors += (HarnessError,)
  try:
    command()
  except loop.Preempted as e:
    logging.warning('%s', e)
  except errors as e:
    fail(str(e))


def flag_error(e: Exception, argv: list[str]) -> str:
  """absl's or ml_collections' complaint about the command line, as one line naming the flag."""
  text = str(e.args[0] if e.args else e)
  message = text.splitlines()[0].strip('"\'')
  if isinstance(e, (KeyError, AttributeError)):  # an unknown --config.a.b
    found = re.search(r"'([A-Za-z0-9_]+)", text)
    key = found.group(1) if found else message
    bad = [a.split('=')[0] for a in argv
           if a.startswith('--config.') and key in a.split('=')[0].split('.')]
    hint = re.search(r'Did you mean "([A-Za-z0-9_]+)"', text)
    message = (f'unknown config field {bad[0] if bad else key!r}'
               f'{f" (did you mean {hint.group(1)!r}?)" if hint else ""}; '
               'settings.py says where the fields are defined')
  return message
