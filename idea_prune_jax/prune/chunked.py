"""Sums over sequence chunks in a checkpointed scan; pure (jax only).

The one implementation behind the chunked LM loss (`train.chunked_cross_entropy`) and the chunked
KD loss (`distill.chunked_kd_loss`): both reduce [B, L, V] logits to a few sums, and both would
rather build those logits one [B, C, V] chunk at a time.
"""

import jax
import jax.numpy as jnp


def sum_over_chunks(token_sums, arrays_BxL, chunk: int):
  """`token_sums(*arrays_BxL)`, computed `chunk` sequence positions at a time and added up.

  token_sums: arrays cut to [B, C, ...] -> a pytree of sums over their positions (a summed NLL
  and a token count, say); it must add up over positions. arrays_BxL: [B, L, ...] arrays. chunk 0
  or >= L: one call on the whole arrays. Otherwise chunk must divide L (callers check, in their
  own words).
  """
  B, L = arrays_BxL[0].shape[:2]
  if chunk == 0 or chunk >= L:
    return token_sums(*arrays_BxL)
  n = L // chunk
  # Chunks along the sequence, not the batch: the batch axis stays whole, so its data sharding
  # is untouched; [n, B, C, ...] lets scan walk the leading axis.
  to_chunks = lambda x: jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)
  chunks = tuple(to_chunks(x) for x in arrays_BxL)

  # Checkpointed body: the backward pass recomputes a chunk's logits instead of keeping n chunks
  # of [B, C, V] alive, which would undo the chunking.
  @jax.checkpoint
  def body(carry, chunk_arrays):
    return jax.tree.map(jnp.add, carry, token_sums(*chunk_arrays)), None

  sums_shape = jax.eval_shape(token_sums, *(c[0] for c in chunks))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
  total, _ = jax.lax.scan(body, zeros, chunks)
  return total
