"""The pruning core's exception: a bad input to `structure`, `masks`, `importance`, `schedules`,
`distill` or `prune_optimizer`, raised before compute with one line saying what and how to fix."""


class PruneError(ValueError):
  """A structure, mask, score, schedule or shape that the pruning core cannot use."""
