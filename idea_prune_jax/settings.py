"""The one place a ConfigDict is read: the CLI's config, checked and turned into frozen dataclasses.

`base()` is the ConfigDict every `configs/*.py` starts from, made from the dataclasses' defaults,
so a field and its default are written once (`train/config.py`, `data/config.py`,
`model/config.py`, `experiments/config.py`). `read` validates and converts; nothing below it
sees a ConfigDict.
"""

import dataclasses
import importlib.util
import typing

import ml_collections

from idea_prune_jax.experiments.config import CompareConfig, SweepConfig
from idea_prune_jax.train.config import ConfigError, RunConfig, validate


@dataclasses.dataclass(frozen=True)
class Settings:
  """A run, and what `compare` and `sweep` vary around it."""
  run: RunConfig
  compare: CompareConfig
  sweep: SweepConfig


def _defaults(cls) -> dict:
  """cls's field defaults as written (not as an instance resolves them: model.head_dim stays 0,
  'd_model / n_heads', rather than the default model's 32)."""
  return {f.name: _defaults(type(f.default)) if dataclasses.is_dataclass(f.default) else f.default
          for f in dataclasses.fields(cls)}


def base() -> ml_collections.ConfigDict:
  """Every field the project reads, with its default."""
  return ml_collections.ConfigDict({**_defaults(RunConfig), 'compare': _defaults(CompareConfig),
                                    'sweep': _defaults(SweepConfig)})


def _build(cls, values: dict, prefix: str):
  """cls from a mapping of its fields, nested dataclasses too; an unknown field is an error."""
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ConfigError(f'config.{prefix}{unknown[0]}: no such field (see idea_prune_jax/'
                      'settings.py for where the fields are defined)')
  return cls(**{k: _build(hints[k], v, f'{prefix}{k}.') if dataclasses.is_dataclass(hints[k])
                else v for k, v in values.items()})


def read(config: ml_collections.ConfigDict) -> Settings:
  """The config as `Settings`, after every check that needs no devices (one line naming the
  field on the first bad one)."""
  values = config.to_dict()
  sections = {name: values.pop(name, {}) for name in ('compare', 'sweep')}
  settings = Settings(_build(RunConfig, values, ''), _build(CompareConfig, sections['compare'],
                                                            'compare.'),
                      _build(SweepConfig, sections['sweep'], 'sweep.'))
  validate(settings.run)
  return settings


def load(spec: str) -> ml_collections.ConfigDict:
  """'configs/tiny.py:test' -> that file's get_config('test'), as the CLI would load it."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_idea_prune_config', path)
  if module_spec is None:
    raise ConfigError(f'--config={spec!r}: no such config file')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg)
