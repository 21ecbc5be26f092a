"""Prepared data through grain: ArrayRecord shards -> shuffled, packed, per-host batches.

Every source (embedded corpus, text/JSONL/Parquet files, TFDS) goes through `prepare.prepare`
once; training only reads a prepared directory (`prepare.read_manifest`). The train stream:

    ArrayRecord documents -> endless, each epoch shuffled by hash(seed, epoch) (order.py) -> this
    shard's documents -> decode -> concat-then-split packing into seq_len+1 rows -> batch ->
    thread prefetch

A host reads `shards / process_count` of the `data.shards` document shards (default: one per
host) and stacks their rows, so the global batch depends on `data.shards`, not on the host
count: one process reading two shards feeds exactly what two hosts feed. The iterator state
(per shard, grain's own) goes into every orbax checkpoint; a resume yields the same batches, and
`TrainBatches.epochs` reads the passes over the train split off that state.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import NamedTuple

import numpy as np
import sentencepiece as spm
from absl import logging
from etils import epath

from idea_prune_jax.data import inputs, prepare, split, storage
from idea_prune_jax.data.config import DataConfig
from idea_prune_jax.data.inputs import DataError

__all__ = ['DataError', 'Data', 'build', 'split_batch', 'global_batch']

LOCAL_COPY_WARN_BYTES = 1 << 30  # past this, a bucket copy per host is the wrong tool: gcsfuse


class Data(NamedTuple):
  """What the trainer needs: tokenizer, this host's train batches and val batches, sizes."""
  sp: spm.SentencePieceProcessor
  train: 'TrainBatches'
  val: list[dict]
  manifest: dict
  prepared_dir: str


# --- where the prepared data comes from -------------------------------------------------------

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


_MANIFEST_KEYS = {'input_spec': 'input', 'val_input': 'val_input', 'val_fraction': 'val_fraction',
                  'text_key': 'text_key', 'split': 'split', 'max_docs': 'max_docs'}


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
    if (epath.Path(out) / prepare.MANIFEST).exists():
      _check_prepared_from(prepare.read_manifest(out), args, out)
    elif os.environ.get(DATA_CACHE_ENV) and d.source == 'embedded':
      storage.copy_dir(_cached_embedded(os.environ[DATA_CACHE_ENV], args), out,
                       last=prepare.MANIFEST)
    else:
      prepare.prepare(output_dir=out, progress=False, **args)
  barrier()
  return out


# Where prepared copies of the embedded corpus are kept, by prepare arguments, when set: many
# runs in fresh workdirs (a test suite, repeated demos) then prepare it once, not once each.
DATA_CACHE_ENV = 'IDEA_PRUNE_DATA_CACHE'


def _cached_embedded(cache_dir: str, args: dict) -> str:
  """cache_dir/<key>, the embedded corpus prepared with args (prepared now if it is not yet)."""
  key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()
                       + inputs.CORPUS.read_bytes()).hexdigest()[:16]
  cached = os.path.join(cache_dir, key)
  if not os.path.isfile(os.path.join(cached, prepare.MANIFEST)):
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'{key}.tmp', dir=cache_dir)
    prepare.prepare(output_dir=tmp, progress=False, **args)
    try:
      os.rename(tmp, cached)  # whole or not at all; another process may have won the race
    except OSError:
      if not os.path.isfile(os.path.join(cached, prepare.MANIFEST)):
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
  manifest = prepare.read_manifest(path)
  key = hashlib.sha256((path + json.dumps(manifest, sort_keys=True)).encode()).hexdigest()[:16]
  local = os.path.join(tempfile.gettempdir(), 'idea_prune_jax_data', key)
  if os.path.isfile(os.path.join(local, prepare.MANIFEST)):
    return local
  names = [prepare.TOKENIZER] + [n for s in prepare.SPLITS for n in manifest['splits'][s]['shards']]
  src = epath.Path(path)
  size = sum((src / n).stat().length for n in names)
  if size > LOCAL_COPY_WARN_BYTES:
    logging.warning('copying %.1f GB of prepared data from %s to local disk; mount the bucket '
                    'with gcsfuse and pass the mount path instead (docs/tpu.md)', size / 1e9, path)
  storage.copy_dir(path, local, names + [prepare.MANIFEST], last=prepare.MANIFEST)
  return local


