"""Masks: apply/shrink equivalence on three kinds of models, zero grads, AdamW, exact top-k."""

import functools
import pathlib
import re
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from idea_prune_jax import importance, masks, structure
from idea_prune_jax.model.config import ModelConfig
from idea_prune_jax.model.model import Transformer, init_params

TINY = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=12)
TOKENS = jnp.array([[1, 5, 9, 3, 7, 2], [4, 4, 8, 31, 0, 6]], jnp.int32)


def random_masks(key, n_layers, width, keep):
  """Float 0/1 masks [n_layers, width] keeping `keep` random neurons in every layer."""
  rows = [jax.random.permutation(k, width)[:keep] for k in jax.random.split(key, n_layers)]
  return jnp.stack([jnp.zeros(width).at[r].set(1.0) for r in rows])


@functools.cache
def our_params():
  return jax.jit(lambda key: nn.unbox(init_params(TINY, key)))(jax.random.key(0))


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg, params, tokens):
  return Transformer(cfg).apply({'params': params}, tokens)


def test_init_shapes_and_errors():
  m = masks.init(our_params(), structure.FFN_STRUCTURE)
  assert list(m) == ['ffn'] and m['ffn'].shape == (2, 12) and m['ffn'].dtype == jnp.float32
  assert np.all(m['ffn'] == 1)
  assert structure.Slice('layers/mlp/gate', -1) == structure.FFN_STRUCTURE[0].slices[0]
  bad_path = (structure.Unit('ffn', (structure.Slice(('mlp', 'gait'), -1),)),)
  with pytest.raises(ValueError, match='mlp/gait matches no leaf'):
    masks.init(our_params(), bad_path)
  bad_axis = (structure.Unit('ffn', (structure.Slice(('mlp', 'gate'), -1),
                                     structure.Slice(('mlp', 'down'), -1))),)
  with pytest.raises(ValueError, match='shapes disagree'):
    masks.init(our_params(), bad_axis)


def test_our_model_masked_logits_equal_shrunk_logits():
  params = our_params()
  ffn_mask = {'ffn': random_masks(jax.random.key(1), 2, 12, keep=5)}
  masked = forward(TINY, masks.apply(params, ffn_mask, structure.FFN_STRUCTURE), TOKENS)
  small_params, small_cfg = masks.shrink_model(params, ffn_mask, structure.FFN_STRUCTURE, TINY)
  assert small_cfg.ffn_dim == 5 and small_params['layers']['mlp']['down'].shape == (2, 5, 16)
  shrunk = forward(small_cfg, small_params, TOKENS)
  dense = forward(TINY, params, TOKENS)
  np.testing.assert_allclose(masked, shrunk, atol=1e-5, rtol=0)
  assert not np.allclose(masked, dense, atol=1e-4)  # the mask did remove something


def test_boxed_params_keep_their_logical_names():
  boxed = jax.jit(init_params, static_argnums=0)(TINY, jax.random.key(0))
  ffn_mask = {'ffn': random_masks(jax.random.key(1), 2, 12, keep=4)}
  small = masks.shrink(boxed, ffn_mask, structure.FFN_STRUCTURE)
  gate = small['layers']['mlp']['gate']
  assert isinstance(gate, nn.Partitioned) and gate.value.shape == (2, 16, 4)
  assert gate.names == boxed['layers']['mlp']['gate'].names


