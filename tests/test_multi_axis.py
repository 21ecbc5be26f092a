"""Pruning every axis (KV groups, query heads, hidden size, FFN, layers): masked == shrunk."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from idea_prune_jax import importance, masks, prune_optimizer, schedules, structure
from idea_prune_jax.model.config import ModelConfig
from idea_prune_jax.model.model import Transformer, init_params
from idea_prune_jax.prune.errors import PruneError

# 2 KV groups of 2 query heads, head_dim 4 (d_model / n_heads), FFN 12.
CFG = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=12)
TOKENS = jnp.array([[1, 5, 9, 3, 7, 2], [4, 4, 8, 31, 0, 6]], jnp.int32)
KEEP = {'ffn': 5, 'kv_groups': 1, 'heads': 1, 'hidden': 10, 'layers': 1}


def llama(cfg, units=structure.UNIT_KINDS):
  return structure.llama(n_kv_heads=cfg.n_kv_heads, heads_per_group=cfg.n_heads // cfg.n_kv_heads,
                         head_dim=cfg.head_dim, tie_embeddings=cfg.tie_embeddings, units=units)


@functools.cache
def params_of(cfg):
  return jax.jit(lambda key: nn.unbox(init_params(cfg, key)))(jax.random.key(0))


def forward(cfg, params, unit_masks=None):
  hidden_kept = None if unit_masks is None or 'hidden' not in unit_masks else jnp.sum(
      unit_masks['hidden'])
  return Transformer(cfg).apply({'params': params}, TOKENS, hidden_kept=hidden_kept)


def random_masks(params, s, seed=1):
  """Masks keeping KEEP[unit] random neurons per row (per layer, per group)."""
  ones = masks.init(params, s)
  keys = jax.random.split(jax.random.key(seed), len(ones))
  scores = {n: jax.random.uniform(k, m.shape) for k, (n, m) in zip(keys, ones.items())}
  return masks.refresh(ones, scores, {n: KEEP[n] for n in ones})


@pytest.mark.parametrize('units,tie', [(('ffn',), True), (('kv_groups',), True),
                                       (('heads',), True), (('hidden',), True), (('layers',), True),
                                       (('hidden',), False), (structure.UNIT_KINDS, True),
                                       (structure.UNIT_KINDS, False)])
def test_masked_logits_equal_shrunk_logits(units, tie):
  cfg = ModelConfig(**{**CFG.__dict__, 'tie_embeddings': tie})
  params, s = params_of(cfg), llama(cfg, units)
  unit_masks = random_masks(params, s)
  masked = forward(cfg, masks.apply(params, unit_masks, s), unit_masks)
  small_params, small_cfg = masks.shrink_model(params, unit_masks, s, cfg)
  want = {'ffn': ('ffn_dim', 5), 'kv_groups': ('n_kv_heads', 1), 'hidden': ('d_model', 10),
          'layers': ('n_layers', 1)}
  for u in units:
    if u in want:
      assert getattr(small_cfg, want[u][0]) == want[u][1]
  if 'heads' in units:
    assert small_cfg.n_heads == small_cfg.n_kv_heads  # one query head kept per group
  assert small_cfg.head_dim == 4
  shapes = jax.tree.map(jnp.shape, params_of(small_cfg))
  assert jax.tree.map(jnp.shape, small_params) == shapes
  shrunk = forward(small_cfg, small_params)
  np.testing.assert_allclose(masked, shrunk, atol=1e-5, rtol=0)
  assert not np.allclose(masked, forward(cfg, params), atol=1e-4)
  if 'hidden' in units:  # RMSNorm over all d_model channels would not match the shrunk model
    plain = forward(cfg, masks.apply(params, unit_masks, s))
    assert not np.allclose(plain, shrunk, atol=1e-4)


def test_grouped_importance_sums_each_head_of_each_group():
  params = params_of(CFG)
  grads = jax.tree.map(lambda p: jnp.cos(p * 7.0), params)
  s = llama(CFG, ('kv_groups', 'heads'))
  got = importance.coupled_norm(params, grads, s)
  assert got['kv_groups'].shape == (2, 2) and got['heads'].shape == (2, 2, 2)
  prod = jax.tree.map(lambda p, g: np.asarray(p * g), params, grads)['layers']['attn']
  q = prod['q'].reshape(2, 16, 2, 2, 4)  # [L, D, KV, heads per group, head_dim]
  o = prod['o'].reshape(2, 2, 2, 4, 16)
  heads = (q ** 2).sum((1, 4)) + (o ** 2).sum((3, 4))
  np.testing.assert_allclose(got['heads'], np.sqrt(heads), rtol=1e-5)
  kv = heads.sum(-1) + (prod['k'].reshape(2, 16, 2, 4) ** 2).sum((1, 3)) + (
      prod['v'].reshape(2, 16, 2, 4) ** 2).sum((1, 3))
  np.testing.assert_allclose(got['kv_groups'], np.sqrt(kv), rtol=1e-5)


def test_maxtext_layout_shrinks_like_the_flat_one():
  """MaxText's scanned attention: query [D, L, H, hd], key/value [D, L, KV, hd], out
  [H, L, hd, D]: heads on their own axis (head_dim=1 entry per head there), layers on axis 1."""
  rng = np.random.default_rng(0)
  D, L, KV, G, hd = 8, 3, 2, 3, 4
  ours = {'q': rng.normal(size=(L, D, KV * G * hd)), 'k': rng.normal(size=(L, D, KV * hd)),
          'v': rng.normal(size=(L, D, KV * hd)), 'o': rng.normal(size=(L, KV * G * hd, D))}
  theirs = {'query': {'kernel': ours['q'].reshape(L, D, KV * G, hd).transpose(1, 0, 2, 3)},
            'key': {'kernel': ours['k'].reshape(L, D, KV, hd).transpose(1, 0, 2, 3)},
            'value': {'kernel': ours['v'].reshape(L, D, KV, hd).transpose(1, 0, 2, 3)},
            'out': {'kernel': ours['o'].reshape(L, KV * G, hd, D).transpose(1, 0, 2, 3)}}
  flat = structure.attention_units((), kv_heads=KV, heads_per_group=G, head_dim=hd,
                                   layer_axis=0)
  maxtext = structure.attention_units(('self_attention',) * 0, kv_heads=KV, heads_per_group=G,
                                      head_dim=1, q='query', k='key', v='value', o='out',
                                      kernel=('kernel',), layer_axis=1, in_axis=2, out_axis=0)
  # Depth first in one structure, last in the other: shrink cuts layers last either way.
  flat = (structure.depth_unit('layers', (), ('q', 'k', 'v', 'o')),) + flat
  maxtext += (structure.depth_unit('layers', (), ('query/kernel', 'key/kernel', 'value/kernel',
                                                  'out/kernel'), layer_axis=1),)
  unit_masks = {'kv_groups': jnp.array([[1., 0.], [0., 1.], [1., 0.]]),
                'heads': jnp.array([[[1., 0., 1.], [0., 1., 1.]]] * L),
                'layers': jnp.array([1., 0., 1.])}
  small_ours = masks.shrink(ours, unit_masks, flat)
  small_theirs = masks.shrink(theirs, unit_masks, maxtext)
  assert small_ours['q'].shape == (2, D, 1 * 2 * hd)
  np.testing.assert_array_equal(small_ours['k'][1], ours['k'][2][:, :hd])  # layer 2, group 0
  np.testing.assert_array_equal(
      small_theirs['query']['kernel'].transpose(1, 0, 2, 3).reshape(2, D, -1), small_ours['q'])
  np.testing.assert_array_equal(
      small_theirs['out']['kernel'].transpose(1, 0, 2, 3).reshape(2, -1, D), small_ours['o'])
  np.testing.assert_array_equal(
      small_theirs['key']['kernel'].transpose(1, 0, 2, 3).reshape(2, D, -1), small_ours['k'])
  got = importance.coupled_norm(theirs, None, maxtext)
  want = importance.coupled_norm(ours, None, flat)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6)


def test_a_head_axis_that_does_not_split_into_groups_is_one_line_error():
  params = params_of(CFG)
  bad = structure.attention_units(('layers', 'attn'), kv_heads=3, heads_per_group=2, head_dim=4,
                                  layer_axis=0)
  with pytest.raises(PruneError, match="unit 'heads': leaf layers/attn/q axis 2 has 16 entries, "
                                       'not a multiple of groups 3 x inner 4'):
    masks.init(params, bad)


def test_prune_optimizer_reaches_every_axis_target_and_keeps_training_shrunk():
  cfg, s = CFG, llama(CFG)
  params = params_of(cfg)
  widths = {'ffn': (12, 5), 'kv_groups': (2, 1), 'heads': (2, 1), 'hidden': (16, 10),
            'layers': (2, 1)}
  scheds = {n: schedules.PruneSchedule(2, 8, 2, enlarged, target)
            for n, (enlarged, target) in widths.items()}
  tx = prune_optimizer(optax.adamw(1e-2), s, scheds)

  def loss(p, unit_masks):
    logits = Transformer(cfg).apply({'params': p}, TOKENS,
                                    hidden_kept=jnp.sum(unit_masks['hidden']))
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], TOKENS[:, 1:]).mean()

  @jax.jit
  def step(p, state):
    grads = jax.grad(loss)(p, state.masks)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  state = tx.init(params)
  for _ in range(10):
    params, state = step(params, state)
  assert step._cache_size() == 1  # k(t) traced: one compilation for the whole window
  kept = masks.widths(state.masks)
  for name, (_, target) in widths.items():
    assert np.all(np.asarray(kept[name]) == target), (name, kept[name])
  masked_logits = Transformer(cfg).apply({'params': params}, TOKENS,
                                         hidden_kept=jnp.sum(state.masks['hidden']))
  jax.tree.map(np.testing.assert_array_equal, masks.apply(params, state.masks, s), params)
  small_params, small_cfg = masks.shrink_model(params, state.masks, s, cfg)
  small_state = masks.shrink(state, state.masks, s)
  np.testing.assert_allclose(Transformer(small_cfg).apply({'params': small_params}, TOKENS),
                             masked_logits, atol=1e-5, rtol=0)
  moments = jax.tree.map(jnp.shape, small_state.inner[0].mu)
  assert moments == jax.tree.map(jnp.shape, small_params)
  # The state's own masks and importance lose the removed layer too.
  want = {'ffn': (1, 5), 'kv_groups': (1, 1), 'heads': (1, 1, 1), 'hidden': (10,), 'layers': (1,)}
  for tree in (small_state.masks, *small_state.importance.values()):
    assert jax.tree.map(jnp.shape, tree) == want
  small_s = llama(small_cfg)
  grads = jax.grad(lambda p: Transformer(small_cfg).apply({'params': p}, TOKENS).mean())(
      small_params)
  inner = optax.adamw(1e-2)
  updates, _ = inner.update(grads, small_state.inner, small_params)
  assert jax.tree.map(jnp.shape, updates) == moments
  assert masks.init(small_params, small_s)['heads'].shape == (1, 1)  # one group: [L, width]