OPEN_THREADS = 64  # shards counted at once at start-up: on gcsfuse each open is a round trip


@dataclasses.dataclass(frozen=True)
class _Shard:
  """array_record's FileInstruction: a shard whose record count is known, so the data source
  neither reopens it to count nor holds it open until a record is read from it."""
  filename: str
  skip: int
  take: int
  examples_in_shard: int


def _count_records(path: str) -> int:
  from array_record.python import array_record_module
  try:
    reader = array_record_module.ArrayRecordReader(path)
    try:
      return reader.num_records()
    finally:
      reader.close()
  except Exception as e:  # noqa: BLE001  array_record raises RuntimeError/ValueError/OSError
    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise DataError(f'{path}: not a readable ArrayRecord shard ({why}); prepare the data '
                    'again') from e


def _source(local_dir: str, manifest: dict, split: str):
  """A grain ArrayRecord source over a split's shards; a truncated shard is named, not hit later.

  Shards are counted OPEN_THREADS at a time (10,000 shards behind 30 ms reads: seconds, not
  minutes) and handed over as FileInstructions, so no shard is opened twice.
  """
  import concurrent.futures
  import grain
  paths = [os.path.join(local_dir, n) for n in manifest['splits'][split]['shards']]
  with concurrent.futures.ThreadPoolExecutor(min(OPEN_THREADS, len(paths))) as pool:
    counts = list(pool.map(_count_records, paths))
  if sum(counts) != manifest['splits'][split]['documents']:
    raise DataError(f'{local_dir}: the {split} shards hold {sum(counts)} documents, the manifest '
                    f'says {manifest["splits"][split]["documents"]}; prepare the data again')
  return grain.sources.ArrayRecordDataSource([_Shard(p, 0, n, n) for p, n in zip(paths, counts)])


def _decode(record: bytes) -> dict:
  return {'tokens': np.frombuffer(record, '<i4').astype(np.int32)}


# --- packed batches ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Packing:
  """How documents become rows: seq_len, attention over documents, read threads, prefetch."""
  seq_len: int
  document_attention: bool = False
  read_threads: int = 2
  prefetch: int = 2
  workers: int = 0  # grain worker processes (they need a __main__ guard in the caller)

  @classmethod
  def from_config(cls, d: DataConfig) -> 'Packing':
    return cls(d.seq_len, d.attention == 'document', d.read_threads, d.prefetch, d.workers)


def to_batch(packed: dict, document_attention: bool) -> dict:
  """Packed [r, L+1] rows -> inputs/targets/weights (+ segment_ids/positions) of length L."""
  tokens, segments = packed['tokens'], packed['tokens_segment_ids']
  weights = segments[:, 1:] != 0  # padding (segment 0) is never a target
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}
  if document_attention:
    # A document's first token is not predicted from the previous document's last one.
    weights &= segments[:, 1:] == segments[:, :-1]
    batch.update(segment_ids=segments[:, :-1], positions=packed['tokens_positions'][:, :-1])
  return {**batch, 'weights': weights.astype(np.float32)}


def _rows(source, packing: Packing, *, shuffle_seed: int | None, shard: int = 0,
          n_shards: int = 1):
  """IterDataset of packed rows from a document source (shuffled and repeated if seeded)."""
  import grain
  ds = grain.MapDataset.source(source)
  if shuffle_seed is not None:
    from idea_prune_jax.data import order  # imports grain
    ds = order.EpochShuffled(ds, shuffle_seed)
  ds = ds[shard::n_shards].map(_decode)
  # Every read thread needs a free slot in the buffer, or threads idle behind slow reads.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=packing.read_threads,
                                            prefetch_buffer_size=max(64, 2 * packing.read_threads)))
  return grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={'tokens': packing.seq_len + 1})


