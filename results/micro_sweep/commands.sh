#!/usr/bin/env bash
# The runs behind results/micro_sweep (README "The regime sweep"): one workdir, each command
# adding runs to it (a rerun skips finished ones); a command's first LR runs for every pipeline
# it names, its other LRs for sweep.lr_pipelines (idea, scratch, scratch_flops). Each pipeline's
# peak-LR grid went upward until its best peak had a worse one on each side; naive ran once per
# budget, at idea's best peak; the third seed only at each pipeline's best peak. About 7 hours
# on an idle 2-core CPU.
set -euo pipefail
S=${1:?usage: results/micro_sweep/commands.sh WORKDIR}
export XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot
sweep() { idea-prune sweep --config configs/micro.py --workdir "$S" "$@"; }
three=idea,scratch,scratch_flops
# 1e-3, 2e-3 and 5e-4 for all three, two seeds (5e-4 at 16x on seed 0 only: worse for all three
# by several seed spreads).
sweep --config.sweep.budgets=1,4 --config.sweep.lrs=1e-3,2e-3,5e-4 --config.sweep.pipelines=$three
sweep --config.sweep.budgets=16 --config.sweep.lrs=1e-3,2e-3 --config.sweep.pipelines=$three
sweep --config.sweep.budgets=16 --config.sweep.lrs=5e-4 --config.sweep.pipelines=$three \
  --config.sweep.seeds=1
# Upward where the top peak was best.
sweep --config.sweep.budgets=1 --config.sweep.lrs=4e-3 --config.sweep.pipelines=$three
sweep --config.sweep.budgets=4,16 --config.sweep.lrs=4e-3 --config.sweep.pipelines=idea
sweep --config.sweep.budgets=1 --config.sweep.lrs=8e-3 --config.sweep.pipelines=idea,scratch
sweep --config.sweep.budgets=4,16 --config.sweep.lrs=8e-3 --config.sweep.pipelines=idea
sweep --config.sweep.budgets=1 --config.sweep.lrs=1.6e-2 --config.sweep.pipelines=idea,scratch
# naive at idea's best peak.
sweep --config.sweep.budgets=1 --config.sweep.lrs=8e-3 --config.sweep.pipelines=naive
sweep --config.sweep.budgets=4,16 --config.sweep.lrs=4e-3 --config.sweep.pipelines=naive
# A third seed at each pipeline's best peak.
sweep --config.sweep.seeds=3 --config.sweep.budgets=1 --config.sweep.lrs=2e-3 \
  --config.sweep.pipelines=scratch_flops
sweep --config.sweep.seeds=3 --config.sweep.budgets=4,16 --config.sweep.lrs=1e-3 \
  --config.sweep.pipelines=scratch,scratch_flops
sweep --config.sweep.seeds=3 --config.sweep.budgets=1 --config.sweep.lrs=8e-3 \
  --config.sweep.pipelines=idea,scratch
sweep --config.sweep.seeds=3 --config.sweep.budgets=4,16 --config.sweep.lrs=4e-3 \
  --config.sweep.pipelines=idea
