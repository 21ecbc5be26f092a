"""The regime study's model (`idea-prune sweep`): small enough that a run reaches 20 tokens per
target parameter in about 15 minutes on a 2-core CPU.

2 layers, d_model 96, FFN 576 (3x enlarged) pruned to 192, vocab 1024: 264k target parameters.
train.steps is the sweep's base budget (1.25 tokens per target parameter); sweep.budgets
multiplies it (16x: 20 tokens per parameter).

  idea-prune sweep --config configs/micro.py --workdir S
  idea-prune sweep --config configs/micro.py:test --workdir S   # seconds, for tests
  idea-prune sweep --config configs/micro.py:multi --workdir S  # enlarged on d_model, KV, FFN
"""

from idea_prune_jax import settings


def get_config(arg: str = ''):
  c = settings.base()
  c.model.update(vocab_size=1024, d_model=96, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=576)
  c.prune.update(target_ffn=192, round_to=1)
  c.data.seq_len = 128
  c.train.update(steps=160, batch_size=16, lr=1e-3, warmup_steps=20, log_every=20,
                 eval_every=10**9, ckpt_every=10**9, eval_batches=16)
  c.sweep.update(budgets='1,4,16', lrs='5e-4,1e-3,2e-3', seeds=2)
  if arg == 'test':  # seconds: the sweep's own test
    c.model.update(vocab_size=512, d_model=32, n_heads=4, ffn_dim=96)
    c.prune.target_ffn = 32
    c.data.seq_len = 32
    c.train.update(steps=10, batch_size=4, warmup_steps=2, eval_batches=2)
    c.sweep.update(budgets='1,2', lrs='1e-3,2e-3', seeds=1)
  elif arg == 'multi':  # the same 264k target from 486k params enlarged on three axes (issue 26)
    c.model.update(d_model=120, n_heads=6, n_kv_heads=3, head_dim=24, ffn_dim=360)
    c.prune.update(target_d_model=96, target_kv_heads=2)
  elif arg:
    raise ValueError(f'configs/micro.py: unknown variant {arg!r}; use "", "test" or "multi"')
  return c
