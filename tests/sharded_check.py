"""Run by test_sharding.py with 8 fake devices: every step kind on several meshes vs one device."""

import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from idea_prune_jax import settings  # noqa: E402
from idea_prune_jax.data import batch as batch_lib  # noqa: E402
from idea_prune_jax.train import pipeline, sharding  # noqa: E402
from idea_prune_jax.train import plan as plan_lib  # noqa: E402

MESHES = ((8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 1, 8))
# Pretrain on every mesh; prune (masks and scores split over the FFN axis) and distill (a teacher
# beside the student, its logits split over tensor) on the meshes that split what they add.
# prune_multi: query heads (2 -> 1 per KV group) and d_model (32 -> 16) pruned beside the FFN,
# their masks split over tensor and fsdp.
KIND_MESHES = {'pretrain': MESHES, 'prune': MESHES[1:], 'distill': MESHES[2:],
               'prune_multi': MESHES[1:3]}
N_STEPS = 6


def run_phase(run, index, devices, batches, init_state):
  """N_STEPS of phase `index` of the plan from its init state: losses, masks, specs, compiles."""
  mesh = sharding.make_mesh(run.mesh, devices)
  phase = plan_lib.plan(run)[index]
  parts = pipeline.parts(run, phase, mesh)
  # One init per kind, placed on each mesh: the steps are what this compares, and a sharded
  # init compile per mesh would double the compiles.
  state = jax.device_put(init_state, parts.shardings)
  step = pipeline.step_fn(run, phase, parts, mesh)
  losses = []
  for b in batches[:N_STEPS]:
    state, metrics = step(state, jax.device_put(b, sharding.batch_sharding(mesh)))
    losses.append(float(metrics['loss']))
  adamw = getattr(state.opt_state, 'inner', state.opt_state)  # inside prune_optimizer's state
  out = {'losses': losses, 'compiles': step._cache_size(),
         'q': list(state.params['layers']['attn']['q'].sharding.spec),
         'mu_gate': list(adamw[1][0].mu['layers']['mlp']['gate'].sharding.spec)}
  if state.masks is not None:
    out.update(masks={u: np.asarray(m).tolist() for u, m in state.masks.items()},
               mask_spec={u: list(m.sharding.spec) for u, m in state.masks.items()},
               score_spec={u: list(m.sharding.spec) for u, m in state.importance['u'].items()})
  if state.teacher is not None:
    out['teacher_gate'] = list(state.teacher['layers']['mlp']['gate'].sharding.spec)
  return out


def main():
  assert jax.device_count() == 8, jax.devices()
  config = settings.load('configs/tiny.py:test')
  config.train.steps = 40
  config.prune.update(t_start=0.25, t_end=0.75, every=2)  # k moves at steps 10, 12, 14
  rng = np.random.RandomState(0)
  batches = []
  for _ in range(N_STEPS):
    x = rng.randint(4, config.model.vocab_size, (config.train.batch_size, config.data.seq_len + 1))
    batches.append(batch_lib.from_rows(x.astype(np.int32)))
  kinds = {'pretrain': (0, 0.0), 'prune': (1, 0.0), 'distill': (2, 0.5), 'prune_multi': (1, 0.0)}
  results, inits = {}, {}
  for mesh in ((1, 1, 1),) + MESHES:
    config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    devices = jax.devices()[:int(np.prod(mesh))]
    for kind, (index, alpha) in kinds.items():
      if mesh != (1, 1, 1) and mesh not in KIND_MESHES[kind]:
        continue
      config.distill.update(alpha=alpha, phases='recovery')
      multi = kind == 'prune_multi'
      config.prune.update(target_heads_per_group=1 if multi else 0,
                          target_d_model=16 if multi else 0, target_layers=1 if multi else 0)
      run = settings.read(config).run
      if kind not in inits:  # on one device; numpy, so no mesh's buffers are donated
        parts = pipeline.parts(run, plan_lib.plan(run)[index],
                               sharding.make_mesh(run.mesh, devices))
        inits[kind] = jax.device_get(jax.jit(parts.init_fn)(jax.random.key(0)))
      results[f'{kind}@{"x".join(map(str, mesh))}'] = run_phase(run, index, devices, batches,
                                                                 inits[kind])
  print(json.dumps(results))


if __name__ == '__main__':
  main()
