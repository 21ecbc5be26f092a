"""The paper's pair: one 24-layer trunk (d_model 2048, 16 heads, vocab 32000, tied embeddings),
FFN 15872 (2.81B params, enlarged) pruned to FFN 5632 (1.30B params, target).

  idea-prune params --config configs/paper_2p8b_to_1p3b.py
  idea-prune compile-check --config configs/paper_2p8b_to_1p3b.py:v5p64 --topology v5p-64

Variants are per-slice memory settings, each checked by the TPU compiler (docs/tpu.md,
BENCHMARKS.md): v5p64 (32 chips x 95 GiB), v6e64 (64 x 32 GiB), v5e64 (64 x 16 GiB). The global
batch stays 1024 x 2048 on every slice, so the training recipe is the same.
"""

from idea_prune_jax import settings

FFN_ENLARGED = 15872  # 2.81B
FFN_TARGET = 5632  # 1.30B

# XLA:TPU's collective matmuls (windowed einsum) over fsdp=32 at 32 sequences per chip rewrite
# every FFN matmul as a loop accumulating into the whole output: 7x the HBM traffic of the step,
# memory bound at an MFU ceiling of 54%. Without them: 84%, for 6 GiB more per chip.
NO_WINDOWED_EINSUM = ('--xla_tpu_enable_windowed_einsum_for_all_gather=false '
                      '--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false')

# variant -> (model.remat_policy, model.loss_chunk, distill.chunk, mesh.libtpu_args)
SLICES = {
    'v5p64': ('save_attn_proj', 512, 512, NO_WINDOWED_EINSUM),
    # save_attn_proj compiles at 31.4 of 32 GiB (98%) for 2 more points of MFU ceiling: no headroom.
    'v6e64': ('full', 512, 512, ''),
    'v5e64': ('full', 512, 512, ''),
}


def get_config(arg: str = ''):
  c = settings.base()
  c.model.update(vocab_size=32000, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=16,
                 ffn_dim=FFN_ENLARGED, tie_embeddings=True, dtype='bfloat16', remat_policy='full')
  c.prune.update(target_ffn=FFN_TARGET, round_to=128, t_start=0.5, t_end=0.7)
  # Prepared once with prepare-data into a bucket, read through a gcsfuse mount (docs/tpu.md).
  c.data.update(source='prepared', prepared_dir='/mnt/idea-data/c4_en', seq_len=2048)
  c.train.update(steps=250_000, batch_size=1024, lr=3e-4, warmup_steps=2000, eval_every=2000,
                 ckpt_every=1000)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  if arg in SLICES:
    remat, loss_chunk, kd_chunk, libtpu_args = SLICES[arg]
    # attention stays 'auto': splash on TPU, and an export evaluated on CPU/GPU uses XLA/cuDNN.
    c.model.update(remat_policy=remat, loss_chunk=loss_chunk)
    c.distill.chunk = kd_chunk
    c.mesh.libtpu_args = libtpu_args
    # Every record read through gcsfuse is a GCS round trip (30-100 ms): 2 read threads feed a
    # host 27k tokens/s at 30 ms, 128 feed 1.2M (545k at 100 ms) against the 163k a v6e-64 host
    # trains at the roofline (BENCHMARKS.md "Data loader from a bucket").
    c.data.read_threads = 128
    # A step takes seconds on a slice: at most 20 minutes of work lost to a preemption, however
    # slow the steps (train.ckpt_every alone bounds steps, not time).
    c.train.ckpt_minutes = 20
  elif arg:
    raise ValueError(f'configs/paper_2p8b_to_1p3b.py: unknown variant {arg!r}; use "" or one '
                     f'of {", ".join(SLICES)}')
  return c
