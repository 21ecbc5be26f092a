#!/usr/bin/env bash
# The runs behind results/regime_micro (README "The regime sweep"), on the fixed data path (scenes,
# hashed epoch orders, document-masked attention): one workdir, each command adding runs to it (a
# rerun skips finished ones: this directory keeps every finished run's report.json, so a copy of
# it as WORKDIR resumes the study). First each pipeline at its best peak LR from the old grid
# (results/micro_sweep), then the 1x peaks bracketed again where they moved. The summary of the
# union: the last line.
set -euo pipefail
S=${1:?usage: results/regime_micro/commands.sh WORKDIR}
export XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot
sweep() { idea-prune sweep --config configs/micro.py --config.model.unroll_layers=true --workdir "$S" "$@"; }
sweep --config.sweep.seeds=3 --config.sweep.budgets=1 --config.sweep.lrs=8e-3 --config.sweep.pipelines=idea,scratch
sweep --config.sweep.seeds=3 --config.sweep.budgets=1 --config.sweep.lrs=2e-3 --config.sweep.pipelines=scratch_flops
sweep --config.sweep.seeds=2 --config.sweep.budgets=1 --config.sweep.lrs=8e-3 --config.sweep.pipelines=naive
sweep --config.sweep.seeds=3 --config.sweep.budgets=4 --config.sweep.lrs=4e-3 --config.sweep.pipelines=idea
sweep --config.sweep.seeds=3 --config.sweep.budgets=4 --config.sweep.lrs=1e-3 --config.sweep.pipelines=scratch,scratch_flops
sweep --config.sweep.seeds=2 --config.sweep.budgets=4 --config.sweep.lrs=4e-3 --config.sweep.pipelines=naive
# 1x: the best peaks moved down (idea, scratch) or to the top of the grid (scratch_flops).
sweep --config.sweep.seeds=3 --config.sweep.budgets=1 --config.sweep.lrs=4e-3 --config.sweep.pipelines=idea,scratch
sweep --config.sweep.seeds=3 --config.sweep.budgets=1 --config.sweep.lrs=1e-3,4e-3 --config.sweep.pipelines=scratch_flops --config.sweep.lr_pipelines=scratch_flops
sweep --config.sweep.seeds=3 --config.sweep.budgets=1 --config.sweep.lrs=8e-3 --config.sweep.pipelines=scratch_flops
sweep --config.sweep.seeds=2 --config.sweep.budgets=1 --config.sweep.lrs=4e-3 --config.sweep.pipelines=naive
sweep --config.sweep.seeds=3 --config.sweep.budgets=1 --config.sweep.lrs=2e-3 --config.sweep.pipelines=idea,scratch
# 16x: two seeds of every pipeline, then the third.
sweep --config.sweep.seeds=2 --config.sweep.budgets=16 --config.sweep.lrs=4e-3 --config.sweep.pipelines=idea
sweep --config.sweep.seeds=2 --config.sweep.budgets=16 --config.sweep.lrs=1e-3 --config.sweep.pipelines=scratch,scratch_flops
sweep --config.sweep.seeds=2 --config.sweep.budgets=16 --config.sweep.lrs=4e-3 --config.sweep.pipelines=naive
sweep --config.sweep.seeds=3 --config.sweep.budgets=16 --config.sweep.lrs=4e-3 --config.sweep.pipelines=idea
sweep --config.sweep.seeds=3 --config.sweep.budgets=16 --config.sweep.lrs=1e-3 --config.sweep.pipelines=scratch,scratch_flops
sweep --config.sweep.collect=true
