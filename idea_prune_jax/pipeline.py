"""Runs as phase plans over the same steps: dense pretraining (`train`)."""

import jax

from idea_prune_jax import checkpoint as ckpt_lib
from idea_prune_jax import loop
from idea_prune_jax import model as model_lib
from idea_prune_jax import schedules
from idea_prune_jax import train as train_lib
from idea_prune_jax.config import ModelConfig


def train(config, workdir: str) -> dict:
  """Dense pretraining of config.model for train.steps; resumes from workdir's latest checkpoint."""
  run = loop.setup(config, workdir)
  model_cfg = ModelConfig.from_config(config)
  model = model_lib.Transformer(model_cfg)
  schedule = schedules.lr_schedule(config.train)
  optimizer = train_lib.make_optimizer(config.train, schedule)
  state, shardings = train_lib.init_state(model_cfg, optimizer, run.mesh,
                                          jax.random.key(config.seed))
  meta = {'model': ckpt_lib.model_meta(model_cfg), 'pipeline': 'train'}
  step = loop.latest(run)
  if step is not None:
    state, _ = loop.restore(run, step, ckpt_lib.abstract_like(state, shardings), model_cfg)
  step_fn = train_lib.jit_step(train_lib.train_step, shardings, run.mesh, model=model,
                               optimizer=optimizer, schedule=schedule)
  eval_fn = train_lib.jit_eval(model, shardings.params, run.mesh)
  state = loop.run_steps(run, state, step_fn, config.train.steps, phase='train', eval_fn=eval_fn,
                         meta=meta)
  result = loop.evaluate(run, eval_fn, state.params)
  run.writer.close()
  return {'steps': int(state.step), 'params': model_lib.param_count(model_cfg), **result}
