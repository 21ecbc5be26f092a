"""Run by test_prune_step.py with 8 fake devices: prune steps on 2x2x2 vs one device."""

import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from idea_prune_jax import config as config_lib  # noqa: E402
from idea_prune_jax import pipeline, sharding  # noqa: E402


def prune_window(config, devices, batches):
  """Runs the whole prune phase of the plan on synthetic batches; losses, final masks, specs."""
  mesh = sharding.make_mesh(config, devices)
  phase = pipeline.plan(config)[1]
  parts = pipeline.parts(config, phase, mesh)
  state = jax.jit(parts.init_fn, out_shardings=parts.shardings)(jax.random.key(0))
  step = pipeline.step_fn(config, phase, parts, mesh)
  losses = []
  for b in batches[:phase.end - phase.start]:
    state, metrics = step(state, jax.device_put(b, sharding.batch_sharding(mesh)))
    losses.append(float(metrics['loss']))
  specs = {'mask': str(state.masks['ffn'].sharding.spec),
           'score': str(state.scores['u']['ffn'].sharding.spec)}
  return losses, np.asarray(state.masks['ffn']).tolist(), specs, step._cache_size()


def main():
  assert jax.device_count() == 8, jax.devices()
  config = config_lib.load('configs/tiny.py:test')
  config.train.steps = 40
  config.prune.update(t_start=0.25, t_end=0.75, every=4)  # window of 20 steps, k moves 6 times
  rng = np.random.RandomState(0)
  batches = []
  for _ in range(24):
    x = rng.randint(4, config.model.vocab_size, (config.train.batch_size, config.data.seq_len + 1))
    batches.append({'inputs': x[:, :-1].astype(np.int32), 'targets': x[:, 1:].astype(np.int32)})
  config.mesh.update(data=2, fsdp=2, tensor=2)
  sharded = prune_window(config, jax.devices(), batches)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  single = prune_window(config, jax.devices()[:1], batches)
  print(json.dumps({'sharded': sharded, 'single': single}))


if __name__ == '__main__':
  main()