class SwiGLUBlock(nnx.Module):
  def __init__(self, d, f, rngs):
    self.gate = nnx.Linear(d, f, rngs=rngs)
    self.up = nnx.Linear(d, f, rngs=rngs)
    self.down = nnx.Linear(f, d, rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class TwoBlockNet(nnx.Module):
  """Independently written: two unscanned blocks, biases on every projection."""

  def __init__(self, d, f, rngs):
    self.block_0 = SwiGLUBlock(d, f, rngs)
    self.block_1 = SwiGLUBlock(d, f, rngs)
    self.head = nnx.Linear(d, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.block_1(self.block_0(x)))


NNX_STRUCTURE = structure.ffn_units([('block_0',), ('block_1',)], kernel=('kernel',), bias='bias')


@pytest.mark.parametrize('split', [False, True])
def test_nnx_model_masked_equals_shrunk(split):
  net = TwoBlockNet(4, 10, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (5, 4))
  if split:
    graphdef, state = nnx.split(net)
  else:
    graphdef, state = nnx.graphdef(net), nnx.state(net, nnx.Param)
  assert len(NNX_STRUCTURE) == 2 and NNX_STRUCTURE[0].layer_axis is None
  ffn_mask = masks.init(state, NNX_STRUCTURE)
  assert ffn_mask['block_0'].shape == (10,)
  ffn_mask = {'block_0': random_masks(jax.random.key(3), 1, 10, keep=6)[0],
              'block_1': random_masks(jax.random.key(4), 1, 10, keep=6)[0]}
  masked = nnx.merge(graphdef, masks.apply(state, ffn_mask, NNX_STRUCTURE))(x)

  optimizer = nnx.Optimizer(net, optax.adamw(1e-3), wrt=nnx.Param)
  small_opt_state = masks.shrink(nnx.state(optimizer), ffn_mask, NNX_STRUCTURE)
  assert small_opt_state['opt_state'][0]['nu']['block_0']['down']['kernel'][...].shape == (6, 4)
  small_state = masks.shrink(state, ffn_mask, NNX_STRUCTURE)
  small_graphdef = nnx.graphdef(nnx.eval_shape(lambda: TwoBlockNet(4, 6, nnx.Rngs(0))))
  small = nnx.merge(small_graphdef, small_state)
  assert small.block_1.gate.kernel[...].shape == (4, 6)
  np.testing.assert_allclose(masked, small(x), atol=1e-5, rtol=0)
  assert not np.allclose(masked, net(x), atol=1e-4)


@jax.jit
def dict_forward(params, x_BxD):
  """A hand-written residual ReLU MLP stack with layers stacked on axis 0 of every leaf."""
  blocks = params['blocks']
  for l in range(blocks['fc1'].shape[0]):
    h = jax.nn.relu(x_BxD @ blocks['fc1'][l] + blocks['b1'][l])
    x_BxD = x_BxD + h @ blocks['fc2'][l]
  return x_BxD @ params['out']


def test_plain_dict_model_masked_equals_shrunk():
  k = jax.random.split(jax.random.key(5), 4)
  params = {'blocks': {'fc1': jax.random.normal(k[0], (3, 4, 8)),
                       'b1': jax.random.normal(k[1], (3, 8)),
                       'fc2': jax.random.normal(k[2], (3, 8, 4))},
            'out': jax.random.normal(k[3], (4, 2))}
  unit = structure.Unit('mlp', (structure.Slice(('blocks', 'fc1'), -1),
                                structure.Slice(('blocks', 'b1'), -1),
                                structure.Slice(('blocks', 'fc2'), 1)), layer_axis=0)
  ffn_mask = {'mlp': random_masks(jax.random.key(6), 3, 8, keep=3)}
  x = jax.random.normal(jax.random.key(7), (5, 4))
  masked = dict_forward(masks.apply(params, ffn_mask, (unit,)), x)
  small = masks.shrink(params, ffn_mask, (unit,))
  assert small['blocks']['b1'].shape == (3, 3) and small['out'].shape == (4, 2)
  np.testing.assert_allclose(masked, dict_forward(small, x), atol=1e-5, rtol=0)


def test_kept_indices_ascending_and_uniform_width_required():
  m = {'ffn': jnp.array([[0., 1, 1, 0], [1, 0, 0, 1]])}
  np.testing.assert_array_equal(masks.kept_indices(m)['ffn'], [[1, 2], [0, 3]])
  np.testing.assert_array_equal(masks.widths(m)['ffn'], [2, 2])
  with pytest.raises(ValueError, match="unit 'ffn': layers keep different widths"):
    masks.kept_indices({'ffn': jnp.array([[0., 1, 1, 0], [1, 0, 0, 0]])})


class _PerUnitHolder(NamedTuple):
  """Any pytree node holding per-unit trees; masks.shrink knows it only by `shrink_units`."""
  per_unit: dict
  params: dict

  def shrink_units(self, take):
    return self._replace(per_unit=take(self.per_unit))


def test_shrink_slices_per_unit_trees_through_the_nodes_shrink_units():
  m = {'ffn': jnp.array([[0., 1, 1, 0], [1, 0, 0, 1]])}
  holder = _PerUnitHolder({'ffn': jnp.array([[10., 11, 12, 13], [20, 21, 22, 23]])},
                          {'mlp': {'up': jnp.arange(16.0).reshape(2, 2, 4)}})
  s = (structure.Unit('ffn', (structure.Slice(('mlp', 'up'), -1),)),)
  small = masks.shrink([holder], m, s)[0]
  np.testing.assert_array_equal(small.per_unit['ffn'], [[11., 12], [20, 23]])
  np.testing.assert_array_equal(small.params['mlp']['up'][1], [[8., 11], [12, 15]])


def test_apply_preserves_dtype():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), our_params())
  out = masks.apply(params, masks.init(params, structure.FFN_STRUCTURE), structure.FFN_STRUCTURE)
  assert out['layers']['mlp']['gate'].dtype == jnp.bfloat16


