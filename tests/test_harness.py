"""lm-eval-harness: our `idea-prune` LM against lm-eval's own `hf` model on the HF export of the
same checkpoint, bounded compilations, the CLI, and one-line errors. Needs the `eval` and `hf`
extras (lm-eval, torch, transformers); skips without them.

The local tasks (tests/data/harness) read their JSONL relative to the repository root, so every
test here runs from there.
"""

import json
import os
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

from idea_prune_jax.io import export  # noqa: E402
from idea_prune_jax.eval import harness, scoring  # noqa: E402
from idea_prune_jax.data import inputs  # noqa: E402
from idea_prune_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from idea_prune_jax.model import model as model_lib  # noqa: E402
from idea_prune_jax.model.config import ModelConfig  # noqa: E402

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
  text = inputs.embedded_works()['hamlet'][:spm_chars]
  with open(tok, 'wb') as f:
    f.write(tokenizer_lib.train_spm(list(tokenizer_lib.spm_chunks(text)), cfg.vocab_size))
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
  for var, value in harness.OFFLINE_ENV.items():
    monkeypatch.setenv(var, value)


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
      'dtype=float32', batch_size=8, device='cpu', **common)
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
  # Greedy flags: a context with its own greedy continuation is greedy; one token off is not.
  other = out[2][:-1] + [(out[2][-1] + 1) % 500]
  flags = [g for _, g in scorer.loglikelihood([(contexts[2], out[2]), (contexts[2], other)])]
  assert flags == [True, False] and scorer.traces['loglikelihood'] == 2


def test_tokenizer_matches_the_hf_export(exported):
  import transformers
  lm = harness.IdeaPruneLM(scorer=object(), sp=_sp(exported))
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(exported, 'hf'))
  for row in map(json.loads, open(os.path.join(TASKS_DIR, 'shakespeare_mc.jsonl'))):
    for text in [row['context']] + [row['context'] + c for c in row['choices']]:
      assert lm.tok_encode(text) == tok(text)['input_ids']  # BOS first on both sides
  assert lm.eot_token_id == tok.eos_token_id == tokenizer_lib.EOS_ID
  assert lm.prefix_token_id == tok.bos_token_id == tokenizer_lib.BOS_ID  # the hf model's prefix too


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


