"""Pretrain, prune and distill steps on 8-device meshes (data x fsdp x tensor) equal one device."""

import os

import numpy as np
import pytest

from conftest import run_config, run_on_devices


@pytest.fixture(scope='module')
def results():
  return run_on_devices('sharded_check.py')


@pytest.mark.parametrize('kind, mesh', [
    ('pretrain', '8x1x1'), ('pretrain', '1x8x1'), ('pretrain', '2x2x2'), ('pretrain', '1x1x8'),
    ('prune', '1x8x1'), ('prune', '2x2x2'), ('prune', '1x1x8'),
    ('distill', '2x2x2'), ('distill', '1x1x8'), ('prune_multi', '1x8x1'),
    ('prune_multi', '2x2x2')])
def test_step_on_mesh_equals_one_device(results, kind, mesh):
  sharded, single = results[f'{kind}@{mesh}'], results[f'{kind}@1x1x1']
  np.testing.assert_allclose(sharded['losses'], single['losses'], rtol=3e-5)
  assert sharded['losses'][-1] < sharded['losses'][0]
  assert sharded['compiles'] == 1
  if kind.startswith('prune'):
    assert sharded['masks'] == single['masks']
    for mask in single['masks'].values():  # one width per layer (and group)
      assert len(set(np.asarray(mask).sum(-1).ravel().tolist())) == 1
    assert set(single['masks']) == ({'ffn', 'heads', 'hidden', 'layers'}
                                    if kind == 'prune_multi' else {'ffn'})


def test_state_shards_follow_the_rules(results):
  spec = lambda kind, mesh, key: results[f'{kind}@{mesh}'][key]
  # q is (layers, embed, q_heads) -> (None, fsdp, tensor); Adam moments shard like their param.
  assert spec('pretrain', '2x2x2', 'q') == [None, 'fsdp', 'tensor']
  assert spec('pretrain', '2x2x2', 'mu_gate') == [None, 'fsdp', 'tensor']
  # Masks and scores are [layers, ffn] and shard like the FFN axis they describe.
  assert spec('prune', '1x1x8', 'mask_spec') == {'ffn': [None, 'tensor']}
  assert spec('prune', '1x1x8', 'score_spec') == {'ffn': [None, 'tensor']}
  # The other axes' masks and scores shard like theirs: heads [layers, KV groups, heads per
  # group] like the KV heads, the hidden size [d_model] like the embedding, depth [layers]
  # replicated (like the stacked axis).
  assert spec('prune_multi', '2x2x2', 'mask_spec') == {
      'ffn': [None, 'tensor'], 'heads': [None, 'tensor', None], 'hidden': ['fsdp'],
      'layers': [None]}
  assert spec('prune_multi', '1x8x1', 'score_spec')['hidden'] == ['fsdp']
  assert spec('distill', '2x2x2', 'teacher_gate') == [None, 'fsdp', 'tensor']


def test_libtpu_args_go_to_the_environment_before_jax_starts(monkeypatch, tiny_config):
  from jax._src import xla_bridge

  from idea_prune_jax.cli import set_libtpu_args
  from idea_prune_jax.settings import ConfigError
  flag = '--xla_jf_spmd_threshold_for_windowed_einsum_mib=1000000'
  monkeypatch.setenv('LIBTPU_INIT_ARGS', '--xla_tpu_enable_latency_hiding_scheduler=true')
  monkeypatch.setattr(xla_bridge, 'backends_are_initialized', lambda: False)
  tiny_config.mesh.libtpu_args = flag
  mesh = run_config(tiny_config).mesh
  set_libtpu_args(mesh)
  assert os.environ['LIBTPU_INIT_ARGS'] == f'--xla_tpu_enable_latency_hiding_scheduler=true {flag}'
  set_libtpu_args(mesh)  # already there: nothing to do, even after start
  monkeypatch.setattr(xla_bridge, 'backends_are_initialized', lambda: True)
  set_libtpu_args(mesh)
  tiny_config.mesh.libtpu_args = '--xla_tpu_other=1'  # too late for libtpu to see it
  with pytest.raises(ConfigError, match='mesh.libtpu_args.*LIBTPU_INIT_ARGS='):
    set_libtpu_args(run_config(tiny_config).mesh)
  tiny_config.mesh.libtpu_args = 'xla_tpu_other=1'
  with pytest.raises(ConfigError, match='start with --'):
    run_config(tiny_config)
