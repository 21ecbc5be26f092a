#!/usr/bin/env bash
# The paper's ablations at micro (README "The paper's ablations at micro"): the 4x budget, two
# seeds, every pipeline at the re-bracketed 4x peak of the regime study (2e-3 for idea, naive and
# scratch), on the fixed data path. The config's own idea, naive and scratch runs are the regime
# study's (results/regime_micro/x4/*/lr0.002: the same config, seeds and batches, deterministic),
# copied into the workdir first so the sweep skips them; without the copy it reruns them. 28 new
# runs, 93 min on a 2-core CPU shared with the 16x study and two TPU compiles. This directory
# keeps every run's report.json: a copy of it as WORKDIR resumes the study.
set -euo pipefail
S=${1:?usage: results/ablation_micro/commands.sh WORKDIR}
export XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot
idea-prune sweep --config configs/micro.py --config.model.unroll_layers=true \
  --config.sweep.budgets=4 --config.sweep.pipelines=idea,naive,scratch \
  --config.sweep.lrs=2e-3 --config.sweep.seeds=2 \
  --config.sweep.enlarge=1.3,2,2.6,4,5.3 --config.sweep.t_starts=0.3,0.7 \
  --config.sweep.windows=0.1,0.4 --workdir "$S"
