"""Where a run's tokens come from and how they are packed: `DataConfig`."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training reads prepared ArrayRecord shards (`idea-prune prepare-data`); any other source is
  prepared into workdir/data on the first run, once."""
  source: str = 'embedded'  # prepared | embedded | files | tfds
  prepared_dir: str = ''  # source=prepared: a prepare-data --output dir (local or gs://)
  files: str = ''  # source=files: comma-separated paths/globs (text, JSONL, Parquet)
  val_files: str = ''  # source=files: held-out files; else val_fraction of the documents
  val_fraction: float = 0.05  # source=files without val_files: documents held out (by hash)
  val_works: str = 'julius_caesar,tempest'  # embedded corpus: works held out for validation
  tokenizer: str = ''  # a SentencePiece .model; empty trains one on the training split
  tfds_name: str = ''
  tfds_data_dir: str = ''
  tfds_train_split: str = 'train'
  tfds_val_split: str = 'validation'
  text_key: str = 'text'  # JSONL/Parquet/TFDS field holding the text
  max_docs: int = 0  # cap on inputs (records, files, works) read from a source (0 = all)
  split: str = 'auto'  # texts/records into documents: auto | file | paragraphs | chunk:N (split.py)
  seq_len: int = 128
  attention: str = 'document'  # document: masked per document | causal: one sequence per row
  shards: int = 0  # document shards of the train stream; 0 = one per process (see stream.py)
  read_threads: int = 2  # grain threads reading records
  prefetch: int = 2  # batches prefetched by a thread (0: none)
  workers: int = 0  # grain worker processes (0: read in the training process)
