#!/usr/bin/env bash
# The runs behind results/kd_tiny_best and results/kd_tiny_trained_teacher (README "Distillation
# grid"), on the fixed data path: the old grid's best settings (results/kd_tiny) on two seeds,
# then the trained-teacher pair. About 35 min on a 2-core CPU shared with the regime rerun.
set -euo pipefail
R=${1:?usage: results/kd_tiny_best/commands.sh DIR}
export XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot
idea-prune sweep --config configs/tiny.py --workdir "$R/kd" --config.sweep.budgets=1 \
  --config.sweep.pipelines=idea,idea_kd --config.sweep.lrs=1e-3 --config.sweep.kd_alphas=0.1,0.5 \
  --config.sweep.kd_taus=1 --config.sweep.kd_phases=both,recovery --config.sweep.seeds=2
# The teacher: the enlarged model trained on all 200 steps.
idea-prune run --config configs/tiny.py --workdir "$R/teacher" --config.pipeline=scratch \
  --config.prune.target_ffn=1152
idea-prune sweep --config configs/tiny.py --workdir "$R/kd_trained" --config.sweep.budgets=1 \
  --config.sweep.pipelines=idea,idea_kd --config.sweep.lrs=1e-3 --config.sweep.kd_alphas=0.1,0.5 \
  --config.sweep.kd_taus=1 --config.sweep.kd_phases=both --config.sweep.seeds=2 \
  --config.distill.teacher="$R/teacher/export"
