"""A prepared directory: its file names and its manifest (written per part, merged, read, checked).

    DIR/tokenizer.model
    DIR/{train,validation}-PPPPP-of-NNNNN-SSSSS.array_record   documents of part P of N
    DIR/manifest-PPPPP-of-NNNNN.json                           one per part, as it finishes
    DIR/manifest.json                                          all parts merged, written last

A directory is read only through `manifest.json`, so one that is still being prepared (or whose
prepare was killed) is never mistaken for a whole one.
"""

import hashlib
import json
import re

from etils import epath

from idea_prune_jax.data.inputs import DataError

FORMAT = 'idea_prune_jax.prepared/1'
SPLITS = ('train', 'validation')
MANIFEST = 'manifest.json'
TOKENIZER = 'tokenizer.model'

# What every part's manifest must share with the others to be merged into one directory.
AGREE = ('format', 'input', 'val_input', 'val_fraction', 'text_key', 'split', 'max_docs',
         'tokenizer', 'tokenizer_digest', 'vocab_size', 'special_ids', 'parts')


def part_tag(part: int, parts: int) -> str:
  return f'{part:05d}-of-{parts:05d}'


def part_manifest_name(part: int, parts: int) -> str:
  return f'manifest-{part_tag(part, parts)}.json'


def tokenizer_digest(model: bytes) -> str:
  """The manifest's fingerprint of the tokenizer: parts prepared with another one do not merge."""
  return hashlib.sha256(model).hexdigest()[:16]


def summary(documents: int, tokens: int, shards: list[str]) -> dict:
  """A split in the manifest, with its mean document length: what judges mixing (split.py)."""
  return {'documents': documents, 'tokens': tokens,
          'mean_document_tokens': round(tokens / max(documents, 1), 1), 'shards': list(shards)}


def to_json(obj) -> bytes:
  return (json.dumps(obj, indent=1) + '\n').encode()


def check_nonempty(manifest: dict) -> None:
  """DataError naming the flag to change unless both splits hold documents."""
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


def merge(out, parts: int) -> dict | None:
  """manifest.json from all per-part manifests in `out` (a records.Output), or None while some
  part is missing."""
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
  if tokenizer_digest((out.root / TOKENIZER).read_bytes()) != first['tokenizer_digest']:
    raise DataError(f'{out.root / TOKENIZER}: not the tokenizer the parts were prepared with; '
                    'prepare every part with the same --tokenizer')
  merged = {k: first[k] for k in first if k not in ('part', 'splits')}
  total = lambda s, key: sum(m['splits'][s][key] for m in manifests)
  merged['splits'] = {s: summary(total(s, 'documents'), total(s, 'tokens'),
                                 [n for m in manifests for n in m['splits'][s]['shards']])
                      for s in SPLITS}
  check_nonempty(merged)
  out.write_bytes(MANIFEST, to_json(merged))
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
