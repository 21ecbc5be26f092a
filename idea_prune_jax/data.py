"""Text sources, a cached SentencePiece tokenizer, and packed, checkpointable batches."""

import glob
import hashlib
import io
import json
import os
import pathlib
import tarfile
from typing import NamedTuple

import numpy as np
import sentencepiece as spm

CORPUS = pathlib.Path(__file__).parent / 'corpus' / 'shakespeare.tar.xz'
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Everything that shapes the trained model goes into the cache key, so changing it retrains.
SPM_OPTIONS = dict(
    model_type='bpe',  # ~0.5 s for vocab 4096 on the 5 MB corpus; unigram takes ~10x longer
    pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, byte_fallback=True,
    character_coverage=1.0,
    # Lossless: keep newlines and runs of spaces so decode(encode(text)) == text.
    normalization_rule_name='identity', remove_extra_whitespaces=False,
    user_defined_symbols=['\n'], allow_whitespace_only_pieces=True,
    num_threads=1,  # BPE merges differ with the thread count; one thread is reproducible
    input_sentence_size=0, shuffle_input_sentence=False,  # we subsample ourselves, seedlessly
    max_sentence_length=16384,  # bytes: a 2000-char chunk of 4-byte characters still fits
)
SPM_MAX_CHARS = 20_000_000  # bounds tokenizer training at a few seconds on big sources
SPM_CHUNK_CHARS = 2_000  # SentencePiece drops longer 'sentences'; lines are much shorter
SINGLE_FILE_VAL_FRACTION = 0.05
# The tfds source holds its text and tokens in host memory; past this, refuse before reading
# (hours into a c4 read is the wrong time to run out of memory).
TFDS_MAX_IN_MEMORY_CHARS = 4_000_000_000
TFDS_SIZE_SAMPLE = 64  # records read to estimate a split's size


class DataError(ValueError):
  """A data problem found before compute; the message names the config field and the fix."""


class Data(NamedTuple):
  """What the trainer needs: tokenizer, this host's train iterator and val batches, sizes."""
  sp: spm.SentencePieceProcessor
  train: 'PackedBatches'
  val: list[np.ndarray]
  train_tokens: int
  val_tokens: int


def _names(csv: str) -> list[str]:
  return [s.strip() for s in csv.split(',') if s.strip()]


def embedded_works() -> dict[str, str]:
  """{work name: text} for the vendored Shakespeare, in name order."""
  with tarfile.open(CORPUS) as tar:
    return {m.name: tar.extractfile(m).read().decode('utf-8')
            for m in sorted(tar.getmembers(), key=lambda m: m.name) if m.isfile()}


def _embedded(data_config) -> tuple[list[str], list[str]]:
  works = embedded_works()
  val_names = _names(data_config.val_works)
  unknown = [n for n in val_names if n not in works]
  if unknown:
    raise DataError(f'config.data.val_works={data_config.val_works!r}: unknown work(s) {unknown}; '
                    f'choose from {", ".join(works)}')
  if not val_names or len(val_names) == len(works):
    raise DataError(f'config.data.val_works={data_config.val_works!r}: hold out at least one '
                    'work and leave at least one for training')
  return ([t for n, t in works.items() if n not in val_names],
          [works[n] for n in val_names])


def expand_files(csv: str, field: str) -> list[str]:
  """Comma-separated paths/globs -> sorted, de-duplicated existing non-empty files."""
  paths = []
  for entry in _names(csv):
    if glob.has_magic(entry):
      matched = [p for p in glob.glob(entry, recursive=True) if os.path.isfile(p)]
      if not matched:
        raise DataError(f'config.{field}={csv!r}: no files match {entry!r}; fix the glob')
      paths += matched
    elif not os.path.isfile(entry):
      raise DataError(f'config.{field}={csv!r}: {entry!r}: no such file; pass existing text files')
    else:
      paths.append(entry)
  if not paths:
    raise DataError(f'config.{field}={csv!r}: empty; pass comma-separated text files or globs')
  paths = sorted(set(paths))
  for p in paths:
    if os.path.getsize(p) == 0:
      raise DataError(f'config.{field}={csv!r}: {p!r} is empty; remove it or add text')
  return paths


def _read(path: str) -> str:
  # errors='replace': one stray byte in a scraped file shouldn't stop a run
  with open(path, encoding='utf-8', errors='replace') as f:
    return f.read()


