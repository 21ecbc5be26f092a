# The paper's ablations at micro (README "The paper's ablations at micro"), 4x budget, 2 seeds.
# First the enlargement axis (28 runs, 67 min on a 2-core CPU shared with another study), then the
# same command with the start and window axes added: a rerun skips finished runs (8 more, 11 min).
idea-prune sweep --config configs/micro.py --config.model.unroll_layers=true \
  --config.sweep.budgets=4 --config.sweep.pipelines=idea,naive,scratch \
  --config.sweep.lrs=4e-3,1e-3 --config.sweep.lr_pipelines=scratch --config.sweep.seeds=2 \
  --config.sweep.enlarge=1.3,2,2.6,4,5.3 --workdir S
idea-prune sweep --config configs/micro.py --config.model.unroll_layers=true \
  --config.sweep.budgets=4 --config.sweep.pipelines=idea,naive,scratch \
  --config.sweep.lrs=4e-3,1e-3 --config.sweep.lr_pipelines=scratch --config.sweep.seeds=2 \
  --config.sweep.enlarge=1.3,2,2.6,4,5.3 --config.sweep.t_starts=0.3,0.7 \
  --config.sweep.windows=0.1,0.4 --workdir S
