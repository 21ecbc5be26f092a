"""Small: the benchmark size (8 layers, d_model 512, FFN 4096 pruned to 1408).

  idea-prune train --config configs/small.py --workdir /tmp/small
"""

from idea_prune_jax import settings


def get_config(arg: str = ''):
  del arg
  c = settings.base()
  c.model.update(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=4096)
  c.prune.update(target_ffn=1408, round_to=128)
  c.data.seq_len = 256
  c.train.update(steps=2000, batch_size=16, lr=6e-4, warmup_steps=100, eval_every=250,
                 ckpt_every=500)
  return c
