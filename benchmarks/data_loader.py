"""Loader throughput and host memory from prepared shards; what a v5p-64 host needs.

  python benchmarks/data_loader.py            # writes a section to BENCHMARKS.md
  python benchmarks/data_loader.py --quick    # seconds, prints only
  python benchmarks/data_loader.py --bucket   # only the bucket mode (4), its own section

1. Tokens/s of `stream.TrainBatches` (shuffle, decode, concat-then-split packing, batch) per host
   with 0, 1 and 2 grain worker processes, seq_len 2048, on a synthetic prepared corpus.
2. Peak RSS of a training process (`idea-prune train`, tiny model, 20 steps) reading a ~50 MB
   and a ~1 GB prepared corpus: host memory must not grow with the corpus.
3. Tokens/s one v5p-64 host must feed for the paper pair at 50% MFU, from model.flops_per_token.

4. Bucket mode: host 0 of a v6e-64's 16 reading its 64 rows of 2048 per step through training's
   own code path (`stream.train_batches`: `records.source`, grain, array_record), with the paper
   config's data settings (defaults, and the `:v6e64` variant's), behind a simulated gcsfuse:
   a delay in the file layer, not a proxy. Every record read (one ranged GCS read for a
   group_size:1 ArrayRecord record) sleeps 30 or 100 ms first (`SlowSource`, picklable, so grain
   worker processes sleep too) and every shard open sleeps two reads (`SlowReader` in place of
   array_record's reader: size and footer). time.sleep releases the GIL as a blocking read does.
   Documents are c4-like, uniform 50-809 tokens (mean 430). Also: start-up of `records.source`
   over 10,000 tiny shards at 30 ms, against counting them one after another as before.

Synthetic corpora: random-length documents of random ids, written as prepare-data writes them
(the embedded corpus' tokenizer, vocab 4096), so the reader does exactly its real work.
"""

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from idea_prune_jax import settings  # noqa: E402
from idea_prune_jax.data.config import DataConfig  # noqa: E402
from idea_prune_jax.model.config import ModelConfig  # noqa: E402
from idea_prune_jax.data import data, layout, prepare, records, stream  # noqa: E402
from idea_prune_jax.model import model as model_lib  # noqa: E402

V5P_PEAK_BF16 = 459e12  # FLOP/s per chip
V5P_CHIPS_PER_HOST = 4


def synthetic_corpus(out: str, n_bytes: int, tokenizer_dir: str, seed: int = 0,
                     doc_tokens: tuple = (100, 1900)) -> dict:
  """A prepared dir of ~n_bytes of int32 documents (lengths uniform in doc_tokens), plus a small
  val split."""
  from array_record.python import array_record_module
  os.makedirs(out, exist_ok=True)
  manifest = layout.read_manifest(tokenizer_dir)
  with open(os.path.join(tokenizer_dir, layout.TOKENIZER), 'rb') as f:
    model = f.read()
  with open(os.path.join(out, layout.TOKENIZER), 'wb') as f:
    f.write(model)
  rng = np.random.default_rng(seed)
  splits = {}
  for split, size in (('train', n_bytes), ('validation', 4 << 20)):
    shards, docs, tokens, written, j = [], 0, 0, 0, 0
    while written < size:
      name = f'{split}-00000-of-00001-{j:05d}.array_record'
      writer = array_record_module.ArrayRecordWriter(os.path.join(out, name), 'group_size:1')
      shard_bytes = 0
      while shard_bytes < records.SHARD_BYTES and written < size:
        doc = rng.integers(4, 4096, rng.integers(*doc_tokens), dtype=np.int32)
        writer.write(doc.astype('<i4').tobytes())
        shard_bytes += doc.nbytes
        written += doc.nbytes
        docs, tokens = docs + 1, tokens + len(doc)
      writer.close()
      shards.append(name)
      j += 1
    splits[split] = {'documents': docs, 'tokens': tokens, 'shards': shards}
  full = {**manifest, 'input': f'synthetic:{n_bytes}', 'splits': splits}
  with open(os.path.join(out, layout.MANIFEST), 'w') as f:
    json.dump(full, f)
  return full


def loader_tokens_per_s(prepared_dir: str, workers: int, seconds: float) -> float:
  data_cfg = DataConfig(source='prepared', prepared_dir=prepared_dir, seq_len=2048,
                        workers=workers)
  it = data.build(data_cfg, '/unused', vocab_size=ModelConfig().vocab_size, batch_size=16,
                  eval_batches=1, seed=0).train
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


