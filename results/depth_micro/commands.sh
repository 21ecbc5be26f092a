#!/usr/bin/env bash
# The depth pilot (issue 26; README "Beyond the paper", the depth bullet): configs/micro.py:multi
# enlarged to 4 layers (849,720 parameters), pruned in one run either 4 -> 2 layers plus the micro
# target widths (depth*/) or, keeping 4 layers, to the same 264,672 parameters by the budget over
# the width axes (width*/), 160 steps at LR 4e-3 (depth/, width/), 2e-3 and 8e-3 (the _lr dirs);
# then the 2-layer micro:multi idea run at the depth arm's training FLOPs (1.564e12: 261 steps
# instead of 160) at 2e-3 and 4e-3 (flops261_lr*/). Seeds 0 and 1, on the regime study's
# prepared data (results/regime_micro: the same batches per seed as its runs). Each run's
# report.json (and the width arms' budget.json) is kept here.
set -euo pipefail
S=${1:?usage: results/depth_micro/commands.sh WORKDIR (holding the regime study data/)}
export XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot
run() { idea-prune run --config configs/micro.py:multi --config.model.unroll_layers=true \
  --config.data.source=prepared --config.data.prepared_dir="$S/data" "$@"; }
for seed in 0 1; do
  for lr in 4e-3 2e-3 8e-3; do
    suffix=$([[ $lr == 4e-3 ]] || echo "_lr$lr")
    run --config.model.n_layers=4 --config.train.lr=$lr --config.seed=$seed \
      --config.prune.target_layers=2 --workdir "$S/depth/depth$suffix/seed$seed"
    run --config.model.n_layers=4 --config.train.lr=$lr --config.seed=$seed \
      --config.prune.target_params=264672 --config.prune.units=ffn,kv_groups,heads,hidden \
      --workdir "$S/depth/width$suffix/seed$seed"
  done
  for lr in 2e-3 4e-3; do
    run --config.train.steps=261 --config.train.lr=$lr --config.seed=$seed \
      --workdir "$S/depth/flops261_lr$lr/seed$seed"
  done
done
