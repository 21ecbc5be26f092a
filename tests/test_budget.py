"""train/budget.py: from prune.target_params to the final shape (candidates, criterion 1)."""

import dataclasses
import json

import numpy as np
import pytest

from idea_prune_jax.model.config import ModelConfig
from idea_prune_jax.model.model import param_count
from idea_prune_jax.prune.structure import UNIT_KINDS
from idea_prune_jax.train import budget
from idea_prune_jax.train.config import ConfigError

# 4 KV groups of 2 query heads, head_dim 4 (explicit, fixed when d_model shrinks), FFN 96.
ENLARGED = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=4,
                       ffn_dim=96)
ALL_UNITS = budget.Constraints(units=UNIT_KINDS)


def widths(cfg):
  return (cfg.d_model, cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.ffn_dim, cfg.n_layers)


def ffn_at(cfg, ffn_dim):
  return dataclasses.replace(cfg, ffn_dim=ffn_dim)


@pytest.mark.parametrize('constraints', [
    ALL_UNITS,
    # Coarse grids on a tiny model: one FFN step of 8 is ~6% of its params.
    budget.Constraints(multiple=4, tensor=2, fsdp=8, units=UNIT_KINDS, tolerance=0.03),
    budget.Constraints(multiple=4, tensor=4, units=('ffn', 'hidden'), tolerance=0.03),
])
def test_every_candidate_fits_budget_constraints_and_never_grows(constraints):
  target = int(0.7 * param_count(ENLARGED))
  cands = budget.candidates(ENLARGED, target, constraints)
  assert len(cands) > 1
  assert len({widths(s) for s in cands}) == len(cands)
  for shape in cands:
    assert abs(param_count(shape) - target) <= constraints.tolerance * target
    assert shape.head_dim == ENLARGED.head_dim
    assert shape.d_model % shape.n_heads == 0  # a Llama transformers loads
    assert shape.n_heads % shape.n_kv_heads == 0
    assert all(w <= e for w, e in zip(widths(shape), widths(ENLARGED)))
    for axis, width, full, step in (
        ('hidden', shape.d_model, ENLARGED.d_model, np.lcm(constraints.multiple,
                                                          constraints.fsdp)),
        ('ffn', shape.ffn_dim, ENLARGED.ffn_dim, np.lcm(constraints.multiple,
                                                       constraints.tensor)),
        ('kv_groups', shape.n_kv_heads, ENLARGED.n_kv_heads, constraints.tensor)):
      # The enlarged width is always allowed: the enlarged model already runs on this mesh.
      assert width == full or (axis in constraints.units and width % step == 0), (axis, shape)
    assert shape.n_heads % constraints.tensor == 0
  misses = [abs(param_count(s) - target) for s in cands]
  assert misses == sorted(misses)


