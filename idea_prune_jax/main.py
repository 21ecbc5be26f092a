"""idea-prune COMMAND --config configs/X.py[:variant] [--config.a.b=v ...] [--workdir W]

  run       one pipeline (config.pipeline: idea | naive | scratch), then export and report
  compare   idea, idea+KD, naive, scratch and FLOP-matched scratch over config.compare.seeds
  train     dense pretraining of config.model
  params    parameter counts of the enlarged and target models
  eval      perplexity of an export on text files: --checkpoint W/export --files a.txt,b.txt
  generate  text from an export: --checkpoint W/export --prompt "..."
  compile-check  every step a run executes, compiled (not run) for a slice: per-chip HBM, FLOPs,
            bytes, roofline step time and MFU ceiling. --topology v5p-64 uses the TPU compiler
            (libtpu, the `tpu` extra); v5p-N and v4-N count TensorCores (v5p-64 = 32 chips),
            v5e-N and v6e-N count chips. --devices 64 [--hbm_gib 95]: fake CPU devices instead.
            [--mesh data=1,fsdp=32,tensor=1] [--cost layers|scan] [--steps enlarged,prune]
"""

import json
import re
import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

COMMANDS = ('run', 'compare', 'train', 'params', 'eval', 'generate', 'compile-check')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'ml_collections config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, outputs).')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'An export directory (W/export).')
_FILES = flags.DEFINE_string('files', None, 'eval: comma-separated text files or globs.')
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
_COST = flags.DEFINE_enum('cost', None, ['layers', 'scan'],
                          'compile-check: layers counts every layer (two extra small compiles per '
                          'step; the default with --topology); scan reports the compiler cost with '
                          'the layer loop counted once (the default with --devices).')
_STEPS = flags.DEFINE_string('steps', '', 'compile-check: only these steps (comma-separated).')


class UsageError(ValueError):
  pass


def _params(config) -> dict:
  from idea_prune_jax import model as model_lib
  from idea_prune_jax.config import ModelConfig, validate_model
  validate_model(config)
  enlarged = ModelConfig.from_config(config)
  target = ModelConfig.from_config(config, ffn_dim=config.prune.target_ffn)
  return {'ffn_enlarged': enlarged.ffn_dim, 'params_enlarged': model_lib.param_count(enlarged),
          'ffn_target': target.ffn_dim, 'params_target': model_lib.param_count(target)}


def _main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise UsageError(f'usage: idea-prune {{{"|".join(COMMANDS)}}} --config FILE [--workdir DIR]; '
                     f'got {argv[1:]}')
  command, config = argv[1], _CONFIG.value
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  if command in ('eval', 'generate'):
    _export_command(command)
    return
  if config is None:
    raise UsageError('--config is required, e.g. --config configs/tiny.py')
  if command == 'params':
    print(json.dumps(_params(config), indent=1))
    return
  if command == 'compile-check':
    from idea_prune_jax import compile_check
    report = compile_check.command(config, _DEVICES.value, _MESH.value, _HBM_GIB.value,
                                   _TOPOLOGY.value, _COST.value, _STEPS.value)
    report['command'] = shlex.join(['idea-prune'] + sys.argv[1:])
    print(compile_check.table(report), file=sys.stderr)
    print(json.dumps(report, indent=1))
    return
  if not _WORKDIR.value:
    raise UsageError(f'--workdir is required for {command}')
  from idea_prune_jax import experiment, pipeline
  if command == 'train':
    print(json.dumps(pipeline.train(config, _WORKDIR.value)))
  elif command == 'run':
    summary = experiment.run(config, _WORKDIR.value)
    print(json.dumps({k: v for k, v in summary.items() if k != 'phases'}))
  elif command == 'compare':
    experiment.compare(config, _WORKDIR.value)
    print(open(f'{_WORKDIR.value}/compare.md').read())


def _export_command(command):
  import jax
  import sentencepiece as spm
  from idea_prune_jax import data, evaluate, export
  if not _CHECKPOINT.value:
    raise UsageError(f'{command} needs --checkpoint, an export directory such as W/export')
  params, model_cfg = export.load_dense(_CHECKPOINT.value)
  tokenizer = export.export_info(_CHECKPOINT.value).get('tokenizer')
  if not tokenizer:
    raise UsageError(f'--checkpoint={_CHECKPOINT.value}: the export holds no tokenizer.model')
  sp = spm.SentencePieceProcessor(model_file=tokenizer)
  if command == 'eval':
    if not _FILES.value:
      raise UsageError('eval needs --files, e.g. --files my.txt')
    texts = [open(f, encoding='utf-8').read() for f in data.expand_files(_FILES.value, 'files')]
    print(json.dumps(evaluate.perplexity(params, model_cfg, sp, texts, seq_len=128)))
  else:
    ids = evaluate.generate(params, model_cfg, sp.encode(_PROMPT.value), _MAX_NEW.value,
                            jax.random.key(_SEED.value), _TEMPERATURE.value, _TOP_P.value)
    print(_PROMPT.value + sp.decode(ids))


def _guarded(argv):
  from idea_prune_jax import loop
  from idea_prune_jax.config import ConfigError
  from idea_prune_jax.data import DataError
  from idea_prune_jax.export import ExportError
  try:
    _main(argv)
  except loop.Preempted as e:
    logging.warning('%s', e)
  except (UsageError, ConfigError, DataError, ExportError, loop.NonFiniteLoss) as e:
    print(f'idea-prune: error: {e}', file=sys.stderr)
    sys.exit(2)


def _parse(argv):
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    # Unknown config keys and bad override types surface here, before any compute.
    text = str(e.args[0] if e.args else e)
    msg = text.splitlines()[0].strip('"\'')
    if isinstance(e, (KeyError, AttributeError)):
      found = re.search(r"'([A-Za-z0-9_]+)", text)
      key = found.group(1) if found else msg
      bad = [a.split('=')[0] for a in argv
             if a.startswith('--config.') and key in a.split('=')[0].split('.')]
      hint = re.search(r'Did you mean "([A-Za-z0-9_]+)"', text)
      msg = (f'unknown config field {bad[0] if bad else key!r}'
             f'{f" (did you mean {hint.group(1)!r}?)" if hint else ""}; '
             'the fields are listed in idea_prune_jax/config.py')
    print(f'idea-prune: error: {msg}', file=sys.stderr)
    sys.exit(2)


def run():
  app.run(_guarded, flags_parser=_parse)


if __name__ == '__main__':
  run()
