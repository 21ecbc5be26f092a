"""Llama 3.1 8B at MaxText's published v6e-256 benchmark shape, to calibrate compile-check's
step-time estimate against a measured run (BENCHMARKS.md, "Calibration against MaxText").

  idea-prune compile-check --config configs/llama31_8b.py:v6e256 --topology v6e-256 \
      --steps enlarged

MaxText's `llama3_1-8b-8192` on v6e-256 (benchmarks/maxtext_trillium_model_configs.py): sequence
8192, 4 sequences per chip (global batch 1024), the whole slice one fsdp axis, flash (splash)
attention, and a custom remat that offloads the layer input and the q/k/v/out projections to host
memory; measured 45.46% MFU, ~7,207 tokens/s/chip. We have no host offload: the variants keep
the same shape with our remat policies instead. Not a training recipe: the prune fields only
make the config valid (compile-check --steps enlarged compiles the dense step).
"""

from idea_prune_jax import settings

# variant -> (model.remat_policy, model.loss_chunk)
SLICES = {
    'v6e256': ('full', 1024),
    'v6e256_save_attn_proj': ('save_attn_proj', 1024),
}


def get_config(arg: str = ''):
  c = settings.base()
  c.model.update(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                 ffn_dim=14336, tie_embeddings=False, rope_theta=500000.0, dtype='bfloat16')
  c.prune.update(target_ffn=7168, round_to=128)
  c.data.update(source='prepared', prepared_dir='/mnt/idea-data/c4_en', seq_len=8192)
  c.train.update(steps=1000, batch_size=1024, warmup_steps=100)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  if arg not in SLICES:
    raise ValueError(f'configs/llama31_8b.py: unknown variant {arg!r}; use one of '
                     f'{", ".join(SLICES)}')
  c.model.remat_policy, c.model.loss_chunk = SLICES[arg]
  return c
