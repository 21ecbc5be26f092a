"""The one scorer: perplexity, log-likelihoods and generation, batched on the sharded model.

Requests arrive as token lists of any length. They are sorted by length, padded on the right into
a few length buckets (powers of two up to `max_length`) and cut into batches of one fixed size
(short batches are filled with dummy rows), so XLA compiles at most one program per bucket and
request kind however many requests come. Right padding needs no attention mask: the model is
causal, so a row's real positions never see its padding.

Scoring needs, per position, only log p(target) and whether the target is the argmax, so the LM
head runs on the final hidden states `chunk` positions at a time: at paper scale (vocab 32k) the
f32 [B, L, V] logits would be the largest array of the program, and they are never whole.

Several hosts: every process holds the whole request list (lm-eval builds it deterministically),
builds the same global batch, hands its own devices only their rows (`make_array_from_callback`)
and reads back the replicated per-row results, so every process returns what one process would.
"""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from idea_prune_jax.model import model as model_lib
from idea_prune_jax.train import sharding as sharding_lib
from idea_prune_jax.model.config import ModelConfig
from idea_prune_jax.train.config import MeshConfig

MIN_BUCKET = 16
# Positions per LM-head chunk: [B, 128, 32k] f32 is 256 MiB at B = 16, a small share of HBM,
# while 128-row matmuls still fill the MXU.
SCORE_CHUNK = 128


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


# ------------------------------------------------------------------------------ pure programs


def _logit_scores(logits_BxCxV, targets_BxC, mask_BxC):
  """(sum of log p(target) over mask [B], all masked targets the argmax [B]) of some positions."""
  logp_BxC = (jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], -1)[..., 0]
              - jax.nn.logsumexp(logits_BxCxV, -1))
  greedy_BxC = jnp.argmax(logits_BxCxV, -1) == targets_BxC
  return jnp.sum(jnp.where(mask_BxC, logp_BxC, 0.0), -1), jnp.all(greedy_BxC | ~mask_BxC, -1)


