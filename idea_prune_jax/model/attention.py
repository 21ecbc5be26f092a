"""Causal GQA attention: XLA, the Pallas splash kernel (TPU), or cuDNN (GPU), with packed documents.

All take q [B, L, H, K], k and v [B, L, KV, K] (H a multiple of KV) and optional segment ids
[B, L] (a token attends only to earlier tokens of its own document), and return [B, L, H, K].
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ('auto', 'xla', 'splash', 'cudnn')
_BATCH_AXES = ('data', 'fsdp')
_HEAD_AXIS = 'tensor'
_BLOCKS = (512, 256, 128)  # splash tiles: the largest that divides the sequence
# The name splash gives its forward residuals (output, logsumexp), for remat policies that keep
# them: the backward kernels then need no second forward kernel.
SPLASH_RESIDUALS = 'splash_residuals'


def resolve(implementation: str, platform: str, seq_len: int, dtype='bfloat16',
            kv_heads: int = 1, head_shards: int = 1) -> str:
  """'auto' -> splash on TPU (xla where it cannot tile seq_len or split the kv heads), cudnn on
  GPU (bf16/fp16; cuDNN has no f32 flash attention), xla elsewhere; explicit names pass through."""
  if implementation != 'auto':
    return implementation
  if platform == 'tpu':
    return 'xla' if check_splash(seq_len) or kv_heads % head_shards else 'splash'
  half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  return 'cudnn' if platform in ('gpu', 'cuda') and half else 'xla'


def trace_platform() -> str:
  """The platform the computation being traced is for: the mesh's devices, else the backend.

  Under `jax.set_mesh` with TPU topology devices (compile-check on a CPU host) this is 'tpu'
  although the default backend is the CPU.
  """
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, 'abstract_device', None)
  platform = getattr(device, 'platform', None)
  return platform or jax.default_backend()


def check_splash(seq_len: int) -> str | None:
  """Why splash cannot run this sequence length (None if it can)."""
  if seq_len % 128:
    return f'splash tiles the sequence in blocks of 128; seq_len {seq_len} is not a multiple'
  return None


def xla_attention(q_BxLxHxK, k_BxLxKVxK, v_BxLxKVxK, segment_ids_BxL=None, implementation=None):
  """`jax.nn.dot_product_attention` (causal; documents masked when segment ids are given)."""
  mask = None
  if segment_ids_BxL is not None:
    same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    mask = same_BxLxL[:, None]  # broadcast over heads
  return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxKVxK, v_BxLxKVxK, mask=mask,
                                      is_causal=True, implementation=implementation)


def cudnn_attention(q_BxLxHxK, k_BxLxKVxK, v_BxLxKVxK, segment_ids_BxL=None):
  return xla_attention(q_BxLxHxK, k_BxLxKVxK, v_BxLxKVxK, segment_ids_BxL, implementation='cudnn')


def _block(seq_len: int) -> int:
  return next(b for b in _BLOCKS if seq_len % b == 0)


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, seq_len: int, interpret: bool, block: int | None = None):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  b = block or _block(seq_len)
  blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                         block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  mask = sm.MultiHeadMask([sm.CausalMask((seq_len, seq_len)) for _ in range(heads)])
  # The MHA kernel takes fewer k/v heads than q heads (GQA) and maps each q head to its group.
  return sk.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                            residual_checkpoint_name=SPLASH_RESIDUALS, interpret=interpret)


def _splash_local(q_BxLxHxK, k_BxLxKVxK, v_BxLxKVxK, segment_ids_BxL, *, interpret, block):
  """Splash on one device's shard: the kernel is per sequence, vmapped over the batch."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  _, L, H, K = q_BxLxHxK.shape
  kernel = _splash_kernel(H, L, interpret, block)
  # The kernel does not scale the logits; scaling q is the usual place (as the XLA path does).
  q_BxHxLxK = jnp.swapaxes(q_BxLxHxK * np.asarray(K ** -0.5, q_BxLxHxK.dtype), 1, 2)
  k_BxKVxLxK, v_BxKVxLxK = jnp.swapaxes(k_BxLxKVxK, 1, 2), jnp.swapaxes(v_BxLxKVxK, 1, 2)
  if segment_ids_BxL is None:
    out_BxHxLxK = jax.vmap(kernel)(q_BxHxLxK, k_BxKVxLxK, v_BxKVxLxK)
  else:
    one = lambda q, k, v, seg: kernel(q, k, v, segment_ids=sk.SegmentIds(q=seg, kv=seg))
    out_BxHxLxK = jax.vmap(one)(q_BxHxLxK, k_BxKVxLxK, v_BxKVxLxK, segment_ids_BxL)
  return jnp.swapaxes(out_BxHxLxK, 1, 2)


