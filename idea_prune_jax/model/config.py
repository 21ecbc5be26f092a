"""The model's shape and numerics: what `model.Transformer` is built from."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """What `model.Transformer` needs; hashable so jit can close over it."""
  vocab_size: int = 4096
  d_model: int = 192
  n_layers: int = 4
  n_heads: int = 6
  n_kv_heads: int = 2
  ffn_dim: int = 1152
  tie_embeddings: bool = True
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  attention: str = 'auto'
  remat_policy: str = 'none'
  loss_chunk: int = 0
  unroll_layers: bool = False
  # Per attention head; 0: d_model / n_heads. Explicit for shapes where it is not (MaxText's 16B,
  # Llama configs with head_dim 128 at any width) and fixed while d_model is pruned.
  head_dim: int = 0

  # How the model computes, not what it is: a checkpoint resumes under other values of these.
  COMPUTE_FIELDS = ('attention', 'remat_policy', 'loss_chunk', 'unroll_layers')

  def __post_init__(self):
    # Left at 0 when d_model does not divide: validation then names the field.
    if not self.head_dim and self.n_heads > 0 and self.d_model % self.n_heads == 0:
      object.__setattr__(self, 'head_dim', self.d_model // self.n_heads)

  @classmethod
  def from_dict(cls, values, **overrides) -> 'ModelConfig':
    """From a mapping with these fields (config.model, an export's config.json); others ignored."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in values.items() if k in fields}, **overrides})
