"""compile-check: the idea steps compiled from abstract state on 8 fake devices, and mesh errors."""

import json
import os
import subprocess
import sys

import pytest

from conftest import FAST_COMPILE_FLAG, run_config
from idea_prune_jax.train import chips
from idea_prune_jax.tools import compile_check
from idea_prune_jax.settings import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=900):
  # No device count in XLA_FLAGS: the command itself must set it before JAX starts its backend.
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  # An existing flag the command must keep (and conftest's, for speed).
  env['XLA_FLAGS'] = f'--xla_cpu_enable_fast_math=false {FAST_COMPILE_FLAG}'
  return subprocess.run([sys.executable, '-m', 'idea_prune_jax.main', 'compile-check',
                         '--config', os.path.join(ROOT, 'configs/tiny.py:test'), *args],
                        env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_every_step_compiles_with_ordered_sizes():
  out = _cli('--devices', '8', '--mesh', 'data=2,fsdp=2,tensor=2')
  assert out.returncode == 0, out.stderr[-4000:]
  report = json.loads(out.stdout)
  assert report['config']['devices'] == 8
  assert report['config']['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}
  steps = report['steps']
  assert list(steps) == [name for name, _ in compile_check.STEPS]
  assert set(steps) == {'enlarged', 'prune', 'prune_nokd', 'recovery', 'naive_score', 'eval'}
  for s in steps.values():
    for key in ('argument_bytes', 'output_bytes', 'temp_bytes', 'total_bytes'):
      assert s[key] > 0, (key, s)
    assert s['total_bytes'] == (s['argument_bytes'] + s['output_bytes'] + s['temp_bytes']
                                - s['alias_bytes'])
    assert s['fits_hbm_gib'] is True
    assert s['flops'] > 0 and s['bytes_accessed'] > 0 and s['model_flops'] > 0
    # XLA:CPU's program too: the layer loop (2 layers) counted as often as it runs.
    assert s['loops_counted'] and 2 in s['loop_trips'], s['cost_source']
    # Every step shards over data, fsdp and tensor: its collectives move bytes between chips.
    assert s['ici_bytes'] == sum(s['collective_bytes'].values()) > 0
  enlarged, prune, recovery = steps['enlarged'], steps['prune'], steps['recovery']
  assert prune['kd'] and prune['teacher'] and prune['masks']
  assert not (recovery['kd'] or recovery['teacher'] or recovery['masks'])
  assert recovery['ffn_dim'] < enlarged['ffn_dim']
  # The shrunk model is smaller; the prune+KD state adds masks, scores and a teacher.
  assert recovery['argument_bytes'] < enlarged['argument_bytes'] < prune['argument_bytes']
  assert not steps['prune_nokd']['teacher'] and steps['prune_nokd']['masks']
  assert steps['prune_nokd']['argument_bytes'] < prune['argument_bytes']
  # The eval forward holds params only; scoring holds params and scores (no optimizer state).
  assert steps['eval']['argument_bytes'] < steps['naive_score']['argument_bytes'] < enlarged[
      'argument_bytes']
  # Donation: the whole state is aliased input -> output.
  assert enlarged['alias_bytes'] == enlarged['state_bytes']


def test_roofline_range_prices_collectives_at_ici_bandwidth():
  chip = chips.CHIPS['v6e']  # 918 TFLOP/s, 1640 GB/s HBM, 800 GB/s ICI both ways over 4 ports
  r = compile_check.roofline(flops=918e12, bytes_accessed=820e9, model_flops=459e12, chip=chip,
                             ici_bytes=200e9)
  assert (r['compute_s'], r['memory_s'], r['ici_s']) == pytest.approx((1.0, 0.5, 0.5))
  assert r['roofline_step_s'] == 1.0 and r['bound'] == 'compute' and r['mfu_ceiling'] == 0.5
  assert r['step_s_range'] == pytest.approx([1.0, 2.0]) and r['mfu_range'] == [0.25, 0.5]
  r = compile_check.roofline(918e12, 820e9, 459e12, chip, ici_bytes=800e9)
  assert r['bound'] == 'ici' and r['step_s_range'] == pytest.approx([2.0, 3.5])
  assert r['roofline_step_s'] == 1.0  # the chip alone, as before


def test_bad_mesh_is_one_line_error():
  out = _cli('--devices', '8', '--mesh', 'data=2,fsdp=2,tensor=3', timeout=120)
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('idea-prune: error:') and 'mesh' in last, out.stderr[-2000:]


def test_parse_mesh():
  assert compile_check.parse_mesh('data=1,fsdp=16,tensor=4') == {'data': 1, 'fsdp': 16,
                                                                 'tensor': 4}
  assert compile_check.parse_mesh('fsdp=-1') == {'fsdp': -1}
  for bad in ('', 'data', 'pipe=2', 'tensr=2', 'data=1.5', 'fsdp=0'):
    with pytest.raises(ConfigError, match='mesh'):
      compile_check.parse_mesh(bad)


def test_calibration_config_is_llama31_8b_at_maxtexts_benchmark_shape():
  from idea_prune_jax import settings
  from idea_prune_jax.model import model as model_lib
  config = settings.load(os.path.join(ROOT, 'configs/llama31_8b.py:v6e256'))
  # Llama 3.1 8B's published parameter count; 4 sequences of 8192 on each of 256 chips.
  assert model_lib.param_count(run_config(config).model) == 8_030_261_248
  assert (config.data.seq_len, config.train.batch_size) == (8192, 4 * 256)


def test_second_calibration_config_is_maxtexts_16b_at_its_v5e_shape():
  from idea_prune_jax import settings
  from idea_prune_jax.model import model as model_lib
  run = run_config(settings.load(os.path.join(ROOT, 'configs/maxtext_16b.py:v5e256')))
  # 64 heads of 128 on a 4096 model: head_dim is not d_model / n_heads.
  assert run.model.n_heads * run.model.head_dim == 8192 != run.model.d_model
  assert model_lib.param_count(run.model) == 15_831_666_688  # MaxText's "16B"
  assert (run.data.seq_len, run.train.batch_size) == (2048, 6 * 256)
