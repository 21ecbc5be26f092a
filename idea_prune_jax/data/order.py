"""The train documents' order: every epoch its own permutation, seeded by a hash of (seed, epoch).

grain's `MapDataset.shuffle(seed).repeat()` seeds epoch e with seed + e, so seed s + 1 reads epoch
e exactly as seed s reads epoch e + 1: the seeds of a comparison would share data orders, shifted
by an epoch. Hashing (seed, epoch) gives every pair its own order. The order is a pure function
of the index (grain's index_shuffle, a Feistel permutation: no table), so memory does not grow
with the corpus and grain's iterator state (an index) still checkpoints the position exactly.
"""

import functools
import sys

import grain
import numpy as np

_ROUNDS = 4  # as grain's own shuffle


@functools.lru_cache(maxsize=64)
def epoch_seed(seed: int, epoch: int) -> int:
  """A 32-bit permutation seed for (seed, epoch), unrelated for any two pairs (SeedSequence)."""
  return int(np.random.SeedSequence([seed % 2**32, epoch]).generate_state(1)[0])


def document_index(seed: int, index: int, n: int) -> int:
  """The document read at position `index` of the endless stream over n documents."""
  epoch, position = divmod(index, n)
  return grain.experimental.index_shuffle(position, max_index=n - 1, seed=epoch_seed(seed, epoch),
                                          rounds=_ROUNDS)


class EpochShuffled(grain.MapDataset):
  """`parent` repeated forever, epoch e in the order of the permutation seeded by (seed, e)."""

  def __init__(self, parent: grain.MapDataset, seed: int):
    super().__init__(parent)
    self._seed, self._n = seed % 2**32, len(parent)

  def __len__(self) -> int:
    return sys.maxsize  # endless, as grain's repeat(None)

  def __str__(self) -> str:
    return f'EpochShuffled(seed={self._seed})'

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[document_index(self._seed, index, self._n)]

  def _getitems(self, indices):
    # One batched read of the parent (ArrayRecord reads several records per call).
    documents = [document_index(self._seed, i, self._n) for i in indices]
    return self._parent._getitems(documents)  # noqa: SLF001  (grain's own shuffle does this)
