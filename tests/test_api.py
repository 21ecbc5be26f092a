"""The public pruning API: a pure core, `prune_optimizer`, and one-line errors for bad inputs."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT
from idea_prune_jax import importance, masks, prune_optimizer, structure
from idea_prune_jax.prune.errors import PruneError
from idea_prune_jax.prune.prune_optax import PruneState
from idea_prune_jax.prune.schedules import PruneSchedule

CORE = ('errors', 'importance', 'masks', 'schedules', 'structure', 'distill', 'chunked',
        'prune_optax')


def test_core_imports_only_jax_optax_numpy():
  """Importing the core adds nothing to what jax, optax and numpy load: no flax, no config."""
  code = ('import json, sys\n'
          'import jax, optax, numpy\n'
          'before = set(sys.modules)\n'
          f'import {", ".join("idea_prune_jax.prune." + m for m in CORE)}\n'
          'print(json.dumps(sorted(set(sys.modules) - before)))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  added = json.loads(out.stdout.strip().splitlines()[-1])
  ours = {m for m in added if m.startswith('idea_prune_jax.')}
  assert ours == {'idea_prune_jax.prune'} | {f'idea_prune_jax.prune.{m}' for m in CORE}, ours
  others = {m.split('.')[0] for m in added} - {'idea_prune_jax'} - set(sys.stdlib_module_names)
  assert not others, others


# A plain dict MLP with layers stacked on axis 0: neuron j is fc1[:, :, j], fc2[:, j, :].
S = (structure.Unit('mlp', (structure.Slice('fc1', -1), structure.Slice('fc2', 1))),)
SCHED = PruneSchedule(t_start=2, t_end=8, every=2, width_enlarged=12, width_target=4)


def _params(width=12, key=0):
  k = jax.random.split(jax.random.key(key), 3)
  return {'fc1': jax.random.normal(k[0], (2, 6, width)) / 3,
          'fc2': jax.random.normal(k[1], (2, width, 6)) / 3,
          'out': jax.random.normal(k[2], (6, 1))}


def _loss(params, x, y):
  for l in range(2):
    x = x + jax.nn.relu(x @ params['fc1'][l]) @ params['fc2'][l]
  return jnp.mean((x @ params['out'] - y) ** 2)


def _data(step):
  x = jax.random.normal(jax.random.key(100 + step), (16, 6))
  return x, jnp.sin(x.sum(-1, keepdims=True))


def _make_step(tx):
  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def test_prune_optimizer_prunes_on_schedule_with_exact_zeros_and_one_compile():
  tx = prune_optimizer(optax.adamw(1e-2, weight_decay=0.1), S, SCHED)
  params = _params()
  state = tx.init(params)
  step = _make_step(tx)
  widths = []
  for t in range(12):
    params, state = step(params, state, *_data(t))
    w = np.asarray(masks.widths(state.masks)['mlp'])
    widths.append(int(w[0]))
    pruned = np.asarray(state.masks['mlp']) == 0  # [layers, width]
    assert not np.any(np.asarray(params['fc1']).transpose(0, 2, 1)[pruned])  # exactly 0.0
    assert not np.any(np.asarray(params['fc2'])[pruned])
  assert widths[:2] == [12, 12] and widths[-1] == 4 and widths == sorted(widths, reverse=True)
  assert widths[SCHED.t_end] == 4 and int(state.count) == 12
  assert step._cache_size() == 1  # k moved at run time, traced
  assert float(jnp.abs(state.importance['ibar']['mlp']).max()) > 0


def test_prune_optimizer_matches_the_hand_written_step():
  """The wrapper is the README's manual loop (score, refresh, step, re-mask) in one object."""
  inner = optax.adamw(1e-2, weight_decay=0.1)
  tx = prune_optimizer(inner, S, SCHED, 'sensitivity_ema', beta1=0.7)
  params, state = _params(), None
  state = tx.init(params)
  ref_params, ref_opt = params, inner.init(params)
  ref_masks = masks.init(params, S)
  ref_importance = importance.init(ref_masks, 'sensitivity_ema')
  step = _make_step(tx)
  for t in range(10):
    params, state = step(params, state, *_data(t))
    grads = jax.grad(_loss)(ref_params, *_data(t))
    ref_importance = importance.update(ref_importance, 'sensitivity_ema', params=ref_params,
                                       grads=grads, structure=S, beta1=0.7)
    if SCHED.is_refresh(t):
      ref_masks = masks.refresh(ref_masks, importance.scores(ref_importance, 'sensitivity_ema'),
                                SCHED.keep_k(t))
    updates, ref_opt = inner.update(grads, ref_opt, ref_params)
    ref_params = masks.apply(optax.apply_updates(ref_params, updates), ref_masks, S)
  np.testing.assert_array_equal(state.masks['mlp'], ref_masks['mlp'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, ref_params)


def test_shrink_of_the_wrapped_state_keeps_training_at_the_new_width():
  inner = optax.adam(1e-2)
  tx = prune_optimizer(inner, S, SCHED, 'magnitude')
  params = _params()
  state = tx.init(params)
  step = _make_step(tx)
  for t in range(SCHED.t_end + 1):
    params, state = step(params, state, *_data(t))
  small_params = masks.shrink(params, state.masks, S)
  small_state = masks.shrink(state, state.masks, S)  # masks, importance and AdamW moments
  assert isinstance(small_state, PruneState) and small_state.masks['mlp'].shape == (2, 4)
  assert small_state.inner[0].mu['fc1'].shape == (2, 6, 4)
  # The reference: a model made at the target width, trained by the plain optimizer from the
  # sliced AdamW state.
  ref_params, ref_opt = small_params, masks.shrink(state.inner, state.masks, S)
  ref_step = _make_step(inner)
  for t in range(SCHED.t_end + 1, SCHED.t_end + 5):
    small_params, small_state = step(small_params, small_state, *_data(t))
    ref_params, ref_opt = ref_step(ref_params, ref_opt, *_data(t))
  # Equal up to float rounding: the two programs fuse differently.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), small_params,
               ref_params)
  assert float(_loss(small_params, *_data(0))) < float(_loss(params, *_data(0)))


