"""Run by test_train.py in a process with 8 fake devices: 2x2x2-mesh train steps vs one device."""

import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from idea_prune_jax import config as config_lib  # noqa: E402
from idea_prune_jax import model as model_lib  # noqa: E402
from idea_prune_jax import schedules, sharding  # noqa: E402
from idea_prune_jax import train as train_lib  # noqa: E402


def losses(config, devices, batches):
  mesh = sharding.make_mesh(config, devices)
  model_cfg = config_lib.ModelConfig.from_config(config)
  schedule = schedules.lr_schedule(config.train)
  optimizer = train_lib.make_optimizer(config.train, schedule)
  state, shardings = train_lib.init_state(model_cfg, optimizer, mesh, jax.random.key(0))
  step = train_lib.jit_step(train_lib.train_step, shardings, mesh,
                            model=model_lib.Transformer(model_cfg), optimizer=optimizer,
                            schedule=schedule)
  out = []
  for b in batches:
    state, metrics = step(state, jax.device_put(b, sharding.batch_sharding(mesh)))
    out.append(float(metrics['loss']))
  q_spec = state.params['layers']['attn']['q'].sharding.spec
  mu_gate = state.opt_state[1][0].mu['layers']['mlp']['gate'].sharding.spec
  return out, [str(q_spec), str(mu_gate)]


def main():
  assert jax.device_count() == 8, jax.devices()
  config = config_lib.load('configs/tiny.py:test')
  rng = np.random.RandomState(0)
  batches = []
  for _ in range(4):
    x = rng.randint(4, config.model.vocab_size, (config.train.batch_size, config.data.seq_len + 1))
    batches.append({'inputs': x[:, :-1].astype(np.int32), 'targets': x[:, 1:].astype(np.int32)})
  config.mesh.update(data=2, fsdp=2, tensor=2)
  sharded, specs = losses(config, jax.devices(), batches)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  single, _ = losses(config, jax.devices()[:1], batches)
  print(json.dumps({'sharded': sharded, 'single': single, 'specs': specs}))


if __name__ == '__main__':
  main()
