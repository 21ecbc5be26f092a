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

  # How the model computes, not what it is: a checkpoint resumes under other values of these.
  COMPUTE_FIELDS = ('attention', 'remat_policy', 'loss_chunk', 'unroll_layers')

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @classmethod
  def from_dict(cls, values, **overrides) -> 'ModelConfig':
    """From a mapping with these fields (config.model, an export's config.json); others ignored."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in values.items() if k in fields}, **overrides})
