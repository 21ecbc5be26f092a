"""idea-prune COMMAND --config configs/X.py[:variant] [--config.a.b=v ...] [--workdir W]

COMMAND: run | compare | sweep | train | params | eval | generate | compile-check | prepare-data,
as README.md shows them; each flag's help starts with the commands that read it.
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from idea_prune_jax import commands, settings

COMMANDS = ('run', 'compare', 'sweep', 'train', 'params', 'eval', 'generate', 'compile-check',
            'prepare-data')
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'ml_collections config file.')
flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, outputs).')
flags.DEFINE_string('checkpoint', None, 'An export directory (W/export).')
flags.DEFINE_string('files', None, 'eval: comma-separated text files or globs.')
flags.DEFINE_string('tasks', None, 'eval: comma-separated lm-eval task names.')
flags.DEFINE_integer('num_fewshot', None, 'eval --tasks: few-shot examples.')
flags.DEFINE_string('include_path', None, 'eval --tasks: a dir of task YAMLs.')
flags.DEFINE_integer('limit', None, 'eval --tasks: at most this many docs per task.')
flags.DEFINE_integer('batch_size', 16, 'eval --tasks: requests per batch.')
flags.DEFINE_integer('max_length', None,
                     'eval --tasks: context window (default: training seq_len).')
flags.DEFINE_string('prompt', '', 'generate: the prompt text.')
flags.DEFINE_integer('max_new_tokens', 64, 'generate: tokens to sample.')
flags.DEFINE_float('temperature', 0.0, 'generate: 0 is greedy.')
flags.DEFINE_float('top_p', 0.9, 'generate: nucleus mass when temperature > 0.')
flags.DEFINE_integer('seed', 0, 'generate: sampling seed.')
flags.DEFINE_integer('devices', None, 'compile-check: fake CPU devices to compile for.')
flags.DEFINE_string('mesh', None, 'compile-check: data=D,fsdp=F,tensor=T into config.mesh.')
flags.DEFINE_float('hbm_gib', None, "compile-check: HBM per chip in GiB (default: the topology's "
                   'chip, else 95 as on v5p).')
flags.DEFINE_string('topology', None, 'compile-check: a TPU slice, v5p-N / v4-N (N TensorCores, 2 '
                    'per chip: v5p-64 is 32 chips) or v5e-N / v6e-N (N chips), or a libtpu name '
                    'like v5p:2x4x4. TPU compiler with the `tpu` extra, else fake CPU devices.')
flags.DEFINE_string('steps', '', 'compile-check: only these steps (comma-separated).')
flags.DEFINE_string('input', None, 'prepare-data: embedded[:works] | tfds:NAME[:SPLIT] | '
                    'comma-separated files/globs (.jsonl .parquet .txt, local or gs://).')
flags.DEFINE_string('output', None, 'prepare-data: the prepared dir (local or gs://); '
                    'eval --tasks: where to write lm-eval results JSON.')
flags.DEFINE_string('tokenizer', '', 'prepare-data: a SentencePiece .model to use.')
flags.DEFINE_integer('vocab_size', 0, 'prepare-data: train a tokenizer this big.')
flags.DEFINE_float('val_fraction', 0.0, 'prepare-data: share of documents held out, chosen by a '
                   'hash of their content.')
flags.DEFINE_string('val_input', '', 'prepare-data: validation documents (as --input); equal '
                    'training documents are dropped.')
flags.DEFINE_string('text_key', 'text', 'prepare-data: JSONL/Parquet/tfds text field.')
flags.DEFINE_string('tfds_data_dir', '', 'prepare-data: tfds data_dir.')
flags.DEFINE_string('split', 'auto', 'prepare-data: texts into documents. auto: records whole, '
                    'plain text cut at scene headings and into 8,000-character chunks; file: one '
                    'per file/record; paragraphs; chunk:N characters.')
flags.DEFINE_string('shard', '0/1', 'prepare-data: part I of N machines (N > 1 needs --tokenizer).')
flags.DEFINE_integer('max_docs', 0, 'prepare-data: read only the first N inputs (records, files, '
                     'works), before --split cuts them.')
flags.DEFINE_bool('tokenizer_only', False, 'prepare-data: train DIR/tokenizer.model, then stop.')


def _values(*names: str) -> dict:
  """The flags of these names: keyword arguments for the commands.* function of the same names."""
  return {name: FLAGS[name].value for name in names}


def _output(argv: list[str], config) -> str:
  """What the command line prints."""
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise commands.UsageError(f'usage: idea-prune {{{"|".join(COMMANDS)}}} --config FILE '
                              f'[--workdir DIR]; got {argv[1:]}')
  command = argv[1]
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  if command == 'eval' and FLAGS.tasks:
    return json.dumps(commands.eval_tasks(**_values(
        'checkpoint', 'tasks', 'include_path', 'num_fewshot', 'limit', 'batch_size', 'max_length',
        'output')))
  if command == 'eval':
    return json.dumps(commands.perplexity(FLAGS.checkpoint, FLAGS.files))
  if command == 'generate':
    return commands.generate(**_values(
        'checkpoint', 'prompt', 'max_new_tokens', 'seed', 'temperature', 'top_p'))
  if command == 'prepare-data':
    return json.dumps(commands.prepare_data(FLAGS.input, **_values(
        'output', 'tokenizer', 'vocab_size', 'val_fraction', 'val_input', 'text_key',
        'tfds_data_dir', 'split', 'shard', 'max_docs', 'tokenizer_only')), indent=1)
  if config is None:
    raise commands.UsageError('--config is required, e.g. --config configs/tiny.py')
  if command == 'compile-check' and FLAGS.mesh:
    from idea_prune_jax.tools import compile_check
    config.mesh.update(compile_check.parse_mesh(FLAGS.mesh))
  s = settings.read(config)
  if command == 'params':
    return json.dumps(commands.params(s.run), indent=1)
  if command == 'compile-check':
    return json.dumps(commands.compile_check(s.run, FLAGS.devices, FLAGS.topology, FLAGS.hbm_gib,
                                             FLAGS.steps), indent=1)
  if not FLAGS.workdir:
    raise commands.UsageError(f'--workdir is required for {command}')
  return commands.train(command, s, FLAGS.workdir)


def _main(argv):
  config = FLAGS.config
  wants_lm_eval = bool(FLAGS.tasks or (config is not None and config.get('eval', {}).get('tasks')))
  commands.report_errors(lambda: print(_output(argv, config)), wants_lm_eval)


def _parse(argv):
  try:
    return FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    # Unknown config keys and bad override types surface here, before any compute.
    commands.fail(commands.flag_error(e, argv))


def cli():
  """The `idea-prune` console script."""
  app.run(_main, flags_parser=_parse)


if __name__ == '__main__':
  cli()
