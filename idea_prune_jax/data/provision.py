"""Which prepared directory a run reads, and a local copy of it for ArrayRecord.

config.data names it (source=prepared) or a source that process 0 prepares once into workdir/data
(from a cache of prepared copies of the embedded corpus when IDEA_PRUNE_DATA_CACHE is set). A
workdir's prepared data is reused only if it was prepared from what config.data asks for.
"""

import hashlib
import json
import os
import shutil
import tempfile

from absl import logging
from etils import epath

from idea_prune_jax.data import inputs, layout, prepare, storage
from idea_prune_jax.data.config import DataConfig
from idea_prune_jax.data.inputs import DataError

# Where prepared copies of the embedded corpus are kept, by prepare arguments, when set: many
# runs in fresh workdirs (a test suite, repeated demos) then prepare it once, not once each.
DATA_CACHE_ENV = 'IDEA_PRUNE_DATA_CACHE'
LOCAL_COPY_WARN_BYTES = 1 << 30  # past this, a bucket copy per host is the wrong tool: gcsfuse

# prepare.prepare's arguments -> the manifest keys that record them.
_MANIFEST_KEYS = {'input_spec': 'input', 'val_input': 'val_input', 'val_fraction': 'val_fraction',
                  'text_key': 'text_key', 'split': 'split', 'max_docs': 'max_docs'}


def prepare_args(d: DataConfig, vocab_size: int) -> dict:
  """prepare.prepare's arguments for config.data's source (everything but the output dir)."""
  common = dict(tokenizer=d.tokenizer, vocab_size=0 if d.tokenizer else vocab_size,
                text_key=d.text_key, split=d.split, max_docs=d.max_docs)
  if d.source == 'embedded':
    return dict(input_spec='embedded', val_input=f'embedded:{d.val_works}', **common)
  if d.source == 'files':
    if not d.files:
      raise DataError("config.data.files='': source=files needs comma-separated paths or globs")
    if d.val_files:
      return dict(input_spec=d.files, val_input=d.val_files, **common)
    return dict(input_spec=d.files, val_fraction=d.val_fraction, **common)
  if d.source == 'tfds':
    if not d.tfds_name:
      raise DataError("config.data.tfds_name='': source=tfds needs a dataset name, e.g. 'c4/en'")
    return dict(input_spec=f'tfds:{d.tfds_name}:{d.tfds_train_split}',
                val_input=f'tfds:{d.tfds_name}:{d.tfds_val_split}',
                tfds_data_dir=d.tfds_data_dir, **common)
  raise DataError(f'config.data.source={d.source!r}: use prepared, embedded, files or tfds')


def prepared_dir(d: DataConfig, vocab_size: int, workdir: str, is_main: bool, barrier) -> str:
  """The prepared directory to read: config.data.prepared_dir, or workdir/data prepared once.

  Process 0 prepares (the first run in a workdir); `barrier()` then lets the other hosts read.
  """
  if d.source == 'prepared':
    if not d.prepared_dir:
      raise DataError("config.data.prepared_dir='': source=prepared needs the output of "
                      'idea-prune prepare-data')
    return d.prepared_dir
  args = prepare_args(d, vocab_size)
  out = os.path.join(workdir, 'data') if '://' not in workdir else f'{workdir.rstrip("/")}/data'
  if is_main:
    if (epath.Path(out) / layout.MANIFEST).exists():
      _check_prepared_from(layout.read_manifest(out), args, out)
    elif os.environ.get(DATA_CACHE_ENV) and d.source == 'embedded':
      storage.copy_dir(_cached_embedded(os.environ[DATA_CACHE_ENV], args), out,
                       last=layout.MANIFEST)
    else:
      prepare.prepare(output_dir=out, progress=False, **args)
  barrier()
  return out


def _cached_embedded(cache_dir: str, args: dict) -> str:
  """cache_dir/<key>, the embedded corpus prepared with args (prepared now if it is not yet)."""
  key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()
                       + inputs.CORPUS.read_bytes()).hexdigest()[:16]
  cached = os.path.join(cache_dir, key)
  if not os.path.isfile(os.path.join(cached, layout.MANIFEST)):
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'{key}.tmp', dir=cache_dir)
    prepare.prepare(output_dir=tmp, progress=False, **args)
    try:
      os.rename(tmp, cached)  # whole or not at all; another process may have won the race
    except OSError:
      if not os.path.isfile(os.path.join(cached, layout.MANIFEST)):
        raise
      shutil.rmtree(tmp, ignore_errors=True)
  return cached


def _check_prepared_from(manifest: dict, args: dict, out: str) -> None:
  """A workdir's data must be what config.data asks for: a changed source is not reused."""
  for arg, key in _MANIFEST_KEYS.items():
    want = args.get(arg, {'val_input': '', 'val_fraction': 0.0}.get(arg))
    had = manifest.get(key, 'file' if key == 'split' else None)  # before split: one per file
    if want is not None and had != want:
      raise DataError(f'{out} was prepared with {key}={had!r}, but config.data asks for '
                      f'{want!r}; use a fresh --workdir (or delete {out})')
  if args['vocab_size'] and manifest['vocab_size'] != args['vocab_size']:
    raise DataError(f'config.model.vocab_size={args["vocab_size"]}: {out} holds a tokenizer of '
                    f'{manifest["vocab_size"]} pieces trained for this workdir; use a fresh '
                    f'--workdir (or delete {out})')


def local_copy(path: str) -> str:
  """A local directory with the prepared files: ArrayRecord reads local paths only.

  Buckets are copied once per host into the temp dir (keyed by path and manifest); pods reading
  large data mount the bucket with gcsfuse instead (docs/tpu.md).
  """
  if '://' not in path:
    return path
  manifest = layout.read_manifest(path)
  key = hashlib.sha256((path + json.dumps(manifest, sort_keys=True)).encode()).hexdigest()[:16]
  local = os.path.join(tempfile.gettempdir(), 'idea_prune_jax_data', key)
  if os.path.isfile(os.path.join(local, layout.MANIFEST)):
    return local
  names = [layout.TOKENIZER] + [n for s in layout.SPLITS for n in manifest['splits'][s]['shards']]
  src = epath.Path(path)
  size = sum((src / n).stat().length for n in names)
  if size > LOCAL_COPY_WARN_BYTES:
    logging.warning('copying %.1f GB of prepared data from %s to local disk; mount the bucket '
                    'with gcsfuse and pass the mount path instead (docs/tpu.md)', size / 1e9, path)
  storage.copy_dir(path, local, names + [layout.MANIFEST], last=layout.MANIFEST)
  return local