# --- bucket mode: one v6e-64 host reading shards behind a gcsfuse-like latency ----------------

PAPER = os.path.join(common.REPO, 'configs/paper_2p8b_to_1p3b.py')
HOSTS = 16  # a v6e-64: 64 chips on 16 hosts, so 1024 / 16 = 64 rows of 2048 per host per step
TARGET_TOKENS_PER_S = 320_000  # 2x what a v6e-64 host trains at the enlarged step's roofline
LATENCIES_S = (0.030, 0.100)
C4_DOC_TOKENS = (50, 810)  # uniform, mean 430: c4/en ~156B tokens / ~365M documents (estimate)
OPEN_ROUND_TRIPS = 2  # opening a shard on gcsfuse: its size (stat), then its footer


class SlowSource:
  """A grain source whose every record read first waits latency_s: on a gcsfuse mount a
  group_size:1 ArrayRecord record is one ranged GCS read. Picklable: grain workers wait too."""

  def __init__(self, source, latency_s: float):
    self.source, self.latency_s = source, latency_s

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    time.sleep(self.latency_s)  # releases the GIL, as a blocking read does
    return self.source[index]


@contextlib.contextmanager
def slow_file_layer(latency_s: float):
  """Training's own code path (records.source, grain, array_record) with latency_s per read:
  OPEN_ROUND_TRIPS reads to open a shard, one per record."""
  from array_record.python import array_record_module
  real_reader, real_source = array_record_module.ArrayRecordReader, records.source

  class SlowReader:
    def __init__(self, *args, **kwargs):
      time.sleep(OPEN_ROUND_TRIPS * latency_s)
      self._reader = real_reader(*args, **kwargs)

    def __getattr__(self, name):
      return getattr(self._reader, name)

  array_record_module.ArrayRecordReader = SlowReader
  records.source = lambda *args: SlowSource(real_source(*args), latency_s)
  try:
    yield
  finally:
    array_record_module.ArrayRecordReader, records.source = real_reader, real_source


def host_config(prepared_dir: str, variant: str, **data_settings):
  """The paper config (variant '' = data defaults) on prepared_dir, data settings overridden."""
  config = settings.load(f'{PAPER}:{variant}' if variant else PAPER)
  config.data.update(prepared_dir=prepared_dir, **data_settings)
  return settings.read(config).run


def bucket_tokens_per_s(run, latency_s: float, seconds: float, min_batches: int) -> tuple:
  """(s to the first batch, tokens/s after it) of host 0 of HOSTS behind latency_s per read."""
  manifest = layout.read_manifest(run.data.prepared_dir)
  with slow_file_layer(latency_s):
    t0 = time.perf_counter()
    it = stream.train_batches(run.data, run.train.batch_size, run.seed, run.data.prepared_dir,
                            manifest, 0, HOSTS)
    next(it)
    first = time.perf_counter() - t0
    n = batches = 0
    t1 = time.perf_counter()
    while time.perf_counter() - t1 < seconds or batches < min_batches:
      n += next(it)['inputs'].size
      batches += 1
    rate = n / (time.perf_counter() - t1)
    it.close()
  return first, rate


def many_shards(out: str, n: int, tokenizer_dir: str) -> dict:
  """A prepared dir of n tiny train shards (two 64-token documents each)."""
  from array_record.python import array_record_module
  os.makedirs(out, exist_ok=True)
  shards = []
  doc = np.arange(4, 68, dtype='<i4').tobytes()
  for j in range(n):
    name = f'train-00000-of-00001-{j:05d}.array_record'
    writer = array_record_module.ArrayRecordWriter(os.path.join(out, name), 'group_size:1')
    writer.write(doc)
    writer.write(doc)
    writer.close()
    shards.append(name)
  manifest = {**layout.read_manifest(tokenizer_dir),
              'splits': {'train': {'documents': 2 * n, 'tokens': 128 * n, 'shards': shards}}}
  with open(os.path.join(out, layout.MANIFEST), 'w') as f:
    json.dump(manifest, f)
  return manifest


def serial_open_s(prepared_dir: str, manifest: dict, latency_s: float, n: int) -> float:
  """Seconds to count n shards one after another, as the source did before (354e064)."""
  from array_record.python import array_record_module
  with slow_file_layer(latency_s):
    t0 = time.perf_counter()
    for name in manifest['splits']['train']['shards'][:n]:
      reader = array_record_module.ArrayRecordReader(os.path.join(prepared_dir, name))
      reader.num_records()
      reader.close()
    return time.perf_counter() - t0


