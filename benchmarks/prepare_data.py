"""prepare-data throughput (MB of text per second) and peak RSS, on generated JSONL corpora.

The corpus is the embedded Shakespeare repeated with variation (each copy's paragraphs reshuffled
into ~4 KB documents, so every document is distinct), written as JSONL to a temporary folder.
Each step runs `idea-prune prepare-data` as its own child process; its peak RSS is the child's
ru_maxrss. A bounded-memory prepare has the same peak RSS on a small and a 5x bigger corpus.

  python benchmarks/prepare_data.py [--mb 50] [--vocab_size 4096]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # machine facts only; no accelerator needed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from idea_prune_jax.data import inputs  # noqa: E402

DOC_CHARS = 4_000  # c4's documents average ~2 KB, fineweb-edu's ~5 KB


def write_corpus(path: str, mb: float) -> tuple[int, int]:
  """JSONL of ~mb MB of distinct documents; returns (documents, bytes)."""
  paragraphs = [p for text in inputs.embedded_works().values() for p in text.split('\n\n') if p]
  n_docs = size = 0
  with open(path, 'w') as f:
    copy = 0
    while size < mb * 1e6:
      order = np.random.default_rng(copy).permutation(len(paragraphs))
      doc = []
      for i in order:
        doc.append(paragraphs[i])
        if sum(map(len, doc)) >= DOC_CHARS:
          line = json.dumps({'text': '\n\n'.join(doc), 'copy': copy}) + '\n'
          f.write(line)
          n_docs, size, doc = n_docs + 1, size + len(line.encode()), []
          if size >= mb * 1e6:
            break
      copy += 1
  return n_docs, size


def child(args: list[str], tmp: str) -> tuple[float, float, float, dict]:
  """(wall s, CPU s, peak RSS MB, printed summary) of one prepare-data child process."""
  cmd = [sys.executable, '-m', 'idea_prune_jax.main', 'prepare-data', *args]
  with open(f'{tmp}/stdout', 'w+') as out, open(f'{tmp}/stderr', 'w+') as err:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=common.REPO,
                            env=dict(os.environ, PYTHONPATH=common.REPO))
    # wait4: this child's own rusage (RUSAGE_CHILDREN is the max over every child so far)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    if proc.returncode:
      raise SystemExit(f'{" ".join(cmd)} failed:\n{err.read()[-3000:]}')
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 1024, json.loads(out.read())  # Linux: ru_maxrss in KB


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--mb', type=float, default=50.0, help='size of the big corpus')
  parser.add_argument('--vocab_size', type=int, default=4096)
  args = parser.parse_args()
  rows = []
  with tempfile.TemporaryDirectory(prefix='prepare-bench-') as tmp:
    small, big = f'{tmp}/small.jsonl', f'{tmp}/big.jsonl'
    sizes = {small: write_corpus(small, args.mb / 5), big: write_corpus(big, args.mb)}
    tok_dir = f'{tmp}/tok'
    wall, cpu, rss, _ = child([f'--input={big}', f'--output={tok_dir}', '--tokenizer_only',
                               f'--vocab_size={args.vocab_size}'], tmp)
    rows.append([f'train tokenizer (vocab {args.vocab_size}, first 20M chars)', '', '', '',
                 f'{wall:.1f}', f'{cpu:.1f}', '', '', f'{rss:.0f}'])
    print(rows[-1], flush=True)
    for path in (small, big):
      n_docs, size = sizes[path]
      wall, cpu, rss, summary = child([f'--input={path}', f'--output={tmp}/out-{len(rows)}',
                                  f'--tokenizer={tok_dir}/tokenizer.model',
                                  '--val_fraction=0.01'], tmp)
      tokens = sum(s['tokens'] for s in summary['splits'].values())
      rows.append([f'prepare {os.path.basename(path)}', f'{size / 1e6:.1f}', n_docs,
                   f'{tokens / 1e6:.2f}', f'{wall:.1f}', f'{cpu:.1f}',
                   f'{size / 1e6 / wall:.2f}', f'{size / 1e6 / cpu:.2f}', f'{rss:.0f}'])
      print(rows[-1], flush=True)
  body = common.table(['step', 'JSONL MB', 'documents', 'Mtokens', 'wall s', 'CPU s',
                       'MB/s (wall)', 'MB per CPU s', 'peak RSS MB'], rows)
  body += ('\n\nEach row is one `idea-prune prepare-data` child process (interpreter start and '
           'imports included). CPU s is the child\'s user + system time, all threads: on this '
           'shared machine wall time also counts waiting for a core, so MB per CPU second is '
           'the steadier figure. Peak RSS is the child\'s ru_maxrss: the same on both '
           'corpora when memory is bounded. Encoding (SentencePiece BPE, `sp.encode` on ~1 MB '
           'batches) is most of the time; it spreads over the machine\'s cores, so on a '
           'many-core prepare VM expect MB/s to scale with them, or run N machines with '
           '`--shard I/N`.')
  common.append_section('prepare-data throughput and peak RSS', body)


if __name__ == '__main__':
  main()
