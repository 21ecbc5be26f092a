"""The TPU path through libtpu: steps compiled by the real TPU compiler for a small v5p slice.

libtpu's topology description gives TPU devices on this CPU-only machine; nothing runs. Skipped
where libtpu is not installed (the `tpu` extra).
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from idea_prune_jax.train import chips

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason='libtpu not installed (pip install -e ".[tpu]")')


def _cli(*args, timeout=600):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  return subprocess.run([sys.executable, '-m', 'idea_prune_jax.main', 'compile-check', *args],
                        env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_slice_names_count_chips():
  # v5p-N and v4-N count TensorCores (2 per chip); v5e-N and v6e-N count chips.
  assert chips.parse_slice('v5p-64') == chips.TpuSlice('v5p', 32, 'v5p:2x4x4')
  assert chips.parse_slice('v5p-8') == chips.TpuSlice('v5p', 4, 'v5p:2x2x1')
  assert chips.parse_slice('v4-32') == chips.TpuSlice('v4', 16, 'v4:2x2x4')
  assert chips.parse_slice('v5e-64') == chips.TpuSlice('v5e', 64, 'v5e:8x8')
  assert chips.parse_slice('v5litepod-16') == chips.TpuSlice('v5e', 16, 'v5e:4x4')
  assert chips.parse_slice('v6e-8') == chips.TpuSlice('v6e', 8, 'v6e:2x4')
  assert chips.parse_slice('v5p:4x4x2').chips == 32
  for bad in ('v5p-6', 'v7-8', 'tpu', 'v5e-12'):
    with pytest.raises(ValueError, match='topology'):
      chips.parse_slice(bad)
  assert chips.from_device_kind('TPU v5 lite') is chips.CHIPS['v5e']
  assert chips.from_device_kind('TPU v5') is chips.CHIPS['v5p']
  assert chips.from_device_kind('NVIDIA H100 80GB HBM3') is chips.CHIPS['h100']
  assert chips.from_device_kind('cpu') is None


def test_needed_bytes_from_resource_exhausted():
  from idea_prune_jax.tools import compile_check
  msg = ('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space '
         'hbm. Used 22.55G of 15.75G hbm. Exceeded hbm capacity by 6.80G.')
  assert compile_check.needed_bytes(msg) == int(22.55 * 2 ** 30)
  assert compile_check.needed_bytes('INTERNAL: something else') is None
  # libtpu 0.0.42.1's wording when the temporaries alone do not fit.
  msg = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
         'temporaries (132.88G) exceeds available HBM (95.74G).')
  assert compile_check.needed_bytes(msg) == int(132.88 * 2 ** 30)


# A small model splash can tile (seq 256, head_dim 128), 3 layers under nn.scan, chunked loss.
SPLASH_V5P = ('--config', os.path.join(ROOT, 'configs/tiny.py:test'), '--topology', 'v5p-8',
              '--mesh', 'data=2,fsdp=1,tensor=2', '--steps', 'enlarged',
              '--config.model.attention=splash', '--config.model.d_model=256',
              '--config.model.n_heads=2', '--config.model.n_kv_heads=2',
              '--config.model.n_layers=3', '--config.data.seq_len=256',
              '--config.model.remat_policy=save_attn_proj')


@needs_libtpu
def test_train_step_with_splash_compiles_for_v5p():
  # The whole enlarged train step, attention under shard_map over a data x tensor mesh,
  # compiled by XLA:TPU.
  out = _cli(*SPLASH_V5P, '--config.model.loss_chunk=128')
  assert out.returncode == 0, out.stderr[-4000:]
  report = json.loads(out.stdout)
  assert report['config']['platform'] == 'tpu' and report['config']['device_kind'] == 'TPU v5'
  assert report['config']['attention'] == 'splash'
  step = report['steps']['enlarged']
  assert step['fits_hbm_gib'] and 0 < step['total_gib'] < step['chip_hbm_gib'] == 95.0
  for key in ('flops', 'bytes_accessed', 'roofline_step_s', 'mfu_ceiling'):
    assert step[key] > 0, key
  # Every loop iteration counted (3 layers forward and backward, 2 loss chunks each way),
  # splash kernels included: above the model's own FLOPs (each loop counted once, as
  # cost_analysis() counts, gives about half).
  assert step['loops_counted'] and step['loop_trips'] == [2, 2, 3, 3], step['cost_source']
  assert 'every loop iteration counted' in step['cost_source']
  assert step['flops'] >= step['model_flops'] and step['kernel_flops'] > 0
  assert not step['flops_below_model']
  # The data axis all-reduces the gradients; the tensor axis gathers and reduces activations.
  assert step['collective_bytes'].get('all-reduce', 0) > 0 and step['ici_s'] > 0
  low, high = step['step_s_range']
  assert low == max(step['roofline_step_s'], step['ici_s'])
  assert high == pytest.approx(step['compute_s'] + step['memory_s'] + step['ici_s'])
  assert step['mfu_range'][0] <= step['mfu_range'][1] <= step['mfu_ceiling']
  assert 'enlarged' in out.stderr  # the table

  # Against the same step with the layers unrolled (the loss chunks still a loop): another
  # program (the scan adds slicing of the stacked layers, fusion differs), so close, not equal.
  out = _cli(*SPLASH_V5P, '--config.model.loss_chunk=128', '--config.model.unroll_layers=true')
  assert out.returncode == 0, out.stderr[-4000:]
  unrolled = json.loads(out.stdout)['steps']['enlarged']
  assert unrolled['loop_trips'] == [2, 2]
  assert step['flops'] == pytest.approx(unrolled['flops'], rel=0.06)
  assert step['bytes_accessed'] == pytest.approx(unrolled['bytes_accessed'], rel=0.15)
