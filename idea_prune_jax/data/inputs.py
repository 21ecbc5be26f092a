"""Input SPECs of prepare-data, read as streams of text documents.

  embedded[:work,work]   the vendored Shakespeare: each work a text
  tfds:NAME[:SPLIT]      tfds.data_source(NAME, split=SPLIT or 'train'): each record
  PATH,GLOB,...          local or gs:// files: *.jsonl / *.json (optionally .gz) each line's
                         text_key a record; *.parquet each row's text_key column a record;
                         anything else plain text, each file a text

Texts and records become documents by the Source's split rule (split.py; default: records as they
are, texts cut at scenes and into bounded chunks).

Nothing here holds more than one record batch (Parquet) or one document in memory.
"""

import contextlib
import functools
import glob
import gzip
import json
import pathlib
import re
import tarfile
from typing import Iterator, NamedTuple

from etils import epath

from idea_prune_jax.data import split as split_lib

CORPUS = pathlib.Path(__file__).parent / 'corpus' / 'shakespeare.tar.xz'
JSONL = ('.jsonl', '.json', '.jsonl.gz', '.json.gz')
PARQUET_BATCH_ROWS = 1024


class DataError(ValueError):
  """A data problem found before compute; the message names the flag, field or file and the fix."""


class Source(NamedTuple):
  spec: str
  flag: str  # the flag that named it, for errors
  kind: str  # 'embedded' | 'tfds' | 'files'
  names: tuple  # works; (tfds name, split); or files in sorted order
  text_key: str = 'text'
  tfds_data_dir: str = ''
  split: split_lib.Rule = split_lib.Rule('auto')


class Documents(NamedTuple):
  """(text, progress) pairs; progress counts `unit`s of which there are `total` (None: unknown)."""
  stream: Iterator[tuple[str, int]]
  total: int | None
  unit: str

  def __iter__(self):
    return self.stream


def _names(csv: str) -> list[str]:
  return [s.strip() for s in csv.split(',') if s.strip()]


@functools.lru_cache(maxsize=1)  # a prepare reads it up to four times; 0.25 s each
def embedded_works() -> dict[str, str]:
  """{work name: text} for the vendored Shakespeare, in name order (shared: do not mutate)."""
  with tarfile.open(CORPUS) as tar:
    return {m.name: tar.extractfile(m).read().decode('utf-8')
            for m in sorted(tar.getmembers(), key=lambda m: m.name) if m.isfile()}


def _glob(entry: str) -> list[str]:
  if '://' not in entry:
    return [p for p in glob.glob(entry, recursive=True) if pathlib.Path(p).is_file()]
  scheme, rest = entry.split('://', 1)
  parts = rest.split('/')
  first = next(i for i, p in enumerate(parts) if glob.has_magic(p))
  base = epath.Path(f'{scheme}://' + '/'.join(parts[:first]))
  return [str(p) for p in base.glob('/'.join(parts[first:])) if p.is_file()]


def expand_files(csv: str, flag: str) -> list[str]:
  """Comma-separated paths/globs -> sorted, de-duplicated files; 0-byte files are skipped."""
  paths = []
  for entry in _names(csv):
    if glob.has_magic(entry):
      matched = _glob(entry)
      if not matched:
        raise DataError(f'{flag}={csv!r}: no files match {entry!r}; fix the glob')
      paths += matched
    elif not epath.Path(entry).is_file():
      raise DataError(f'{flag}={csv!r}: {entry!r}: no such file')
    else:
      paths.append(entry)
  if not paths:
    raise DataError(f'{flag}={csv!r}: empty; pass embedded, tfds:NAME or files/globs')
  paths = [p for p in sorted(set(paths)) if epath.Path(p).stat().length > 0]
  if not paths:
    raise DataError(f'{flag}={csv!r}: every file is empty')
  return paths


def _is_parquet(path: str) -> bool:
  return path.endswith('.parquet')


def _check_text_key(path: str, keys, text_key: str) -> None:
  if text_key not in keys:
    raise DataError(f'--text_key={text_key!r}: not in {path}; its fields are {sorted(keys)}')


def _first_json_keys(path: str):
  with _open(path) as (_, f):
    for line in f:
      if line.strip():
        record = json.loads(line)
        return record.keys() if isinstance(record, dict) else []
  return None


