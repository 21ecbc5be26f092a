"""Importance scores against a NumPy reference written out by hand (2 layers x 3 neurons, D=2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idea_prune_jax import importance, masks, structure

S = structure.FFN_STRUCTURE
B1, B2 = 0.85, 0.95


def tiny_tree(seed):
  """{'layers': {'mlp': gate [2,2,3], up [2,2,3], down [2,3,2]}} plus an unrelated leaf."""
  rng = np.random.default_rng(seed)
  mlp = {'gate': rng.normal(size=(2, 2, 3)), 'up': rng.normal(size=(2, 2, 3)),
         'down': rng.normal(size=(2, 3, 2))}
  return {'embed': rng.normal(size=(5, 2)).astype(np.float32),
          'layers': {'mlp': {k: v.astype(np.float32) for k, v in mlp.items()}}}


def reference_norm(a, b):
  """s[l,j] = sqrt(sum_d (ab).gate[l,d,j]^2 + sum_d (ab).up[l,d,j]^2 + sum_d (ab).down[l,j,d]^2)."""
  a, b = a['layers']['mlp'], b['layers']['mlp']
  s = np.zeros((2, 3))
  for l in range(2):
    for j in range(3):
      total = 0.0
      for d in range(2):
        total += (a['gate'][l, d, j] * b['gate'][l, d, j]) ** 2
        total += (a['up'][l, d, j] * b['up'][l, d, j]) ** 2
        total += (a['down'][l, j, d] * b['down'][l, j, d]) ** 2
      s[l, j] = np.sqrt(total)
  return s


def test_coupled_norm_matches_reference():
  p, g = tiny_tree(0), tiny_tree(1)
  np.testing.assert_allclose(importance.coupled_norm(p, g, S)['ffn'], reference_norm(p, g),
                             rtol=1e-6)
  ones = jax.tree.map(np.ones_like, p)
  np.testing.assert_allclose(importance.coupled_norm(p, None, S)['ffn'], reference_norm(p, ones),
                             rtol=1e-6)


@pytest.mark.parametrize('kind', ['platon', 'sensitivity_ema'])
def test_sensitivity_kinds_match_reference_over_three_steps(kind):
  params = [tiny_tree(10 + t) for t in range(3)]
  grads = [tiny_tree(20 + t) for t in range(3)]
  state = importance.init({'ffn': jnp.ones((2, 3))}, kind)
  update = jax.jit(importance.update, static_argnames=('kind', 'structure'))
  ibar, u = np.zeros((2, 3)), np.zeros((2, 3))
  for p, g in zip(params, grads):
    state = update(state, kind, params=p, grads=g, structure=S, beta1=B1, beta2=B2)
    s = reference_norm(p, g)
    ibar = B1 * ibar + (1 - B1) * s
    u = B2 * u + (1 - B2) * np.abs(s - ibar)  # the new ibar, as PLATON
  want = ibar * u if kind == 'platon' else ibar
  np.testing.assert_allclose(importance.scores(state, kind)['ffn'], want, rtol=1e-5)


def test_magnitude_is_stateless_norm_of_current_params():
  p = tiny_tree(3)
  state = importance.init({'ffn': jnp.ones((2, 3))}, 'magnitude')
  assert state == {} and importance.update(state, 'magnitude') == {}
  ones = jax.tree.map(np.ones_like, p)
  np.testing.assert_allclose(importance.scores(state, 'magnitude', params=p, structure=S)['ffn'],
                             reference_norm(p, ones), rtol=1e-6)


def test_activation_ema_matches_reference():
  acts = [np.array([[0.1, 0.5, 0.0], [2.0, 1.0, 0.3]]), np.array([[0.4, 0.2, 0.9], [0., 1., 1.]]),
          np.array([[1.0, 0.0, 0.5], [0.5, 0.5, 0.5]])]
  state = importance.init({'ffn': jnp.ones((2, 3))}, 'activation')
  want = np.zeros((2, 3))
  for t, a in enumerate(acts):
    given = a if t % 2 else {'ffn': a}  # a bare array or a dict name -> array
    state = jax.jit(importance.update, static_argnames='kind')(state, 'activation',
                                                               activations=given, beta1=B1)
    want = B1 * want + (1 - B1) * a
  np.testing.assert_allclose(importance.scores(state, 'activation')['ffn'], want, rtol=1e-6)


def test_activation_from_our_models_sown_intermediates():
  from idea_prune_jax.model.config import ModelConfig
  from idea_prune_jax.model.model import Transformer, init_params
  import flax.linen as nn
  cfg = ModelConfig(vocab_size=16, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=6)
  params = jax.jit(lambda key: nn.unbox(init_params(cfg, key)))(jax.random.key(0))
  _, inter = jax.jit(lambda p: Transformer(cfg).apply({'params': p}, jnp.ones((1, 4), jnp.int32),
                                                      mutable=['intermediates']))(params)
  act = inter['intermediates']['layers']['mlp']['ffn_act']
  state = importance.update(importance.init(masks.init(params, S), 'activation'), 'activation',
                            activations=act)
  assert state['act']['ffn'].shape == (2, 6)
  np.testing.assert_allclose(state['act']['ffn'], (1 - B1) * np.asarray(act), rtol=1e-6)


def test_pruned_neurons_get_zero_sensitivity():
  p, g = tiny_tree(0), tiny_tree(1)
  ffn_mask = {'ffn': jnp.array([[1., 0, 1], [0, 1, 1]])}
  s = importance.coupled_norm(masks.apply(p, ffn_mask, S), masks.apply(g, ffn_mask, S), S)['ffn']
  assert np.all(np.asarray(s)[np.asarray(ffn_mask['ffn']) == 0] == 0)


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="unknown importance kind 'fisher'; use one of platon"):
    importance.init({'ffn': jnp.ones((2, 3))}, 'fisher')
  with pytest.raises(ValueError, match='needs params=, grads= and structure='):
    importance.update(importance.init({'ffn': jnp.ones((2, 3))}), 'platon', params=tiny_tree(0))
  optax_like = {'mu': tiny_tree(0), 'nu': tiny_tree(1)}
  with pytest.raises(ValueError, match='matches 2 leaves'):
    importance.coupled_norm(optax_like, optax_like, S)