def test_axes_not_in_units_keep_the_enlarged_width():
  cands = budget.candidates(ENLARGED, int(0.8 * param_count(ENLARGED)),
                            budget.Constraints(units=('heads', 'ffn')))
  assert {(s.d_model, s.n_kv_heads) for s in cands} == {(32, 4)}
  assert {s.n_heads // s.n_kv_heads for s in cands} == {1, 2}


def test_candidates_are_deterministic():
  target = int(0.6 * param_count(ENLARGED))
  assert budget.candidates(ENLARGED, target, ALL_UNITS) == budget.candidates(ENLARGED, target,
                                                                             ALL_UNITS)


@pytest.mark.parametrize('multiple, tolerance', [(1, 0.005), (8, 0.07)])  # a step: 1,536
@pytest.mark.parametrize('fraction', [0.45, 0.62, 0.8, 0.97])
def test_ffn_only_gives_the_width_a_brute_force_search_finds(multiple, tolerance, fraction):
  target = int(fraction * param_count(ENLARGED))
  c = budget.Constraints(multiple=multiple, units=('ffn',), tolerance=tolerance)
  cands = budget.candidates(ENLARGED, target, c)
  within = [f for f in range(multiple, ENLARGED.ffn_dim + 1, multiple)
            if abs(param_count(ffn_at(ENLARGED, f)) - target) <= c.tolerance * target]
  best = min(within, key=lambda f: (abs(param_count(ffn_at(ENLARGED, f)) - target), -f))
  assert cands == [ffn_at(ENLARGED, best)]


def test_an_ffn_halfway_between_two_steps_rounds_to_the_wider():
  halfway = param_count(ffn_at(ENLARGED, 40)) + 3 * 2 * 32 * 4
  cands = budget.candidates(ENLARGED, halfway, budget.Constraints(multiple=8, tolerance=0.07))
  assert cands == [ffn_at(ENLARGED, 48)]


def test_fixed_ffn_is_checked_directly():
  shape = dataclasses.replace(ENLARGED, d_model=24)
  cands = budget.candidates(ENLARGED, param_count(shape), budget.Constraints(units=('hidden',)))
  assert cands[0] == shape and all(s.ffn_dim == ENLARGED.ffn_dim for s in cands)


def test_unreachable_target_is_a_one_line_error_with_the_reachable_range():
  smallest = param_count(dataclasses.replace(ENLARGED, ffn_dim=1))
  with pytest.raises(ConfigError) as e:
    budget.candidates(ENLARGED, smallest // 2, budget.Constraints(units=('ffn',)))
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith(f'config.prune.target_params={smallest // 2}: ')
  assert f'{smallest:,} to {param_count(ENLARGED):,}' in message
  with pytest.raises(ConfigError, match='prune.target_params'):  # never grows
    budget.candidates(ENLARGED, 2 * param_count(ENLARGED), ALL_UNITS)


@pytest.mark.parametrize('constraints, field_name', [
    (budget.Constraints(units=('ffn', 'experts')), 'config.prune.units'),
    (budget.Constraints(multiple=0), 'config.prune.round_to'),
    (budget.Constraints(tolerance=0.0), 'config.prune.tolerance'),
])
def test_bad_constraints_name_their_field(constraints, field_name):
  with pytest.raises(ConfigError, match=field_name):
    budget.candidates(ENLARGED, param_count(ENLARGED), constraints)


def random_scores(seed=0):
  rng = np.random.default_rng(seed)
  groups = ENLARGED.n_heads // ENLARGED.n_kv_heads
  return {'ffn': rng.uniform(0.1, 1, (2, 96)), 'kv_groups': rng.uniform(0.1, 1, (2, 4)),
          'heads': rng.uniform(0.1, 1, (2, 4, groups)), 'hidden': rng.uniform(0.1, 1, (32,))}


def test_retained_importance_is_one_at_the_enlarged_shape_and_falls_as_widths_shrink():
  scores = random_scores()
  assert budget.retained_importance(ENLARGED, ENLARGED, scores) == pytest.approx(1.0)
  for field_name, values in (('ffn_dim', [96, 64, 32, 8, 1]), ('d_model', [32, 24, 16, 4])):
    retained = [budget.retained_importance(dataclasses.replace(ENLARGED, **{field_name: v}),
                                           ENLARGED, scores) for v in values]
    assert all(a > b for a, b in zip(retained, retained[1:])), (field_name, retained)
    assert all(0 <= r <= 1 for r in retained)
  retained = [budget.retained_importance(
      dataclasses.replace(ENLARGED, n_kv_heads=kv, n_heads=kv * g), ENLARGED, scores)
              for kv, g in ((4, 2), (4, 1), (2, 1), (1, 1))]
  assert all(a > b for a, b in zip(retained, retained[1:])), retained


def test_retained_importance_counts_each_rows_top_k():
  ffn = np.zeros((2, 96))
  ffn[0, :3] = 1.0  # layer 0: all its mass in 3 neurons; layer 1: uniform
  ffn[1, :] = 3.0 / 96
  keep_3 = budget.retained_importance(ffn_at(ENLARGED, 3), ENLARGED, {'ffn': ffn})
  assert keep_3 == pytest.approx((3 + 3 * 3 / 96) / 6)


def test_retained_importance_weighs_axes_by_the_parameters_they_hold():
  # ffn keeps half its mass, hidden all of it: the mean is weighted by 3·L·D·F for the FFN and by
  # every parameter but the norms for d_model.
  ffn = np.ones((2, 96))
  retained = budget.retained_importance(ffn_at(ENLARGED, 48), ENLARGED,
                                        {'ffn': ffn, 'hidden': np.ones(32)})
  ffn_weight = 3 * 2 * 32 * 96
  hidden_weight = param_count(ENLARGED) - (2 * 2 * 32 + 32)
  want = (0.5 * ffn_weight + hidden_weight) / (ffn_weight + hidden_weight)
  assert retained == pytest.approx(want)


def test_choose_by_importance_prunes_the_axis_whose_mass_is_concentrated():
  target = int(0.5 * param_count(ENLARGED))
  cands = budget.candidates(ENLARGED, target, budget.Constraints(units=('ffn', 'hidden'),
                                                                 tolerance=0.02))
  assert len({s.d_model for s in cands}) > 2
  concentrated_ffn = np.zeros((2, 96))
  concentrated_ffn[:, :4] = 1.0
  concentrated_hidden = np.zeros(32)
  concentrated_hidden[:2] = 1.0
  uniform_ffn, uniform_hidden = np.ones((2, 96)), np.ones(32)

  chosen, table = budget.choose_by_importance(
      cands, ENLARGED, {'ffn': concentrated_ffn, 'hidden': uniform_hidden})
  assert chosen.ffn_dim == min(s.ffn_dim for s in cands) and chosen.d_model == 32
  chosen, _ = budget.choose_by_importance(
      cands, ENLARGED, {'ffn': uniform_ffn, 'hidden': concentrated_hidden})
  assert chosen.d_model == min(s.d_model for s in cands)

  assert len(table) == len(cands) and sum(row['chosen'] for row in table) == 1
  assert json.loads(json.dumps(table)) == table
  assert set(table[0]) == {'ffn_dim', 'n_kv_heads', 'heads_per_group', 'd_model', 'n_layers',
                           'params', 'retained_importance', 'chosen'}


def test_choose_by_importance_breaks_ties_by_candidate_order():
  cands = budget.candidates(ENLARGED, int(0.7 * param_count(ENLARGED)), ALL_UNITS)
  chosen, table = budget.choose_by_importance(cands, ENLARGED, {'ffn': np.zeros((2, 96))})
  assert chosen == cands[0] and table[0]['chosen']


def test_shape_dict():
  shape = dataclasses.replace(ENLARGED, n_kv_heads=2, n_heads=2, d_model=24, ffn_dim=40)
  assert budget.shape_dict(shape) == {'ffn_dim': 40, 'n_kv_heads': 2, 'heads_per_group': 1,
                                      'd_model': 24, 'n_layers': 2, 'params': param_count(shape)}


DEEP = dataclasses.replace(ENLARGED, n_layers=4)


def test_depth_in_units_offers_every_layer_count_each_with_its_nearest_ffn():
  target = int(0.6 * param_count(DEEP))
  c = budget.Constraints(units=('ffn', 'layers'), tolerance=0.02)
  cands = budget.candidates(DEEP, target, c)
  assert {s.n_layers for s in cands} == {3, 4}  # 2 layers hold too little even at full FFN
  for shape in cands:
    assert abs(param_count(shape) - target) <= c.tolerance * target
    brute = min(range(1, 97), key=lambda f: (abs(param_count(ffn_at(shape, f)) - target), -f))
    assert shape.ffn_dim == brute
  assert {s.n_layers for s in budget.candidates(
      DEEP, target, budget.Constraints(units=('ffn',), tolerance=0.02))} == {4}


def test_choose_by_importance_drops_a_layer_whose_mass_is_small():
  target = int(0.6 * param_count(DEEP))
  cands = budget.candidates(DEEP, target, budget.Constraints(units=('ffn', 'layers'),
                                                             tolerance=0.02))
  uniform_ffn = np.ones((4, 96))
  one_idle_layer = np.array([1.0, 1.0, 0.01, 1.0])
  chosen, _ = budget.choose_by_importance(cands, DEEP, {'ffn': uniform_ffn,
                                                        'layers': one_idle_layer})
  assert chosen.n_layers == 3
  chosen, _ = budget.choose_by_importance(cands, DEEP, {'ffn': uniform_ffn,
                                                        'layers': np.ones(4)})
  assert chosen.n_layers == 4
