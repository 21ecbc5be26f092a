"""Train step time with document-masked attention (data.attention=document, the default) against
plain causal rows, in one run: the same compiled-ahead step as benchmarks/train_step.py, fed a
batch with and without segment ids.

  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot .venv/bin/python \
      benchmarks/document_attention.py --set model.unroll_layers=True     # as `make demo`
  ... benchmarks/document_attention.py --config configs/small.py --no-append

On the XLA path the [B, 1, L, L] same-document mask is built and applied whatever the segment
values, so the documents' length does not change the cost; the default 1,550 tokens is about the mean
of the embedded corpus split into scenes (DATA.md). The figure is the median over interleaved
rounds of best-of-5 steps, document / causal.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from benchmarks import train_step  # noqa: E402
from idea_prune_jax.data import batch as batch_lib  # noqa: E402


def packed_batch(doc_tokens: int):
  """make_batch for train_step.build: rows cut from one stream of doc_tokens-long documents."""
  def make(B: int, L: int, vocab_size: int) -> dict:
    stream = np.arange(B * (L + 1))
    packed = {'tokens': np.random.RandomState(0).randint(1, vocab_size, B * (L + 1)),
              'tokens_segment_ids': stream // doc_tokens + 1,
              'tokens_positions': stream % doc_tokens}
    rows = {k: v.reshape(B, L + 1).astype(np.int32) for k, v in packed.items()}
    return batch_lib.from_packed(rows, document_attention=True)
  return make


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/tiny.py')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='config override, e.g. model.unroll_layers=True')
  parser.add_argument('--doc_tokens', type=int, default=1550)
  parser.add_argument('--rounds', type=int, default=6)
  parser.add_argument('--no-append', action='store_true', help='print only')
  args = parser.parse_args(argv)
  benches = {'causal': train_step.build(args.config, args.set),
             'document': train_step.build(args.config, args.set, packed_batch(args.doc_tokens))}
  for b in benches.values():
    for _ in range(3):
      b.run_step()
  best = {name: [] for name in benches}
  for _ in range(args.rounds):
    for name, b in benches.items():
      best[name].append(min(b.run_step()[0] for _ in range(5)))
  ratio = float(np.median(np.array(best['document']) / np.array(best['causal'])))
  b = benches['causal']
  body = common.table(
      ['attention', 'step s (median of best-of-5)', 'compile s'],
      [(name, f'{np.median(best[name]):.3f}', f'{benches[name].compile_s:.1f}')
       for name in benches])
  body += (f'\n\n{b.name} ({", ".join(args.set) or "as configured"}), B x L = {b.batch_size} x '
           f'{b.seq_len}, documents of {args.doc_tokens} tokens, {args.rounds} interleaved '
           f'rounds: **document / causal step time {ratio:.2f}**.')
  print(body)
  if not args.no_append:
    common.append_section(f'Document-masked attention against causal: {b.name} train step',
                          body)


if __name__ == '__main__':
  main()
