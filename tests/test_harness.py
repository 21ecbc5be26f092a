"""lm-eval-harness: our `idea-prune` LM against lm-eval's own `hf` model on the HF export of the
same checkpoint, bounded compilations, the CLI, and one-line errors. Needs the `eval` and `hf`
extras (lm-eval, torch, transformers); skips without them.

The local tasks (tests/data/harness) read their JSONL relative to the repository root, so every
test here runs from there.
"""

import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT

pytest.importorskip('lm_eval')
pytest.importorskip('torch')
pytest.importorskip('transformers')

from idea_prune_jax import data as data_lib  # noqa: E402
from idea_prune_jax import export, harness, scoring  # noqa: E402
from idea_prune_jax import model as model_lib  # noqa: E402
from idea_prune_jax.config import ModelConfig  # noqa: E402

TASKS_DIR = os.path.join('tests', 'data', 'harness')
TASKS = ['shakespeare_mc', 'shakespeare_gen', 'shakespeare_ppl']
MAX_LENGTH = 64  # small, so the rolling task needs several windows per passage
CFG = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40)


def make_export(directory, cfg=CFG, seed=0, spm_chars=100_000):
  """A dense export + its HF directory: random params far from init (peaked predictions, so the
  greedy flags and generations mean something), with byte pieces' embeddings zeroed so greedy
  text is made of whole pieces (HF's tokenizer decodes stray bytes differently from ours)."""
  os.makedirs(directory, exist_ok=True)
  tok = os.path.join(directory, 'spm.model')
  text = data_lib.embedded_works()['hamlet'][:spm_chars]
  with open(tok, 'wb') as f:
    f.write(data_lib.train_spm(data_lib.spm_sentences([text]), min(cfg.vocab_size, 512)))
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=tok)
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: nn.unbox(model_lib.init_params(cfg, jax.random.key(0))))
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray(
          (1.0 + 0.2 * rng.standard_normal(x.shape)) if 'scale' in jax.tree_util.keystr(path)
          else 0.15 * rng.standard_normal(x.shape), x.dtype), shapes)
  byte_ids = [i for i in range(sp.get_piece_size()) if sp.is_byte(i)]
  params['embed'] = params['embed'].at[jnp.asarray(byte_ids, jnp.int32)].set(0.0)
  out = export.save_dense(os.path.join(directory, 'export'), params, cfg, tok,
                          extra={'seq_len': MAX_LENGTH})
  export.save_hf(os.path.join(out, 'hf'), params, cfg, tok)
  return out


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  return make_export(str(tmp_path_factory.mktemp('harness')))


@pytest.fixture(autouse=True)
def _offline_from_root(monkeypatch):
  monkeypatch.chdir(ROOT)
  for var in ('HF_DATASETS_OFFLINE', 'HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE'):
    monkeypatch.setenv(var, '1')


def _resps(results, task):
  return [s['resps'] for s in sorted(results['samples'][task], key=lambda s: s['doc_id'])]


def test_loglikelihoods_and_accuracies_match_lm_eval_hf_model(exported):
  import lm_eval
  tm = harness.task_manager(TASKS_DIR, TASKS)
  common = dict(tasks=TASKS, task_manager=tm, limit=16, bootstrap_iters=0, log_samples=True)
  # The model by its registered name, as lm-eval's CLI makes it: --model_args win over the
  # CLI's own --batch_size (default 1).
  ours = lm_eval.simple_evaluate(
      model='idea-prune', model_args=f'checkpoint={exported},batch_size=8', batch_size=1,
      **common)
  theirs = lm_eval.simple_evaluate(
      model='hf', model_args=f'pretrained={exported}/hf,max_length={MAX_LENGTH},'
      'prefix_token_id=3,dtype=float32', batch_size=8, device='cpu', **common)
  ll_ours = [r for doc in _resps(ours, 'shakespeare_mc') for [r] in doc]
  ll_theirs = [r for doc in _resps(theirs, 'shakespeare_mc') for [r] in doc]
  assert len(ll_ours) == len(ll_theirs) == 64
  np.testing.assert_allclose([r[0] for r in ll_ours], [r[0] for r in ll_theirs], atol=1e-3,
                             rtol=0)
  assert [r[1] for r in ll_ours] == [r[1] for r in ll_theirs]
  rolling = [[r[0] for r in _resps(res, 'shakespeare_ppl')] for res in (ours, theirs)]
  assert len(rolling[0]) == 8 and min(len(t) for t in rolling) > 0
  np.testing.assert_allclose(*rolling, atol=1e-3, rtol=0)
  gen = [_resps(res, 'shakespeare_gen') for res in (ours, theirs)]
  assert gen[0] == gen[1] and any(g[0][0].strip() for g in gen[0])  # non-empty, identical text
  a, b = harness.summary(ours), harness.summary(theirs)
  for task, metric in [('shakespeare_mc', 'acc'), ('shakespeare_mc', 'acc_norm'),
                       ('shakespeare_gen', 'exact_match')]:
    assert a[task][metric] == b[task][metric], (task, metric, a[task], b[task])
  np.testing.assert_allclose(a['shakespeare_ppl']['word_perplexity'],
                             b['shakespeare_ppl']['word_perplexity'], rtol=1e-4)


