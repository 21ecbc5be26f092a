"""The SentencePiece tokenizer: trained here (reproducibly) or read from a file, and how a document
is framed with it: `[bos] + ids + [eos]`, each where the tokenizer has it."""

import io
from typing import Iterator

import sentencepiece as spm
from etils import epath

from idea_prune_jax.data import layout
from idea_prune_jax.data.inputs import DataError

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


def spm_sample(docs: Iterator[str], max_chars: int = SPM_MAX_CHARS) -> list[str]:
  """The first max_chars characters of docs as SentencePiece sentences: the training text."""
  sentences, n_chars = [], 0
  for text in docs:
    for chunk in spm_chunks(text):
      sentences.append(chunk)
      n_chars += len(chunk)
      if n_chars >= max_chars:
        return sentences
  return sentences


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


def read_model(path: str) -> bytes:
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


def from_prepared(prepared_dir: str) -> spm.SentencePieceProcessor:
  """The tokenizer a prepared directory was written with."""
  return spm.SentencePieceProcessor(
      model_proto=(epath.Path(prepared_dir) / layout.TOKENIZER).read_bytes())


def special_ids(sp: spm.SentencePieceProcessor) -> dict:
  return {'pad': sp.pad_id(), 'unk': sp.unk_id(), 'bos': sp.bos_id(), 'eos': sp.eos_id()}


def document_frame(sp: spm.SentencePieceProcessor) -> tuple[list[int], list[int]]:
  """(prefix, suffix) around a document's ids: [bos], [eos], each where the tokenizer has it."""
  return ([sp.bos_id()] if sp.bos_id() >= 0 else []), ([sp.eos_id()] if sp.eos_id() >= 0 else [])


def document_ids(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
  """A document's ids as prepare-data writes them: document_frame around the text's ids."""
  prefix, suffix = document_frame(sp)
  return prefix + sp.encode(text) + suffix
