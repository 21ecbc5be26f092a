"""prepare-data: text documents -> tokenized ArrayRecord shards, tokenizer.model, manifest.json.

One record per document, `[bos] + ids + [eos]` as little-endian int32 (bos/eos only where the
tokenizer has them). Streams: memory is bounded by a batch of documents whatever the corpus
size. `shard=(I, N)` prepares part I of N on one of N machines; the union of the parts is the
one-machine output, and the last part to finish merges the per-part manifests. Files appear under
their final names only when complete, so a killed prepare leaves no half shard behind.
"""

import hashlib
import io
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from typing import Iterator

import numpy as np
import sentencepiece as spm
from etils import epath

from idea_prune_jax.data import inputs
from idea_prune_jax.data.inputs import DataError

__all__ = ['DataError', 'prepare', 'read_manifest', 'check_vocab', 'parse_shard', 'train_spm',
           'document_frame']

FORMAT = 'idea_prune_jax.prepared/1'
SPLITS = ('train', 'validation')
MANIFEST = 'manifest.json'
TOKENIZER = 'tokenizer.model'
RECORDS_PER_SHARD = 65_536
SHARD_BYTES = 64 << 20
ENCODE_BATCH_CHARS = 1 << 20  # sp.encode takes a list: one call per ~1 MB of text

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3  # of the tokenizers trained here
# Everything that shapes a trained tokenizer; changing it changes the model bytes (and digest).
SPM_OPTIONS = dict(
    model_type='bpe',  # ~0.5 s for vocab 4096 on the 5 MB corpus; unigram takes ~10x longer
    pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, byte_fallback=True,
    character_coverage=1.0,
    # Lossless: keep newlines and runs of spaces so decode(encode(text)) == text.
    normalization_rule_name='identity', remove_extra_whitespaces=False,
    user_defined_symbols=['\n'], allow_whitespace_only_pieces=True,
    num_threads=1,  # BPE merges differ with the thread count; one thread is reproducible
    input_sentence_size=0, shuffle_input_sentence=False,  # the sample is ours, seedless
    max_sentence_length=16384,  # bytes: a 2000-char chunk of 4-byte characters still fits
)
SPM_MAX_CHARS = 20_000_000  # the first 20M characters of training text: a few seconds to train
SPM_CHUNK_CHARS = 2_000  # SentencePiece drops longer 'sentences'; lines are much shorter


# --- tokenizer -------------------------------------------------------------------------------

def spm_chunks(text: str) -> Iterator[str]:
  """A document cut at line ends into chunks SentencePiece accepts, newlines kept."""
  chunk = ''
  for line in text.splitlines(keepends=True):
    if chunk and len(chunk) + len(line) > SPM_CHUNK_CHARS:
      if chunk.strip():
        yield chunk
      chunk = ''
    chunk += line[:SPM_CHUNK_CHARS]
  if chunk.strip():
    yield chunk


def train_spm(sentences, vocab_size: int) -> bytes:
  """A serialized SentencePiece model (SPM_OPTIONS) trained in memory on `sentences`."""
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model,
                                   vocab_size=vocab_size, minloglevel=2, **SPM_OPTIONS)
  except RuntimeError as e:  # e.g. vocab above what the text supports, or below the byte set
    reason = str(e).strip().splitlines()[-1].split('] ', 1)[-1]
    raise DataError(f'--vocab_size={vocab_size}: SentencePiece cannot train it on the '
                    f'training documents: {reason}') from e
  return model.getvalue()


def _sample(docs: Iterator[str], max_chars: int = SPM_MAX_CHARS) -> list[str]:
  sentences, n_chars = [], 0
  for text in docs:
    for chunk in spm_chunks(text):
      sentences.append(chunk)
      n_chars += len(chunk)
      if n_chars >= max_chars:
        return sentences
  return sentences


