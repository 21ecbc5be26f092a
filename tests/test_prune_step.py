"""The prune step inside the trainer: one compilation per window, exact widths, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_config
from idea_prune_jax.data import batch as batch_lib
from idea_prune_jax.train import pipeline, sharding
from idea_prune_jax.train import plan as plan_lib


def test_prune_step_compiles_once_while_k_moves(tiny_config):
  tiny_config.train.steps = 40
  tiny_config.prune.update(t_start=0.25, t_end=0.75, every=2)
  mesh = sharding.make_mesh(run_config(tiny_config).mesh)
  phase = plan_lib.plan(run_config(tiny_config))[1]
  parts = pipeline.parts(run_config(tiny_config), phase, mesh)
  state = jax.jit(parts.init_fn, out_shardings=parts.shardings)(jax.random.key(0))
  step = pipeline.step_fn(run_config(tiny_config), phase, parts, mesh)
  rng = np.random.RandomState(0)
  widths, ks = [], []
  for t in range(phase.start, phase.end):
    x = rng.randint(4, 512, (tiny_config.train.batch_size, tiny_config.data.seq_len + 1))
    batch = batch_lib.from_rows(x.astype(np.int32))
    state, metrics = step(state, batch)
    widths.append(int(np.asarray(state.masks['ffn']).sum(-1).max()))
    assert np.all(np.asarray(state.masks['ffn']).sum(-1) == widths[-1])  # every layer: exact k
    pruned = np.asarray(state.masks['ffn']) == 0  # [layers, ffn]
    mlp = state.params['layers']['mlp']
    assert not np.any(np.asarray(mlp['gate']).transpose(0, 2, 1)[pruned])  # stay exactly zero
    assert not np.any(np.asarray(mlp['down'])[pruned])
    ks.append(int(phase.prune['ffn'].keep_k(t)) if bool(phase.prune['ffn'].is_refresh(t)) else None)
  assert step._cache_size() == 1
  refreshed = [k for k in ks if k is not None]
  assert len(set(refreshed)) >= 5  # k really moved at the refreshes
  assert widths[-1] == tiny_config.prune.target_ffn
  assert all(b <= a for a, b in zip(widths, widths[1:]))


def _batches(config, n, seed=0):
  rng = np.random.RandomState(seed)
  for _ in range(n):
    x = rng.randint(4, 512, (config.train.batch_size, config.data.seq_len + 1)).astype(np.int32)
    yield batch_lib.from_rows(x)


@pytest.mark.parametrize('kind', ['magnitude', 'sensitivity_ema', 'activation', 'activation_kd'])
def test_every_score_kind_runs_in_the_trainers_prune_step(tiny_config, kind):
  score, kd = kind.split('_')[0], kind.endswith('_kd')
  tiny_config.prune.update(score={'sensitivity': 'sensitivity_ema'}.get(score, score), every=1)
  if kd:
    tiny_config.distill.update(alpha=0.5, phases='prune')
  mesh = sharding.make_mesh(run_config(tiny_config).mesh)
  phase = plan_lib.plan(run_config(tiny_config))[1]
  assert phase.kd == kd
  parts = pipeline.parts(run_config(tiny_config), phase, mesh)
  state = jax.jit(parts.init_fn, out_shardings=parts.shardings)(jax.random.key(0))
  step = pipeline.step_fn(run_config(tiny_config), phase, parts, mesh)
  for batch in _batches(tiny_config, phase.end - phase.start):
    state, metrics = step(state, batch)
  assert step._cache_size() == 1
  assert np.all(np.asarray(state.masks['ffn']).sum(-1) == tiny_config.prune.target_ffn)
  assert ('kl' in metrics) == kd
  for field in jax.tree.leaves(state.importance):  # the state moved (magnitude has none)
    assert np.all(np.isfinite(field)) and np.any(np.asarray(field) > 0)
  assert (len(jax.tree.leaves(state.importance)) == 0) == (score == 'magnitude')


def test_the_trainer_drops_the_lowest_scoring_neurons(tiny_config):
  mesh = sharding.make_mesh(run_config(tiny_config).mesh)
  phase = plan_lib.plan(run_config(tiny_config))[1]
  parts = pipeline.parts(run_config(tiny_config), phase, mesh)
  state = parts.init_fn(jax.random.key(0))
  n_layers, width = state.masks['ffn'].shape
  # Scores far apart (1e3 per rank) so one step's sensitivity cannot reorder them.
  ranks = np.stack([np.random.RandomState(l).permutation(width) for l in range(n_layers)])
  ibar = jnp.asarray(1e3 * (ranks + 1), jnp.float32)
  t_end = phase.prune['ffn'].t_end  # a refresh with k = f_T
  opt_state = state.opt_state._replace(count=jnp.asarray(t_end, jnp.int32),
                                       importance={'ibar': {'ffn': ibar},
                                                   'u': {'ffn': jnp.full_like(ibar, 1e6)}})
  state = jax.device_put(state.replace(step=jnp.asarray(t_end, jnp.int32), opt_state=opt_state),
                         parts.shardings)
  step = pipeline.step_fn(run_config(tiny_config), phase, parts, mesh)
  state, _ = step(state, next(_batches(tiny_config, 1)))
  kept = np.asarray(state.masks['ffn']) > 0
  k = tiny_config.prune.target_ffn
  np.testing.assert_array_equal(kept, ranks >= width - k)  # the top-k ranks, per layer