def startup_s(prepared_dir: str, manifest: dict, latency_s: float) -> float:
  with slow_file_layer(latency_s):
    t0 = time.perf_counter()
    records.source(prepared_dir, manifest, 'train')
    return time.perf_counter() - t0


def bucket_section(tmp: str, tok_dir: str, quick: bool) -> str:
  corpus = os.path.join(tmp, 'c4like')
  synthetic_corpus(corpus, (8 if quick else 40) << 20, tok_dir, seed=2, doc_tokens=C4_DOC_TOKENS)
  seconds = 3.0 if quick else 6.0
  tpu = host_config(corpus, 'v6e64')
  runs = [('defaults', host_config(corpus, ''))]
  runs += [(':v6e64' if t == tpu.data.read_threads else f':v6e64, read_threads={t}',
            host_config(corpus, 'v6e64', read_threads=t)) for t in (16, 32, 64, 128)
           if not quick or t == tpu.data.read_threads]
  runs.append((':v6e64, workers=1', host_config(corpus, 'v6e64', workers=1)))
  rows = []
  for name, config in runs:
    d = config.data
    for latency in LATENCIES_S:
      if 'workers' in name and latency != LATENCIES_S[-1]:
        continue
      first, rate = bucket_tokens_per_s(config, latency, seconds,
                                        min_batches=1 if name == 'defaults' else 4)
      rows.append([name, f'{d.read_threads}, {d.prefetch}, {d.workers}', f'{latency * 1e3:.0f}',
                   f'{first:.1f}', f'{rate:,.0f}', f'{rate / TARGET_TOKENS_PER_S:.2f}x'])
      print(rows[-1], flush=True)
  body = common.table(['data settings', 'read_threads, prefetch, workers', 'ms per read',
                       's to first batch', 'tokens/s (host 0 of 16, 64 x 2048)',
                       f'vs {TARGET_TOKENS_PER_S:,} target'], rows)
  n_shards = 500 if quick else 10_000
  wide = os.path.join(tmp, 'wide')
  manifest = many_shards(wide, n_shards, tok_dir)
  serial_n = 50 if quick else 500
  serial = serial_open_s(wide, manifest, LATENCIES_S[0], serial_n)
  parallel = startup_s(wide, manifest, LATENCIES_S[0])
  body += (f'\n\nStart-up, {n_shards:,} shards at {LATENCIES_S[0] * 1e3:.0f} ms per read '
           f'({OPEN_ROUND_TRIPS} reads to open one): records.source (counted '
           f'{records.OPEN_THREADS} at a time, handed to grain as FileInstructions) '
           f'**{parallel:.1f} s**; one after another as before: {serial:.1f} s for the first '
           f'{serial_n}, so {serial * n_shards / serial_n:.0f} s for all {n_shards:,}.\n')
  return body


def v5p_host_tokens_per_s(mfu: float = 0.5) -> dict:
  paper = settings.read(settings.load(os.path.join(common.REPO,
                                                   'configs/paper_2p8b_to_1p3b.py'))).run
  cfg = paper.model
  flops = model_lib.flops_per_token(cfg, paper.data.seq_len)
  per_host = V5P_CHIPS_PER_HOST * V5P_PEAK_BF16 * mfu / flops
  return {'flops_per_token': flops, 'tokens_per_s_per_host': per_host}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--bucket', action='store_true',
                      help='only the bucket mode: reads behind 30 and 100 ms, 10,000 shards')
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
  tmp = tempfile.mkdtemp(prefix='loader_bench_')
  tok_dir = os.path.join(tmp, 'tok')
  prepare.prepare('embedded', tok_dir, vocab_size=4096, val_input='embedded:tempest',
                  max_docs=4, progress=False)
  if args.bucket:
    body = bucket_section(tmp, tok_dir, args.quick)
    print(body)
    if not args.quick:
      common.append_section('Data loader from a bucket: one v6e-64 host behind 30 / 100 ms reads',
                            body)
    shutil.rmtree(tmp, ignore_errors=True)
    return
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
        [['~50 MB', f'{layout.read_manifest(small)["splits"]["train"]["tokens"]:,}',
          f'{rss_small:.0f}'],
         ['~1 GB', f'{layout.read_manifest(big)["splits"]["train"]["tokens"]:,}',
          f'{rss_big:.0f}']])
    body += f'\n\nRSS ratio 1 GB / 50 MB: {rss_big / rss_small:.3f} (target: within 10%).\n'
  print(body)
  if not args.quick:
    common.append_section('Data loader: tokens/s per host and peak RSS', body)


if __name__ == '__main__':
  main()
