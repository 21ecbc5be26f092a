"""What the CLI's `run` and `compare` do: a pipeline, then its export and report; many, compared."""

import json
import math
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from idea_prune_jax.data import provision
from idea_prune_jax.io import export
from idea_prune_jax.model import model as model_lib
from idea_prune_jax.train import budget
from idea_prune_jax.train import pipeline
from idea_prune_jax.train import plan as plan_lib
from idea_prune_jax.tools import report
from idea_prune_jax.data import storage
from idea_prune_jax.experiments.config import IDEA_KD_ALPHA, CompareConfig
from idea_prune_jax.train.config import ConfigError, RunConfig, override

COMPARE_PIPELINES = ('idea', 'idea_kd', 'naive', 'scratch', 'scratch_flops')


def _tokenizer_file(workdir: str, sp) -> str:
  """W/tokenizer/tokenizer.model, written by process 0; every host returns once it exists."""
  path = storage.join(workdir, 'tokenizer', 'tokenizer.model')
  if jax.process_index() == 0:
    storage.write_bytes(path, sp.serialized_model_proto())
  multihost_utils.sync_global_devices('idea_prune_jax:tokenizer_written')
  return path


def _eval_tasks(run: RunConfig) -> list[str]:
  return [t.strip() for t in run.eval.tasks.split(',') if t.strip()]


def check_downstream(run: RunConfig):
  """The lm-eval task manager for run.eval.tasks, the tasks checked (names, offline); or None."""
  tasks = _eval_tasks(run)
  if not tasks:
    return None
  from idea_prune_jax.eval import harness  # the `eval` extra
  tm = harness.task_manager(run.eval.include_path or None, tasks)
  harness.check_tasks(tm, tasks)
  return tm


def downstream(run: RunConfig, params, model_cfg, mesh, sp, tm=None) -> dict:
  """{task: {metric: value}} of run.eval.tasks on params as they lie on the training mesh."""
  import flax.linen as nn
  from idea_prune_jax.eval import harness, scoring
  tm = tm or check_downstream(run)
  scorer = scoring.Scorer(nn.unbox(params), model_cfg, mesh, run.eval.batch_size,
                          run.data.seq_len)
  e = run.eval
  results = harness.evaluate(harness.IdeaPruneLM(scorer=scorer, sp=sp), _eval_tasks(run),
                             None if e.num_fewshot < 0 else e.num_fewshot, e.limit or None,
                             tm=tm)
  return harness.summary(results)


def run_experiment(run: RunConfig, workdir: str, do_export: bool = True) -> dict:
  """One pipeline end to end: train (resuming), export the dense final model, write the report;
  with run.eval.tasks, lm-eval's tasks on the final model too (checked before training)."""
  tm = check_downstream(run)
  out = pipeline.run_pipeline(run, workdir)
  state, model_cfg, ctx = out['state'], out['model_cfg'], out['ctx']
  enlarged = run.model
  summary = {
      'pipeline': run.pipeline, 'seed': run.seed,
      'params_enlarged': model_lib.param_count(enlarged),
      'params_final': model_lib.param_count(model_cfg),
      'ffn_enlarged': enlarged.ffn_dim, 'ffn_final': model_cfg.ffn_dim,
      'shape_final': budget.shape_dict(model_cfg),
      # From the executed plan, which is what ran (and what train_flops counts).
      'tokens': plan_lib.plan_tokens(run, out['phases']), 'steps': int(state.step),
      'train_flops': plan_lib.train_flops(run, out['phases'], pipeline.teacher_config(run)),
      'val_loss': out['val_loss'], 'val_ppl': out['val_ppl'], 'wall_s': out['wall_s'],
      'phases': [{'name': ph.name, 'start': ph.start, 'end': ph.end, 'ffn_dim': ph.model.ffn_dim}
                 for ph in out['phases']],
      'distill_alpha': run.distill.alpha,
  }
  if run.prune.target_params and run.pipeline in ('idea', 'naive'):
    record = json.loads(storage.read_text(storage.join(workdir, pipeline.BUDGET_FILE)))
    summary['budget'] = {k: record[k] for k in ('target_params', 'criterion', 'chosen')}
    summary['budget']['candidates'] = len(record['candidates'])  # all in budget.json
    # Why: the chosen shape's figures beside those of the best other by the same criterion.
    by = ((lambda row: row.get('lookahead_loss', math.inf)) if record['criterion'] == 'lookahead'
          else (lambda row: -row['retained_importance']))
    ranked = sorted(record['candidates'], key=lambda row: (not row['chosen'], by(row)))
    summary['budget']['chosen_figures'] = ranked[0]
    summary['budget']['runner_up'] = ranked[1] if len(ranked) > 1 else None
  if do_export:
    export_dir = storage.join(workdir, 'export')
    tokenizer = _tokenizer_file(workdir, ctx.data.sp)
    extra = {k: summary[k] for k in ('pipeline', 'ffn_enlarged', 'params_enlarged', 'val_loss',
                                     'tokens', 'steps')}
    extra['seq_len'] = run.data.seq_len  # the harness's default context window
    with ctx.clock.timing('checkpoint'):
      export.save_dense(export_dir, state.params, model_cfg, tokenizer, extra=extra)
      params = jax.tree.map(np.asarray,
                            multihost_utils.process_allgather(state.params, tiled=True))
      if jax.process_index() == 0:
        export.save_hf(storage.join(export_dir, 'hf'), params, model_cfg, tokenizer)
    summary['export_dir'] = export_dir
  if tm is not None:
    with ctx.clock.timing('eval'):
      summary['downstream'] = downstream(run, state.params, model_cfg, ctx.mesh,
                                         ctx.data.sp, tm)
  summary['goodput'] = ctx.clock.summary()
  if jax.process_index() == 0:
    report.write_report(workdir, summary)
  return summary