def load_tokenizer(path: str) -> bytes:
  """The model bytes of a SentencePiece file (local or gs://); DataError naming it otherwise."""
  try:
    model = epath.Path(path).read_bytes()
  except (OSError, ValueError) as e:
    raise DataError(f'--tokenizer={path!r}: cannot read it ({type(e).__name__}); pass an '
                    'existing SentencePiece .model file') from e
  try:
    spm.SentencePieceProcessor(model_proto=model)
  except (RuntimeError, TypeError) as e:
    raise DataError(f'--tokenizer={path!r}: not a SentencePiece model; pass a .model file '
                    'such as a LLaMA-2 tokenizer.model') from e
  return model


def _digest(model: bytes) -> str:
  return hashlib.sha256(model).hexdigest()[:16]


def _special_ids(sp) -> dict:
  return {'pad': sp.pad_id(), 'unk': sp.unk_id(), 'bos': sp.bos_id(), 'eos': sp.eos_id()}


# --- output: files appear whole or not at all ------------------------------------------------

class _Output:
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


def _part_tag(part: int, parts: int) -> str:
  return f'{part:05d}-of-{parts:05d}'


def part_manifest_name(part: int, parts: int) -> str:
  return f'manifest-{_part_tag(part, parts)}.json'


class _SplitWriter:
  """One split of one part: documents into numbered ArrayRecord shards, rolled by size."""

  def __init__(self, out: _Output, split: str, part: int, parts: int, records_per_shard: int):
    self.out, self.records_per_shard = out, records_per_shard
    self.prefix = f'{split}-{_part_tag(part, parts)}'
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


def _summary(documents: int, tokens: int, shards: list[str]) -> dict:
  """A split in the manifest, with its mean document length: what judges mixing (split.py)."""
  return {'documents': documents, 'tokens': tokens,
          'mean_document_tokens': round(tokens / max(documents, 1), 1), 'shards': list(shards)}


# --- progress --------------------------------------------------------------------------------