class TrainBatches:
  """This host's rows of every global batch: its shards' packed rows, stacked in shard order.

  get_state/set_state speak bytes (JSON of the per-shard grain states), which is what
  `grain.checkpoint.CheckpointSave` stores for a non-grain iterator.
  """

  def __init__(self, source, packing: Packing, seed: int, shards: list[int], n_shards: int,
               rows_per_shard: int):
    import grain
    self._args = (source, packing, seed, shards, n_shards, rows_per_shard)
    self._n_shards, self._documents = n_shards, len(source)
    self._iters = []
    for shard in shards:
      ds = _rows(source, packing, shuffle_seed=seed, shard=shard, n_shards=n_shards)
      ds = ds.batch(rows_per_shard, drop_remainder=True)
      ds = ds.map(lambda rows: to_batch(rows, packing.document_attention))
      if packing.workers:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=packing.workers))
      elif packing.prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=packing.prefetch)
      self._iters.append(iter(ds))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    parts = [next(it) for it in self._iters]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> bytes:
    return json.dumps([it.get_state() for it in self._iters]).encode()

  def set_state(self, state: bytes) -> None:
    states = json.loads(state)
    if len(states) != len(self._iters):
      raise DataError(f'the checkpoint holds the data position of {len(states)} shard(s) on this '
                      f'host, this run reads {len(self._iters)}; resume with the same '
                      'data.shards and host count')
    for it, s in zip(self._iters, states):
      it.set_state(_tuples_restored(s))

  def epochs(self, state: bytes | None = None) -> float:
    """Passes over the train split read at `state` (default: now), fractional: documents this
    host's shards have read x data.shards / documents in the split, so every host reports the
    whole split's count. Only the iterator position goes in, so a resumed run counts on."""
    states = json.loads(self.get_state() if state is None else state)
    read = sum(_documents_read(s) for s in states)
    return read * self._n_shards / len(states) / self._documents

  def close(self) -> None:
    """Stops prefetch threads/workers now (left to interpreter exit, grain's cleanup is noisy)."""
    for it in self._iters:
      if hasattr(it, 'close'):
        it.close()

  def start_prefetch(self) -> None:
    """Called by grain's checkpoint handler after a restore; our iterators start on demand."""

  def fork(self) -> 'TrainBatches':
    """An independent iterator at the same position (naive's scoring must not move this one)."""
    other = TrainBatches(*self._args)
    other.set_state(self.get_state())
    return other


def _documents_read(state) -> int:
  """Documents a shard's iterator has taken from its source, from its grain state: the
  `next_index` of the read stage (one per grain worker, each reading its own slice)."""
  if isinstance(state, list):
    return sum(_documents_read(s) for s in state)
  if not isinstance(state, dict):
    return 0
  if 'next_index' in state:
    return int(state['next_index'])
  return sum(_documents_read(v) for k, v in state.items() if k != 'future_states')


def _tuples_restored(state):
  """grain's concat-then-split compares its remainder slices with a tuple sentinel (-1, -1);
  JSON turned those tuples into lists, which would read as a remainder that is not there."""
  if not isinstance(state, dict):
    return state
  return {k: ({n: tuple(s) for n, s in v.items()} if k == 'remainder_slices'
              else _tuples_restored(v)) for k, v in state.items()}


def host_shards(n_shards: int, global_batch: int, process_index: int, process_count: int):
  """(this host's shard indices, rows per shard); one-line errors for impossible splits."""
  n_shards = n_shards or process_count
  if n_shards % process_count:
    raise DataError(f'config.data.shards={n_shards}: not a multiple of the {process_count} '
                    'processes; use a multiple (0 = one per process)')
  if global_batch % n_shards:
    raise DataError(f'config.train.batch_size={global_batch}: not divisible by the {n_shards} '
                    'data shards (config.data.shards, default one per process); make it a multiple')
  per_host = n_shards // process_count
  return list(range(process_index * per_host, (process_index + 1) * per_host)), n_shards


def val_batches(source, packing: Packing, batch_size: int, n_batches: int,
                process_index: int = 0, process_count: int = 1) -> list[dict]:
  """The first n_batches global batches of in-order held-out rows (fewer if short), this host's
  rows; read once, so evaluation sees the same tokens every time and never the whole split."""
  if n_batches < 1:
    raise DataError(f'config.train.eval_batches={n_batches}: must be >= 1')
  if batch_size % process_count:
    raise DataError(f'config.train.batch_size={batch_size}: not divisible by the '
                    f'{process_count} processes; make it a multiple')
  rows = []
  for row in _rows(source, dataclasses.replace(packing, read_threads=0), shuffle_seed=None):
    rows.append(row)
    if len(rows) == n_batches * batch_size:
      break
  n = len(rows) // batch_size
  if n == 0:
    raise DataError(f'config.train.batch_size={batch_size}: the validation split packs into '
                    f'{len(rows)} rows of data.seq_len+1={packing.seq_len + 1} tokens, fewer than '
                    'one batch; hold out more text or lower the batch size / seq_len')
  local = batch_size // process_count
  out = []
  for b in range(n):
    mine = rows[b * batch_size + process_index * local:b * batch_size + (process_index + 1) * local]
    packed = {k: np.stack([r[k] for r in mine]) for k in mine[0]}
    out.append(to_batch(packed, packing.document_attention))
  return out