def pipeline_names(field: str, text: str) -> list[str]:
  """Comma-separated compare/sweep entries; unknown ones (or none) refused naming the field."""
  names = [n.strip() for n in text.split(',') if n.strip()]
  unknown = sorted(set(names) - set(COMPARE_PIPELINES))
  if unknown or not names:
    raise ConfigError(f'config.{field}={text!r}: unknown {unknown}; use some of '
                      f'{",".join(COMPARE_PIPELINES)}')
  return names


def variant(run: RunConfig, name: str, seed: int, steps: int | None = None) -> RunConfig:
  """One compare entry as a plain pipeline run; only idea_kd distils."""
  pipeline_name = {'idea_kd': 'idea', 'scratch_flops': 'scratch'}.get(name, name)
  changes = {'seed': seed, 'pipeline': pipeline_name,
             'distill.alpha': (run.distill.alpha or IDEA_KD_ALPHA) if name == 'idea_kd' else 0.0}
  if steps is not None:
    changes['train.steps'] = steps
  return override(run, changes)


def flops_matched_steps(run: RunConfig) -> int:
  """Steps of the target model that cost what run's idea run costs (scratch_flops)."""
  idea, scratch = variant(run, 'idea', run.seed), variant(run, 'scratch', run.seed)
  ratio = (plan_lib.train_flops(idea, plan_lib.plan(idea))
           / plan_lib.train_flops(scratch, plan_lib.plan(scratch)))
  return int(round(run.train.steps * ratio))


def one_shape(run: RunConfig, command: str) -> None:
  """compare and sweep train every pipeline to one target shape: a budget must be explicit."""
  if run.prune.target_params:
    raise ConfigError(f'config.prune.target_params={run.prune.target_params}: {command} trains '
                      'every pipeline to one shape; set prune.target_* instead (an idea run '
                      'with target_params writes the shape it chose to its budget.json)')


def prepared_once(run: RunConfig, workdir: str) -> RunConfig:
  """run reading its data prepared once into workdir/data, so every run it spawns shares it."""
  if run.data.source == 'prepared':
    return run
  prepared = provision.prepared_dir(
      run.data, run.model.vocab_size, workdir, jax.process_index() == 0,
      lambda: multihost_utils.sync_global_devices('idea_prune_jax:shared_data'))
  return override(run, {'data.prepared_dir': prepared, 'data.source': 'prepared'})


def compare(run: RunConfig, cmp: CompareConfig, workdir: str) -> dict:
  """idea, idea+KD, naive, scratch at equal tokens, and scratch at idea's FLOPs, over seeds."""
  names = pipeline_names('compare.pipelines', cmp.pipelines)
  one_shape(run, 'compare')
  run = prepared_once(run, workdir)
  # The compute-matched baseline: the target model trained on as many FLOPs as idea spends.
  flops_steps = flops_matched_steps(run)
  check_downstream(run)  # bad task names fail now, not after the first pipeline
  results = {}
  for seed_index in range(cmp.seeds):
    seed = run.seed + seed_index
    for name in names:
      c = variant(run, name, seed, flops_steps if name == 'scratch_flops' else None)
      run_dir = os.path.join(workdir, name, f'seed{seed}')
      s = run_experiment(c, run_dir, do_export=False)
      r = results.setdefault(name, {'val_loss': [], 'val_ppl': [], 'wall_s': [], 'workdirs': [],
                                    'downstream': [], 'params_final': s['params_final'],
                                    'tokens': s['tokens'], 'train_flops': s['train_flops']})
      for k in ('val_loss', 'val_ppl', 'wall_s'):
        r[k].append(s[k])
      if 'downstream' in s:
        r['downstream'].append(s['downstream'])
      r['workdirs'].append(run_dir)
  if jax.process_index() == 0:
    report.write_compare(workdir, results)
  return results
