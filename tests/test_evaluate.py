"""The one scorer against a direct forward pass: log-likelihoods, perplexity, the chunked LM
head, generation (greedy and nucleus) with the tokenizer's BOS and EOS."""

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idea_prune_jax.eval import evaluate, scoring
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


def _score_inputs(cfg, B, L, seed=0):
  rng = np.random.default_rng(seed)
  inputs, targets = (rng.integers(0, cfg.vocab_size, (B, L)).astype(np.int32) for _ in range(2))
  mask = rng.random((B, L)) < 0.7
  return inputs, targets, mask


@pytest.mark.parametrize('chunk', [8, 16], ids=['divides', 'padded'])
def test_chunked_head_scores_equal_the_whole_logits(chunk):
  """The scorer's LM head chunk by chunk gives what the [B, L, V] logits give (L = 40: a chunk of
  16 leaves 8 padded positions), and both equal log_softmax of the model's own logits."""
  params = nn.unbox(model_lib.init_params(CFG, jax.random.key(0)))
  inputs, targets, mask = _score_inputs(CFG, 3, 40)
  # Make one row's masked targets its greedy tokens, so the flag is True somewhere.
  logits = np.asarray(model_lib.Transformer(CFG).apply({'params': params}, inputs))
  targets[1] = np.where(mask[1], logits[1].argmax(-1), targets[1])
  score = lambda chunk: jax.jit(functools.partial(scoring.score_batch, cfg=CFG, chunk=chunk))(
      params, inputs, targets, mask)
  whole, chunked = score(0), score(chunk)
  np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-5)
  assert np.asarray(chunked[1]).tolist() == np.asarray(whole[1]).tolist() == [False, True, False]
  logp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(chunked[0], np.where(mask, logp, 0).sum(-1), rtol=1e-5)


def _largest_f32(hlo: str) -> int:
  sizes = [int(np.prod([int(d) for d in dims.split(',') if d]))
           for dims in re.findall(r'f32\[([0-9,]*)\]', hlo)]
  return max(sizes)


def test_compiled_scoring_never_holds_the_whole_logits():
  """With vocab V and L positions the chunked program's largest f32 array is smaller than
  B x L x V; the unchunked one holds it (so the check can see it)."""
  cfg = dataclasses.replace(CFG, vocab_size=1024)
  B, L = 2, 64
  params = jax.eval_shape(lambda: nn.unbox(model_lib.init_params(cfg, jax.random.key(0))))
  args = [jax.ShapeDtypeStruct((B, L), dtype) for dtype in (np.int32, np.int32, bool)]

  def largest(chunk):
    program = jax.jit(functools.partial(scoring.score_batch, cfg=cfg, chunk=chunk))
    return _largest_f32(program.lower(params, *args).compile().as_text())

  assert largest(0) >= B * L * cfg.vocab_size
  assert largest(16) < B * L * cfg.vocab_size


def test_nucleus_sampling_keeps_the_smallest_prefix_reaching_top_p():
  probs = np.asarray([[0.15, 0.5, 0.05, 0.3]])
  logits = jnp.asarray(np.log(probs))
  keys = jax.random.split(jax.random.key(0), 2000)
  draw = jax.vmap(lambda k, top_p: scoring.sample(logits, k, 1.0, top_p)[0], (0, None))
  # Mass before each token, largest first: 0, 0.5, 0.8, 0.95; top_p 0.7 keeps tokens 1 and 3.
  counts = np.bincount(np.asarray(draw(keys, 0.7)), minlength=4)
  assert counts[0] == counts[2] == 0
  np.testing.assert_allclose(counts[1] / counts.sum(), 0.5 / 0.8, atol=0.04)
  assert set(np.asarray(draw(keys, 1e-6)).tolist()) == {1}  # the top token always survives
  assert np.asarray(scoring.sample(logits, keys[0], 0.0)).tolist() == [1]  # temperature 0: argmax


def test_sampling_with_a_vanishing_nucleus_is_greedy_generation():
  params = nn.unbox(model_lib.init_params(CFG, jax.random.key(0)))
  context = [5, 9, 17, 3]
  greedy = evaluate.generate(params, CFG, context, 5, None, max_len=16, sp=SP)
  sampled = evaluate.generate(params, CFG, context, 5, jax.random.key(3), temperature=2.0,
                              top_p=1e-6, max_len=16, sp=SP)
  other = evaluate.generate(params, CFG, context, 5, jax.random.key(3), temperature=2.0,
                            max_len=16, sp=SP)
  assert sampled == greedy and other != greedy  # and full-mass sampling at T=2 wanders off


def test_perplexity_is_the_mean_token_loss_of_each_window():
  params = nn.unbox(model_lib.init_params(CFG, jax.random.key(0)))
  windows = np.random.default_rng(0).integers(0, CFG.vocab_size, (5, 21)).astype(np.int32)
  mesh = scoring.make_mesh()
  scorer = scoring.Scorer(scoring.shard_params(params, CFG, mesh), CFG, mesh, batch_size=2,
                          max_length=20, chunk=8)
  got = scorer.perplexity(windows)
  logits = model_lib.Transformer(CFG).apply({'params': params}, windows[:, :-1])
  logp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), windows[:, 1:, None], -1)
  assert got['tokens'] == 100
  np.testing.assert_allclose(got['loss'], -logp.mean(), rtol=1e-5)
  np.testing.assert_allclose(got['ppl'], np.exp(-logp.mean()), rtol=1e-5)
