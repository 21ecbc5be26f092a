"""Memory knobs change what is stored, never the numbers: chunked LM loss and remat policies."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idea_prune_jax.data import batch as batch_lib
from idea_prune_jax.model import model as model_lib
from idea_prune_jax.train import step as step_lib
from idea_prune_jax.model.config import ModelConfig

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)


def _batch(B=2, L=16, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  weights = (jnp.arange(L) < L - 3).astype(jnp.float32) * jnp.ones((B, 1))  # padded tails
  return batch_lib.make(jax.random.randint(k1, (B, L), 0, 64),
                        jax.random.randint(k2, (B, L), 0, 64), weights)


def _loss_and_grads(cfg, batch):
  params = nn.unbox(model_lib.init_params(TINY, jax.random.key(1)))
  fn = lambda p: step_lib.lm_loss(p, batch, model_lib.Transformer(cfg))[0]
  return jax.value_and_grad(fn)(params)


@pytest.mark.parametrize('tied', [True, False])
def test_chunked_loss_equals_unchunked_loss_and_grads(tied):
  batch, cfg = _batch(), dataclasses.replace(TINY, tie_embeddings=tied)
  params = nn.unbox(model_lib.init_params(cfg, jax.random.key(1)))
  fn = lambda p, c: step_lib.lm_loss(p, batch, model_lib.Transformer(c))[0]
  loss, grads = jax.value_and_grad(fn)(params, cfg)
  loss_c, grads_c = jax.value_and_grad(fn)(params, dataclasses.replace(cfg, loss_chunk=4))
  np.testing.assert_allclose(loss_c, loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_chunked_cross_entropy_never_builds_whole_logits():
  # The jaxpr of the chunked loss holds no [B, L, V] value, only [B, C, V] ones.
  B, L, D, V, C = 2, 16, 8, 64, 4
  cfg = dataclasses.replace(TINY, d_model=D, vocab_size=V)
  fn = lambda h, w: step_lib.chunked_cross_entropy(
      h, w, jnp.zeros((B, L), jnp.int32), jnp.ones((B, L)), cfg, chunk=C)[0]
  jaxpr = jax.make_jaxpr(jax.grad(fn))(jnp.ones((B, L, D)), jnp.ones((D, V)))
  shapes = {tuple(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars}
  for sub in jax.extend.core.subjaxprs(jaxpr.jaxpr):
    shapes |= {tuple(v.aval.shape) for eqn in sub.eqns for v in eqn.outvars}
  assert (B, L, V) not in shapes
  assert any(s[-1] == V and C in s for s in shapes)


@pytest.mark.parametrize('policy', ['full', 'dots_saveable', 'save_attn_proj'])
def test_remat_policies_give_the_same_grads(policy):
  batch = _batch()
  loss, grads = _loss_and_grads(TINY, batch)
  loss_r, grads_r = _loss_and_grads(dataclasses.replace(TINY, remat_policy=policy), batch)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_a_checkpoint_resumes_under_other_memory_settings():
  from idea_prune_jax.train import loop as checkpoint
  from idea_prune_jax.settings import ConfigError
  meta = {'model': checkpoint.model_meta(TINY)}
  checkpoint.check_same_model(meta, dataclasses.replace(
      TINY, remat_policy='full', attention='splash', loss_chunk=4), 'W')
  with pytest.raises(ConfigError, match='ffn_dim'):
    checkpoint.check_same_model(meta, dataclasses.replace(TINY, ffn_dim=40), 'W')