def splash_attention(q_BxLxHxK, k_BxLxKVxK, v_BxLxKVxK, segment_ids_BxL=None,
                     interpret: bool | None = None, block: int | None = None):
  """The Pallas splash kernel, under shard_map when a mesh with our axes is set.

  Batch stays split over (data, fsdp) and heads over tensor, so each chip runs the kernel on its
  own shard; without a mesh (tests, user code) it runs on the whole arrays. interpret=None runs
  Pallas' interpreter off TPU (CPU tests), the compiled kernel on TPU. block: the tile size
  (default the largest of 512, 256, 128 dividing L).
  """
  if interpret is None:
    interpret = trace_platform() != 'tpu'
  fn = functools.partial(_splash_local, interpret=interpret, block=block)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not {*_BATCH_AXES, _HEAD_AXIS} <= set(mesh.axis_names):
    return fn(q_BxLxHxK, k_BxLxKVxK, v_BxLxKVxK, segment_ids_BxL)
  heads = P(_BATCH_AXES, None, _HEAD_AXIS, None)
  tokens = P(_BATCH_AXES, None)
  if segment_ids_BxL is None:
    sharded = jax.shard_map(lambda q, k, v: fn(q, k, v, None), mesh=mesh,
                            in_specs=(heads, heads, heads), out_specs=heads, check_vma=False)
    return sharded(q_BxLxHxK, k_BxLxKVxK, v_BxLxKVxK)
  sharded = jax.shard_map(fn, mesh=mesh, in_specs=(heads, heads, heads, tokens), out_specs=heads,
                          check_vma=False)
  return sharded(q_BxLxHxK, k_BxLxKVxK, v_BxLxKVxK, segment_ids_BxL)


def attention(q_BxLxHxK, k_BxLxKVxK, v_BxLxKVxK, segment_ids_BxL=None, *,
              implementation: str = 'auto'):
  """Causal attention by implementation name (see IMPLEMENTATIONS)."""
  mesh = jax.sharding.get_abstract_mesh()
  head_shards = 1 if mesh.empty else dict(mesh.shape).get(_HEAD_AXIS, 1)
  name = resolve(implementation, trace_platform(), q_BxLxHxK.shape[1], q_BxLxHxK.dtype,
                 k_BxLxKVxK.shape[2], head_shards)
  if name == 'splash' and not check_splash(q_BxLxHxK.shape[1]):
    return splash_attention(q_BxLxHxK, k_BxLxKVxK, v_BxLxKVxK, segment_ids_BxL)
  if name == 'cudnn':
    return cudnn_attention(q_BxLxHxK, k_BxLxKVxK, v_BxLxKVxK, segment_ids_BxL)
  if name in ('xla', 'splash'):  # splash: lengths it cannot tile, i.e. param init's short trace
    return xla_attention(q_BxLxHxK, k_BxLxKVxK, v_BxLxKVxK, segment_ids_BxL)
  raise ValueError(f'attention implementation {implementation!r}: use one of {IMPLEMENTATIONS}')
