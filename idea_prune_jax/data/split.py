"""How an input's text becomes documents (prepare-data --split, config.data.split), and whether
the documents are short enough for a shuffled, packed stream to mix them.

  auto        records (JSONL, Parquet, tfds) as they are; a plain text file or embedded work is cut
              at scene headings, then into chunks of at most AUTO_CHUNK_CHARS characters
  file        one document per file, record or work, however long
  paragraphs  one document per paragraph (text up to and including a run of blank lines)
  chunk:N     paragraphs joined into documents of at most N characters (a longer paragraph is cut
              at line ends, a longer line anywhere)

Every rule is lossless: a text's documents, joined, are the text. Pure standard library, so the
config can check a rule without loading the data path.
"""

import re
from typing import Iterator, NamedTuple

RULES = ('auto', 'file', 'paragraphs', 'chunk:N')
# About one long scene; the embedded corpus then averages 1,546 tokens a document at vocab
# 4096, under the 2,064 tokens of the tiny demo's step (DATA.md, "Documents").
AUTO_CHUNK_CHARS = 8_000
# A scene starts at a line 'SCENE II.' / 'Scene 3' (an 'ACT I.' line right above it comes along).
# Capitals only: 'scene I would see' in verse is not a heading.
_SCENE = re.compile(r'^[ \t]*(?:(?:ACT|Act)\b[^\n]*?(?:\n[ \t\r\n]*)?)?(?:SCENE|Scene)[ \t]+'
                    r'(?:[IVXL]+|\d+)\b', re.MULTILINE)
_PARAGRAPH_END = re.compile(r'\n(?:[ \t\r]*\n)+')
# A one-line paragraph without lower case ('XIII', 'CHAPTER IV') heads what follows it.
_HEADING = re.compile(r'[^a-z\n]{1,40}\n(?:[ \t\r]*\n)*')
# (rows, tokens per row) of config.base()'s step, the tiny demo's: prepare-data, which knows no
# batch, judges mixing against it.
DEFAULT_STEP = (16, 129)


class Rule(NamedTuple):
  kind: str  # 'auto' | 'file' | 'paragraphs' | 'chunk'
  max_chars: int = 0  # chunk: the most characters a document holds


class SplitError(ValueError):
  """A split rule that does not parse; the message names the flag and the rules."""


def parse(text: str, flag: str = '--split') -> Rule:
  """'auto' | 'file' | 'paragraphs' | 'chunk:N' -> Rule; a one-line SplitError otherwise."""
  text = str(text).strip()
  if text in ('auto', 'file', 'paragraphs'):
    return Rule(text)
  found = re.fullmatch(r'chunk:(\d+)', text)
  if found and int(found.group(1)) >= 1:
    return Rule('chunk', int(found.group(1)))
  raise SplitError(f'{flag}={text!r}: use {", ".join(RULES)} (N characters >= 1)')


def _cut(text: str, starts) -> list[str]:
  bounds = [0, *(s for s in starts if 0 < s < len(text)), len(text)]
  return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def scenes(text: str) -> list[str]:
  """The text cut before each scene heading (one piece when it has none)."""
  return _cut(text, [m.start() for m in _SCENE.finditer(text)])


def paragraphs(text: str) -> list[str]:
  """The text cut after each run of blank lines, which stays with the paragraph before it."""
  return _cut(text, [m.end() for m in _PARAGRAPH_END.finditer(text)])


def _units(text: str, max_chars: int) -> Iterator[str]:
  """Paragraphs, with those over max_chars cut into lines and lines into max_chars slices."""
  for paragraph in paragraphs(text):
    if len(paragraph) <= max_chars:
      yield paragraph
      continue
    for line in paragraph.splitlines(keepends=True):
      yield from (line[i:i + max_chars] for i in range(0, len(line), max_chars))


def chunks(text: str, max_chars: int) -> list[str]:
  """Consecutive paragraphs joined greedily into pieces of at most max_chars characters; a
  heading at the end of a piece moves on to open the next one."""
  out, current, last = [], '', ''
  for unit in _units(text, max_chars):
    if current and len(current) + len(unit) > max_chars:
      moves = (_HEADING.fullmatch(last) and len(last) < len(current)
               and len(last) + len(unit) <= max_chars)
      head = last if moves else ''
      out.append(current[:len(current) - len(head)])
      current = head
    current += unit
    last = unit
  return out + [current] if current else out


def documents(text: str, rule: Rule, record: bool) -> list[str]:
  """One input document (a record if `record`, else a text file or work) as the rule cuts it."""
  if rule.kind == 'file' or (rule.kind == 'auto' and record):
    return [text]
  if rule.kind == 'paragraphs':
    return paragraphs(text)
  if rule.kind == 'chunk':
    return chunks(text, rule.max_chars)
  return [piece for scene in scenes(text) for piece in chunks(scene, AUTO_CHUNK_CHARS)]


def mixing_problem(train: dict, rows_per_step: int, row_tokens: int, flag: str) -> str | None:
  """Why these training documents do not mix from step to step (None if they do).

  `train` is a manifest split ({'documents', 'tokens'}). Packing lays shuffled documents end to
  end and a step takes the next rows_per_step rows of each shard's stream, so when the mean
  document is longer than those rows, consecutive steps continue the same documents (the
  embedded corpus as 40 whole works: one play for ~20 steps of the tiny demo).
  """
  documents, tokens = train['documents'], train['tokens']
  mean, step = tokens / max(documents, 1), rows_per_step * row_tokens
  if mean <= step:
    return None
  return (f'the {documents:,} training documents average {mean:,.0f} tokens, more than a step '
          f'reads ({rows_per_step} rows x {row_tokens} = {step:,} tokens): consecutive steps '
          f'train on the same documents; cut them smaller, e.g. {flag}=chunk:4000')