def _files(data_config) -> tuple[list[str], list[str]]:
  train_paths = expand_files(data_config.files, 'data.files')
  if data_config.val_files:
    val_paths = expand_files(data_config.val_files, 'data.val_files')
    # A file in both lists would leak into validation; validation wins.
    val_real = {os.path.realpath(p) for p in val_paths}
    train_paths = [p for p in train_paths if os.path.realpath(p) not in val_real]
    if not train_paths:
      raise DataError(f'config.data.files={data_config.files!r}: every file is also in '
                      'data.val_files; leave some for training')
    return [_read(p) for p in train_paths], [_read(p) for p in val_paths]
  if len(train_paths) >= 2:  # hold out whole files, never random lines: no shared passages
    return [_read(p) for p in train_paths[:-1]], [_read(train_paths[-1])]
  # One file: its final 5% of lines is the only held-out text we can get without a second file.
  lines = _read(train_paths[0]).splitlines(keepends=True)
  n_val = max(1, int(len(lines) * SINGLE_FILE_VAL_FRACTION))
  if n_val >= len(lines):
    raise DataError(f'config.data.files={data_config.files!r}: one file of {len(lines)} line(s) '
                    'cannot be split into train and validation; add text or set data.val_files')
  return [''.join(lines[:-n_val])], [''.join(lines[-n_val:])]


def _tfds_split(tfds, data_config, split: str, field: str) -> list[str]:
  try:
    source = tfds.data_source(data_config.tfds_name, split=split,
                              data_dir=data_config.tfds_data_dir or None)
  except Exception as e:  # tfds raises many types; the user needs the field, not the type
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f'config.{field}={split!r} of data.tfds_name={data_config.tfds_name!r} '
                    f'(data_dir={data_config.tfds_data_dir!r}) failed to open: {first_line}') from e

  def text_of(record):
    if data_config.text_key not in record:
      raise DataError(f'config.data.text_key={data_config.text_key!r}: not in the records of '
                      f'{data_config.tfds_name}; keys are {sorted(record)}')
    text = record[data_config.text_key]
    return text.decode('utf-8', errors='replace') if isinstance(text, bytes) else str(text)

  n_records = len(source)
  sample = [len(text_of(source[i])) for i in range(min(n_records, TFDS_SIZE_SAMPLE))]
  estimate = int(np.mean(sample) * n_records) if sample else 0
  limit = data_config.max_chars if data_config.max_chars > 0 else estimate
  if min(limit, estimate) > TFDS_MAX_IN_MEMORY_CHARS:
    raise DataError(f'config.data.max_chars={data_config.max_chars}: {split!r} of '
                    f'data.tfds_name={data_config.tfds_name!r} is ~{estimate:.2e} characters, more '
                    f'than this in-memory source holds ({TFDS_MAX_IN_MEMORY_CHARS:.0e}); set '
                    f'data.max_chars <= {TFDS_MAX_IN_MEMORY_CHARS}')
  docs, n_chars = [], 0
  for i in range(n_records):
    text = text_of(source[i])
    if data_config.max_chars > 0 and n_chars + len(text) > data_config.max_chars:
      docs.append(text[:data_config.max_chars - n_chars])
      break
    docs.append(text)
    n_chars += len(text)
  return [d for d in docs if d]


def _tfds(data_config) -> tuple[list[str], list[str]]:
  if not data_config.tfds_name:
    raise DataError("config.data.tfds_name='': source=tfds needs a dataset name, e.g. 'c4/en'")
  try:
    import tensorflow_datasets as tfds  # optional: only runs on tfds data need it
  except ImportError as e:
    raise DataError("config.data.source='tfds': tensorflow_datasets is not installed; "
                    "pip install 'idea-prune-jax[data]'") from e
  # max_chars caps each split separately: validation only needs a few batches.
  return (_tfds_split(tfds, data_config, data_config.tfds_train_split, 'data.tfds_train_split'),
          _tfds_split(tfds, data_config, data_config.tfds_val_split, 'data.tfds_val_split'))


def load_texts(data_config) -> tuple[list[str], list[str]]:
  """(train_docs, val_docs) from config.data; validation is always whole held-out documents."""
  loaders = {'embedded': _embedded, 'files': _files, 'tfds': _tfds}
  if data_config.source not in loaders:
    raise DataError(f'config.data.source={data_config.source!r}: use embedded, files or tfds')
  train, val = loaders[data_config.source](data_config)
  if not any(train):
    raise DataError(f'config.data.source={data_config.source!r}: the training split is empty')
  if not any(val):
    raise DataError(f'config.data.source={data_config.source!r}: the validation split is empty')
  return train, val


def _digest(*parts) -> str:
  h = hashlib.sha256()
  for part in parts:
    h.update(part if isinstance(part, bytes) else part.encode('utf-8', errors='replace'))
    h.update(b'\0')  # so ['ab', 'c'] and ['a', 'bc'] differ
  return h.hexdigest()[:16]


