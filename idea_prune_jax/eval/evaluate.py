"""Text in, numbers out: perplexity of texts, log p(continuation | context), and sampled text.

What the `eval --files` and `generate` commands (and tests comparing us with other models) call.
Each builds a `scoring.Scorer` over all devices, so a request here runs the very programs an
lm-eval request runs; only the tokenizer's framing (BOS before a context, EOS ending a
generation) is added here.
"""

import numpy as np

from idea_prune_jax.data import batch as batch_lib
from idea_prune_jax.data import tokenizer as tokenizer_lib
from idea_prune_jax.data.inputs import DataError
from idea_prune_jax.eval import scoring
from idea_prune_jax.model.config import ModelConfig


def start_id(sp) -> int:
  """The id a request's context follows: the tokenizer's BOS, which training puts before every
  document (`tokenizer.document_ids`); without one, its EOS, which ends the document before."""
  start = sp.bos_id() if sp.bos_id() >= 0 else sp.eos_id()
  if start < 0:
    raise DataError('the tokenizer has neither BOS nor EOS, so a context has no start; '
                    'use a SentencePiece model with bos_id or eos_id set')
  return start


def scorer(params, model_cfg: ModelConfig, batch_size: int, max_length: int,
           mesh=None) -> scoring.Scorer:
  """A Scorer over all devices (or mesh), params laid out on it; batch_size is rounded up to a
  multiple of the data-parallel devices so every device gets whole rows."""
  mesh = scoring.make_mesh() if mesh is None else mesh
  rows = scoring.data_rows(mesh)
  batch_size = -(-batch_size // rows) * rows
  return scoring.Scorer(scoring.shard_params(params, model_cfg, mesh), model_cfg, mesh,
                        batch_size, max_length)


def perplexity(params, model_cfg: ModelConfig, sp, texts: list[str], seq_len: int,
               batch_size: int = 8) -> dict:
  """Token-level loss and perplexity of texts, framed as training frames documents and packed
  into seq_len windows (the ragged tail is dropped)."""
  tokens = np.asarray([i for text in texts for i in tokenizer_lib.document_ids(sp, text)], np.int32)
  windows = batch_lib.windows(tokens, seq_len)
  if len(windows) == 0:
    raise DataError(f'--files: fewer than {seq_len + 1} tokens; pass more text')
  return scorer(params, model_cfg, batch_size, seq_len).perplexity(windows)


def loglikelihood(params, model_cfg: ModelConfig, context_ids: list[int],
                  continuation_ids: list[int], *, sp) -> tuple[float, bool]:
  """(sum log p(continuation | context), whether it is the greedy continuation).

  The two numbers an lm-eval-harness `loglikelihood` request asks for; sp: the tokenizer the
  model was trained with (its special ids start the context). Many requests: build one `scorer`
  and pass them all to its `loglikelihood`, which batches them; this compiles for each call.
  """
  context = [start_id(sp)] + list(context_ids)
  n = len(context) + len(continuation_ids) - 1  # max_length n: nothing is truncated
  return scorer(params, model_cfg, 1, n).loglikelihood([(context, list(continuation_ids))])[0]


def generate(params, model_cfg: ModelConfig, prompt_ids: list[int], max_new_tokens: int, key,
             temperature: float = 0.0, top_p: float = 1.0, max_len: int = 512, *,
             sp) -> list[int]:
  """Greedy (temperature 0) or nucleus sampling, up to and including the tokenizer's EOS.

  sp: the model's tokenizer; the prompt follows its BOS (see `start_id`). max_len bounds prompt
  plus generation: nothing is cut from the prompt.
  """
  ids = [start_id(sp)] + list(prompt_ids)
  if len(ids) + max_new_tokens > max_len:
    raise ValueError(f'prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds '
                     f'max_len={max_len}; shorten the prompt or raise max_len')
  eos_id = sp.eos_id()
  # The scorer drops its stop id (lm-eval wants no EOS in the text) but here EOS belongs to the
  # result: no stop id (-1 is no token) and is_done ends the row once EOS is in it.
  return scorer(params, model_cfg, 1, max_len).generate(
      [ids], max_new_tokens, -1, lambda row: eos_id >= 0 and row[-1] == eos_id, key=key,
      temperature=temperature, top_p=top_p)[0]