def test_importing_the_harness_leaves_the_environment_alone():
  """OFFLINE_ENV is for entry points to set; they set it after this import, which is in time only
  while the import loads neither of the libraries that read it once."""
  env = {k: v for k, v in os.environ.items() if k not in harness.OFFLINE_ENV}
  code = ('import os, sys; before = dict(os.environ); import idea_prune_jax.eval.harness as h; '
          'print(dict(os.environ) == before, sorted({"datasets", "huggingface_hub"} & '
          'set(sys.modules)), sorted(h.OFFLINE_ENV))')
  out = subprocess.run([sys.executable, '-c', code], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split('\n')[-2] == (
      "True [] ['HF_DATASETS_OFFLINE', 'HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE']")


def _cli(*args, module='idea_prune_jax.main'):
  env = dict(os.environ, HF_DATASETS_OFFLINE='1', HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
  return subprocess.Popen([sys.executable, '-m', module, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def _done(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def test_lm_eval_cli_with_the_model_registered(exported, monkeypatch, capsys):
  """`python -m idea_prune_jax.eval.harness ARGS` is lm-eval's CLI; run in-process here, with
  lm-eval's own TaskManager limited to the include_path (indexing its built-in tasks takes a
  minute)."""
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


def test_cli_eval_tasks(exported, tmp_path):
  out_json = tmp_path / 'results.json'
  rc, out, err = _done(_cli('eval', '--checkpoint', exported, '--tasks', 'shakespeare_mc',
                            '--include_path', TASKS_DIR, '--limit', '4', '--batch_size', '4',
                            '--output', str(out_json)))
  assert rc == 0, err[-3000:]
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary['shakespeare_mc']['sample_len'] == 4 and 0 <= summary['shakespeare_mc']['acc'] <= 1
  assert json.loads(out_json.read_text())['results']['shakespeare_mc']['acc,none'] == (
      summary['shakespeare_mc']['acc'])


def test_bad_checkpoints_are_one_line(exported, tmp_path):
  """What `eval --tasks` prints after 'idea-prune: error: ' (main catches these errors)."""
  # The 512-piece tokenizer of `exported` on a 256-token model: ids the model cannot embed. The
  # tokenizer is checked before the params are read, so config.json and tokenizer.model suffice.
  mismatched = tmp_path / 'small'
  mismatched.mkdir()
  info = json.loads(open(os.path.join(exported, 'config.json')).read())
  info['model']['vocab_size'] = 256
  (mismatched / 'config.json').write_text(json.dumps(info))
  (mismatched / 'tokenizer.model').write_bytes(
      open(export.export_info(exported)['tokenizer'], 'rb').read())
  mismatched = str(mismatched)
  run_dir = tmp_path / 'run'
  (run_dir / 'export').mkdir(parents=True)
  (run_dir / 'export' / 'config.json').write_text('{}')
  for kwargs, error, match in [
      ({'checkpoint': str(tmp_path)}, export.ExportError, r'not an export \(no readable config'),
      ({'checkpoint': str(run_dir)}, harness.HarnessError, 'a run directory.*pass .*/export'),
      ({'checkpoint': mismatched}, harness.HarnessError,
       "has 512 pieces but the model's vocabulary has 256"),
      ({'checkpoint': exported, 'batch_size': 'auto'}, harness.HarnessError, 'auto'),
      ({'checkpoint': exported, 'chekpoint': 'x'}, harness.HarnessError,
       r"unknown model_args \['chekpoint'\]")]:
    with pytest.raises(error, match=match) as e:
      harness.IdeaPruneLM(**kwargs)
    assert '\n' not in str(e.value)


def _worker(export_dir, out_dir, n_devices, process=None, port=None):
  env = {k: v for k, v in os.environ.items() if not k.startswith('IDEA_PRUNE_')}
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={n_devices} '
             '--xla_backend_optimization_level=0', JAX_PLATFORMS='cpu')
  if process is not None:
    env.update(IDEA_PRUNE_DISTRIBUTED='1', IDEA_PRUNE_COORDINATOR=f'127.0.0.1:{port}',
               IDEA_PRUNE_NUM_PROCESSES='2', IDEA_PRUNE_PROCESS_ID=str(process))
  return subprocess.Popen([sys.executable, os.path.join(ROOT, 'tests', 'harness_worker.py'),
                           export_dir, out_dir], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_two_processes_return_what_one_process_returns(exported, tmp_path):
  """Each process feeds its own rows of every global batch (1 device each; the reference has 2
  devices in one process) and all of them get every request's result."""
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs = [_worker(exported, str(tmp_path / 'multi'), 1, i, port) for i in range(2)]
  procs.append(_worker(exported, str(tmp_path / 'single'), 2))
  try:
    logs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, 9)  # its own session: the worker and nothing else
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  multi = [json.loads((tmp_path / 'multi' / f'result_{i}.json').read_text()) for i in range(2)]
  single = json.loads((tmp_path / 'single' / 'result_0.json').read_text())
  assert [m['process_count'] for m in multi] == [2, 2] and single['process_count'] == 1
  assert multi[0]['device_count'] == single['device_count'] == 2
  assert multi[0] == multi[1]  # every process has every result
  got, want = multi[0], single
  np.testing.assert_allclose([r[0] for r in got['loglikelihood']],
                             [r[0] for r in want['loglikelihood']], rtol=1e-5)
  assert [r[1] for r in got['loglikelihood']] == [r[1] for r in want['loglikelihood']]
  np.testing.assert_allclose(got['rolling'], want['rolling'], rtol=1e-5)
  assert got['generate'] == want['generate'] and any(got['generate'])
  assert got['traces'] == want['traces']


def test_run_reports_downstream_tasks_and_compare_adds_a_column(exported, tmp_path,
                                                                tiny_config):
  """What `run` does after training, on the params as they lie on a mesh (the whole pipeline is
  covered elsewhere; here only the three lines that call this are skipped)."""
  from idea_prune_jax.experiments import experiment
  from idea_prune_jax.tools import report
  config = tiny_config
  config.eval.update(tasks='shakespeare_mc,shakespeare_gen', include_path=TASKS_DIR, limit=4,
                     batch_size=8)
  config.data.seq_len = MAX_LENGTH
  params, model_cfg = export.load_dense(exported)
  mesh = scoring.make_mesh()
  params = scoring.shard_params(params, model_cfg, mesh)
  downstream = experiment.downstream(config, params, model_cfg, mesh, _sp(exported))
  assert set(downstream) == {'shakespeare_mc', 'shakespeare_gen'}
  assert 0 <= downstream['shakespeare_mc']['acc'] <= 1
  assert downstream['shakespeare_mc']['sample_len'] == 4
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'metrics.jsonl').write_text('')
  report.write_report(str(workdir), {'pipeline': 'idea', 'downstream': downstream})
  saved = json.loads((workdir / 'report.json').read_text())
  assert saved['downstream'] == downstream
  md = (workdir / 'report.md').read_text()
  assert '## Downstream tasks (lm-eval)' in md and '| shakespeare_mc | acc |' in md

  # compare: one column per task, the headline metric's mean over seeds.
  base = {'val_loss': [4.0, 4.2], 'val_ppl': [55.0, 66.0], 'wall_s': [1.0, 1.0],
          'params_final': 10, 'tokens': 100, 'train_flops': 1e9}
  results = {'idea': {**base, 'downstream': [{'mc': {'acc': 0.5, 'acc_norm': 0.1}},
                                             {'mc': {'acc': 0.25, 'acc_norm': 0.2}}]},
             'naive': {**base, 'downstream': []}}
  report.write_compare(str(tmp_path / 'cmp'), results)
  lines = (tmp_path / 'cmp' / 'compare.md').read_text().splitlines()
  header = next(line for line in lines if line.startswith('| rank'))
  assert header.endswith('| mc acc |')
  assert next(line for line in lines if '| idea |' in line).endswith('| 0.3750 |')
  assert next(line for line in lines if '| naive |' in line).endswith('| — |')


def test_bad_task_in_config_fails_before_training(tmp_path, tiny_config):
  from idea_prune_jax.experiments import experiment
  (tmp_path / 'tasks').mkdir()
  (tmp_path / 'tasks' / 't.yaml').write_text('task: hub_only\ndataset_path: someorg/somedata\n')
  tiny_config.eval.update(tasks='hub_only', include_path=str(tmp_path / 'tasks'))
  with pytest.raises(harness.HarnessError, match="needs dataset 'someorg/somedata'"):
    experiment.run_experiment(tiny_config, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')
