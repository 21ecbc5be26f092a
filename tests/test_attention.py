"""Attention implementations: splash (Pallas interpret mode on CPU) equals the XLA path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idea_prune_jax.model import attention


def _qkv(B=2, L=256, H=2, KV=2, K=32, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (B, L, H, K)), jax.random.normal(kk, (B, L, KV, K)),
          jax.random.normal(kv, (B, L, KV, K)))


def _segments(B, L):
  # Three documents in row 0, two in row 1 (boundaries off the 128-token tiles).
  cuts = np.array([[0, 100, 200], [0, 150, L]])
  ids = (np.arange(L)[None, :, None] >= cuts[:, None, :]).sum(-1)
  return jnp.asarray(ids[:B], jnp.int32)


@pytest.mark.parametrize('kv_heads,packed', [(2, False), (1, True)])  # MHA; GQA with documents
def test_splash_equals_xla_forward_and_grads(kv_heads, packed):
  # Two 128-token tiles: masked, partly masked (diagonal) and full blocks all occur.
  q, k, v = _qkv(KV=kv_heads)
  seg = _segments(2, 256) if packed else None
  w = jax.random.normal(jax.random.key(9), q.shape)  # a loss that weighs every output

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v, seg) * w)

  splash = lambda q, k, v, s: attention.splash_attention(q, k, v, s, interpret=True, block=128)
  out_s = splash(q, k, v, seg)
  out_x = attention.xla_attention(q, k, v, seg)
  np.testing.assert_allclose(out_s, out_x, atol=2e-5, rtol=2e-5)
  grads_s = jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
  grads_x = jax.grad(loss(attention.xla_attention), argnums=(0, 1, 2))(q, k, v)
  for gs, gx in zip(grads_s, grads_x):
    np.testing.assert_allclose(gs, gx, atol=1e-4, rtol=1e-4)


def test_segment_ids_mask_across_documents():
  # The reference splash is compared against: no token sees another document's values.
  q, k, v = _qkv(B=1, L=16, H=2, KV=1)
  seg = jnp.asarray((np.arange(16) >= 7)[None].astype(np.int32))
  v2 = v.at[:, :7].set(0.0)  # change document 0 only
  a, b = attention.xla_attention(q, k, v, seg), attention.xla_attention(q, k, v2, seg)
  np.testing.assert_allclose(a[:, 7:], b[:, 7:], atol=1e-6)
  assert not np.allclose(a[:, :7], b[:, :7])


def test_auto_resolves_by_platform():
  assert attention.resolve('auto', 'tpu', 2048) == 'splash'
  assert attention.resolve('auto', 'tpu', 100) == 'xla'  # splash needs 128-token tiles
  assert attention.resolve('auto', 'tpu', 2048, kv_heads=2, head_shards=4) == 'xla'
  assert attention.resolve('auto', 'gpu', 2048, 'bfloat16') == 'cudnn'
  assert attention.resolve('auto', 'gpu', 2048, 'float32') == 'xla'
  assert attention.resolve('auto', 'cpu', 2048) == 'xla'
  assert attention.resolve('splash', 'cpu', 2048) == 'splash'