def test_activation_score_takes_activations_as_an_extra_argument():
  tx = prune_optimizer(optax.sgd(0.1), S, SCHED, 'activation')
  params = _params()
  state = tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  acts = {'mlp': jnp.arange(24.0).reshape(2, 12)}
  _, state = tx.update(grads, state, params, activations=acts)
  np.testing.assert_allclose(state.importance['act']['mlp'], 0.15 * acts['mlp'], rtol=1e-6)
  with pytest.raises(PruneError, match=r"activations of unit 'mlp' have shape \(12,\)"):
    tx.update(grads, state, params, activations={'mlp': jnp.ones(12)})
  with pytest.raises(PruneError, match='needs activations='):
    tx.update(grads, state, params)


def test_prune_optimizer_errors_are_one_line():
  tx = prune_optimizer(optax.sgd(0.1), S, SCHED)
  params = _params()
  state = tx.init(params)
  with pytest.raises(PruneError, match=r'update\(grads, state, params\) needs params'):
    tx.update(params, state)
  with pytest.raises(PruneError, match="unit 'mlp' has width 10 in params but the schedule's "
                                       'width_enlarged=12'):
    tx.init(_params(width=10))
  with pytest.raises(PruneError, match="unknown score 'fisher'"):
    prune_optimizer(optax.sgd(0.1), S, SCHED, 'fisher')
  with pytest.raises(PruneError, match="unit 'mlp': slice path fc2 matches no leaf of grads"):
    tx.update({'fc1': params['fc1'], 'out': params['out']}, state, params)


def test_integer_keys_in_paths():
  params = {'layers': [{'mlp': {'up': jnp.ones((3, 5)), 'down': jnp.ones((5, 3))}}
                       for _ in range(2)]}
  s = structure.ffn_units([('layers', 0, 'mlp'), ('layers', 1, 'mlp')], in_projs=('up',))
  m = masks.init(params, s)
  assert set(m) == {'layers/0/mlp', 'layers/1/mlp'} and m['layers/0/mlp'].shape == (5,)
  m['layers/1/mlp'] = jnp.array([1., 0, 1, 0, 0])
  small, widths = masks.shrink_params(params, m, s)
  assert widths == {'layers/0/mlp': 5, 'layers/1/mlp': 2}
  assert small['layers'][1]['mlp']['down'].shape == (2, 3)


def test_a_prefix_matching_two_modules_is_an_error_unless_shared():
  w = lambda: {'mlp': {'gate': jnp.ones((3, 4)), 'up': jnp.ones((3, 4)),
                       'down': jnp.ones((4, 3))}}
  params = {'encoder': w(), 'decoder': w()}
  s = (structure.ffn_unit('ffn', ('mlp',)),)
  with pytest.raises(PruneError, match='matches 2 leaves of params '
                                       r'\(decoder/mlp/gate, encoder/mlp/gate\)'):
    masks.init(params, s)
  shared = (structure.ffn_unit('ffn', ('mlp',), shared=True),)
  assert masks.init(params, shared)['ffn'].shape == (4,)
  assert set(masks.init(params, structure.ffn_units([('encoder', 'mlp'), ('decoder', 'mlp')])))


def test_missing_units_wrong_shapes_and_jit_are_named():
  params = _params()
  m = masks.init(params, S)
  with pytest.raises(PruneError, match="masks has no unit 'mlp'"):
    masks.apply(params, {'ffn': m['mlp']}, S)
  with pytest.raises(PruneError, match=r"scores of unit 'mlp' have shape \(12,\), its mask "
                                       r'\(2, 12\)'):
    masks.refresh(m, {'mlp': jnp.ones(12)}, 4)
  with pytest.raises(PruneError, match="scores has no unit 'mlp'"):
    masks.refresh(m, {'ffn': jnp.ones((2, 12))}, 4)
  with pytest.raises(PruneError, match='call them outside jit'):
    jax.jit(lambda p, mm: masks.shrink(p, mm, S))(params, m)
