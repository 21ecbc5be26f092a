"""Log-likelihood requests per second: our `idea-prune` LM vs lm-eval's own `hf` model, same export.

  .venv/bin/python benchmarks/harness.py [--repeats 3] [--no-append]

The export is the tiny config's model (4 layers, d_model 192, FFN 384, vocab 4096) with random
weights; the requests are the local multiple-choice task's (tests/data/harness/shakespeare_mc,
32 docs x 4 choices), built by lm-eval itself, and both models get the same Instances with batch
size 16 on the CPU. Compilation (ours) and the first call are timed apart; the rates are medians
of `repeats` calls, ours and theirs interleaved.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for _var in ('HF_DATASETS_OFFLINE', 'HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE'):
  os.environ.setdefault(_var, '1')

import dataclasses  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from idea_prune_jax import settings  # noqa: E402
from idea_prune_jax.eval import harness  # noqa: E402

TASK = 'shakespeare_mc'
BATCH = 16


def _export(directory):
  sys.path.insert(0, os.path.join(common.REPO, 'tests'))
  from test_harness import make_export
  tiny = settings.read(settings.load(os.path.join(common.REPO, 'configs/tiny.py'))).run.model
  cfg = dataclasses.replace(tiny, ffn_dim=384)
  return make_export(directory, cfg, spm_chars=400_000), cfg


def _requests():
  tm = harness.task_manager(os.path.join('tests', 'data', 'harness'), [TASK])
  task = tm.load([TASK])['tasks'][TASK]
  task.build_all_requests(rank=0, world_size=1)
  return task.instances


def _rate(lm, requests):
  t = time.perf_counter()
  out = lm.loglikelihood(requests, disable_tqdm=True)
  return len(requests) / (time.perf_counter() - t), out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--no-append', action='store_true')
  args = parser.parse_args()
  os.chdir(common.REPO)  # the task's data_files are relative to the repository root
  from lm_eval.models.huggingface import HFLM
  with tempfile.TemporaryDirectory(prefix='harness_bench_') as tmp:
    export_dir, cfg = _export(tmp)
    requests = _requests()
    t = time.perf_counter()
    ours = harness.IdeaPruneLM(checkpoint=export_dir, batch_size=BATCH, max_length=128)
    load_ours = time.perf_counter() - t
    t = time.perf_counter()
    theirs = HFLM(pretrained=os.path.join(export_dir, 'hf'), batch_size=BATCH, max_length=128,
                  prefix_token_id=3, device='cpu', dtype='float32')
    load_theirs = time.perf_counter() - t
    first_ours, _ = _rate(ours, requests)  # includes compiling the buckets
    first_theirs, _ = _rate(theirs, requests)
    rates = {'ours': [], 'hf': []}
    for _ in range(args.repeats):
      r, out_ours = _rate(ours, requests)
      rates['ours'].append(r)
      r, out_theirs = _rate(theirs, requests)
      rates['hf'].append(r)
  diff = float(np.max(np.abs(np.asarray([o[0] for o in out_ours]) -
                             np.asarray([o[0] for o in out_theirs]))))
  med = {k: common.median(v) for k, v in rates.items()}
  lengths = sorted(len(ours.tok_encode(''.join(r.args))) for r in requests)
  rows = [['idea-prune (JAX)', f'{med["ours"]:.1f}', f'{min(rates["ours"]):.1f}',
           f'{max(rates["ours"]):.1f}', f'{first_ours:.1f}', f'{load_ours:.1f}'],
          ['hf (torch)', f'{med["hf"]:.1f}', f'{min(rates["hf"]):.1f}',
           f'{max(rates["hf"]):.1f}', f'{first_theirs:.1f}', f'{load_theirs:.1f}']]
  body = (f'{len(requests)} loglikelihood requests of `{TASK}` ({lengths[0]}–{lengths[-1]} '
          f'tokens), batch size {BATCH}, max_length 128; model {cfg.n_layers} layers, d_model '
          f'{cfg.d_model}, FFN {cfg.ffn_dim}, vocab {cfg.vocab_size}, f32, '
          f'{jax.device_count()} CPU device(s).\n\n'
          + common.table(['model', 'requests/s median', 'min', 'max',
                          'first call req/s (ours compiles)', 'load s'], rows)
          + f'\n\nOurs / hf: **{med["ours"] / med["hf"]:.2f}×** (medians of {args.repeats}); '
          f'compiled programs: {dict(ours.scorer.traces)}; largest |Δ log-likelihood| between '
          f'the two: {diff:.1e}.\n')
  print(body)
  if not args.no_append:
    common.append_section('lm-eval log-likelihood throughput: idea-prune vs hf', body)


if __name__ == '__main__':
  main()