def lm_loss(params, tokens):
  logits = forward(TINY, params, tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def pruned_slices(tree, ffn_mask):
  """All values of the pruned gate/up columns and down rows, concatenated."""
  off = np.asarray(ffn_mask['ffn']) == 0
  mlp = tree['layers']['mlp']
  out = []
  for l in range(off.shape[0]):
    out += [np.asarray(mlp['gate'][l][:, off[l]]).ravel(),
            np.asarray(mlp['up'][l][:, off[l]]).ravel(),
            np.asarray(mlp['down'][l][off[l], :]).ravel()]
  return np.concatenate(out)


# Gradient w.r.t. the unmasked params of the loss of the masked model.
masked_grads = jax.jit(jax.grad(
    lambda p, m: lm_loss(masks.apply(p, m, structure.FFN_STRUCTURE), TOKENS)))
ADAMW = optax.adamw(1e-2, weight_decay=0.1)


@jax.jit
def adamw_step(params, opt_state, ffn_mask):
  updates, opt_state = ADAMW.update(masked_grads(params, ffn_mask), opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def test_grads_wrt_pruned_slices_are_exactly_zero():
  params = our_params()
  ffn_mask = {'ffn': random_masks(jax.random.key(1), 2, 12, keep=7)}
  assert np.all(pruned_slices(masked_grads(params, ffn_mask), ffn_mask) == 0)
  dense = masks.init(params, structure.FFN_STRUCTURE)
  assert np.any(pruned_slices(masked_grads(params, dense), ffn_mask) != 0)


def test_adamw_with_reapplied_masks_keeps_pruned_slices_zero():
  params, s = our_params(), structure.FFN_STRUCTURE
  opt_state, dense = ADAMW.init(params), masks.init(params, s)
  for _ in range(3):  # momentum builds up on every neuron before the prune
    params, opt_state = adamw_step(params, opt_state, dense)
  ffn_mask = {'ffn': random_masks(jax.random.key(1), 2, 12, keep=6)}
  reapplied = not_reapplied = masks.apply(params, ffn_mask, s)  # the prune itself
  state_a = state_b = opt_state
  for _ in range(4):
    reapplied, state_a = adamw_step(reapplied, state_a, ffn_mask)
    reapplied = masks.apply(reapplied, ffn_mask, s)
    not_reapplied, state_b = adamw_step(not_reapplied, state_b, ffn_mask)
  assert np.all(pruned_slices(reapplied, ffn_mask) == 0)
  # Why the re-apply is needed: old momentum and weight decay revive pruned slices.
  assert np.any(pruned_slices(not_reapplied, ffn_mask) != 0)


def test_shrink_optax_adamw_state_equals_take_by_kept_indices():
  params, s = our_params(), structure.FFN_STRUCTURE
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))
  opt_state = opt.init(params)
  grads = masked_grads(params, masks.init(params, s))
  update = jax.jit(opt.update)
  for _ in range(2):
    _, opt_state = update(grads, opt_state, params)
  ffn_mask = {'ffn': random_masks(jax.random.key(8), 2, 12, keep=4)}
  small = masks.shrink(opt_state, ffn_mask, s)
  idx = masks.kept_indices(ffn_mask)['ffn']
  for moment in ('mu', 'nu'):
    full, got = getattr(opt_state[1][0], moment), getattr(small[1][0], moment)
    for l in range(2):
      for name, axis in (('gate', 1), ('up', 1), ('down', 0)):
        want = np.take(np.asarray(full['layers']['mlp'][name][l]), idx[l], axis=axis)
        np.testing.assert_array_equal(got['layers']['mlp'][name][l], want)
    np.testing.assert_array_equal(got['layers']['attn']['q'], full['layers']['attn']['q'])
  assert small[1][0].count == opt_state[1][0].count
  # The shrunk state drives a step of the shrunk model.
  small_params, _ = masks.shrink_model(params, ffn_mask, s, TINY)
  update(masks.shrink(grads, ffn_mask, s), small, small_params)


