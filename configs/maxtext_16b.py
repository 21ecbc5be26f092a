"""MaxText's 16B benchmark model (`global_parameter_scale=16`) at its published v5e-256 shape, a
second point to calibrate compile-check's step-time estimate against a measured run (BENCHMARKS.md,
"Calibration against MaxText").

  idea-prune compile-check --config configs/maxtext_16b.py:v5e256 --topology v5e-256 \
      --steps enlarged

MaxText's base model scaled 16x: d_model 4096, 64 query and 64 KV heads of head_dim 128 (so
heads x head_dim = 8192, not d_model: `model.head_dim` is explicit), MLP 28672, 32 layers, vocab
32000, sequence 2048, 6 sequences per chip (global batch 1536), the slice one fsdp axis, remat
full; measured 61.1% MFU (120 TFLOP/s/chip) on v5e-256. Not a training recipe: the prune fields
only make the config valid (compile-check --steps enlarged compiles the dense step).
"""

from idea_prune_jax import settings

# variant -> (model.remat_policy, model.loss_chunk)
SLICES = {
    'v5e256': ('full', 512),
}


def get_config(arg: str = ''):
  c = settings.base()
  c.model.update(vocab_size=32000, d_model=4096, n_layers=32, n_heads=64, n_kv_heads=64,
                 head_dim=128, ffn_dim=28672, tie_embeddings=False, dtype='bfloat16')
  c.prune.update(target_ffn=14336, round_to=128)
  c.data.update(source='prepared', prepared_dir='/mnt/idea-data/c4_en', seq_len=2048)
  c.train.update(steps=1000, batch_size=1536, warmup_steps=100)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  if arg not in SLICES:
    raise ValueError(f'configs/maxtext_16b.py: unknown variant {arg!r}; use one of '
                     f'{", ".join(SLICES)}')
  c.model.remat_policy, c.model.loss_chunk = SLICES[arg]
  return c