def spm_sentences(docs: list[str], max_chars: int = SPM_MAX_CHARS) -> list[str]:
  """Docs cut at line ends into chunks SentencePiece accepts, evenly thinned to max_chars."""
  # Chunks keep their newlines so training sees text exactly as `tokenize` will encode it.
  chunks = []
  for doc in docs:
    chunk = ''
    for line in doc.splitlines(keepends=True):
      if chunk and len(chunk) + len(line) > SPM_CHUNK_CHARS:
        if chunk.strip():
          chunks.append(chunk)
        chunk = ''
      chunk += line[:SPM_CHUNK_CHARS]
    if chunk.strip():
      chunks.append(chunk)
  total = sum(map(len, chunks))
  if total <= max_chars:
    return chunks
  stride = -(-total // max_chars)  # every stride-th chunk: deterministic, spread over all docs
  return chunks[::stride]


def write_atomic(path: str, data: bytes) -> None:
  # Hosts sharing a workdir may write the same file at once; rename makes each write whole.
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def train_spm(sentences: list[str], vocab_size: int) -> bytes:
  """A serialized SentencePiece model trained in memory on `sentences`."""
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model,
                                   vocab_size=vocab_size, minloglevel=2, **SPM_OPTIONS)
  except RuntimeError as e:  # e.g. vocab above what the text supports, or below the byte set
    reason = str(e).strip().splitlines()[-1].split('] ', 1)[-1]
    raise DataError(f'config.model.vocab_size={vocab_size}: SentencePiece cannot train it on '
                    f'the training split: {reason}') from e
  return model.getvalue()


def tokenizer(config, workdir: str | None, train_docs: list[str] | None = None
              ) -> spm.SentencePieceProcessor:
  """config.data.tokenizer if set, else one trained on the training split and cached in workdir."""
  vocab_size = config.model.vocab_size
  if config.data.tokenizer:
    path = config.data.tokenizer
    if not os.path.isfile(path):
      raise DataError(f'config.data.tokenizer={path!r}: no such file; pass a SentencePiece '
                      '.model or leave it empty to train one')
    try:
      sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
      raise DataError(f'config.data.tokenizer={path!r}: not a SentencePiece model ({e})') from e
    if sp.vocab_size() > vocab_size:
      raise DataError(f'config.model.vocab_size={vocab_size}: smaller than the '
                      f'{sp.vocab_size()} pieces of data.tokenizer; set it to >= {sp.vocab_size()}')
    return sp
  if train_docs is None:
    train_docs = load_texts(config.data)[0]
  sentences = spm_sentences(train_docs)
  key = _digest(json.dumps(SPM_OPTIONS, sort_keys=True), str(SPM_MAX_CHARS), *sentences)
  path = workdir and os.path.join(workdir, 'tokenizer', f'spm_{vocab_size}_{key}.model')
  if path and os.path.isfile(path):
    return spm.SentencePieceProcessor(model_file=path)
  model = train_spm(sentences, vocab_size)
  if path:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, model)
  return spm.SentencePieceProcessor(model_proto=model)


def tokenize(sp: spm.SentencePieceProcessor, docs: list[str], cache_dir: str | None = None,
             split: str = 'tokens') -> np.ndarray:
  """int32 ids of all docs, each followed by EOS; cached as .npy in cache_dir if given."""
  eos = sp.eos_id()
  if eos < 0:
    raise DataError('config.data.tokenizer: the model has no EOS piece; train it with eos_id set')
  # Keyed by the model bytes too: the same text under another tokenizer is other ids.
  path = cache_dir and os.path.join(
      cache_dir, f'{split}_{_digest(sp.serialized_model_proto(), *docs)}.npy')
  if path and os.path.isfile(path):
    return np.load(path)
  tokens = np.concatenate([np.asarray(doc + [eos], np.int32) for doc in sp.encode(docs)]
                          or [np.zeros(0, np.int32)])
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, tokens)
    write_atomic(path, buf.getvalue())
  return tokens


def _host_rows(global_batch: int, process_index: int, process_count: int) -> slice:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} / process_count={process_count}: invalid')
  if global_batch % process_count:
    raise DataError(f'config.train.batch_size={global_batch}: not divisible by the '
                    f'{process_count} processes; make it a multiple')
  local = global_batch // process_count
  return slice(process_index * local, (process_index + 1) * local)


def windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """[n, seq_len+1] view of non-overlapping windows; the ragged tail is dropped."""
  n = len(tokens) // (seq_len + 1)
  return tokens[:n * (seq_len + 1)].reshape(n, seq_len + 1)


