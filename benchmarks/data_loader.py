"""Loader throughput and host memory from prepared shards; what a v5p-64 host needs.

  python benchmarks/data_loader.py            # writes a section to BENCHMARKS.md
  python benchmarks/data_loader.py --quick    # seconds, prints only

1. Tokens/s of `data.TrainBatches` (shuffle, decode, concat-then-split packing, batch) per host
   with 0, 1 and 2 grain worker processes, seq_len 2048, on a synthetic prepared corpus.
2. Peak RSS of a training process (`idea-prune train`, tiny model, 20 steps) reading a ~50 MB
   and a ~1 GB prepared corpus: host memory must not grow with the corpus.
3. Tokens/s one v5p-64 host must feed for the paper pair at 50% MFU, from model.flops_per_token.

Synthetic corpora: random-length documents of random ids, written as prepare-data writes them
(the embedded corpus' tokenizer, vocab 4096), so the reader does exactly its real work.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from idea_prune_jax import config as config_lib  # noqa: E402
from idea_prune_jax import data, prepare  # noqa: E402
from idea_prune_jax import model as model_lib  # noqa: E402

V5P_PEAK_BF16 = 459e12  # FLOP/s per chip
V5P_CHIPS_PER_HOST = 4


def synthetic_corpus(out: str, n_bytes: int, tokenizer_dir: str, seed: int = 0) -> dict:
  """A prepared dir of ~n_bytes of int32 documents (mean 1000 tokens), plus a small val split."""
  from array_record.python import array_record_module
  os.makedirs(out, exist_ok=True)
  manifest = prepare.read_manifest(tokenizer_dir)
  with open(os.path.join(tokenizer_dir, prepare.TOKENIZER), 'rb') as f:
    model = f.read()
  with open(os.path.join(out, prepare.TOKENIZER), 'wb') as f:
    f.write(model)
  rng = np.random.default_rng(seed)
  splits = {}
  for split, size in (('train', n_bytes), ('validation', 4 << 20)):
    shards, docs, tokens, written, j = [], 0, 0, 0, 0
    while written < size:
      name = f'{split}-00000-of-00001-{j:05d}.array_record'
      writer = array_record_module.ArrayRecordWriter(os.path.join(out, name), 'group_size:1')
      shard_bytes = 0
      while shard_bytes < prepare.SHARD_BYTES and written < size:
        doc = rng.integers(4, 4096, rng.integers(100, 1900), dtype=np.int32)
        writer.write(doc.astype('<i4').tobytes())
        shard_bytes += doc.nbytes
        written += doc.nbytes
        docs, tokens = docs + 1, tokens + len(doc)
      writer.close()
      shards.append(name)
      j += 1
    splits[split] = {'documents': docs, 'tokens': tokens, 'shards': shards}
  full = {**manifest, 'input': f'synthetic:{n_bytes}', 'splits': splits}
  with open(os.path.join(out, prepare.MANIFEST), 'w') as f:
    json.dump(full, f)
  return full


def loader_tokens_per_s(prepared_dir: str, workers: int, seconds: float) -> float:
  config = config_lib.base()
  config.data.update(source='prepared', prepared_dir=prepared_dir, seq_len=2048, workers=workers)
  config.train.batch_size = 16
  it = data.build(config, '/unused').train
  next(it)  # workers started, first batch out
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    batch = next(it)
    n += batch['inputs'].size
  return n / (time.perf_counter() - t0)


def training_peak_rss_mb(prepared_dir: str, workdir: str) -> float:
  """ru_maxrss of an `idea-prune train` child (tiny model, 20 steps) reading prepared_dir."""
  cmd = [sys.executable, '-m', 'idea_prune_jax.main', 'train', '--config',
         os.path.join(common.REPO, 'configs/tiny.py'), '--workdir', workdir,
         '--config.data.source=prepared', f'--config.data.prepared_dir={prepared_dir}',
         '--config.train.steps=20', '--config.train.eval_every=20', '--config.train.eval_batches=1',
         '--config.train.ckpt_every=1000']
  # A fresh parent per measurement: RUSAGE_CHILDREN's maxrss is the largest child it has seen.
  wrapper = ('import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, '
             'capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)')
  out = subprocess.run([sys.executable, '-c', wrapper, *cmd], check=True, capture_output=True,
                       text=True, cwd=common.REPO)
  return int(out.stdout.split()[-1]) / 1024


def v5p_host_tokens_per_s(mfu: float = 0.5) -> dict:
  paper = config_lib.load(os.path.join(common.REPO, 'configs/paper_2p8b_to_1p3b.py'))
  cfg = config_lib.ModelConfig.from_config(paper)
  flops = model_lib.flops_per_token(cfg, paper.data.seq_len)
  per_host = V5P_CHIPS_PER_HOST * V5P_PEAK_BF16 * mfu / flops
  return {'flops_per_token': flops, 'tokens_per_s_per_host': per_host}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true')
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
  tmp = tempfile.mkdtemp(prefix='loader_bench_')
  tok_dir = os.path.join(tmp, 'tok')
  prepare.prepare('embedded', tok_dir, vocab_size=4096, val_input='embedded:tempest',
                  max_docs=4, progress=False)
  small = os.path.join(tmp, 'small')
  synthetic_corpus(small, (8 if args.quick else 50) << 20, tok_dir)
  seconds = 3.0 if args.quick else 15.0
  rates = {w: loader_tokens_per_s(small, w, seconds) for w in (0, 1, 2)}
  need = v5p_host_tokens_per_s()
  rows = [[f'{w}', f'{r:,.0f}', f'{r / need["tokens_per_s_per_host"]:.1f}x']
          for w, r in rates.items()]
  body = common.table(['grain workers', 'tokens/s (1 host, seq 2048)', 'vs v5p-64 host need'],
                      rows)
  body += (f'\n\nA v5p-64 host (4 chips x {V5P_PEAK_BF16 / 1e12:.0f} TFLOP/s bf16) at 50% MFU on '
           f'the 2.8B enlarged model ({need["flops_per_token"]:.3g} FLOPs/token = '
           f'model.flops_per_token, seq 2048) trains '
           f'{need["tokens_per_s_per_host"]:,.0f} tokens/s: 4 x 459e12 x 0.5 / FLOPs per token.\n')
  if not args.quick:
    big = os.path.join(tmp, 'big')
    synthetic_corpus(big, 1 << 30, tok_dir, seed=1)
    rss_small = training_peak_rss_mb(small, os.path.join(tmp, 'run_small'))
    rss_big = training_peak_rss_mb(big, os.path.join(tmp, 'run_big'))
    body += '\n' + common.table(
        ['prepared corpus', 'train tokens', 'peak RSS of idea-prune train (MB)'],
        [['~50 MB', f'{prepare.read_manifest(small)["splits"]["train"]["tokens"]:,}',
          f'{rss_small:.0f}'],
         ['~1 GB', f'{prepare.read_manifest(big)["splits"]["train"]["tokens"]:,}',
          f'{rss_big:.0f}']])
    body += f'\n\nRSS ratio 1 GB / 50 MB: {rss_big / rss_small:.3f} (target: within 10%).\n'
  print(body)
  if not args.quick:
    common.append_section('Data loader: tokens/s per host and peak RSS', body)


if __name__ == '__main__':
  main()