def tokenizer(path: str) -> spm.SentencePieceProcessor:
  return spm.SentencePieceProcessor(model_proto=(epath.Path(path) / prepare.TOKENIZER).read_bytes())


def train_batches(d: DataConfig, batch_size: int, seed: int, local_dir: str, manifest: dict,
                  process_index: int = 0, process_count: int = 1) -> TrainBatches:
  """This host's train iterator over a local (or gcsfuse-mounted) prepared directory; batch_size
  is the global batch's rows."""
  shards, n_shards = host_shards(d.shards, batch_size, process_index, process_count)
  return TrainBatches(_source(local_dir, manifest, 'train'), Packing.from_config(d), seed, shards,
                      n_shards, batch_size // n_shards)


def build(d: DataConfig, workdir: str, *, vocab_size: int, batch_size: int, eval_batches: int,
          seed: int, process_index: int = 0, process_count: int = 1,
          barrier=lambda: None) -> Data:
  """Prepared data (made once in workdir/data unless source=prepared) -> tokenizer, this host's
  train iterator (global batches of batch_size rows, in seed's order) and eval_batches
  validation batches."""
  try:
    import grain  # noqa: F401
    from array_record.python import array_record_module  # noqa: F401
  except ImportError as e:
    raise DataError("training reads prepared data through grain and array_record: "
                    "pip install 'idea-prune-jax[data]'") from e
  path = prepared_dir(d, vocab_size, workdir, process_index == 0, barrier)
  manifest = prepare.read_manifest(path)
  prepare.check_vocab(manifest, vocab_size)
  _, n_shards = host_shards(d.shards, batch_size, process_index, process_count)
  mixing = split.mixing_problem(manifest['splits']['train'], batch_size // n_shards,
                                d.seq_len + 1, '--config.data.split')
  if mixing and process_index == 0:
    logging.warning('%s', mixing)
  local = local_copy(path)
  train = train_batches(d, batch_size, seed, local, manifest, process_index, process_count)
  val = val_batches(_source(local, manifest, 'validation'), Packing.from_config(d), batch_size,
                    eval_batches, process_index, process_count)
  return Data(tokenizer(local), train, val, manifest, path)


# --- batches from token arrays (eval of text files, tests, benchmarks) ----------------------

def document_ids(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
  """A document's ids as prepare writes them: [bos] + ids + [eos], each where the tokenizer has it."""
  prefix, suffix = prepare.document_frame(sp)
  return prefix + sp.encode(text) + suffix


def windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """[n, seq_len+1] non-overlapping windows of a token stream; the ragged tail is dropped."""
  n = len(tokens) // (seq_len + 1)
  return tokens[:n * (seq_len + 1)].reshape(n, seq_len + 1)


def split_batch(rows: np.ndarray) -> dict:
  """Unpacked [B, L+1] rows -> a batch: inputs all but the last token, targets all but the first."""
  return {'inputs': rows[:, :-1], 'targets': rows[:, 1:],
          'weights': np.ones(rows[:, 1:].shape, np.float32)}


def global_batch(local, sharding):
  """This host's numpy rows -> one global jax.Array (per entry if given a dict).

  Hosts hold disjoint equal row blocks (`host_shards`), so the global batch is process_count
  times the local one. Saying so makes jax reject a mesh whose batch shards split otherwise
  (e.g. tensor across hosts: every host holds all rows) instead of building a smaller batch.
  """
  import jax  # lazy: the data pipeline itself is numpy-only

  def one(rows):
    shape = (rows.shape[0] * jax.process_count(), *rows.shape[1:])
    return jax.make_array_from_process_local_data(sharding, rows, shape)

  return {k: one(v) for k, v in local.items()} if isinstance(local, dict) else one(local)