def reference_refresh(mask, scores, k):
  """NumPy: among alive neurons, keep the first k by (-score, index)."""
  out = np.zeros_like(mask)
  for l in range(mask.shape[0]):
    alive = [j for j in range(mask.shape[1]) if mask[l, j] > 0]
    alive.sort(key=lambda j: (-scores[l, j], j))
    out[l, alive[:k]] = 1
  return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3).flatmap(lambda n_layers: st.integers(1, 9).flatmap(
    lambda width: st.tuples(
        st.lists(st.lists(st.lists(st.integers(-2, 2), min_size=width, max_size=width),
                          min_size=n_layers, max_size=n_layers), min_size=1, max_size=4),
        st.lists(st.integers(0, width + 1), min_size=1, max_size=4)))))
def test_refresh_is_monotone_exact_and_breaks_ties_by_index(case):
  score_seq, ks = case
  ks = sorted(ks, reverse=True)
  mask = np.ones((len(score_seq[0]), len(score_seq[0][0])), np.float32)
  for t, k in enumerate(ks):
    scores = np.asarray(score_seq[t % len(score_seq)], np.float32)  # small ints: many ties
    new = np.asarray(_jit_refresh({'ffn': mask}, {'ffn': scores}, jnp.int32(k))['ffn'])
    assert np.all(new <= mask)  # monotone
    np.testing.assert_array_equal(new.sum(1), np.minimum(k, mask.sum(1)))  # exact
    np.testing.assert_array_equal(new, reference_refresh(mask, scores, k))
    mask = new


_jit_refresh = jax.jit(masks.refresh)


def test_refresh_ties_lower_index_wins_and_pruned_never_return():
  mask = jnp.array([[1., 1, 1, 1, 0]])
  got = masks.refresh({'f': mask}, {'f': jnp.array([[3., 5, 5, 5, 9]])}, 2)['f']
  np.testing.assert_array_equal(got, [[0, 1, 1, 0, 0]])
  got = masks.refresh({'f': mask}, {'f': jnp.full((1, 5), jnp.nan)}, 3)['f']
  np.testing.assert_array_equal(got, [[1, 1, 1, 0, 0]])
  got = masks.refresh({'f': mask}, {'f': jnp.array([[0., 0, 0, 0, 9]])}, 5)['f']  # k > alive
  np.testing.assert_array_equal(got, mask)
  per_layer = masks.refresh({'f': jnp.ones((2, 3))}, {'f': jnp.ones((2, 3))}, jnp.array([1, 2]))
  np.testing.assert_array_equal(per_layer['f'], [[1, 0, 0], [1, 1, 0]])


def test_refresh_under_jit_compiles_once_as_k_changes():
  traces = []

  @jax.jit
  def refresh(m, s, k):
    traces.append(1)
    return masks.refresh(m, s, k)

  m = {'ffn': jnp.ones((2, 12))}
  s = {'ffn': jax.random.normal(jax.random.key(0), (2, 12))}
  for k in (12, 9, 5, 3):
    m = refresh(m, s, jnp.int32(k))
    np.testing.assert_array_equal(masks.widths(m)['ffn'], [k, k])
  assert len(traces) == 1 and refresh._cache_size() == 1


def test_docs_example_runs():
  doc = (pathlib.Path(__file__).parents[1] / 'docs' / 'pruning_api.md').read_text()
  blocks = re.findall(r'```python\n(.*?)```', doc, re.S)
  # The dict MLP, Linen (nn.scan), NNX (nnx.Optimizer), MaxText (layers on axis 1), MaxText
  # attention (KV groups and query heads) and its depth examples, run in order in one namespace.
  assert len(blocks) == 6 and 'nnx.Optimizer(' in blocks[2] and 'nn.scan(' in blocks[1], blocks
  assert 'layer_axis=1, out_axis=0' in blocks[3] and 'attention_units(' in blocks[4]
  assert 'depth_unit(' in blocks[5]
  exec(compile('\n'.join(blocks), 'docs/pruning_api.md', 'exec'), {})


