#!/usr/bin/env bash
# The two budget criteria (issue 26; README "Beyond the paper"): configs/micro.py:multi (486,360
# parameters enlarged on d_model, KV groups and the FFN) told only the 264,672-parameter budget;
# at t_s the run scores every axis and picks a shape by `importance` or `lookahead`. Two seeds at
# 1x (160 steps, LR 4e-3) and 4x (640 steps, LR 4e-3, where every run sat on the loss plateau, and
# 2e-3, the multi-axis idea's 4x peak), on the regime study's prepared data (results/regime_micro:
# the same batches per seed as its runs). Each run's report.json and budget.json (every candidate
# with its figures) are kept here under x1_lr4e-3/, x4_lr4e-3/ and x4_lr2e-3/.
set -euo pipefail
S=${1:?usage: results/budget_criteria_micro/commands.sh WORKDIR (holding the regime study data/)}
export XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot
for run in 160:4e-3 640:4e-3 640:2e-3; do steps=${run%%:*}; lr=${run##*:}
for crit in importance lookahead; do for seed in 0 1; do
  idea-prune run --config configs/micro.py:multi --config.model.unroll_layers=true \
    --config.prune.target_params=264672 --config.prune.budget=$crit --config.seed=$seed \
    --config.train.steps=$steps --config.train.lr=$lr \
    --config.data.source=prepared --config.data.prepared_dir="$S/data" \
    --workdir "$S/criteria/x$((steps / 160))_lr$lr/$crit/seed$seed"
done; done; done
