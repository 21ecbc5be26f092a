"""hlo_cost: a compiled program's FLOPs with every loop iteration counted, nested loops too."""

import jax
import jax.numpy as jnp
import pytest

from conftest import run_on_devices
from idea_prune_jax.tools import hlo_cost

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


# Collectives as XLA:TPU prints them: async halves, iota and mesh replica groups, inside a loop
# of 4 trips (known_trip_count) on 32 partitions.
COLLECTIVE_HLO = '''HloModule c, num_partitions=32

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], bf16[64,128])) -> (s32[], bf16[64,128]) {
  %p = (s32[], bf16[64,128]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[64,128] get-tuple-element(%p), index=1
  %ag = (bf16[8,128], bf16[64,128]) all-gather-start(%x), replica_groups=[4,8]<=[32], dimensions={0}
  %agd = bf16[64,128] all-gather-done(%ag)
  %rs = bf16[8,128] reduce-scatter(%agd), replica_groups=mesh['x'=4,'y'=8] {'y'}, dimensions={0}, to_apply=%add
  %cp = (bf16[64,128], bf16[64,128], u32[], u32[]) collective-permute-start(%agd), source_target_pairs={{0,1},{1,0}}
  %cpd = bf16[64,128] collective-permute-done(%cp)
  ROOT %out = (s32[], bf16[64,128]) tuple(%i, %cpd)
}

%cond (p: (s32[], bf16[64,128])) -> pred[] {
  %p = (s32[], bf16[64,128]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: bf16[64,128], g: f32[256]) -> f32[256] {
  %x = bf16[64,128] parameter(0)
  %g = f32[256] parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[64,128]) tuple(%zero, %x)
  %loop = (s32[], bf16[64,128]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %ar = f32[256] all-reduce(%g), replica_groups={}, to_apply=%add
}
'''


def test_collective_bytes_counted_per_loop_iteration():
  moved = hlo_cost.loop_cost(COLLECTIVE_HLO)['collectives']
  row = 64 * 128 * 2  # one bf16[64,128]
  assert moved['all-gather'] == 4 * row * 7 / 8  # groups of 8: each chip receives 7 of 8 parts
  assert moved['reduce-scatter'] == 4 * (row // 8) * 7  # an 8-part output, 7 parts sent
  assert moved['collective-permute'] == 4 * row
  assert moved['all-reduce'] == 256 * 4 * 2 * 31 / 32  # no groups: all 32 partitions
  assert moved['all-to-all'] == 0


def test_collective_bytes_of_a_compiled_scan():
  got = run_on_devices('collectives_check.py')
  moved, layers = got['collectives'], got['layers']
  # Per layer each chip receives the 3 quarters of [64, 64] f32 it lacks; the psum of [8, 64]
  # f32 over 2 chips sends and receives half of it twice.
  assert moved['all-gather'] == layers * 3 * 16 * 64 * 4
  assert moved['all-reduce'] == 2 * (1 / 2) * 8 * 64 * 4
  assert [trips for _, trips in got['loops']] == [layers]