def test_refresh_refuses_a_negative_or_misshapen_concrete_k():
  m, s = {'ffn': jnp.ones((2, 4))}, {'ffn': jnp.ones((2, 4))}
  for bad, match in [(-3, r"keep_k=-3 of unit 'ffn' must be >= 0"),
                     (np.array([2, -1]), r'keep_k=\[2, -1\] .* must be >= 0'),
                     (2.5, 'must be whole numbers'),
                     ({'ffn': jnp.array([1, 2, 3])}, r'has shape \(3,\); give one int or one per '
                                                     r'layer \(2,\)')]:
    with pytest.raises(ValueError, match=match) as e:
      masks.refresh(m, s, bad)
    assert '\n' not in str(e.value)
  np.testing.assert_array_equal(masks.refresh(m, s, 0)['ffn'], np.zeros((2, 4)))  # k=0 is valid


def maxtext_ffn(params, x_BxD):
  """Residual SwiGLU blocks in MaxText's scanned layout: wi_0/wi_1 [D, L, F], wo [F, L, D]."""
  mlp = params['decoder']['layers']['mlp']
  for l in range(mlp['wo']['kernel'].shape[1]):
    h_BxF = (jax.nn.silu(x_BxD @ mlp['wi_0']['kernel'][:, l]) *
             (x_BxD @ mlp['wi_1']['kernel'][:, l]))
    x_BxD = x_BxD + h_BxF @ mlp['wo']['kernel'][:, l]
  return x_BxD


def test_maxtext_scanned_layout_masks_scores_and_shrinks():
  k = jax.random.split(jax.random.key(8), 4)
  n_layers, d, f = 3, 4, 6
  mlp = {'wi_0': {'kernel': 0.5 * jax.random.normal(k[0], (d, n_layers, f))},
         'wi_1': {'kernel': 0.5 * jax.random.normal(k[1], (d, n_layers, f))},
         'wo': {'kernel': 0.5 * jax.random.normal(k[2], (f, n_layers, d))}}
  params = {'decoder': {'layers': {'mlp': mlp}}}
  unit = structure.ffn_unit('mlp', ('decoder', 'layers', 'mlp'), in_projs=('wi_0', 'wi_1'),
                            out_projs=('wo',), kernel=('kernel',), layer_axis=1, out_axis=0)
  x = jax.random.normal(k[3], (5, d))
  assert masks.init(params, (unit,))['mlp'].shape == (n_layers, f)
  # Scores equal those of the same weights in our layout (layers first, [L, D, F] / [L, F, D]).
  loss = lambda p: jnp.sum(maxtext_ffn(p, x) ** 2)
  grads = jax.grad(loss)(params)
  ours = lambda t: {'gate': jnp.moveaxis(t['wi_0']['kernel'], 1, 0),
                    'up': jnp.moveaxis(t['wi_1']['kernel'], 1, 0),
                    'down': jnp.moveaxis(t['wo']['kernel'], 1, 0)}
  reference = (structure.ffn_unit('mlp', (), layer_axis=0),)
  for a, b in [(params, grads), (params, None)]:
    got = importance.coupled_norm(a, b, (unit,))['mlp']
    want = importance.coupled_norm(ours(a['decoder']['layers']['mlp']),
                                   None if b is None else ours(b['decoder']['layers']['mlp']),
                                   reference)['mlp']
    np.testing.assert_allclose(got, want, rtol=1e-6)
  kept = masks.refresh(masks.init(params, (unit,)), {'mlp': got}, 2)
  masked = maxtext_ffn(masks.apply(params, kept, (unit,)), x)
  small, widths = masks.shrink_params(params, kept, (unit,))
  assert widths == {'mlp': 2}
  assert small['decoder']['layers']['mlp']['wi_1']['kernel'].shape == (d, n_layers, 2)
  assert small['decoder']['layers']['mlp']['wo']['kernel'].shape == (2, n_layers, d)
  np.testing.assert_allclose(maxtext_ffn(small, x), masked, atol=1e-5, rtol=0)
  assert not np.allclose(masked, maxtext_ffn(params, x), atol=1e-3)  # the masks did prune
