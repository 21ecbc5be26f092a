"""The lm-eval-harness loglikelihood interface against a direct forward pass."""

import flax.linen as nn
import jax
import numpy as np

from idea_prune_jax import evaluate, model as model_lib
from idea_prune_jax.config import ModelConfig

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)


def test_loglikelihood_is_the_continuations_log_prob_and_greedy_flag():
  params = nn.unbox(model_lib.init_params(CFG, jax.random.key(0)))
  context = [5, 9, 17, 3]
  # The greedy continuation (generate's own argmax), so the flag must be True; changing its
  # last token must clear it and lower the log-prob.
  greedy = evaluate.generate(params, CFG, context, 2, jax.random.key(1), max_len=16)
  ids = np.asarray([[evaluate.START_ID] + context + greedy])
  logits = model_lib.Transformer(CFG).apply({'params': params}, ids[:, :-1])[0]
  logp = np.asarray(jax.nn.log_softmax(logits))
  want = sum(logp[len(context) + i, t] for i, t in enumerate(greedy))
  got, is_greedy = evaluate.loglikelihood(params, CFG, context, greedy)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert is_greedy
  other = greedy[:-1] + [(greedy[-1] + 1) % CFG.vocab_size]
  got_other, other_greedy = evaluate.loglikelihood(params, CFG, context, other)
  assert not other_greedy and got_other < got