class _Progress:
  """A tqdm bar on a terminal; a plain line every PLAIN_EVERY_S seconds in log files."""
  PLAIN_EVERY_S = 30.0

  def __init__(self, enabled: bool, desc: str, total: int | None, unit: str):
    self.plain = enabled and not sys.stderr.isatty()
    self.desc, self.unit, self.total, self.done = desc, unit, total, 0
    self.t0 = self.t_last = time.perf_counter()
    self._postfix = {}
    import tqdm
    self.bar = tqdm.tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True,
                         mininterval=1.0, disable=not enabled or self.plain)

  def update(self, n: int) -> None:
    self.done += n
    self.bar.update(n)
    if self.plain and time.perf_counter() - self.t_last >= self.PLAIN_EVERY_S:
      self.line()

  def postfix(self, **postfix) -> None:
    self._postfix = postfix
    self.bar.set_postfix(postfix, refresh=False)

  def line(self) -> None:
    self.t_last = time.perf_counter()
    scale, unit = (1e6, 'MB') if self.unit == 'B' else (1, self.unit)
    of = f'/{self.total / scale:.0f}' if self.total else ''
    extra = ' '.join(f'{k} {v}' for k, v in self._postfix.items())
    print(f'{self.desc}: {self.done / scale:.0f}{of} {unit} in {self.t_last - self.t0:.0f} s '
          f'{extra}', file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.plain:
      self.line()
    self.bar.close()


# --- prepare ---------------------------------------------------------------------------------

def parse_shard(text: str) -> tuple[int, int]:
  """'I/N' -> (I, N), a one-line DataError naming --shard otherwise."""
  found = re.fullmatch(r'\s*(\d+)\s*/\s*(\d+)\s*', text or '')
  if not found:
    raise DataError(f'--shard={text!r}: write it as I/N, e.g. 0/4 for the first of 4 machines')
  return _check_shard((int(found.group(1)), int(found.group(2))))


def _check_shard(shard) -> tuple[int, int]:
  part, parts = shard
  if parts < 1 or not 0 <= part < parts:
    raise DataError(f'--shard={part}/{parts}: need 0 <= I < N, e.g. 0/4 ... 3/4')
  return int(part), int(parts)


def _uniform(text: str) -> float:
  """sha256 of the content -> [0, 1): the same document lands in the same split on any machine."""
  return int.from_bytes(hashlib.sha256(text.encode('utf-8')).digest()[:8], 'big') / 2.0**64


def _content_key(text: str) -> bytes:
  return hashlib.sha256(text.encode('utf-8')).digest()[:16]


def _check_args(shard, tokenizer, vocab_size, val_fraction, val_input, tokenizer_only):
  part, parts = _check_shard(shard)
  if tokenizer and tokenizer_only:
    raise DataError('--tokenizer_only trains a tokenizer; it takes --vocab_size, not --tokenizer')
  if tokenizer_only:
    part, parts = 0, 1  # the tokenizer is trained on the whole input, whichever part asks
  if not tokenizer and vocab_size < 1:
    raise DataError(f'--vocab_size={vocab_size}: set it (e.g. 32000) to train a tokenizer, or '
                    'pass --tokenizer FILE')
  if parts > 1 and not tokenizer:
    raise DataError(f'--shard={part}/{parts}: all machines must share one tokenizer; pass '
                    '--tokenizer FILE, or first run prepare-data once with --tokenizer_only '
                    '--vocab_size N --output DIR and then --tokenizer DIR/tokenizer.model')
  if tokenizer_only:
    return part, parts
  if not 0.0 <= val_fraction < 1.0:
    raise DataError(f'--val_fraction={val_fraction}: must be in [0, 1)')
  if val_input and val_fraction:
    raise DataError(f'--val_fraction={val_fraction} and --val_input={val_input!r}: pass one')
  if not val_input and not val_fraction:
    raise DataError('--val_fraction=0 and --val_input empty: no validation documents; pass '
                    '--val_fraction F (e.g. 0.001) or --val_input SPEC')
  return part, parts


def _open_output(output_dir: str) -> _Output:
  if not output_dir:
    raise DataError('--output is empty; pass a directory (local or gs://BUCKET/path)')
  path = epath.Path(output_dir)
  if path.exists() and not path.is_dir():
    raise DataError(f'--output={output_dir!r} is a file; pass a directory')
  path.mkdir(parents=True, exist_ok=True)
  return _Output(output_dir)


def prepare(input_spec: str, output_dir: str, *, tokenizer: str = '', vocab_size: int = 0,
            val_fraction: float = 0.0, val_input: str = '', text_key: str = 'text',
            tfds_data_dir: str = '', split: str = 'auto', shard: tuple[int, int] = (0, 1),
            max_docs: int = 0, progress: bool = True, tokenizer_only: bool = False,
            records_per_shard: int = RECORDS_PER_SHARD) -> dict:
  """Prepares part shard[0] of shard[1] into output_dir; returns the merged manifest once every
  part is done (this part's manifest before). See the module docstring and docs/tpu.md."""
  part, parts = _check_args(shard, tokenizer, vocab_size, val_fraction, val_input,
                            tokenizer_only)
  model = load_tokenizer(tokenizer) if tokenizer else None
  if model and vocab_size:
    pieces = spm.SentencePieceProcessor(model_proto=model).vocab_size()
    if pieces != vocab_size:
      raise DataError(f'--vocab_size={vocab_size}: --tokenizer={tokenizer!r} has {pieces} '
                      'pieces; drop --vocab_size (it is for training a tokenizer)')
  source = inputs.parse(input_spec, '--input', text_key, tfds_data_dir, split)
  val_source = inputs.parse(val_input, '--val_input', text_key, tfds_data_dir, split) \
      if val_input else None
  out = _open_output(output_dir)
  try:
    # Held-out content, as hashes only: a training document equal to one is dropped.
    val_keys = {_content_key(t) for t in inputs.texts(val_source)} if val_source else set()
    if val_source and not val_keys:
      raise DataError(f'--val_input={val_input!r}: no validation documents (all are empty)')

    def is_val(text):
      return _content_key(text) in val_keys if val_source else _uniform(text) < val_fraction

    if model is None:
      train_texts = (t for t in inputs.texts(source, max_docs=max_docs) if not is_val(t))
      model = train_spm(_sample(train_texts), vocab_size)
    out.write_bytes(TOKENIZER, model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    common = {'format': FORMAT, 'input': input_spec, 'val_input': val_input,
              'val_fraction': val_fraction, 'text_key': text_key, 'split': split,
              'max_docs': max_docs, 'tokenizer': TOKENIZER, 'tokenizer_digest': _digest(model),
              'vocab_size': sp.vocab_size(), 'special_ids': _special_ids(sp), 'parts': parts}
    if tokenizer_only:
      return common
    _remove_stale(out, part, parts)
    writers = {s: _SplitWriter(out, s, part, parts, records_per_shard) for s in SPLITS}
    try:
      if val_source:
        _write(sp, inputs.documents(val_source, part, parts), lambda t: 'validation',
               writers, progress, f'validation {part}/{parts}')
        route = lambda t: None if is_val(t) else 'train'
      else:
        route = lambda t: 'validation' if is_val(t) else 'train'
      _write(sp, inputs.documents(source, part, parts, max_docs), route, writers, progress,
             f'prepare {part}/{parts}')
      for w in writers.values():
        w.finish()
    except BaseException:
      for w in writers.values():
        w.abort()
      raise
    splits = {s: _summary(w.documents, w.tokens, w.shards) for s, w in writers.items()}
    manifest = {**common, 'part': part, 'splits': splits}
    if parts == 1:
      _check_nonempty(manifest)
    out.write_bytes(part_manifest_name(part, parts), _json(manifest))
    merged = _merge(out, parts)
    return merged or manifest
  finally:
    out.close()


def document_frame(sp) -> tuple[list[int], list[int]]:
  """(prefix, suffix) around a document's ids: [bos], [eos], each where the tokenizer has it."""
  return ([sp.bos_id()] if sp.bos_id() >= 0 else []), ([sp.eos_id()] if sp.eos_id() >= 0 else [])


def _write(sp, docs, route, writers, progress: bool, desc: str) -> None:
  """Encodes docs in batches and hands each record to the writer its route names (None: drop)."""
  prefix, suffix = document_frame(sp)
  pending = {s: [] for s in writers}
  pending_chars = dict.fromkeys(writers, 0)

  bar = _Progress(progress, desc, docs.total, docs.unit)

  def flush(split):
    for ids in sp.encode(pending[split]):
      writers[split].add(np.asarray(prefix + ids + suffix, dtype='<i4'))
    pending[split], pending_chars[split] = [], 0
    bar.postfix(train=writers['train'].documents, val=writers['validation'].documents,
                tokens=sum(w.tokens for w in writers.values()))

  for text, done in docs:
    split = route(text) if text.strip() else None  # empty documents carry nothing to learn
    if split is not None:
      pending[split].append(text)
      pending_chars[split] += len(text)
      if pending_chars[split] >= ENCODE_BATCH_CHARS:
        flush(split)
    bar.update(done)
  for split in writers:
    if pending[split]:
      flush(split)
  bar.close()


def _json(obj) -> bytes:
  return (json.dumps(obj, indent=1) + '\n').encode()


def _remove_stale(out: _Output, part: int, parts: int) -> None:
  """This part's files from an earlier (maybe killed) run, and the merged manifest they fed."""
  tag = re.escape(_part_tag(part, parts))
  stale = re.compile(rf'((train|validation)-{tag}-\d+\.array_record|manifest-{tag}\.json'
                     rf'|{re.escape(MANIFEST)})(\.tmp-.*)?')
  for name in out.names():
    if stale.fullmatch(name):
      (out.root / name).unlink(missing_ok=True)


def _check_nonempty(manifest: dict) -> None:
  splits = manifest['splits']
  if not any(splits[s]['documents'] for s in SPLITS):
    raise DataError(f'--input={manifest["input"]!r}: no documents (every one is empty)')
  if not splits['validation']['documents']:
    flag = (f'--val_input={manifest["val_input"]!r}' if manifest['val_input'] else
            f'--val_fraction={manifest["val_fraction"]}')
    raise DataError(f'{flag}: no validation documents in --input={manifest["input"]!r}; raise '
                    '--val_fraction or pass --val_input')
  if not splits['train']['documents']:
    raise DataError(f'--input={manifest["input"]!r}: no training documents (all empty, or all '
                    'held out for validation)')


AGREE = ('format', 'input', 'val_input', 'val_fraction', 'text_key', 'split', 'max_docs',
         'tokenizer', 'tokenizer_digest', 'vocab_size', 'special_ids', 'parts')


def _merge(out: _Output, parts: int) -> dict | None:
  """manifest.json from all per-part manifests, or None while some part is missing."""
  names = [part_manifest_name(i, parts) for i in range(parts)]
  if not set(names) <= out.names():
    return None
  manifests = [json.loads((out.root / n).read_text()) for n in names]
  first = manifests[0]
  for name, m in zip(names[1:], manifests[1:]):
    differ = [k for k in AGREE if m.get(k) != first.get(k)]
    if differ:
      raise DataError(f'{out.root / name}: its {", ".join(differ)} differ from '
                      f'{names[0]}; prepare every part with the same flags and --tokenizer')
  if _digest((out.root / TOKENIZER).read_bytes()) != first['tokenizer_digest']:
    raise DataError(f'{out.root / TOKENIZER}: not the tokenizer the parts were prepared with; '
                    'prepare every part with the same --tokenizer')
  merged = {k: first[k] for k in first if k not in ('part', 'splits')}
  total = lambda s, key: sum(m['splits'][s][key] for m in manifests)
  merged['splits'] = {s: _summary(total(s, 'documents'), total(s, 'tokens'),
                                  [n for m in manifests for n in m['splits'][s]['shards']])
                      for s in SPLITS}
  _check_nonempty(merged)
  out.write_bytes(MANIFEST, _json(merged))
  return merged


def read_manifest(output_dir: str) -> dict:
  """The merged manifest of a prepared dir; one-line DataError if missing or incomplete."""
  root = epath.Path(output_dir)
  names = {p.name for p in root.iterdir()} if root.is_dir() else set()
  if MANIFEST not in names:
    parts = sorted(n for n in names if re.fullmatch(r'manifest-\d{5}-of-\d{5}\.json', n))
    if parts:
      n_parts = int(parts[0][-10:-5])
      missing = [i for i in range(n_parts) if part_manifest_name(i, n_parts) not in names]
      raise DataError(f'{output_dir}: not fully prepared: parts {missing} of {n_parts} are '
                      f'missing; run prepare-data --shard I/{n_parts} for each')
    raise DataError(f'{output_dir}: no {MANIFEST}; prepare it with idea-prune prepare-data '
                    f'--output {output_dir}')
  manifest = json.loads((root / MANIFEST).read_text())
  if manifest.get('format') != FORMAT:
    raise DataError(f'{root / MANIFEST}: format {manifest.get("format")!r}, expected {FORMAT!r}; '
                    'prepare it again')
  listed = [TOKENIZER] + [n for s in SPLITS for n in manifest['splits'][s]['shards']]
  missing = [n for n in listed if n not in names]
  if missing:
    raise DataError(f'{output_dir}: {len(missing)} file(s) of {MANIFEST} are missing '
                    f'(first: {missing[0]}); prepare it again')
  return manifest


def check_vocab(manifest: dict, vocab_size: int) -> None:
  """DataError unless the model's vocabulary covers every id the prepared tokenizer emits."""
  if vocab_size < manifest['vocab_size']:
    raise DataError(f'config.model.vocab_size={vocab_size}: the prepared tokenizer has '
                    f'{manifest["vocab_size"]} pieces; set model.vocab_size >= '
                    f'{manifest["vocab_size"]}')
