"""Model: causality, parameter count, RoPE convention, logical axis names."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idea_prune_jax.model import model as model_lib
from idea_prune_jax.model.config import ModelConfig

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)


@pytest.mark.parametrize('cfg', [
    TINY,
    dataclasses.replace(TINY, tie_embeddings=False),
    dataclasses.replace(TINY, n_kv_heads=4, n_layers=3, ffn_dim=40),
    dataclasses.replace(TINY, n_kv_heads=1, remat_policy='full'),
])
def test_param_count_matches_initialised_tree(cfg):
  params = nn.unbox(model_lib.init_params(cfg, jax.random.key(0)))
  assert sum(x.size for x in jax.tree.leaves(params)) == model_lib.param_count(cfg)


@pytest.mark.parametrize('tied', [True, False])
def test_flops_per_token_is_6x_matmul_params_plus_attention(tied):
  cfg = dataclasses.replace(TINY, tie_embeddings=tied)
  # Matmul weights: every param but the norm scales and (untied) the embedding table, which is
  # a lookup; tied, the table is the LM head's matmul.
  norms = (2 * cfg.n_layers + 1) * cfg.d_model
  matmul = model_lib.param_count(cfg) - norms - (0 if tied else cfg.vocab_size * cfg.d_model)
  attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 128
  assert model_lib.flops_per_token(cfg, 128) == 6 * matmul + attention


def test_paper_pair_param_counts():
  trunk = ModelConfig(vocab_size=32000, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=16)
  assert round(model_lib.param_count(dataclasses.replace(trunk, ffn_dim=5632)) / 1e9, 2) == 1.30
  assert round(model_lib.param_count(dataclasses.replace(trunk, ffn_dim=15872)) / 1e9, 2) == 2.81


def test_no_gradient_from_future_tokens():
  # Untied, so the LM head's own gradient does not touch embedding rows.
  cfg, L, i = dataclasses.replace(TINY, tie_embeddings=False), 10, 4
  params = nn.unbox(model_lib.init_params(cfg, jax.random.key(1)))
  # Positions <= i use tokens 0..i; later positions use tokens no earlier position uses.
  tokens = jnp.arange(L)[None, :] + jnp.where(jnp.arange(L) > i, 32, 0)[None, :]

  def logits_at_i(embed):
    p = {**params, 'embed': embed}
    return model_lib.Transformer(cfg).apply({'params': p}, tokens)[0, i].sum()

  g_embed = jax.grad(logits_at_i)(params['embed'])
  future_rows = np.asarray(tokens[0, i + 1:])
  past_rows = np.asarray(tokens[0, :i + 1])
  assert np.all(g_embed[future_rows] == 0.0)
  assert np.all(np.abs(g_embed[past_rows]).sum(-1) > 0)


def test_rope_is_hugging_face_half_split():
  x = np.random.RandomState(0).randn(1, 5, 2, 8).astype(np.float32)
  pos = np.arange(5)
  inv_freq = 1.0 / (10000 ** (np.arange(0, 8, 2) / 8))
  ang = np.concatenate([pos[:, None] * inv_freq] * 2, axis=-1)[None, :, None, :]
  rotate_half = np.concatenate([-x[..., 4:], x[..., :4]], axis=-1)
  expected = x * np.cos(ang) + rotate_half * np.sin(ang)
  np.testing.assert_allclose(model_lib.rope(jnp.asarray(x), jnp.arange(5), 10000.0), expected,
                             atol=1e-5)


def test_every_param_has_logical_axis_names():
  specs = nn.get_partition_spec(model_lib.init_params(TINY, jax.random.key(0)))
  params = nn.unbox(model_lib.init_params(TINY, jax.random.key(0)))
  for spec, leaf in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                        jax.tree.leaves(params)):
    assert len(spec) == leaf.ndim and all(isinstance(a, str) for a in spec)


def test_gqa_equals_repeated_kv_mha():
  cfg = dataclasses.replace(TINY, n_layers=1)
  mha = dataclasses.replace(cfg, n_kv_heads=4)
  params = nn.unbox(model_lib.init_params(cfg, jax.random.key(2)))
  k_per, group = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
  repeat = lambda w: jnp.repeat(w.reshape(*w.shape[:-1], cfg.n_kv_heads, k_per), group,
                                axis=-2).reshape(*w.shape[:-1], -1)
  attn = params['layers']['attn']
  mha_params = {**params, 'layers': {**params['layers'], 'attn': {
      **attn, 'k': repeat(attn['k']), 'v': repeat(attn['v'])}}}
  tokens = jnp.arange(12)[None, :] % cfg.vocab_size
  out = model_lib.Transformer(cfg).apply({'params': params}, tokens)
  ref = model_lib.Transformer(mha).apply({'params': mha_params}, tokens)
  np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_packed_document_logits_equal_the_document_alone(remat):
  cfg = dataclasses.replace(TINY, remat_policy=remat)
  params = nn.unbox(model_lib.init_params(cfg, jax.random.key(1)))
  model = model_lib.Transformer(cfg)
  docs = [np.array([5, 9, 2, 7, 11]), np.array([3, 3, 8, 1, 4, 6, 12])]
  row = jnp.asarray(np.concatenate(docs))[None]
  segment_ids = jnp.asarray(np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)]))
  positions = jnp.asarray(np.concatenate([np.arange(len(d)) for d in docs]))
  packed = model.apply({'params': params}, row, segment_ids=segment_ids[None],
                       positions=positions[None])[0]
  start = 0
  for doc in docs:
    alone = model.apply({'params': params}, jnp.asarray(doc)[None])[0]
    np.testing.assert_allclose(packed[start:start + len(doc)], alone, atol=2e-5)
    start += len(doc)
  # Without segment ids the second document attends to the first: the logits differ.
  causal = model.apply({'params': params}, row)[0]
  assert float(jnp.abs(causal[len(docs[0]):] - packed[len(docs[0]):]).max()) > 1e-3


def test_head_dim_can_differ_from_d_model_over_heads():
  wide = dataclasses.replace(TINY, head_dim=2 * TINY.head_dim)
  params = nn.unbox(model_lib.init_params(wide, jax.random.key(0)))
  q, o = params['layers']['attn']['q'], params['layers']['attn']['o']
  assert q.shape[-1] == o.shape[-2] == wide.n_heads * wide.head_dim != wide.d_model
  assert sum(x.size for x in jax.tree.leaves(params)) == model_lib.param_count(wide)
  logits = model_lib.Transformer(wide).apply({'params': params}, jnp.zeros((1, 8), jnp.int32))
  assert logits.shape == (1, 8, wide.vocab_size)