def test_bucket_lengths():
  assert [scoring.bucket(n, 64) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
  assert scoring.bucket(40, 48) == 48  # capped at max_length, not the next power of two


def test_one_compilation_per_bucket_and_kind_and_padding_changes_nothing(exported):
  scorer, sp = harness.load(exported, batch_size=4, max_length=32)
  rng = np.random.default_rng(0)
  # 2 buckets (16, 32), several batches each, a ragged last batch, and pairs longer than
  # max_length + 1 (truncated from the left).
  lengths = [3, 5, 9, 14, 15, 16, 17, 18, 20, 25, 31, 32, 33, 40, 64]
  pairs = [(rng.integers(4, 500, n - 2).tolist(), rng.integers(4, 500, 2).tolist())
           for n in lengths]
  got = scorer.loglikelihood(pairs)
  assert scorer.traces['loglikelihood'] == 2
  again = scorer.loglikelihood(pairs[::-1][:7])  # other batches, same buckets: no new program
  assert scorer.traces['loglikelihood'] == 2
  assert again == got[::-1][:7]  # and a row's result does not depend on its batch-mates
  # A request alone and unpadded gives the same log-likelihood (the truncated one).
  (ctx, cont), (logp, greedy) = pairs[-1], got[-1]
  seq = np.asarray((ctx + cont)[-33:])
  logits = model_lib.Transformer(CFG).apply({'params': scorer.params}, seq[None, :-1])[0]
  lp = np.asarray(jax.nn.log_softmax(logits))[np.arange(len(seq) - 1), seq[1:]]
  np.testing.assert_allclose(logp, lp[-2:].sum(), atol=1e-4, rtol=0)
  assert greedy == bool(np.all(np.asarray(logits.argmax(-1))[-2:] == seq[-2:]))
  contexts = [rng.integers(4, 500, n).tolist() for n in (2, 5, 11, 13, 20, 40)]
  out = scorer.generate(contexts, 4, sp.eos_id())
  assert scorer.traces['generate_until'] == 2  # 16 and 32 (the 40-token context is cut to 28)
  alone = [scorer.generate([c], 4, sp.eos_id())[0] for c in (contexts[0], contexts[-1])]
  assert [out[0], out[-1]] == alone and scorer.traces['generate_until'] == 2
  assert all(len(o) == 4 for o in out)  # byte pieces aside, random weights rarely say EOS


def test_tokenizer_matches_the_hf_export(exported):
  import transformers
  lm = harness.IdeaPruneLM(scorer=object(), sp=_sp(exported))
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(exported, 'hf'))
  for row in map(json.loads, open(os.path.join(TASKS_DIR, 'shakespeare_mc.jsonl'))):
    for text in [row['context']] + [row['context'] + c for c in row['choices']]:
      assert lm.tok_encode(text) == tok(text)['input_ids']  # no BOS on either side
  assert lm.eot_token_id == tok.eos_token_id == lm.prefix_token_id == data_lib.EOS_ID


def _sp(exported):
  import sentencepiece as spm
  return spm.SentencePieceProcessor(model_file=export.export_info(exported)['tokenizer'])


