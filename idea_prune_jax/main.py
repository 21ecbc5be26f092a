"""idea-prune COMMAND --config configs/X.py[:variant] [--config.a.b=v ...] [--workdir W]

Commands: train (dense pretraining), params (parameter counts).
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

COMMANDS = ('train', 'params')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'ml_collections config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, outputs).')


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
  if config is None:
    raise UsageError('--config is required, e.g. --config configs/tiny.py')
  if command == 'params':
    print(json.dumps(_params(config), indent=1))
    return
  if not _WORKDIR.value:
    raise UsageError(f'--workdir is required for {command}')
  from idea_prune_jax import pipeline
  if command == 'train':
    print(json.dumps(pipeline.train(config, _WORKDIR.value)))


def _guarded(argv):
  from idea_prune_jax import loop
  from idea_prune_jax.config import ConfigError
  from idea_prune_jax.data import DataError
  try:
    _main(argv)
  except loop.Preempted as e:
    logging.warning('%s', e)
  except (UsageError, ConfigError, DataError, loop.NonFiniteLoss) as e:
    print(f'idea-prune: error: {e}', file=sys.stderr)
    sys.exit(2)


def _parse(argv):
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    # Unknown config keys and bad override types surface here, before any compute.
    msg = str(e.args[0] if e.args else e).splitlines()[0].strip('"\'')
    if isinstance(e, (KeyError, AttributeError)):
      bad = [a.split('=')[0] for a in argv if a.startswith('--config.') and msg in a]
      msg = (f'unknown config field {bad[0] if bad else msg!r}; '
             'the fields are listed in idea_prune_jax/config.py')
    print(f'idea-prune: error: {msg}', file=sys.stderr)
    sys.exit(2)


def run():
  app.run(_guarded, flags_parser=_parse)


if __name__ == '__main__':
  run()
