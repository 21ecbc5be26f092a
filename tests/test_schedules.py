"""Width schedule k(t), refresh cadence, its own validation, and pruning-config validation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_config, validate
from idea_prune_jax import settings
from idea_prune_jax.train import plan as plan_lib
from idea_prune_jax.settings import ConfigError
from idea_prune_jax.train.targets import prune_schedule
from idea_prune_jax.prune.errors import PruneError
from idea_prune_jax.prune.schedules import PruneSchedule


def test_keep_k_cubic_at_edges_and_midpoint():
  sched = PruneSchedule(t_start=100, t_end=140, every=10, width_enlarged=1152, width_target=384)
  k = jax.jit(sched.keep_k)
  assert int(k(0)) == int(k(100)) == 1152  # p = 0: f_E
  assert int(k(120)) == 384 + (1152 - 384) // 8  # p = 1/2: (1 - p)^3 = 1/8 -> 480
  assert int(k(140)) == int(k(10_000)) == 384  # p = 1: f_T
  assert int(k(110)) == round(384 + 768 * 0.75 ** 3)
  ks = [int(k(t)) for t in range(90, 150)]
  assert ks == sorted(ks, reverse=True) and min(ks) == 384 and k(7).dtype == jnp.int32


def test_keep_k_linear():
  sched = PruneSchedule(t_start=0, t_end=10, every=1, width_enlarged=30, width_target=10,
                        kind='linear')
  assert [int(sched.keep_k(t)) for t in (0, 5, 10, 11)] == [30, 20, 10, 10]
  assert int(sched.keep_k(3)) == 24  # 10 + 20 * 0.7


def test_keep_k_rounds_to_nearest_never_below_target():
  sched = PruneSchedule(t_start=0, t_end=7, every=1, width_enlarged=13, width_target=5)
  for t in range(8):
    want = round(5 + 8 * (1 - t / 7) ** 3)
    assert int(sched.keep_k(t)) == want >= 5


def test_is_refresh_cadence_includes_t_end():
  sched = PruneSchedule(t_start=20, t_end=45, every=10, width_enlarged=8, width_target=2)
  refresh = jax.jit(sched.is_refresh)
  assert [t for t in range(60) if refresh(t)] == [20, 30, 40, 45]
  assert [t for t in range(60) if sched.in_window(t)] == list(range(20, 46))
  assert int(sched.keep_k(45)) == 2  # the final refresh reaches f_T


def test_from_config_reads_fractions_of_the_run():
  c = settings.base()
  c.train.steps, c.model.ffn_dim, c.prune.target_ffn = 600, 1152, 384
  sched = prune_schedule(run_config(c))  # run_config checks it: validate_prune accepts it
  assert sched == PruneSchedule(t_start=300, t_end=420, every=10, width_enlarged=1152,
                                width_target=384, kind='cubic')


@pytest.mark.parametrize('field,value,tp,fragment', [
    ('prune.target_ffn', 2000, 1, 'config.prune.target_ffn=2000'),
    ('prune.target_ffn', 0, 1, 'config.prune.target_ffn=0'),
    ('prune.round_to', 256, 1, 'config.prune.target_ffn=384: not a multiple of prune.round_to'),
    ('prune.target_ffn', 390, 4, 'config.prune.target_ffn=390: not a multiple of the tensor'),
    ('model.ffn_dim', 1151, 5, 'config.model.ffn_dim=1151'),
    ('prune.t_start', -0.1, 1, 'config.prune.t_start'),
    ('prune.t_end', 1.2, 1, 'config.prune.t_end'),
    ('prune.t_end', 0.4, 1, 'config.prune.t_end'),
    ('prune.t_end', 0.5005, 1, 'config.prune.t_end=0.5005: window [300, 300]'),
    ('prune.every', 0, 1, 'config.prune.every=0'),
    ('prune.schedule', 'quadratic', 1, 'config.prune.schedule'),
    ('prune.score', 'fisher', 1, 'config.prune.score'),
    ('prune.beta1', 1.0, 1, 'config.prune.beta1'),
    ('prune.beta2', -0.5, 1, 'config.prune.beta2'),
])
def test_validate_prune_names_the_field(field, value, tp, fragment):
  c = settings.base()
  c.train.steps, c.model.ffn_dim, c.prune.target_ffn = 600, 1152, 384
  if field == 'model.ffn_dim':
    c.prune.target_ffn = 380  # a multiple of 5, so only ffn_dim fails
  section, name = field.split('.')
  c[section][name] = value
  c.mesh.tensor = tp
  with pytest.raises(ConfigError, match=fragment.replace('[', r'\[').replace(']', r'\]')):
    validate(c, n_devices=tp)


def test_validate_prune_reads_tensor_parallel_from_mesh():
  c = settings.base()
  c.model.ffn_dim, c.prune.target_ffn, c.mesh.tensor = 1152, 386, 4
  with pytest.raises(ConfigError, match='tensor-parallel degree 4'):
    validate(c, n_devices=4)
  c.prune.target_ffn = 384
  validate(c, n_devices=4)


def test_keep_k_changes_without_recompiling():
  sched = PruneSchedule(t_start=0, t_end=100, every=10, width_enlarged=64, width_target=16)
  k = jax.jit(sched.keep_k)
  values = [int(k(jnp.int32(t))) for t in range(0, 101, 10)]
  assert len(set(values)) > 5 and k._cache_size() == 1
  np.testing.assert_array_equal(values[0], 64)


@pytest.mark.parametrize('kwargs,fragment', [
    (dict(width_target=2000), 'width_target=2000: above width_enlarged=1152'),
    (dict(width_target=0), 'width_target=0: must be >= 1'),
    (dict(t_start=50, t_end=40), 't_end=40: before t_start=50'),
    (dict(every=0), 'every=0: must be >= 1'),
    (dict(kind='cosine'), "kind='cosine': use one of cubic, linear"),
    (dict(width_target=384.5), 'width_target=384.5: must be an integer'),
    (dict(t_start=-1), 't_start=-1: must be >= 0'),
])
def test_prune_schedule_validates_itself(kwargs, fragment):
  args = dict(t_start=10, t_end=40, every=5, width_enlarged=1152, width_target=384)
  with pytest.raises(PruneError, match=re.escape(f'PruneSchedule.{fragment}')):
    PruneSchedule(**{**args, **kwargs})


def test_one_step_window_prunes_to_target_at_t_end():
  sched = PruneSchedule(t_start=9, t_end=9, every=5, width_enlarged=8, width_target=2)
  assert int(sched.keep_k(8)) == 8 and bool(sched.is_refresh(9)) and int(sched.keep_k(9)) == 2


def test_validate_prune_checks_the_window_the_pipeline_runs():
  # t_end 1.0 of 10 steps is clamped to step 9: the window [9, 9] would keep every neuron.
  c = settings.base()
  c.train.steps, c.train.warmup_steps, c.model.ffn_dim, c.prune.target_ffn = 10, 0, 96, 32
  c.prune.update(t_start=0.9, t_end=1.0)
  with pytest.raises(ConfigError, match=re.escape('config.prune.t_end=1.0: window [9, 9]')):
    run_config(c)
  c.pipeline, c.naive.prune, c.naive.split, c.naive.window = 'naive', 'iterative', 0.9, 0.05
  with pytest.raises(ConfigError, match=re.escape('config.naive.window=0.05: window [9, 9]')):
    run_config(c)


@pytest.mark.parametrize('name', ['idea', 'naive_iterative', 'naive_oneshot'])
def test_every_accepted_config_plans_inside_the_run_and_reaches_target(name):
  """A config validation accepts runs: phases tile [0, train.steps) and pruning reaches f_T."""
  checked = 0
  for steps in (4, 7, 10, 12, 33):
    for a in (0.0, 0.3, 0.5, 0.9):
      for b in (0.05, 0.2, 0.49, 0.6, 1.0):
        c = settings.base()
        c.train.steps, c.train.warmup_steps, c.model.ffn_dim, c.prune.target_ffn = steps, 0, 96, 32
        if name == 'idea':
          c.prune.update(t_start=a, t_end=min(a + b, 1.0))
        else:
          c.pipeline, c.naive.prune = 'naive', name.split('_')[1]
          c.naive.update(split=a or 0.1, window=b)
        try:
          validate(c, 1)
        except ConfigError:
          continue
        phases = plan_lib.plan(run_config(c))
        assert phases[0].start == 0 and phases[-1].end == steps, phases
        assert all(p.end == q.start for p, q in zip(phases, phases[1:])), phases
        assert all(p.start <= p.end for p in phases), phases
        for ph in phases:
          if ph.prune:
            last, ffn = ph.end - 1, ph.prune['ffn']
            assert ffn.t_end == last and bool(ffn.is_refresh(last))
            assert int(ffn.keep_k(last)) == 32
        checked += 1
  assert checked > 10
