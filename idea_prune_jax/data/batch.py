"""The batch a step reads, spelled once: `Batch`, the one constructor `make`, and its builders.

Every batch in the package (grain's packed rows, plain token windows, abstract shapes for ahead-of-
time compilation, benchmarks and tests) is made by `make`, so the keys exist in one place. The
module is numpy-only: the model imports it for the key names without loading the data pipeline.
"""

from typing import Any, TypedDict

import numpy as np

Rows = Any  # [B, L]: a numpy array, a jax.Array or a jax.ShapeDtypeStruct


class Batch(TypedDict, total=False):
  """Next-token pairs of B rows of L positions; the packing keys only for packed documents."""
  inputs: Rows  # int32 token ids
  targets: Rows  # int32, the token after each input
  weights: Rows  # float32: 1 where the target counts in the loss (0: padding, document borders)
  segment_ids: Rows  # int32, packed rows: which document a position is in (0: padding)
  positions: Rows  # int32, packed rows: the position within its document (RoPE restarts)


# The optional keys: a batch has both (attention within documents) or neither (one causal row).
PACKING_KEYS = ('segment_ids', 'positions')


def make(inputs: Rows, targets: Rows, weights: Rows, segment_ids: Rows | None = None,
         positions: Rows | None = None) -> Batch:
  """The one constructor of a Batch; packed documents pass both segment_ids and positions."""
  batch = Batch(inputs=inputs, targets=targets, weights=weights)
  if segment_ids is not None:
    batch.update(segment_ids=segment_ids, positions=positions)
  return batch


def from_packed(packed: dict, document_attention: bool) -> Batch:
  """grain's packed [r, L+1] rows (tokens, tokens_segment_ids, tokens_positions) -> a Batch of
  length L, with segment_ids/positions when attention stays within documents."""
  tokens, segments = packed['tokens'], packed['tokens_segment_ids']
  weights = segments[:, 1:] != 0  # padding (segment 0) is never a target
  if not document_attention:
    return make(tokens[:, :-1], tokens[:, 1:], weights.astype(np.float32))
  # A document's first token is not predicted from the previous document's last one.
  weights &= segments[:, 1:] == segments[:, :-1]
  return make(tokens[:, :-1], tokens[:, 1:], weights.astype(np.float32),
              segments[:, :-1], packed['tokens_positions'][:, :-1])


def from_rows(rows: np.ndarray) -> Batch:
  """Unpacked [B, L+1] rows -> a Batch: inputs all but the last token, targets all but the first."""
  return make(rows[:, :-1], rows[:, 1:], np.ones(rows[:, 1:].shape, np.float32))


def windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """[n, seq_len+1] non-overlapping windows of a token stream; the ragged tail is dropped."""
  n = len(tokens) // (seq_len + 1)
  return tokens[:n * (seq_len + 1)].reshape(n, seq_len + 1)


def concatenate(parts: list[Batch]) -> Batch:
  """Batches of the same keys stacked along the rows, in order."""
  return Batch(**{k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def global_batch(local, sharding):
  """This host's numpy rows -> one global jax.Array (per entry if given a Batch).

  Hosts hold disjoint equal row blocks (`stream.host_shards`), so the global batch is
  process_count times the local one. Saying so makes jax reject a mesh whose batch shards split
  otherwise (e.g. tensor across hosts: every host holds all rows) instead of building a smaller
  batch.
  """
  import jax  # lazy: the data pipeline itself is numpy-only

  def one(rows):
    shape = (rows.shape[0] * jax.process_count(), *rows.shape[1:])
    return jax.make_array_from_process_local_data(sharding, rows, shape)

  return {k: one(v) for k, v in local.items()} if isinstance(local, dict) else one(local)
