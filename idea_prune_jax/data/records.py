"""ArrayRecord shards of documents: written whole by prepare-data, read as a grain source.

One record per document, `[bos] + ids + [eos]` as little-endian int32. Files appear under their
final names only when complete, so a killed prepare leaves no half shard behind.
"""

import concurrent.futures
import dataclasses
import os
import shutil
import socket
import tempfile

import numpy as np
from etils import epath

from idea_prune_jax.data import layout
from idea_prune_jax.data.inputs import DataError

RECORDS_PER_SHARD = 65_536
SHARD_BYTES = 64 << 20
OPEN_THREADS = 64  # shards counted at once at start-up: on gcsfuse each open is a round trip


# --- writing: files appear whole or not at all -----------------------------------------------

class Output:
  """DIR, local or gs://. Local files are written under a per-process temporary name in DIR and
  renamed; remote ones are written in a local temporary folder and copied (GCS objects appear
  atomically)."""

  def __init__(self, root: str):
    self.root = epath.Path(root)
    self.remote = '://' in root
    self.suffix = f'.tmp-{socket.gethostname()}-{os.getpid()}'
    self._local = tempfile.mkdtemp(prefix='prepare-') if self.remote else None

  def temp(self, name: str) -> str:
    return os.path.join(self._local, name) if self.remote else str(self.root / (name + self.suffix))

  def publish(self, tmp: str, name: str) -> None:
    if self.remote:
      epath.Path(tmp).copy(self.root / name, overwrite=True)
      os.remove(tmp)
    else:
      os.replace(tmp, self.root / name)

  def discard(self, tmp: str) -> None:
    epath.Path(tmp).unlink(missing_ok=True)

  def write_bytes(self, name: str, data: bytes) -> None:
    tmp = self.temp(name)
    epath.Path(tmp).write_bytes(data)
    self.publish(tmp, name)

  def names(self) -> set[str]:
    return {p.name for p in self.root.iterdir()} if self.root.exists() else set()

  def close(self) -> None:
    if self._local:
      shutil.rmtree(self._local)


class SplitWriter:
  """One split of one part: documents into numbered ArrayRecord shards, rolled by size."""

  def __init__(self, out: Output, split: str, part: int, parts: int, records_per_shard: int):
    self.out, self.records_per_shard = out, records_per_shard
    self.prefix = f'{split}-{layout.part_tag(part, parts)}'
    self.shards, self.documents, self.tokens = [], 0, 0
    self._writer = self._tmp = None
    self._records = self._bytes = 0

  def add(self, record: np.ndarray) -> None:
    if self._writer is None:
      from array_record.python import array_record_module  # lazy: only writing needs it
      self._tmp = self.out.temp(f'{self.prefix}-{len(self.shards):05d}.array_record')
      # group_size:1: a record is its own chunk, so a random read decodes one document only.
      self._writer = array_record_module.ArrayRecordWriter(self._tmp, 'group_size:1')
    data = record.tobytes()
    self._writer.write(data)
    self.documents += 1
    self.tokens += len(record)
    self._records += 1
    self._bytes += len(data)
    if self._records >= self.records_per_shard or self._bytes >= SHARD_BYTES:
      self.finish()

  def finish(self) -> None:
    """Closes the open shard under its final name."""
    if self._writer is not None:
      self._writer.close()
      name = f'{self.prefix}-{len(self.shards):05d}.array_record'
      self.out.publish(self._tmp, name)
      self.shards.append(name)
      self._writer = self._tmp = None
      self._records = self._bytes = 0

  def abort(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self.out.discard(self._tmp)
      self._writer = self._tmp = None


# --- reading: a split's shards as one grain source ------------------------------------------

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


def source(local_dir: str, manifest: dict, split: str):
  """A grain ArrayRecord source over a split's shards; a truncated shard is named, not hit later.

  Shards are counted OPEN_THREADS at a time (10,000 shards behind 30 ms reads: seconds, not
  minutes) and handed over as FileInstructions, so no shard is opened twice.
  """
  import grain
  paths = [os.path.join(local_dir, n) for n in manifest['splits'][split]['shards']]
  with concurrent.futures.ThreadPoolExecutor(min(OPEN_THREADS, len(paths))) as pool:
    counts = list(pool.map(_count_records, paths))
  if sum(counts) != manifest['splits'][split]['documents']:
    raise DataError(f'{local_dir}: the {split} shards hold {sum(counts)} documents, the manifest '
                    f'says {manifest["splits"][split]["documents"]}; prepare the data again')
  return grain.sources.ArrayRecordDataSource([_Shard(p, 0, n, n) for p, n in zip(paths, counts)])


def decode(record: bytes) -> dict:
  """A document's record -> {'tokens': int32 ids}, the field grain's packing reads."""
  return {'tokens': np.frombuffer(record, '<i4').astype(np.int32)}
