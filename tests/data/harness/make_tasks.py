"""Writes the JSONL of the local lm-eval tasks here from the embedded corpus (deterministic).

  PYTHONPATH=. python tests/data/harness/make_tasks.py

shakespeare_mc: a line's first half, and four second halves (its own and three from other lines
of the play) to choose from. shakespeare_gen: a speaker and the first words of a line; the answer
is the rest of the line (greedy generation until the newline). shakespeare_ppl: short passages
for loglikelihood_rolling. Lines come from Hamlet, which the tiny configs train on.
"""

import json
import os
import random

from idea_prune_jax.data import inputs

HERE = os.path.dirname(os.path.abspath(__file__))


def _lines(text):
  return [line.strip() for line in text.splitlines()
          if 6 <= len(line.split()) <= 10 and line[:1].isupper() and not line.isupper()]


def main():
  text = inputs.embedded_works()['hamlet']
  rng = random.Random(0)
  lines = _lines(text)
  picked = rng.sample(lines, 80)
  mc = []
  for line in picked[:32]:
    words = line.split()
    cut = len(words) // 2
    others = [o.split() for o in rng.sample(lines, 3)]
    choices = [' ' + ' '.join(words[cut:])] + [' ' + ' '.join(o[len(o) // 2:]) for o in others]
    order = list(range(4))
    rng.shuffle(order)
    mc.append({'context': ' '.join(words[:cut]), 'choices': [choices[i] for i in order],
               'label': order.index(0)})
  gen = []
  for line in picked[32:56]:
    words = line.split()
    gen.append({'prompt': ' '.join(words[:-2]), 'answer': ' '.join(words[-2:])})
  paragraphs = [p for p in text.split('\n\n') if 200 <= len(p) <= 700]
  ppl = [{'text': p} for p in rng.sample(paragraphs, 8)]
  for name, rows in (('shakespeare_mc', mc), ('shakespeare_gen', gen), ('shakespeare_ppl', ppl)):
    with open(os.path.join(HERE, f'{name}.jsonl'), 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)


if __name__ == '__main__':
  main()