def test_unknown_task_and_network_tasks_are_one_line(tmp_path):
  (tmp_path / 'hub.yaml').write_text('task: hub_task\ndataset_path: Rowan/hellaswag\n')
  (tmp_path / 'url.yaml').write_text(
      'task: url_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n'
      '    test: hf://datasets/EleutherAI/arithmetic/data/x.jsonl\n')
  (tmp_path / 'missing.yaml').write_text(
      'task: missing_task\ndataset_path: json\ndataset_kwargs:\n  data_files: nowhere.jsonl\n')
  tm = harness.task_manager(str(tmp_path), ['hub_task'])  # only the local tasks: fast
  for tasks, match in [(['hub_task', 'nosuch_task'], r"unknown task\(s\) \['nosuch_task'\]"),
                       (['hub_task'], "'Rowan/hellaswag' from the Hugging Face Hub.*offline"),
                       (['url_task'], 'hf://.*needs the network'),
                       (['missing_task'], 'nowhere.jsonl not found')]:
    with pytest.raises(harness.HarnessError, match=match) as e:
      harness.check_tasks(tm, tasks)
    assert '\n' not in str(e.value)
  harness.check_tasks(harness.task_manager(TASKS_DIR, TASKS), TASKS)  # ours are all local


def _cli(*args, module='idea_prune_jax.main'):
  env = dict(os.environ, HF_DATASETS_OFFLINE='1', HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
  return subprocess.Popen([sys.executable, '-m', module, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def _done(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def test_lm_eval_cli_with_the_model_registered(exported, monkeypatch, capsys):
  """`python -m idea_prune_jax.harness ARGS` is lm-eval's CLI; run in-process here, with lm-eval's
  own TaskManager limited to the include_path (indexing its built-in tasks takes a minute)."""
  import lm_eval.tasks
  full = lm_eval.tasks.TaskManager
  monkeypatch.setattr(lm_eval.tasks, 'TaskManager',
                      lambda *a, **k: full(*a, **{**k, 'include_defaults': False}))
  monkeypatch.setattr(sys, 'argv', sys.argv)
  harness.cli(['lm_eval', '--model', 'idea-prune', '--model_args',
               f'checkpoint={exported},batch_size=4', '--tasks', 'shakespeare_mc',
               '--include_path', TASKS_DIR, '--limit', '4'])
  table = capsys.readouterr().out
  assert 'idea-prune' in table and '|shakespeare_mc|' in table.replace(' ', '')


def test_cli_eval_tasks_and_bad_input(exported, tmp_path):
  small = ModelConfig(vocab_size=256, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=8)
  params = nn.unbox(model_lib.init_params(small, jax.random.key(0)))
  # The 512-piece tokenizer of `exported` on a 256-token model: ids the model cannot embed.
  mismatched = export.save_dense(str(tmp_path / 'small'), params, small,
                                 export.export_info(exported)['tokenizer'])
  out_json = tmp_path / 'results.json'
  task_args = ['--tasks', 'shakespeare_mc', '--include_path', TASKS_DIR, '--limit', '4']
  procs = {
      'eval': _cli('eval', '--checkpoint', exported, *task_args, '--batch_size', '4',
                   '--output', str(out_json)),
      'no_config': _cli('eval', '--checkpoint', str(tmp_path), *task_args),
      'tokenizer': _cli('eval', '--checkpoint', mismatched, *task_args),
  }
  results = {k: _done(p) for k, p in procs.items()}
  rc, out, err = results['eval']
  assert rc == 0, err[-3000:]
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary['shakespeare_mc']['sample_len'] == 4 and 0 <= summary['shakespeare_mc']['acc'] <= 1
  assert json.loads(out_json.read_text())['results']['shakespeare_mc']['acc,none'] == (
      summary['shakespeare_mc']['acc'])
  # (unknown and network tasks: test_unknown_task_and_network_tasks_are_one_line)
  for name, match in [('no_config', 'not an export \\(no readable config.json'),
                      ('tokenizer', 'has 512 pieces but the model\'s vocabulary has 256')]:
    rc, _, err = results[name]
    lines = err.strip().splitlines()
    assert rc == 2 and lines[-1].startswith('idea-prune: error: '), (name, err[-2000:])
    assert re.search(match, lines[-1]), (name, lines[-1])
