"""Is the run healthy: MFU against the chip's peak, goodput, a profiler trace, the compile cache."""

import glob
import json
import os
import shutil
import subprocess
import sys
import types

import jax
import pytest

from conftest import ROOT, run_config
from idea_prune_jax.train import chips
from idea_prune_jax.train import plan as plan_lib


@pytest.mark.parametrize('kind, tflops', [
    ('TPU v4', 275), ('TPU v5 lite', 197), ('TPU v5e', 197), ('TPU v5p', 459), ('TPU v5', 459),
    ('TPU v6 lite', 918), ('TPU v6e', 918), ('NVIDIA H100 80GB HBM3', 989), ('NVIDIA H200', 989)])
def test_peak_of_each_chip(kind, tflops):
  device = types.SimpleNamespace(device_kind=kind, platform='tpu' if 'TPU' in kind else 'gpu')
  assert chips.peak_flops_per_device(device) == tflops * 1e12


def test_cpu_peak_is_measured_once():
  cpu = jax.devices('cpu')[0]
  first = chips.peak_flops_per_device(cpu)
  assert first > 1e8 and chips.peak_flops_per_device(cpu) == first  # cached, not re-measured


def test_unknown_accelerator_has_no_peak_rather_than_failing():
  device = types.SimpleNamespace(device_kind='Some NPU', platform='npu')
  assert chips.peak_flops_per_device(device) != chips.peak_flops_per_device(device)  # NaN


def test_rows_carry_mfu_report_has_goodput_and_the_profile_is_written(tmp_path, tiny_config):
  from idea_prune_jax.experiments import experiment
  config = tiny_config
  config.pipeline = 'scratch'
  config.train.update(steps=6, eval_every=3, ckpt_every=3)
  config.profile.update(start_step=2, steps=2)
  workdir = str(tmp_path)
  summary = experiment.run_experiment(run_config(config), workdir, do_export=False)
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  train = [r for r in rows if 'loss' in r]
  assert [r['step'] for r in train] == list(range(6))
  flops = plan_lib.step_flops(run_config(config), plan_lib.plan(run_config(config))[0])
  peak = chips.peak_flops_per_device(jax.devices()[0])
  for r in train:
    assert r['tflops_per_device'] == pytest.approx(flops / r['step_s'] / jax.device_count() / 1e12)
    assert r['mfu'] == pytest.approx(r['tflops_per_device'] * 1e12 / peak)
    assert r['tokens_per_s'] == pytest.approx(config.train.batch_size * config.data.seq_len /
                                              r['step_s'])
  goodput = summary['goodput']
  parts = sum(goodput[f'{k}_s'] for k in ('train', 'compile', 'data', 'eval', 'checkpoint',
                                          'restore', 'other'))
  assert parts == pytest.approx(goodput['wall_s'], abs=0.01)
  assert goodput['goodput'] == pytest.approx(goodput['train_s'] / goodput['wall_s'], abs=1e-3)
  assert goodput['compile_s'] > 0 and goodput['checkpoint_s'] > 0 and goodput['eval_s'] > 0
  report = json.load(open(tmp_path / 'report.json'))
  assert report['goodput'] == goodput and len(report['attempts']) == 1
  assert '## Goodput' in open(tmp_path / 'report.md').read()
  assert glob.glob(str(tmp_path / 'profile' / '**' / '*.xplane.pb'), recursive=True)


def test_a_resumed_run_loads_its_steps_from_the_compilation_cache(tmp_path):
  workdir = str(tmp_path / 'w')
  cmd = [sys.executable, '-m', 'idea_prune_jax.main', 'train', '--config',
         os.path.join(ROOT, 'configs/tiny.py:test'), '--workdir', workdir,
         '--config.train.steps=4', '--config.train.ckpt_every=2', '--config.train.eval_every=2']
  # Tiny CPU programs compile in well under JAX's 1 s threshold for caching.
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_LOG_COMPILES='1',
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
  assert first.returncode == 0, first.stderr[-3000:]
  assert glob.glob(os.path.join(workdir, 'jax_cache', 'jit_train_step-*'))
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))  # resume at step 2, same config
  second = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Persistent compilation cache hit for 'jit_train_step'" in second.stderr, second.stderr
  assert "CACHE MISS for 'jit_train_step'" not in second.stderr
