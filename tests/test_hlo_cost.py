"""hlo_cost: a compiled program's FLOPs with every loop iteration counted, nested loops too."""

import jax
import jax.numpy as jnp
import pytest

from idea_prune_jax import hlo_cost

DOT_FLOPS = 2 * 8 * 16 * 16  # one [8, 16] x [16, 16] dot

# A loop as XLA:TPU prints it: no known_trip_count, the counter's init a copied constant, the
# bound in the condition: i = 2, 3, ..., 6 runs the body 5 times.
WHILE_HLO = '''HloModule loop

%body (p: (s32[], f32[8,16], f32[16,16])) -> (s32[], f32[8,16], f32[16,16]) {
  %p = (s32[], f32[8,16], f32[16,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %x = f32[8,16] get-tuple-element(%p), index=1
  %w = f32[16,16] get-tuple-element(%p), index=2
  %y = f32[8,16] dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %out = (s32[], f32[8,16], f32[16,16]) tuple(%next, %y, %w)
}

%cond (p: (s32[], f32[8,16], f32[16,16])) -> pred[] {
  %p = (s32[], f32[8,16], f32[16,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(7)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[8,16], w: f32[16,16]) -> f32[8,16] {
  %x = f32[8,16] parameter(0)
  %w = f32[16,16] parameter(1)
  %start = s32[] constant(2)
  %start.copy = s32[] copy(%start)
  %init = (s32[], f32[8,16], f32[16,16]) tuple(%start.copy, %x, %w)
  %loop = (s32[], f32[8,16], f32[16,16]) while(%init), condition=%cond, body=%body
  ROOT %y = f32[8,16] get-tuple-element(%loop), index=1
}
'''


def test_trip_count_from_the_loop_condition():
  cost = hlo_cost.loop_cost(WHILE_HLO)
  assert cost['loops'] == [('body', 5)]
  assert cost['once']['flops'] == pytest.approx(DOT_FLOPS, abs=8)  # XLA's own count: once
  assert cost['flops'] == pytest.approx(5 * DOT_FLOPS, abs=40)
  assert cost['bytes_accessed'] > 4 * cost['once']['bytes_accessed']
  # A condition it cannot read leaves the body counted once, and says so.
  unknown = hlo_cost.loop_cost(WHILE_HLO.replace('direction=LT', 'direction=NE'))
  assert unknown['loops'] == [('body', None)] and unknown['flops'] == cost['once']['flops']


def _nested(ws, x, unroll: bool):
  """A scan over 4 layers, each a fori_loop of 3 dots; or the same with Python loops."""
  def layer(x, w):
    if unroll:
      for _ in range(3):
        x = jnp.tanh(x @ w)
      return x, None
    return jax.lax.fori_loop(2, 5, lambda i, x: jnp.tanh(x @ w), x), None
  if unroll:
    for w in ws:
      x, _ = layer(x, w)
    return jnp.sum(x)
  return jnp.sum(jax.lax.scan(layer, x, ws)[0])


def test_nested_loops_counted_as_unrolled():
  ws, x = jnp.ones((4, 16, 16)), jnp.ones((8, 16))
  compiled = {unroll: jax.jit(jax.grad(lambda ws, x: _nested(ws, x, unroll)))
              .lower(ws, x).compile() for unroll in (False, True)}
  truth = compiled[True].cost_analysis()['flops']
  cost = hlo_cost.loop_cost(compiled[False].as_text())
  # Forward and backward: 12 dots each way, 36 in all (the backward has two per forward dot).
  assert truth >= 36 * DOT_FLOPS
  assert cost['once']['flops'] < truth / 4  # one layer's one dot, as XLA counts
  assert cost['flops'] == pytest.approx(truth, rel=0.02)
  assert sorted(trips for _, trips in cost['loops']) == [3, 3, 4, 4]