@contextlib.contextmanager
def _open(path: str):
  """(raw file, readable stream): the stream decompresses .gz; both close on exit."""
  with epath.Path(path).open('rb') as raw:
    if path.endswith('.gz'):
      with gzip.GzipFile(fileobj=raw) as stream:
        yield raw, stream
    else:
      yield raw, raw


def _tfds_source(name: str, split: str, data_dir: str, flag: str, spec: str):
  try:
    import tensorflow_datasets as tfds  # optional: only tfds inputs need it
  except ImportError as e:
    raise DataError(f"{flag}={spec!r}: tensorflow_datasets is not installed; "
                    "pip install 'idea-prune-jax[data]'") from e
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None)
  except Exception as e:  # tfds raises many types; the user needs the flag, not the type
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f'{flag}={spec!r} (--tfds_data_dir={data_dir!r}) failed to open: '
                    f'{first_line}') from e


def _tfds_text(record, text_key: str, spec: str) -> str:
  if text_key not in record:
    raise DataError(f'--text_key={text_key!r}: not in the records of {spec}; keys are '
                    f'{sorted(record)}')
  text = record[text_key]
  return text.decode('utf-8', errors='replace') if isinstance(text, bytes) else str(text)


def parse(spec: str, flag: str, text_key: str = 'text', tfds_data_dir: str = '',
          split: str = 'auto') -> Source:
  """A checked Source: works known, files present, text_key in the first record of each format,
  split rule valid (checked first: it is the cheapest)."""
  try:
    rule = split_lib.parse(split)
  except split_lib.SplitError as e:
    raise DataError(str(e)) from None
  if not (spec or '').strip():
    raise DataError(f'{flag} is empty; pass embedded, tfds:NAME[:SPLIT] or files/globs')
  if spec == 'embedded' or spec.startswith('embedded:'):
    works = list(embedded_works())
    chosen = _names(spec.partition(':')[2]) or works
    unknown = [n for n in chosen if n not in works]
    if unknown:
      raise DataError(f'{flag}={spec!r}: unknown work(s) {unknown}; choose from {", ".join(works)}')
    return Source(spec, flag, 'embedded', tuple(chosen), split=rule)
  if spec.startswith('tfds:'):
    name, _, tfds_split = spec[5:].partition(':')
    version = re.match(r'\d+\.\d+\.\d+(:|$)', tfds_split)  # tfds:c4/en:3.1.0:validation
    if version:
      name, tfds_split = f'{name}:{version.group(0).rstrip(":")}', tfds_split[version.end():]
    tfds_split = tfds_split or 'train'
    data_source = _tfds_source(name, tfds_split, tfds_data_dir, flag, spec)
    if len(data_source) == 0:
      raise DataError(f'{flag}={spec!r}: the split has no records')
    _tfds_text(data_source[0], text_key, spec)
    return Source(spec, flag, 'tfds', (name, tfds_split), text_key, tfds_data_dir, rule)
  files = expand_files(spec, flag)
  checked_json = False
  for path in files:
    if _is_parquet(path):
      import pyarrow.parquet as pq
      with epath.Path(path).open('rb') as f:
        _check_text_key(path, pq.ParquetFile(f).schema_arrow.names, text_key)
    elif path.endswith(JSONL) and not checked_json:
      keys = _first_json_keys(path)
      if keys is not None:
        _check_text_key(path, keys, text_key)
        checked_json = True
  return Source(spec, flag, 'files', tuple(files), text_key, split=rule)


# --- reading ---------------------------------------------------------------------------------

def _jsonl(path: str, text_key: str) -> Iterator[tuple[str, int]]:
  with _open(path) as (raw, f):
    done = 0
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      record = json.loads(line)
      if not isinstance(record, dict) or text_key not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f'--text_key={text_key!r}: not in {path} line {number}; its fields '
                        f'are {keys}')
      position = raw.tell()
      yield str(record[text_key] or ''), position - done
      done = position


def _parquet(path: str, text_key: str) -> Iterator[tuple[str, int]]:
  import pyarrow.parquet as pq
  with epath.Path(path).open('rb') as f:
    parquet = pq.ParquetFile(f)
    _check_text_key(path, parquet.schema_arrow.names, text_key)
    size, rows = epath.Path(path).stat().length, max(parquet.metadata.num_rows, 1)
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_key]):
      texts = batch.column(0).to_pylist()
      per_row = size / rows
      for i, text in enumerate(texts):
        # integer progress that adds up to the file size over the rows
        yield (text or ''), int((i + 1) * per_row) - int(i * per_row)


