"""Batched scoring and greedy generation on the sharded model, for lm-eval-harness requests.

Requests arrive as token lists of any length. They are sorted by length, padded on the right into
a few length buckets (powers of two up to `max_length`) and cut into batches of one fixed size
(short batches are filled with dummy rows), so XLA compiles at most one program per bucket and
request kind however many requests come. Right padding needs no attention mask: the model is
causal, so a row's real positions never see its padding.

Several hosts: every process holds the whole request list (lm-eval builds it deterministically),
builds the same global batch, hands its own devices only their rows (`make_array_from_callback`)
and reads back the replicated per-row results, so every process returns what one process would.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from idea_prune_jax.model import model as model_lib
from idea_prune_jax.train import sharding as sharding_lib
from idea_prune_jax.model.config import ModelConfig

MIN_BUCKET = 16


def bucket(n: int, max_length: int) -> int:
  """The padded length for n tokens: the next power of two (>= MIN_BUCKET), capped at max_length."""
  return min(max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()), max_length)


def _batches(lengths: list[int], batch_size: int, max_length: int):
  """[(bucket length, request indices)]: longest first, each batch from one bucket."""
  order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
  by_bucket = collections.defaultdict(list)
  for i in order:
    by_bucket[bucket(lengths[i], max_length)].append(i)
  for length in sorted(by_bucket, reverse=True):
    rows = by_bucket[length]
    for start in range(0, len(rows), batch_size):
      yield length, rows[start:start + batch_size]


class Scorer:
  """A model's params on a mesh, with one jitted scoring and one greedy-step program.

  `traces` counts how often each program was traced (a trace is a compilation), per kind.
  """

  def __init__(self, params, model_cfg: ModelConfig, mesh, batch_size: int, max_length: int):
    self.params, self.model_cfg, self.mesh = params, model_cfg, mesh
    self.batch_size, self.max_length = batch_size, max_length
    self.traces = collections.Counter()
    model = model_lib.Transformer(model_cfg)
    rows = sharding_lib.batch_sharding(mesh)
    self._rows_1d = NamedSharding(mesh, P(rows.spec[0]))
    replicated = sharding_lib.replicated(mesh)

    def score(params, inputs_BxL, targets_BxL, mask_BxL):
      self.traces['loglikelihood'] += 1
      logits_BxLxV = model.apply({'params': params}, inputs_BxL)
      logp_BxL = jnp.take_along_axis(jax.nn.log_softmax(logits_BxLxV), targets_BxL[..., None],
                                     -1)[..., 0]
      greedy_BxL = jnp.argmax(logits_BxLxV, -1) == targets_BxL
      return (jnp.sum(jnp.where(mask_BxL, logp_BxL, 0.0), -1),
              jnp.all(greedy_BxL | ~mask_BxL, -1))

    def next_token(params, tokens_BxL, last_B):
      self.traces['generate_until'] += 1
      hidden_BxLxD = model.apply({'params': params}, tokens_BxL, return_hidden=True)
      hidden_BxD = jnp.take_along_axis(hidden_BxLxD, last_B[:, None, None], 1)[:, 0]
      head = model_lib.head(params, model_cfg)
      return jnp.argmax(model_lib.logits(hidden_BxD, head, model_cfg), -1).astype(jnp.int32)

    param_sharding = jax.tree.map(lambda x: x.sharding, params)
    self._score = sharding_lib.MeshJit(jax.jit(
        score, in_shardings=(param_sharding, rows, rows, rows),
        out_shardings=(replicated, replicated)), mesh)
    self._next = sharding_lib.MeshJit(jax.jit(
        next_token, in_shardings=(param_sharding, rows, self._rows_1d), out_shardings=replicated),
        mesh)
    self._rows = rows

  def _global(self, array: np.ndarray, sharding=None):
    """The same numpy array on every process -> a global jax.Array; each device gets its rows."""
    return jax.make_array_from_callback(array.shape, sharding or self._rows, lambda i: array[i])

  def loglikelihood(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), whether greedy decoding yields it) per pair.

    Like lm-eval's `hf` model, a pair longer than max_length + 1 tokens loses its oldest tokens.
    """
    seqs = [(ctx + cont)[-(self.max_length + 1):] for ctx, cont in pairs]
    n_cont = [len(cont) for _, cont in pairs]
    for (ctx, cont), seq in zip(pairs, seqs):
      if not cont or len(cont) > self.max_length or len(seq) < 2:
        raise ValueError(f'continuation of {len(cont)} tokens after {len(ctx)} context tokens: '
                         f'need 1..{self.max_length} continuation tokens and some context')
    results = [None] * len(pairs)
    for length, idx in _batches([len(s) - 1 for s in seqs], self.batch_size, self.max_length):
      inputs = np.zeros((self.batch_size, length), np.int32)
      targets = np.zeros_like(inputs)
      mask = np.zeros(inputs.shape, bool)
      for row, i in enumerate(idx):
        n = len(seqs[i]) - 1
        inputs[row, :n], targets[row, :n] = seqs[i][:-1], seqs[i][1:]
        mask[row, n - n_cont[i]:n] = True
      total, greedy = self._score(self.params, self._global(inputs), self._global(targets),
                                  self._global(mask))
      total, greedy = np.asarray(total), np.asarray(greedy)
      for row, i in enumerate(idx):
        results[i] = (float(total[row]), bool(greedy[row]))
    return results

  def generate(self, contexts: list[list[int]], max_new: int, stop_eos: int,
               is_done=lambda row_tokens: False) -> list[list[int]]:
    """Greedy continuations: up to max_new tokens, ending before stop_eos or when is_done(tokens).

    Contexts lose their oldest tokens beyond max_length - max_new. No KV cache: each step runs the
    whole padded buffer, which keeps one program per bucket.
    """
    keep = self.max_length - max_new
    if keep < 1:
      raise ValueError(f'max_gen_toks={max_new} leaves no room for context in '
                       f'max_length={self.max_length}')
    contexts = [c[-keep:] for c in contexts]
    out = [[] for _ in contexts]
    lengths = [len(c) + max_new for c in contexts]
    for length, idx in _batches(lengths, self.batch_size, self.max_length):
      buf = np.zeros((self.batch_size, length), np.int32)
      pos = np.ones(self.batch_size, np.int32)  # dummy rows: one token
      for row, i in enumerate(idx):
        buf[row, :len(contexts[i])] = contexts[i]
        pos[row] = len(contexts[i])
      active = np.zeros(self.batch_size, bool)
      active[:len(idx)] = True
      for _ in range(max_new):
        last = np.minimum(pos, length) - 1
        tokens = np.asarray(self._next(self.params, self._global(buf),
                                       self._global(last, self._rows_1d)))
        for row, i in enumerate(idx):
          if not active[row]:
            continue
          if tokens[row] == stop_eos:
            active[row] = False
            continue
          buf[row, pos[row]] = tokens[row]
          pos[row] += 1
          out[i].append(int(tokens[row]))
          if is_done(out[i]) or len(out[i]) >= max_new:
            active[row] = False
        if not active.any():
          break
    return out


def abstract_params(model_cfg: ModelConfig):
  """Boxed shapes with logical axis names (no memory)."""
  return jax.eval_shape(lambda: model_lib.init_params(model_cfg, jax.random.key(0)))


def make_mesh(fsdp: int = 1, tensor: int = 1):
  """All devices: the rest on 'data' (params replicated there), fsdp/tensor as asked."""
  from idea_prune_jax import config as config_lib
  config = config_lib.base()
  config.mesh.update(data=-1, fsdp=fsdp, tensor=tensor)
  return sharding_lib.make_mesh(config)


def shard_params(params, model_cfg: ModelConfig, mesh):
  """Params (any placement) laid out on mesh by their logical axis names."""
  shardings = sharding_lib.param_shardings(abstract_params(model_cfg), mesh)
  return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)
