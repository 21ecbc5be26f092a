"""What `compare` and `sweep` run besides the base `RunConfig`."""

import dataclasses

# idea_kd's distill.alpha where the config has none (compare, sweep; compile-check's KD step):
# the best alpha of the KD grid at tiny on the old data path (results/kd_tiny) and the cheapest
# with the t_s teacher on the fixed one (results/kd_tiny_best), with tau 1 over both phases.
IDEA_KD_ALPHA = 0.1


@dataclasses.dataclass(frozen=True)
class CompareConfig:
  seeds: int = 2
  pipelines: str = 'idea,idea_kd,naive,scratch,scratch_flops'


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  budgets: str = '1,4,16'  # token budgets as multiples of train.steps
  pipelines: str = 'idea,naive,scratch,scratch_flops'
  lrs: str = ''  # peak LRs; empty: train.lr
  lr_pipelines: str = 'idea,scratch,scratch_flops'  # those run at every LR; others at the first
  seeds: int = 2
  # idea_kd runs once per KD setting: alphas x taus x phases (each empty: the distill config's).
  # An alpha is a value or START:END[:KIND], a schedule over the distilling steps (cosine default).
  kd_alphas: str = ''  # e.g. '0.1,0.3,0.5,0.9:0.5'
  kd_taus: str = ''  # e.g. '1,2'
  kd_phases: str = ''  # e.g. 'prune,recovery,both'
  # The paper's ablations, each axis varied alone around the config (empty: not varied). idea and
  # naive run once per value, labelled idea@e2.6, naive@e2.6, idea@ts0.3, idea@w0.4; scratch
  # (and scratch_flops) once, as without them.
  enlarge: str = ''  # enlarged FFN / target FFN, e.g. '1.3,2,2.6,4,5.3' (model.ffn_dim rounded)
  t_starts: str = ''  # prune.t_start fractions, e.g. '0.3,0.5,0.7' (the window kept)
  windows: str = ''  # window lengths t_end - t_start as fractions, e.g. '0.1,0.2,0.4'
  # True: run nothing; summarise every finished run under the workdir, the union of several
  # sweep commands into it (each pipeline at its own LRs per budget), as one sweep.json/md/png.
  collect: bool = False
  # Labels every run of this command PIPELINE@TAG, so runs of another config (another enlarged
  # shape, e.g. configs/micro.py:multi) share a workdir with the base runs and are tabled like an
  # ablation: idea@TAG against scratch, naive@TAG and idea.
  tag: str = ''
