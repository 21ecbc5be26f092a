"""The idea-prune CLI: parameter counts, one-line errors, eval and generate on an export."""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from conftest import ROOT, run_config, validate
from idea_prune_jax import settings
from idea_prune_jax.io import export
from idea_prune_jax.model import model as model_lib
from idea_prune_jax.data import prepare


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'idea_prune_jax.main', *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=300)


def test_params_of_the_paper_pair():
  out = _cli('params', '--config', 'configs/paper_2p8b_to_1p3b.py')
  assert out.returncode == 0, out.stderr
  counts = json.loads(out.stdout)
  enlarged, target = counts['enlarged'], counts['target']
  assert enlarged['ffn_dim'] == 15872 and target['ffn_dim'] == 5632
  assert round(enlarged['params'] / 1e9, 2) == 2.81 and round(target['params'] / 1e9, 2) == 1.30
  assert target['d_model'] == enlarged['d_model'] == 2048  # FFN-only: the other axes stay


def test_unknown_config_key_is_one_line_naming_it():
  out = _cli('params', '--config', 'configs/tiny.py', '--config.prune.target_fnn=256')
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      "idea-prune: error: unknown config field '--config.prune.target_fnn' (did you mean "
      "'target_ffn'?); settings.py says where the fields are defined"]


def test_bad_value_is_refused_before_compute(tmp_path):
  out = _cli('train', '--config', 'configs/tiny.py:test', '--workdir', str(tmp_path),
             '--config.model.n_kv_heads=3')
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].startswith('idea-prune: error: config.model.n_heads=4')
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_eval_and_generate_on_an_export(tmp_path):
  config = settings.load(os.path.join(ROOT, 'configs/tiny.py:test'))
  prepare.prepare('embedded:hamlet,macbeth', str(tmp_path / 'data'), progress=False,
                  vocab_size=config.model.vocab_size, val_input='embedded:macbeth')
  tok_path = str(tmp_path / 'data' / 'tokenizer.model')
  cfg = dataclasses.replace(run_config(config).model, ffn_dim=40)
  params = nn.unbox(model_lib.init_params(cfg, jax.random.key(0)))
  export_dir = export.save_dense(str(tmp_path / 'export'), params, cfg, tok_path)
  text = tmp_path / 'text.txt'
  text.write_text('To be, or not to be, that is the question.\n' * 40)
  out = _cli('eval', '--checkpoint', export_dir, '--files', str(text))
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout)
  assert result['tokens'] > 100 and result['ppl'] > 1
  out = _cli('generate', '--checkpoint', export_dir, '--prompt', 'ROMEO:', '--max_new_tokens', '8')
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith('ROMEO:') and len(out.stdout) > len('ROMEO:')
  out = _cli('eval', '--checkpoint', str(tmp_path), '--files', str(text))
  assert out.returncode == 2 and 'not an export' in out.stderr


@pytest.mark.parametrize('field, value', [('train.log_every', 0), ('train.eval_every', 0),
                                          ('train.ckpt_every', 0), ('naive.score_batches', 0)])
def test_zero_cadences_and_score_batches_are_refused_naming_the_field(field, value):
  # 0 used to pass and then divide by zero after the first step (or keep neurons 0..f_T-1).
  config = settings.load(os.path.join(ROOT, 'configs/tiny.py:test'))
  group, name = field.split('.')
  config[group][name] = value
  with pytest.raises(settings.ConfigError, match=rf'^config\.{field}=0: must be >= 1') as e:
    validate(config, 1)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('bad', ['gs://ab/run', 'gs://My-Bucket/run', 'gs://-bucket/run',
                                 'gs://bucket_/run', 'gs://b@d/run', f'gs://{"x" * 64}/run'])
def test_bucket_names_gcs_rejects_fail_before_compute(bad):
  from idea_prune_jax.data import storage
  with pytest.raises(storage.StorageError, match=r'^--workdir=.*: gs://.* is not a valid bucket '
                                                 'name') as e:
    storage.check_workdir(bad)
  assert '\n' not in str(e.value)
  config = settings.load(os.path.join(ROOT, 'configs/tiny.py:test'))
  config.data.files = f'local.txt,{bad}/*.txt'
  with pytest.raises(settings.ConfigError, match=r'^config\.data\.files=.*not a valid bucket'):
    validate(config, 1)
  for good in ('gs://idea-prune-test/run', 'gs://a.b_c-9/x', f'gs://{"x" * 63}.{"y" * 63}/x'):
    assert storage.bucket_problem(good) == ''
  config.data.files = ''
  config.distill.teacher = 'gs://idea-prune-test/export'
  validate(config, 1)
