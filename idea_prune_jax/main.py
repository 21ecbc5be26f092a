"""idea-prune COMMAND --config configs/X.py[:variant] [--config.a.b=v ...] [--workdir W]

  run       one pipeline (config.pipeline: idea | naive | scratch), then export and report
  compare   idea, idea+KD, naive, scratch and FLOP-matched scratch over config.compare.seeds
  sweep     pipelines × token budgets × peak LRs × seeds (config.sweep): sweep.json/md/png
  train     dense pretraining of config.model
  params    parameter counts of the enlarged and target models
  eval      perplexity of an export on text files: --checkpoint W/export --files a.txt,b.txt;
            or lm-eval tasks: --checkpoint W/export --tasks T1,T2 [--num_fewshot N]
            [--include_path DIR] [--limit N] [--batch_size B] [--output results.json]
  generate  text from an export: --checkpoint W/export --prompt "..."
  compile-check  every step a run executes, compiled (not run) for a slice: per-chip HBM, FLOPs,
            bytes, roofline step time and MFU ceiling. --topology v5p-64 uses the TPU compiler
            (libtpu, the `tpu` extra); v5p-N and v4-N count TensorCores (v5p-64 = 32 chips),
            v5e-N and v6e-N count chips. --devices 64 [--hbm_gib 95]: fake CPU devices instead.
            [--mesh data=1,fsdp=32,tensor=1] [--steps enlarged,prune]
  prepare-data   tokenized ArrayRecord shards for training (no --config):
            --input SPEC --output DIR [--tokenizer FILE | --vocab_size N]
            [--val_fraction F | --val_input SPEC] [--text_key K] [--shard I/N] [--tokenizer_only]
            [--split auto|file|paragraphs|chunk:N]
            SPEC: embedded[:work,...] | tfds:NAME[:SPLIT] | files/globs (.jsonl .parquet .txt)
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from idea_prune_jax import commands, settings

COMMANDS = ('run', 'compare', 'sweep', 'train', 'params', 'eval', 'generate',
            'compile-check', 'prepare-data')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'ml_collections config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, outputs).')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'An export directory (W/export).')
_FILES = flags.DEFINE_string('files', None, 'eval: comma-separated text files or globs.')
_TASKS = flags.DEFINE_string('tasks', None, 'eval: comma-separated lm-eval task names.')
_NUM_FEWSHOT = flags.DEFINE_integer('num_fewshot', None, 'eval --tasks: few-shot examples.')
_INCLUDE_PATH = flags.DEFINE_string('include_path', None, 'eval --tasks: a dir of task YAMLs.')
_LIMIT = flags.DEFINE_integer('limit', None, 'eval --tasks: at most this many docs per task.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 16, 'eval --tasks: requests per batch.')
_MAX_LENGTH = flags.DEFINE_integer('max_length', None,
                                   'eval --tasks: context window (default: training seq_len).')
_PROMPT = flags.DEFINE_string('prompt', '', 'generate: the prompt text.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'generate: tokens to sample.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, 'generate: 0 is greedy.')
_TOP_P = flags.DEFINE_float('top_p', 0.9, 'generate: nucleus mass when temperature > 0.')
_SEED = flags.DEFINE_integer('seed', 0, 'generate: sampling seed.')
_DEVICES = flags.DEFINE_integer('devices', None, 'compile-check: fake CPU devices to compile for.')
_MESH = flags.DEFINE_string('mesh', None, 'compile-check: data=D,fsdp=F,tensor=T into config.mesh.')
_HBM_GIB = flags.DEFINE_float('hbm_gib', None, 'compile-check: HBM per chip in GiB (default: '
                              "the topology's chip, else 95 as on v5p).")
_TOPOLOGY = flags.DEFINE_string(
    'topology', None, 'compile-check: a TPU slice, v5p-N / v4-N (N TensorCores, 2 per chip: '
    'v5p-64 is 32 chips) or v5e-N / v6e-N (N chips), or a libtpu name like v5p:2x4x4.')
_STEPS = flags.DEFINE_string('steps', '', 'compile-check: only these steps (comma-separated).')
_INPUT = flags.DEFINE_string('input', None, 'prepare-data: embedded[:works] | tfds:NAME[:SPLIT] | '
                             'comma-separated files/globs (local or gs://).')
_OUTPUT = flags.DEFINE_string('output', None, 'prepare-data: the prepared dir (local or gs://); '
                              'eval --tasks: where to write lm-eval results JSON.')
_TOKENIZER = flags.DEFINE_string('tokenizer', '', 'prepare-data: a SentencePiece .model to use.')
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', 0, 'prepare-data: train a tokenizer this big.')
_VAL_FRACTION = flags.DEFINE_float('val_fraction', 0.0, 'prepare-data: share of documents held '
                                   'out, chosen by a hash of their content.')
_VAL_INPUT = flags.DEFINE_string('val_input', '', 'prepare-data: validation documents (a SPEC); '
                                 'equal training documents are dropped.')
_TEXT_KEY = flags.DEFINE_string('text_key', 'text', 'prepare-data: JSONL/Parquet/tfds text field.')
_TFDS_DATA_DIR = flags.DEFINE_string('tfds_data_dir', '', 'prepare-data: tfds data_dir.')
_SPLIT = flags.DEFINE_string('split', 'auto', 'prepare-data: texts into documents. auto: records '
                             'whole, plain text cut at scene headings and into 8,000-character '
                             'chunks; file: one per file/record; paragraphs; chunk:N characters.')
_SHARD = flags.DEFINE_string('shard', '0/1', 'prepare-data: part I of N machines (needs '
                             '--tokenizer when N > 1).')
_MAX_DOCS = flags.DEFINE_integer('max_docs', 0, 'prepare-data: read only the first N inputs '
                                 '(records, files, works), before --split cuts them.')
_TOKENIZER_ONLY = flags.DEFINE_bool('tokenizer_only', False, 'prepare-data: train and write '
                                    'DIR/tokenizer.model, then stop.')


def _main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise commands.UsageError(f'usage: idea-prune {{{"|".join(COMMANDS)}}} --config FILE '
                              f'[--workdir DIR]; got {argv[1:]}')
  command, config = argv[1], _CONFIG.value
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  if command == 'eval' and _TASKS.value:
    print(json.dumps(commands.eval_tasks(
        _CHECKPOINT.value, _TASKS.value, _INCLUDE_PATH.value, _NUM_FEWSHOT.value, _LIMIT.value,
        _BATCH_SIZE.value, _MAX_LENGTH.value, _OUTPUT.value)))
  elif command == 'eval':
    print(json.dumps(commands.perplexity(_CHECKPOINT.value, _FILES.value)))
  elif command == 'generate':
    print(commands.generate(_CHECKPOINT.value, _PROMPT.value, _MAX_NEW.value, _SEED.value,
                            _TEMPERATURE.value, _TOP_P.value))
  elif command == 'prepare-data':
    print(json.dumps(commands.prepare_data(
        _INPUT.value, _OUTPUT.value, tokenizer=_TOKENIZER.value, vocab_size=_VOCAB_SIZE.value,
        val_fraction=_VAL_FRACTION.value, val_input=_VAL_INPUT.value, text_key=_TEXT_KEY.value,
        tfds_data_dir=_TFDS_DATA_DIR.value, split=_SPLIT.value, shard=_SHARD.value,
        max_docs=_MAX_DOCS.value, tokenizer_only=_TOKENIZER_ONLY.value), indent=1))
  elif config is None:
    raise commands.UsageError('--config is required, e.g. --config configs/tiny.py')
  else:
    if command == 'compile-check' and _MESH.value:
      from idea_prune_jax.tools import compile_check
      config.mesh.update(compile_check.parse_mesh(_MESH.value))
    s = settings.read(config)
    if command == 'params':
      print(json.dumps(commands.params(s.run), indent=1))
    elif command == 'compile-check':
      print(json.dumps(commands.compile_check(s.run, _DEVICES.value, _TOPOLOGY.value,
                                              _HBM_GIB.value, _STEPS.value), indent=1))
    elif not _WORKDIR.value:
      raise commands.UsageError(f'--workdir is required for {command}')
    else:
      print(commands.train(command, s, _WORKDIR.value))


def _guarded(argv):
  config = _CONFIG.value
  wants_lm_eval = bool(_TASKS.value or (config is not None and config.get('eval', {}).get('tasks')))
  commands.report_errors(lambda: _main(argv), wants_lm_eval)


def _parse(argv):
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    # Unknown config keys and bad override types surface here, before any compute.
    commands.fail(commands.flag_error(e, argv))


def cli():
  """The `idea-prune` console script."""
  app.run(_guarded, flags_parser=_parse)


if __name__ == '__main__':
  cli()
