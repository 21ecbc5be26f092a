"""LLaMA-style decoder: RMSNorm, half-split RoPE, GQA attention, SwiGLU, layers under nn.scan.

Params are a plain pytree with logical axis names (see `sharding.RULES`). Layer params are stacked
on a leading 'layers' axis, so the FFN of layer l is `params['layers']['mlp']['gate'][l]` etc.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from idea_prune_jax.data.batch import PACKING_KEYS, Batch
from idea_prune_jax.model import attention as attention_lib
from idea_prune_jax.model.config import ModelConfig

Array = jax.Array


def _param(module, name, init, shape, names, dtype):
  return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


class RMSNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, hidden_kept=None):
    """hidden_kept: how many d_model channels are alive (hidden-size pruning keeps the others at
    0); the mean square is over those only, so a masked model equals its shrunk one."""
    scale = _param(self, 'scale', nn.initializers.ones, (x_BxLxD.shape[-1],), ('norm',),
                   self.cfg.param_dtype)
    x = x_BxLxD.astype(jnp.float32)
    if hidden_kept is None:
      mean_square = jnp.mean(x * x, axis=-1, keepdims=True)
    else:
      mean_square = jnp.sum(x * x, axis=-1, keepdims=True) / hidden_kept
    x = x * jax.lax.rsqrt(mean_square + self.cfg.norm_eps)
    return (x * scale.astype(jnp.float32)).astype(self.cfg.dtype)


def shard_batch(x_BxLxD):
  """Keeps activations split over the batch like the tokens are.

  Without it XLA shards the embedding lookup's output like the table (d_model over fsdp) and
  every chip computes the whole global batch: 1329 GiB/chip instead of 29 at paper scale on 64
  chips (BENCHMARKS.md, compile-check). A no-op when no mesh is set (CPU tests, user code).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not {'data', 'fsdp'} <= set(mesh.axis_names):
    return x_BxLxD
  spec = jax.sharding.PartitionSpec(('data', 'fsdp'), *([None] * (x_BxLxD.ndim - 1)))
  return jax.lax.with_sharding_constraint(x_BxLxD, spec)


def rope(x_BxLxHxK, positions_BxL, theta):
  """Rotary embedding, half-split convention (Hugging Face Llama's `rotate_half`).

  positions [B, L], or [L] shared by every row.
  """
  half = x_BxLxHxK.shape[-1] // 2
  freq_K2 = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxLxK2 = jnp.atleast_2d(positions_BxL)[..., None].astype(jnp.float32) * freq_K2
  sin, cos = jnp.sin(angle_BxLxK2)[:, :, None, :], jnp.cos(angle_BxLxK2)[:, :, None, :]
  x = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL=None, positions_BxL=None):
    cfg = self.cfg
    B, L, D = x_BxLxD.shape
    H, KV, K = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    init = nn.initializers.normal(0.02)
    out_init = nn.initializers.normal(0.02 / math.sqrt(2 * cfg.n_layers))
    wq = _param(self, 'q', init, (D, H * K), ('embed', 'q_heads'), cfg.param_dtype)
    wk = _param(self, 'k', init, (D, KV * K), ('embed', 'kv_heads'), cfg.param_dtype)
    wv = _param(self, 'v', init, (D, KV * K), ('embed', 'kv_heads'), cfg.param_dtype)
    wo = _param(self, 'o', out_init, (H * K, D), ('q_heads', 'embed'), cfg.param_dtype)
    x = x_BxLxD.astype(cfg.dtype)
    q_BxLxHxK = (x @ wq.astype(cfg.dtype)).reshape(B, L, H, K)
    k_BxLxKVxK = (x @ wk.astype(cfg.dtype)).reshape(B, L, KV, K)
    v_BxLxKVxK = (x @ wv.astype(cfg.dtype)).reshape(B, L, KV, K)
    positions = jnp.arange(L) if positions_BxL is None else positions_BxL  # [L] or [B, L]
    # Named for remat_policy='save_attn_proj': the backward pass reuses them instead of
    # recomputing the projections.
    q_BxLxHxK = checkpoint_name(rope(q_BxLxHxK, positions, cfg.rope_theta), 'q_proj')
    k_BxLxKVxK = checkpoint_name(rope(k_BxLxKVxK, positions, cfg.rope_theta), 'k_proj')
    v_BxLxKVxK = checkpoint_name(v_BxLxKVxK, 'v_proj')
    out_BxLxHxK = attention_lib.attention(q_BxLxHxK, k_BxLxKVxK, v_BxLxKVxK, segment_ids_BxL,
                                          implementation=cfg.attention)
    out_BxLxHxK = checkpoint_name(out_BxLxHxK, 'attn_out')
    return out_BxLxHxK.reshape(B, L, H * K) @ wo.astype(cfg.dtype)


class SwiGLU(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    D, F = x_BxLxD.shape[-1], cfg.ffn_dim
    init = nn.initializers.normal(0.02)
    out_init = nn.initializers.normal(0.02 / math.sqrt(2 * cfg.n_layers))
    gate = _param(self, 'gate', init, (D, F), ('embed', 'mlp'), cfg.param_dtype)
    up = _param(self, 'up', init, (D, F), ('embed', 'mlp'), cfg.param_dtype)
    down = _param(self, 'down', out_init, (F, D), ('mlp', 'embed'), cfg.param_dtype)
    x = x_BxLxD.astype(cfg.dtype)
    h_BxLxF = nn.silu(x @ gate.astype(cfg.dtype)) * (x @ up.astype(cfg.dtype))
    # Only recorded when the caller makes 'intermediates' mutable (activation importance).
    self.sow('intermediates', 'ffn_act', jnp.mean(jnp.abs(h_BxLxF.astype(jnp.float32)), (0, 1)),
             init_fn=lambda: 0.0, reduce_fn=lambda _, new: new)
    return h_BxLxF @ down.astype(cfg.dtype)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, hidden_kept):
    x_BxLxD = x_BxLxD + Attention(self.cfg, name='attn')(
        RMSNorm(self.cfg, name='attn_norm')(x_BxLxD, hidden_kept), segment_ids_BxL,
        positions_BxL)
    x_BxLxD = x_BxLxD + SwiGLU(self.cfg, name='mlp')(
        RMSNorm(self.cfg, name='mlp_norm')(x_BxLxD, hidden_kept))
    return x_BxLxD, None