def _text_file(path: str) -> Iterator[tuple[str, int]]:
  with _open(path) as (_, f):
    data = f.read()
  yield data.decode('utf-8', errors='replace'), epath.Path(path).stat().length


# An input is (its documents, progress): one text or record cut by the Source's split rule, so
# max_docs and the parts count inputs whatever the rule.

def _cut(stream, rule: split_lib.Rule, record: bool) -> Iterator[tuple[list[str], int]]:
  for text, done in stream:
    yield split_lib.documents(text, rule, record), done


def _file_inputs(path: str, source: Source) -> Iterator[tuple[list[str], int]]:
  if _is_parquet(path):
    return _cut(_parquet(path, source.text_key), source.split, record=True)
  if path.endswith(JSONL):
    return _cut(_jsonl(path, source.text_key), source.split, record=True)
  return _cut(_text_file(path), source.split, record=False)


def _tfds_data(source: Source):
  name, tfds_split = source.names
  return _tfds_source(name, tfds_split, source.tfds_data_dir, source.flag, source.spec)


def _tfds_inputs(source: Source, data_source, indices) -> Iterator[tuple[list[str], int]]:
  records = ((_tfds_text(data_source[i], source.text_key, source.spec), 1) for i in indices)
  return _cut(records, source.split, record=True)


def _all_inputs(source: Source) -> Iterator[tuple[list[str], int]]:
  if source.kind == 'embedded':
    works = embedded_works()
    yield from _cut(((works[n], len(works[n])) for n in source.names), source.split, False)
  elif source.kind == 'tfds':
    data_source = _tfds_data(source)
    yield from _tfds_inputs(source, data_source, range(len(data_source)))
  else:
    for path in source.names:
      yield from _file_inputs(path, source)


def _documents(inputs) -> Iterator[tuple[str, int]]:
  """Inputs -> (document, progress); an input's progress is counted at its last document."""
  for pieces, done in inputs:
    for piece in pieces[:-1]:
      yield piece, 0
    yield (pieces[-1] if pieces else ''), done


def _take(inputs, part: int, parts: int, max_docs: int) -> Iterator[tuple[list[str], int]]:
  """Input i of the stream -> part i % parts; progress of the others is still counted."""
  skipped = 0
  for i, (pieces, done) in enumerate(inputs):
    if max_docs and i >= max_docs:
      return
    if i % parts == part:
      yield pieces, done + skipped
      skipped = 0
    else:
      skipped += done


def documents(source: Source, part: int = 0, parts: int = 1, max_docs: int = 0) -> Documents:
  """This part's documents (empty ones included; callers skip them), of the first max_docs inputs
  (texts, records, works: before the split rule cuts them).

  A part reads only its own share where it can: every parts-th file when there are at least as
  many files as parts (and no max_docs), every parts-th record of a tfds split; otherwise every
  parts-th input of the one stream. Either way the parts' union is the parts=1 stream.
  """
  if source.kind == 'tfds':
    data_source = _tfds_data(source)
    n = min(len(data_source), max_docs) if max_docs else len(data_source)
    mine = range(part, n, parts)
    return Documents(_documents(_tfds_inputs(source, data_source, mine)), len(mine), 'doc')
  if source.kind == 'files' and len(source.names) >= parts and not max_docs:
    mine = source.names[part::parts]
    inputs_ = (i for path in mine for i in _file_inputs(path, source))
    return Documents(_documents(inputs_), sum(epath.Path(p).stat().length for p in mine), 'B')
  if source.kind == 'files':
    total = sum(epath.Path(p).stat().length for p in source.names)
  else:
    total = sum(len(embedded_works()[name]) for name in source.names)
  return Documents(_documents(_take(_all_inputs(source), part, parts, max_docs)),
                   None if max_docs else total, 'B')


def texts(source: Source, max_docs: int = 0) -> Iterator[str]:
  """Every non-empty document of the whole input, in stream order."""
  for text, _ in documents(source, max_docs=max_docs):
    if text.strip():
      yield text
