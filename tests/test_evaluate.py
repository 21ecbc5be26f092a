"""The lm-eval-harness loglikelihood interface against a direct forward pass."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from idea_prune_jax.eval import evaluate
from idea_prune_jax.model import model as model_lib
from idea_prune_jax.model.config import ModelConfig

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)


class Tokenizer:
  """The special ids of a SentencePiece model (-1: it has none), nothing else."""

  def __init__(self, bos: int, eos: int):
    self._bos, self._eos = bos, eos

  def bos_id(self):
    return self._bos

  def eos_id(self):
    return self._eos


# Neither the ids of the tokenizers trained here (BOS 2, EOS 3) nor each other's.
SP = Tokenizer(bos=7, eos=11)


@pytest.mark.parametrize('sp, start', [(SP, 7), (Tokenizer(bos=-1, eos=11), 11)],
                         ids=['bos', 'no_bos'])
def test_loglikelihood_is_the_continuations_log_prob_and_greedy_flag(sp, start):
  params = nn.unbox(model_lib.init_params(CFG, jax.random.key(0)))
  context = [5, 9, 17, 3]
  # The greedy continuation (generate's own argmax), so the flag must be True; changing its
  # last token must clear it and lower the log-prob.
  greedy = evaluate.generate(params, CFG, context, 2, jax.random.key(1), max_len=16, sp=sp)
  # The context follows the tokenizer's BOS (its EOS when it has none), as documents do in training.
  assert evaluate.start_id(sp) == start
  ids = np.asarray([[start] + context + greedy])
  logits = model_lib.Transformer(CFG).apply({'params': params}, ids[:, :-1])[0]
  logp = np.asarray(jax.nn.log_softmax(logits))
  want = sum(logp[len(context) + i, t] for i, t in enumerate(greedy))
  got, is_greedy = evaluate.loglikelihood(params, CFG, context, greedy, sp=sp)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert is_greedy
  other = greedy[:-1] + [(greedy[-1] + 1) % CFG.vocab_size]
  got_other, other_greedy = evaluate.loglikelihood(params, CFG, context, other, sp=sp)
  assert not other_greedy and got_other < got


def test_generate_stops_at_the_tokenizers_eos():
  params = nn.unbox(model_lib.init_params(CFG, jax.random.key(0)))
  context = [5, 9, 17, 3]
  free = evaluate.generate(params, CFG, context, 6, jax.random.key(1), max_len=16,
                           sp=Tokenizer(bos=7, eos=-1))  # no EOS: never stops early
  assert len(free) == 6
  eos = free[2]
  first = free.index(eos)
  got = evaluate.generate(params, CFG, context, 6, jax.random.key(1), max_len=16,
                          sp=Tokenizer(bos=7, eos=eos))
  assert got == free[:first + 1]  # up to and including the tokenizer's EOS