def batch_inputs(batch: Batch) -> dict:
  """The model's keyword inputs from a batch: its packing keys (segment_ids, positions), if any."""
  return {k: batch[k] for k in PACKING_KEYS if k in batch}


class Transformer(nn.Module):
  """tokens [B, L] int -> logits [B, L, V] float32 (or the final hidden states, see below)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, segment_ids=None, positions=None, return_hidden: bool = False,
               hidden_kept=None):
    """segment_ids/positions [B, L]: packed documents (attention within a document, RoPE from
    each document's start); None is one causal sequence per row. return_hidden: the final-norm
    output [B, L, D] instead of logits, for chunked heads. hidden_kept: the alive d_model
    channels while the hidden size is pruned by masks (a traced int is fine; see RMSNorm)."""
    cfg = self.cfg
    embedding = _param(self, 'embed', nn.initializers.normal(0.02), (cfg.vocab_size, cfg.d_model),
                       ('vocab', 'embed'), cfg.param_dtype)
    x_BxLxD = shard_batch(jnp.take(embedding, tokens_BxL, axis=0).astype(cfg.dtype))
    block = Block
    if cfg.remat_policy != 'none':
      block = nn.remat(Block, prevent_cse=False, policy=remat_policy(cfg.remat_policy))
    layers = nn.scan(block, variable_axes={'params': 0, 'intermediates': 0},
                     split_rngs={'params': True}, in_axes=(nn.broadcast,) * 3,
                     length=cfg.n_layers, unroll=cfg.n_layers if cfg.unroll_layers else 1,
                     metadata_params={nn.PARTITION_NAME: 'layers'})
    x_BxLxD, _ = layers(cfg, name='layers')(x_BxLxD, segment_ids, positions, hidden_kept)
    x_BxLxD = RMSNorm(cfg, name='final_norm')(x_BxLxD, hidden_kept)
    if not cfg.tie_embeddings:
      _param(self, 'lm_head', nn.initializers.normal(0.02), (cfg.d_model, cfg.vocab_size),
             ('embed', 'vocab'), cfg.param_dtype)
    if return_hidden:
      return x_BxLxD
    return logits(x_BxLxD, head(self.variables['params'], cfg), cfg)


REMAT_POLICIES = ('none', 'full', 'dots_saveable', 'save_attn_proj')


def remat_policy(name: str):
  """What a layer keeps for the backward pass (the rest is recomputed); see REMAT_POLICIES.

  full: only the layer input. dots_saveable: every weight matmul's output (XLA's batch-free
  dots; the attention score dots stay recomputed, else the [B, H, L, L] scores would be kept).
  save_attn_proj: q, k, v (after RoPE), the attention output and the splash kernel's residuals.
  """
  policies = jax.checkpoint_policies
  if name == 'full':
    return policies.nothing_saveable
  if name == 'dots_saveable':
    return policies.dots_with_no_batch_dims_saveable
  if name == 'save_attn_proj':
    return policies.save_only_these_names('q_proj', 'k_proj', 'v_proj', 'attn_out',
                                          attention_lib.SPLASH_RESIDUALS)
  raise ValueError(f'remat policy {name!r}: use one of {REMAT_POLICIES}')


def head(params, cfg: ModelConfig):
  """The LM head [D, V] from a param tree (the transposed embedding when tied)."""
  params = nn.unbox(params)
  return params['embed'].T if cfg.tie_embeddings else params['lm_head']


def logits(x_BxLxD, head_DxV, cfg: ModelConfig):
  return (x_BxLxD @ head_DxV.astype(cfg.dtype)).astype(jnp.float32)


def _layer_matmul_params(cfg: ModelConfig) -> int:
  """Weights of one layer's matmuls: q, k, v, o and the three FFN projections."""
  d, k = cfg.d_model, cfg.head_dim
  return 2 * d * cfg.n_heads * k + 2 * d * cfg.n_kv_heads * k + 3 * d * cfg.ffn_dim


def param_count(cfg: ModelConfig) -> int:
  """Analytical parameter count (equals the initialised tree's size; tested)."""
  d = cfg.d_model
  per_layer = _layer_matmul_params(cfg) + 2 * d  # + the two RMSNorm scales
  head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
  return cfg.n_layers * per_layer + cfg.vocab_size * d + d + head


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 x matmul params + 12·layers·heads·head_dim·seq (PaLM app. B)."""
  matmul = cfg.n_layers * _layer_matmul_params(cfg) + cfg.d_model * cfg.vocab_size
  attention = cfg.n_layers * 2 * cfg.n_heads * cfg.head_dim * seq_len
  return 6 * matmul + 6 * attention


def init_params(cfg: ModelConfig, key, seq_len: int = 8):
  """Boxed (nn.Partitioned) params; `nn.unbox` gives the plain pytree."""
  return Transformer(cfg).init(key, jnp.zeros((1, seq_len), jnp.int32))['params']
