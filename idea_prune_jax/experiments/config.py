"""What `compare` and `sweep` run besides the base `RunConfig`."""

import dataclasses

# idea_kd's distill.alpha where the config has none (compare, sweep; compile-check's KD step):
# the best alpha of the KD grid at tiny (README, results/kd_tiny), with tau 1 over both phases.
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
