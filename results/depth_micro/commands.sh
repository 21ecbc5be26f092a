#!/usr/bin/env bash
# The depth pilot (issue 26; README "Beyond the paper", the depth bullet): configs/micro.py:multi
# enlarged to 4 layers (849,720 parameters), pruned in one run either 4 -> 2 layers plus the micro
# target widths (depth/) or, keeping 4 layers, to the same 264,672 parameters by the budget over
# the width axes (width/). LR 4e-3, 160 steps, seeds 0 and 1, on the regime study's prepared data
# (results/regime_micro: the same batches per seed as its runs). Each run's report.json (and the
# width arm's budget.json) is kept here.
set -euo pipefail
S=${1:?usage: results/depth_micro/commands.sh WORKDIR (holding the regime study data/)}
export XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot
for seed in 0 1; do
  for arm in depth width; do
    if [[ $arm == depth ]]; then target=(--config.prune.target_layers=2)
    else
      target=(--config.prune.target_params=264672 --config.prune.units=ffn,kv_groups,heads,hidden)
    fi
    idea-prune run --config configs/micro.py:multi --config.model.unroll_layers=true \
      --config.model.n_layers=4 --config.train.lr=4e-3 --config.seed=$seed "${target[@]}" \
      --config.data.source=prepared --config.data.prepared_dir="$S/data" \
      --workdir "$S/depth/$arm/seed$seed"
  done
done
