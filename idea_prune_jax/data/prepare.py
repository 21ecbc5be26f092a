"""prepare-data: text documents -> tokenized ArrayRecord shards, tokenizer.model, manifest.json.

One record per document (records.py), the tokenizer trained on the training documents or given
(tokenizer.py), the manifest last (layout.py). Streams: memory is bounded by a batch of documents
whatever the corpus size. `shard=(I, N)` prepares part I of N on one of N machines; the union of
the parts is the one-machine output, and the last part to finish merges the per-part manifests.
"""

import hashlib
import re
import sys
import time

import numpy as np
import sentencepiece as spm
from etils import epath

from idea_prune_jax.data import inputs, layout, records
from idea_prune_jax.data import tokenizer as tokenizer_lib
from idea_prune_jax.data.inputs import DataError

ENCODE_BATCH_CHARS = 1 << 20  # sp.encode takes a list: one call per ~1 MB of text


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


def _open_output(output_dir: str) -> records.Output:
  if not output_dir:
    raise DataError('--output is empty; pass a directory (local or gs://BUCKET/path)')
  path = epath.Path(output_dir)
  if path.exists() and not path.is_dir():
    raise DataError(f'--output={output_dir!r} is a file; pass a directory')
  path.mkdir(parents=True, exist_ok=True)
  return records.Output(output_dir)


def prepare(input_spec: str, output_dir: str, *, tokenizer: str = '', vocab_size: int = 0,
            val_fraction: float = 0.0, val_input: str = '', text_key: str = 'text',
            tfds_data_dir: str = '', split: str = 'auto', shard: tuple[int, int] = (0, 1),
            max_docs: int = 0, progress: bool = True, tokenizer_only: bool = False,
            records_per_shard: int = records.RECORDS_PER_SHARD) -> dict:
  """Prepares part shard[0] of shard[1] into output_dir; returns the merged manifest once every
  part is done (this part's manifest before). See the module docstring and docs/tpu.md."""
  part, parts = _check_args(shard, tokenizer, vocab_size, val_fraction, val_input,
                            tokenizer_only)
  model = tokenizer_lib.read_model(tokenizer) if tokenizer else None
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
      model = tokenizer_lib.train_spm(tokenizer_lib.spm_sample(train_texts), vocab_size)
    out.write_bytes(layout.TOKENIZER, model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    common = {'format': layout.FORMAT, 'input': input_spec, 'val_input': val_input,
              'val_fraction': val_fraction, 'text_key': text_key, 'split': split,
              'max_docs': max_docs, 'tokenizer': layout.TOKENIZER,
              'tokenizer_digest': layout.tokenizer_digest(model),
              'vocab_size': sp.vocab_size(), 'special_ids': tokenizer_lib.special_ids(sp),
              'parts': parts}
    if tokenizer_only:
      return common
    _remove_stale(out, part, parts)
    writers = {s: records.SplitWriter(out, s, part, parts, records_per_shard)
               for s in layout.SPLITS}
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
    splits = {s: layout.summary(w.documents, w.tokens, w.shards) for s, w in writers.items()}
    manifest = {**common, 'part': part, 'splits': splits}
    if parts == 1:
      layout.check_nonempty(manifest)
    out.write_bytes(layout.part_manifest_name(part, parts), layout.to_json(manifest))
    merged = layout.merge(out, parts)
    return merged or manifest
  finally:
    out.close()


def _write(sp, docs, route, writers, progress: bool, desc: str) -> None:
  """Encodes docs in batches and hands each record to the writer its route names (None: drop)."""
  prefix, suffix = tokenizer_lib.document_frame(sp)
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


def _remove_stale(out: records.Output, part: int, parts: int) -> None:
  """This part's files from an earlier (maybe killed) run, and the merged manifest they fed."""
  tag = re.escape(layout.part_tag(part, parts))
  stale = re.compile(rf'((train|validation)-{tag}-\d+\.array_record|manifest-{tag}\.json'
                     rf'|{re.escape(layout.MANIFEST)})(\.tmp-.*)?')
  for name in out.names():
    if stale.fullmatch(name):
      (out.root / name).unlink(missing_ok=True)
