"""The prune step inside the trainer: one compilation per window, exact widths, sharding."""

import jax
import numpy as np

from idea_prune_jax import data as data_lib
from idea_prune_jax import pipeline, sharding


def test_prune_step_compiles_once_while_k_moves(tiny_config):
  tiny_config.train.steps = 40
  tiny_config.prune.update(t_start=0.25, t_end=0.75, every=2)
  mesh = sharding.make_mesh(tiny_config)
  phase = pipeline.plan(tiny_config)[1]
  parts = pipeline.parts(tiny_config, phase, mesh)
  state = jax.jit(parts.init_fn, out_shardings=parts.shardings)(jax.random.key(0))
  step = pipeline.step_fn(tiny_config, phase, parts, mesh)
  rng = np.random.RandomState(0)
  widths, ks = [], []
  for t in range(phase.start, phase.end):
    x = rng.randint(4, 512, (tiny_config.train.batch_size, tiny_config.data.seq_len + 1))
    batch = data_lib.split_batch(x.astype(np.int32))
    state, metrics = step(state, batch)
    widths.append(int(np.asarray(state.masks['ffn']).sum(-1).max()))
    assert np.all(np.asarray(state.masks['ffn']).sum(-1) == widths[-1])  # every layer: exact k
    pruned = np.asarray(state.masks['ffn']) == 0  # [layers, ffn]
    mlp = state.params['layers']['mlp']
    assert not np.any(np.asarray(mlp['gate']).transpose(0, 2, 1)[pruned])  # stay exactly zero
    assert not np.any(np.asarray(mlp['down'])[pruned])
    ks.append(int(phase.prune.keep_k(t)) if bool(phase.prune.is_refresh(t)) else None)
  assert step._cache_size() == 1
  refreshed = [k for k in ks if k is not None]
  assert len(set(refreshed)) >= 5  # k really moved at the refreshes
  assert widths[-1] == tiny_config.prune.target_ffn
  assert all(b <= a for a, b in zip(widths, widths[1:]))
