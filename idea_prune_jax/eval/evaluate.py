"""Perplexity on text, per-token log-probs (the interface lm-eval-harness needs), and sampling."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from idea_prune_jax.data import data as data_lib
from idea_prune_jax.model import model as model_lib
from idea_prune_jax.train import train as train_lib


def start_id(sp) -> int:
  """The id a request's context follows: the tokenizer's BOS, which training puts before every
  document (`data.document_ids`); without one, its EOS, which ends the document before."""
  start = sp.bos_id() if sp.bos_id() >= 0 else sp.eos_id()
  if start < 0:
    raise data_lib.DataError('the tokenizer has neither BOS nor EOS, so a context has no start; '
                             'use a SentencePiece model with bos_id or eos_id set')
  return start


@functools.partial(jax.jit, static_argnums=(0,))
def _scored(model_cfg, params, inputs_BxL, targets_BxL):
  """(log p(target) [B, L], greedy token [B, L]) from one forward pass."""
  logits_BxLxV = model_lib.Transformer(model_cfg).apply({'params': params}, inputs_BxL)
  logprobs_BxL = jnp.take_along_axis(jax.nn.log_softmax(logits_BxLxV), targets_BxL[..., None],
                                     -1)[..., 0]
  return logprobs_BxL, jnp.argmax(logits_BxLxV, -1)


def loglikelihood(params, model_cfg, context_ids: list[int], continuation_ids: list[int], *,
                  sp) -> tuple[float, bool]:
  """(sum log p(continuation | context), whether it is the greedy continuation).

  The two numbers an lm-eval-harness `loglikelihood` request asks for; sp: the tokenizer the
  model was trained with (its special ids start the context).
  """
  ids = np.asarray([start_id(sp)] + context_ids + continuation_ids, np.int32)[None]
  n = len(continuation_ids)
  logprobs, greedy = _scored(model_cfg, params, jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:]))
  return float(logprobs[0, -n:].sum()), bool(np.all(np.asarray(greedy[0, -n:]) == ids[0, -n:]))


def perplexity(params, model_cfg, sp, texts: list[str], seq_len: int, batch_size: int = 8) -> dict:
  """Token-level loss and perplexity of texts, packed into seq_len windows."""
  tokens = np.asarray([i for text in texts for i in data_lib.document_ids(sp, text)], np.int32)
  windows = data_lib.windows(tokens, seq_len)
  if len(windows) == 0:
    raise data_lib.DataError(f'--files: fewer than {seq_len + 1} tokens; pass more text')
  eval_fn = jax.jit(functools.partial(train_lib.eval_step, model=model_lib.Transformer(model_cfg)))
  total = count = 0.0
  for i in range(0, len(windows), batch_size):
    nll, n = eval_fn(params, data_lib.split_batch(windows[i:i + batch_size]))
    total, count = total + float(nll), count + float(n)
  loss = total / count
  return {'loss': loss, 'ppl': math.exp(min(loss, 50.0)), 'tokens': int(count)}


def generate(params, model_cfg, prompt_ids: list[int], max_new_tokens: int, key,
             temperature: float = 0.0, top_p: float = 1.0, max_len: int = 512, *,
             sp) -> list[int]:
  """Greedy (temperature 0) or nucleus sampling; one compiled step for every position.

  sp: the model's tokenizer; the prompt follows its BOS (see `start_id`) and generation stops
  after its EOS (included in the result).

  No KV cache: each step re-runs a fixed [1, max_len] buffer, which keeps one compilation and
  is fine for the small exported models this is meant to spot-check.
  """
  ids, eos_id = [start_id(sp)] + list(prompt_ids), sp.eos_id()
  if len(ids) + max_new_tokens > max_len:
    raise ValueError(f'prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds '
                     f'max_len={max_len}; shorten the prompt or raise max_len')
  buf = np.zeros((1, max_len), np.int32)
  buf[0, :len(ids)] = ids

  @jax.jit
  def next_token(params, buf, pos, key):
    logits = model_lib.Transformer(model_cfg).apply({'params': params}, buf)[0, pos - 1]
    if temperature == 0.0:
      return jnp.argmax(logits).astype(jnp.int32)
    probs = jax.nn.softmax(logits / temperature)
    order = jnp.argsort(-probs)
    cumulative = jnp.cumsum(probs[order])
    # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
    keep_sorted = cumulative - probs[order] < top_p
    keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
    masked = jnp.where(keep, jnp.log(probs), -jnp.inf)
    return jax.random.categorical(key, masked).astype(jnp.int32)

  pos = len(ids)
  for _ in range(max_new_tokens):
    key, sub = jax.random.split(key)
    tok = int(next_token(params, jnp.asarray(buf), pos, sub))
    buf[0, pos] = tok
    pos += 1
    if tok == eos_id:
      break
  return buf[0, len(ids):pos].tolist()
