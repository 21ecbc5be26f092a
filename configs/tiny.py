"""Tiny CPU demo: 4 layers, d_model 192, FFN 1152 (3x enlarged) pruned to 384.

  idea-prune train --config configs/tiny.py --workdir /tmp/tiny
  idea-prune train --config configs/tiny.py:test --workdir /tmp/t   # seconds, for tests
"""

from idea_prune_jax import settings


def get_config(arg: str = ''):
  c = settings.base()
  c.model.update(vocab_size=4096, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, ffn_dim=1152)
  c.prune.update(target_ffn=384, round_to=1)
  c.data.seq_len = 128
  c.train.update(steps=200, batch_size=16, lr=1e-3, warmup_steps=20, eval_every=100,
                 ckpt_every=100, eval_batches=8)
  if arg == 'test':  # a few seconds: CLI and resume tests
    c.model.update(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)
    c.prune.target_ffn = 32
    c.data.seq_len = 32
    c.train.update(steps=12, batch_size=8, warmup_steps=2, log_every=1, eval_every=6,
                   ckpt_every=6, eval_batches=2)
  elif arg:
    raise ValueError(f'configs/tiny.py: unknown variant {arg!r}; use "" or "test"')
  return c