class PackedBatches:
  """Deterministic, resumable iterator of this host's rows of shuffled packed windows."""

  def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    self.windows = windows(np.asarray(tokens, np.int32), seq_len)
    self.rows = _host_rows(global_batch, process_index, process_count)
    self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
    self.batches_per_epoch = len(self.windows) // global_batch  # drop each epoch's ragged end
    if self.batches_per_epoch == 0:
      raise DataError(f'config.train.batch_size={global_batch}: the training split has only '
                      f'{len(self.windows)} windows of data.seq_len+1={seq_len + 1} tokens, fewer '
                      'than one batch; lower train.batch_size or data.seq_len, or add text')
    self.epoch, self.index = 0, 0
    self._perm_epoch, self._perm = None, None

  def _fingerprint(self) -> dict:
    return dict(seed=self.seed, seq_len=self.seq_len, global_batch=self.global_batch,
                n_windows=len(self.windows))

  def permutation(self, epoch: int) -> np.ndarray:
    """Window order of an epoch; depends on (seed, epoch) only, never on the host count."""
    if self._perm_epoch != epoch:  # memo: one permutation per epoch, not per batch
      rng = np.random.default_rng([self.seed % 2**63, epoch])
      self._perm_epoch, self._perm = epoch, rng.permutation(len(self.windows))
    return self._perm

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    if self.index == self.batches_per_epoch:
      self.epoch, self.index = self.epoch + 1, 0
    start = self.index * self.global_batch
    batch_windows = self.permutation(self.epoch)[start:start + self.global_batch][self.rows]
    self.index += 1
    return self.windows[batch_windows]

  def get_state(self) -> dict:
    """JSON-serializable position; the fingerprint catches a resume with other data."""
    return dict(epoch=self.epoch, index=self.index, **self._fingerprint())

  def set_state(self, state: dict) -> None:
    saved = {k: state.get(k) for k in self._fingerprint()}
    if saved != self._fingerprint():
      raise DataError(f'data iterator state was saved for {saved} but this run has '
                      f'{self._fingerprint()}; resume with the same data, seq_len, batch and seed')
    if not 0 <= state['index'] <= self.batches_per_epoch or state['epoch'] < 0:
      raise DataError(f'data iterator state {state} is out of range')
    self.epoch, self.index = int(state['epoch']), int(state['index'])


def val_batches(tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int,
                process_index: int = 0, process_count: int = 1) -> list[np.ndarray]:
  """The first n_batches batches of in-order windows (fewer if short), this host's rows."""
  if n_batches < 1:
    raise DataError(f'config.train.eval_batches={n_batches}: must be >= 1')
  rows = _host_rows(batch_size, process_index, process_count)
  val_windows = windows(np.asarray(tokens, np.int32), seq_len)
  n = min(n_batches, len(val_windows) // batch_size)
  if n == 0:
    raise DataError(f'config.train.batch_size={batch_size}: the validation split has only '
                    f'{len(tokens)} tokens, fewer than one batch of data.seq_len+1={seq_len + 1}; '
                    'hold out more text or lower the batch size / seq_len')
  return [val_windows[b * batch_size:(b + 1) * batch_size][rows] for b in range(n)]


def split_batch(batch: np.ndarray) -> dict:
  """Next-token pairs: inputs are all but the last token, targets all but the first."""
  return {'inputs': batch[:, :-1], 'targets': batch[:, 1:],
          'weights': np.ones(batch[:, 1:].shape, np.float32)}


def global_batch(local, sharding):
  """This host's numpy rows -> one global jax.Array (per entry if given a dict).

  Hosts hold disjoint equal row blocks (`_host_rows`), so the global batch is process_count
  times the local one. Saying so makes jax reject a mesh whose batch shards split otherwise
  (e.g. tensor across hosts: every host holds all rows) instead of building a smaller batch.
  """
  import jax  # lazy: the data pipeline itself is numpy-only

  def one(rows):
    shape = (rows.shape[0] * jax.process_count(), *rows.shape[1:])
    return jax.make_array_from_process_local_data(sharding, rows, shape)

  return {k: one(v) for k, v in local.items()} if isinstance(local, dict) else one(local)


def build(config, workdir: str | None, process_index: int = 0, process_count: int = 1) -> Data:
  """Texts -> tokenizer -> token caches -> this host's train iterator and val batches."""
  train_docs, val_docs = load_texts(config.data)
  sp = tokenizer(config, workdir, train_docs)
  cache_dir = workdir and os.path.join(workdir, 'tokenizer')
  train_tokens = tokenize(sp, train_docs, cache_dir, 'train')
  val_tokens = tokenize(sp, val_docs, cache_dir, 'val')
  seq_len, batch_size = config.data.seq_len, config.train.batch_size
  train = PackedBatches(train_tokens, seq_len, batch_size, config.seed,
                        process_index, process_count)
  val = val_batches(val_tokens, seq_len, batch_size, config.train.eval_batches,
                    process_index, process_count)
  return Data(sp, train, val, train_tokens=len(train_tokens), val_tokens=len(val_tokens))