def target_scores(hidden_BxLxD, head_DxV, targets_BxL, mask_BxL, cfg: ModelConfig, chunk: int):
  """(sum of log p(target) over mask [B], whether every masked target is the argmax [B]).

  chunk 0 or >= L: the whole [B, L, V] logits at once (the reference the chunked scan must equal).
  """
  B, L, _ = hidden_BxLxD.shape
  if not chunk or chunk >= L:
    return _logit_scores(model_lib.logits(hidden_BxLxD, head_DxV, cfg), targets_BxL, mask_BxL)
  n = -(-L // chunk)
  # max_length caps a bucket at any length, so L need not divide: the padding is masked out.
  pad = lambda x: jnp.pad(x, [(0, 0), (0, n * chunk - L)] + [(0, 0)] * (x.ndim - 2))
  # Sequence chunks keep the batch axis (and its data sharding) whole; scan walks axis 0.
  to_chunks = lambda x: jnp.moveaxis(pad(x).reshape(B, n, chunk, *x.shape[2:]), 1, 0)

  def body(carry, xs):
    h_BxCxD, targets_BxC, mask_BxC = xs
    logp_B, greedy_B = _logit_scores(model_lib.logits(h_BxCxD, head_DxV, cfg), targets_BxC,
                                     mask_BxC)
    return (carry[0] + logp_B, carry[1] & greedy_B), None

  init = (jnp.zeros((B,), jnp.float32), jnp.ones((B,), bool))
  (logp_B, greedy_B), _ = jax.lax.scan(
      body, init, (to_chunks(hidden_BxLxD), to_chunks(targets_BxL), to_chunks(mask_BxL)))
  return logp_B, greedy_B


def score_batch(params, inputs_BxL, targets_BxL, mask_BxL, *, cfg: ModelConfig, chunk: int):
  """Per row: (sum of log p(target) where mask, whether those targets are all greedy)."""
  hidden_BxLxD = model_lib.Transformer(cfg).apply({'params': params}, inputs_BxL,
                                                  return_hidden=True)
  return target_scores(hidden_BxLxD, model_lib.head(params, cfg), targets_BxL, mask_BxL, cfg,
                       chunk)


def sample(logits_BxV, key, temperature: float = 0.0, top_p: float = 1.0):
  """One token per row: the argmax at temperature 0, else nucleus sampling at that temperature."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, -1).astype(jnp.int32)
  logp_BxV = jax.nn.log_softmax(logits_BxV / temperature, -1)
  order_BxV = jnp.argsort(-logp_BxV, -1)
  sorted_BxV = jnp.exp(jnp.take_along_axis(logp_BxV, order_BxV, -1))
  # The smallest prefix whose mass reaches top_p: a token survives if the mass before it is short
  # of top_p, so the top token always does.
  keep_sorted_BxV = jnp.cumsum(sorted_BxV, -1) - sorted_BxV < top_p
  keep_BxV = jnp.take_along_axis(keep_sorted_BxV, jnp.argsort(order_BxV, -1), -1)
  return jax.random.categorical(key, jnp.where(keep_BxV, logp_BxV, -jnp.inf), -1).astype(
      jnp.int32)


def next_token(params, tokens_BxL, last_B, key_data, *, cfg: ModelConfig, temperature: float,
               top_p: float):
  """The token after position last_B of each row; only those rows' logits [B, V] are made."""
  hidden_BxLxD = model_lib.Transformer(cfg).apply({'params': params}, tokens_BxL,
                                                  return_hidden=True)
  hidden_BxD = jnp.take_along_axis(hidden_BxLxD, last_B[:, None, None], 1)[:, 0]
  logits_BxV = model_lib.logits(hidden_BxD, model_lib.head(params, cfg), cfg)
  return sample(logits_BxV, jax.random.wrap_key_data(key_data), temperature, top_p)


# ---------------------------------------------------------------------------------- the scorer


class Scorer:
  """A model's params on a mesh, with one jitted program per request kind and length bucket.

  `traces` counts how often each kind was traced (a trace is a compilation).
  """

  def __init__(self, params, model_cfg: ModelConfig, mesh, batch_size: int, max_length: int,
               chunk: int = SCORE_CHUNK):
    self.params, self.model_cfg, self.mesh = params, model_cfg, mesh
    self.batch_size, self.max_length, self.chunk = batch_size, max_length, chunk
    self.traces = collections.Counter()
    self._rows = sharding_lib.batch_sharding(mesh)
    self._rows_1d = NamedSharding(mesh, P(self._rows.spec[0]))
    self._replicated = sharding_lib.replicated(mesh)
    self._param_sharding = jax.tree.map(lambda x: x.sharding, params)
    self._next = {}

    def score(*args):
      self.traces['loglikelihood'] += 1
      return score_batch(*args, cfg=model_cfg, chunk=chunk)

    self._score = sharding_lib.MeshJit(jax.jit(
        score, in_shardings=(self._param_sharding, self._rows, self._rows, self._rows),
        out_shardings=(self._replicated, self._replicated)), mesh)

  def _next_program(self, temperature: float, top_p: float):
    """The next-token program of one sampling setting (greedy ignores top_p)."""
    setting = (0.0, 1.0) if temperature == 0.0 else (float(temperature), float(top_p))
    if setting not in self._next:
      def step(*args):
        self.traces['generate_until'] += 1
        return next_token(*args, cfg=self.model_cfg, temperature=setting[0], top_p=setting[1])
      self._next[setting] = sharding_lib.MeshJit(jax.jit(
          step, in_shardings=(self._param_sharding, self._rows, self._rows_1d, self._replicated),
          out_shardings=self._replicated), self.mesh)
    return self._next[setting]

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

  def perplexity(self, windows: np.ndarray) -> dict:
    """Token loss and perplexity of [N, L + 1] token windows (L <= max_length), each scored whole:
    its first token is the context of the other L."""
    if len(windows) == 0:
      raise ValueError('perplexity of no windows')
    pairs = [(w[:1].tolist(), w[1:].tolist()) for w in np.asarray(windows)]
    count = sum(len(cont) for _, cont in pairs)
    loss = -math.fsum(logp for logp, _ in self.loglikelihood(pairs)) / count
    return {'loss': loss, 'ppl': math.exp(min(loss, 50.0)), 'tokens': count}

  def generate(self, contexts: list[list[int]], max_new: int, stop_eos: int,
               is_done=lambda row_tokens: False, *, key=None, temperature: float = 0.0,
               top_p: float = 1.0) -> list[list[int]]:
    """Up to max_new tokens per context, ending before stop_eos or once is_done(tokens): greedy at
    temperature 0, else nucleus sampling (top_p) from key.

    Contexts lose their oldest tokens beyond max_length - max_new. No KV cache: each step runs the
    whole padded buffer, which keeps one program per bucket.
    """
    keep = self.max_length - max_new
    if keep < 1:
      raise ValueError(f'max_gen_toks={max_new} leaves no room for context in '
                       f'max_length={self.max_length}')
    if temperature and key is None:
      raise ValueError(f'temperature={temperature} samples: pass a key')
    program = self._next_program(temperature, top_p)
    key = jax.random.key(0) if key is None else key  # greedy draws nothing: any key will do
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
        sub = key
        if temperature:
          key, sub = jax.random.split(key)
        # Raw key bits, the same on every process, so each host builds the same global input.
        sub = np.asarray(jax.random.key_data(sub))
        last = np.minimum(pos, length) - 1
        tokens = np.asarray(program(self.params, self._global(buf),
                                    self._global(last, self._rows_1d),
                                    self._global(sub, self._replicated)))
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


# --------------------------------------------------------------------------------- placement


def abstract_params(model_cfg: ModelConfig):
  """Boxed shapes with logical axis names (no memory)."""
  return jax.eval_shape(lambda: model_lib.init_params(model_cfg, jax.random.key(0)))


def make_mesh(fsdp: int = 1, tensor: int = 1):
  """All devices: the rest on 'data' (params replicated there), fsdp/tensor as asked."""
  return sharding_lib.make_mesh(MeshConfig(data=-1, fsdp=fsdp, tensor=tensor))


def shard_params(params, model_cfg: ModelConfig, mesh):
  """Params (any placement) laid out on mesh by their logical axis names."""
  shardings = sharding_lib.param_shardings(abstract_params(model_cfg), mesh)
  return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)


def data_rows(mesh) -> int:
  """Devices a batch's rows are split over: a batch size must be a multiple of this."""
  return mesh.shape['data'] * mesh.shape['fsdp']
