"""What a run reads: the prepared data's tokenizer, this host's train stream and val batches.

Every source (embedded corpus, text/JSONL/Parquet files, TFDS) goes through `prepare.prepare`
once (provision.py); training only reads a prepared directory (layout.py), streamed through grain
(stream.py).
"""

from typing import NamedTuple

import sentencepiece as spm
from absl import logging

from idea_prune_jax.data import batch as batch_lib
from idea_prune_jax.data import layout, provision, records, split, stream
from idea_prune_jax.data import tokenizer as tokenizer_lib
from idea_prune_jax.data.config import DataConfig
from idea_prune_jax.data.inputs import DataError


class Data(NamedTuple):
  """What the trainer needs: tokenizer, this host's train batches and val batches, sizes."""
  sp: spm.SentencePieceProcessor
  train: stream.TrainBatches
  val: list[batch_lib.Batch]
  manifest: dict
  prepared_dir: str


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
  path = provision.prepared_dir(d, vocab_size, workdir, process_index == 0, barrier)
  manifest = layout.read_manifest(path)
  layout.check_vocab(manifest, vocab_size)
  _, n_shards = stream.host_shards(d.shards, batch_size, process_index, process_count)
  mixing = split.mixing_problem(manifest['splits']['train'], batch_size // n_shards,
                                d.seq_len + 1, '--config.data.split')
  if mixing and process_index == 0:
    logging.warning('%s', mixing)
  local = provision.local_copy(path)
  train = stream.train_batches(d, batch_size, seed, local, manifest, process_index, process_count)
  val = stream.val_batches(records.source(local, manifest, 'validation'),
                           stream.Packing.from_config(d), batch_size, eval_batches, process_index,
                           process_count)
  return Data(tokenizer_lib.from_prepared(local), train, val, manifest, path)
