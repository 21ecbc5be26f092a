"""The grain stream: a prepared split's documents -> shuffled, packed, per-host batches.

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
import json

import numpy as np

from idea_prune_jax.data import batch as batch_lib
from idea_prune_jax.data import records
from idea_prune_jax.data.config import DataConfig
from idea_prune_jax.data.inputs import DataError


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


def _rows(source, packing: Packing, *, shuffle_seed: int | None, shard: int = 0,
          n_shards: int = 1):
  """IterDataset of packed rows from a document source (shuffled and repeated if seeded)."""
  import grain
  ds = grain.MapDataset.source(source)
  if shuffle_seed is not None:
    from idea_prune_jax.data import order  # imports grain
    ds = order.EpochShuffled(ds, shuffle_seed)
  ds = ds[shard::n_shards].map(records.decode)
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
      ds = ds.map(lambda rows: batch_lib.from_packed(rows, packing.document_attention))
      if packing.workers:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=packing.workers))
      elif packing.prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=packing.prefetch)
      self._iters.append(iter(ds))

  def __iter__(self):
    return self

  def __next__(self) -> batch_lib.Batch:
    return batch_lib.concatenate([next(it) for it in self._iters])

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

  def copy(self) -> 'TrainBatches':
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


def train_batches(d: DataConfig, batch_size: int, seed: int, local_dir: str, manifest: dict,
                  process_index: int = 0, process_count: int = 1) -> TrainBatches:
  """This host's train iterator over a local (or gcsfuse-mounted) prepared directory; batch_size
  is the global batch's rows."""
  shards, n_shards = host_shards(d.shards, batch_size, process_index, process_count)
  return TrainBatches(records.source(local_dir, manifest, 'train'), Packing.from_config(d), seed,
                      shards, n_shards, batch_size // n_shards)


def val_batches(source, packing: Packing, batch_size: int, n_batches: int,
                process_index: int = 0, process_count: int = 1) -> list[batch_lib.Batch]:
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
    out.append(batch_lib.from_packed(packed, packing.document_attention))
  return out
