"""The final dense model on disk: our format (orbax params + config.json) and Hugging Face Llama.

  save_dense / load_dense   directory/params (orbax), directory/config.json (ModelConfig with the
                            pruned ffn_dim, plus `extra`), directory/tokenizer.model (optional)
  save_hf / load_hf         a `transformers.LlamaForCausalLM` directory: model.safetensors,
                            config.json (intermediate_size = the pruned width), tokenizer.model
                            and tokenizer_config.json (LlamaTokenizer) when a tokenizer is given
  export_info               the config.json of either kind, with the tokenizer's absolute path

Our layout maps onto HF Llama one to one: RoPE is half-split in both (no q/k permutation), weights
are [in, out] here and [out, in] there, layer params are stacked on a leading axis here and
numbered there; head_dim is written explicitly (pruning keeps it while n_heads and d_model
shrink). Writing needs no torch (`safetensors.numpy`); config.json is written last, so an
interrupted export is not mistaken for a complete one. Directories may be local or gs://.
"""

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from idea_prune_jax.model import model as model_lib
from idea_prune_jax.data import storage
from idea_prune_jax.model.config import ModelConfig

DENSE_FORMAT = 'idea_prune_jax/dense'
FORMAT_VERSION = 1
TOKENIZER = 'tokenizer.model'
# ours (path under params['layers']) -> HF name under model.layers.{i}, and whether to transpose
_HF_LAYER = {('attn', 'q'): ('self_attn.q_proj.weight', True),
             ('attn', 'k'): ('self_attn.k_proj.weight', True),
             ('attn', 'v'): ('self_attn.v_proj.weight', True),
             ('attn', 'o'): ('self_attn.o_proj.weight', True),
             ('mlp', 'gate'): ('mlp.gate_proj.weight', True),
             ('mlp', 'up'): ('mlp.up_proj.weight', True),
             ('mlp', 'down'): ('mlp.down_proj.weight', True),
             ('attn_norm', 'scale'): ('input_layernorm.weight', False),
             ('mlp_norm', 'scale'): ('post_attention_layernorm.weight', False)}
_DTYPES = {'float32', 'bfloat16', 'float16'}


class ExportError(ValueError):
  """A directory that is not the export asked for, or params that do not match their config."""


def _abstract(cfg: ModelConfig):
  """ShapeDtypeStructs of the plain param tree `cfg` describes (no compute, no memory)."""
  return jax.eval_shape(lambda: nn.unbox(model_lib.init_params(cfg, jax.random.key(0))))


def _check(params, cfg: ModelConfig):
  """Plain params; ExportError naming the first leaf whose shape differs from what cfg implies."""
  params = nn.unbox(params)
  want = jax.tree_util.tree_flatten_with_path(_abstract(cfg))[0]
  got = jax.tree_util.tree_flatten_with_path(params)[0]
  if [p for p, _ in want] != [p for p, _ in got]:
    raise ExportError(f'params tree {[jax.tree_util.keystr(p) for p, _ in got]} is not the tree '
                      f'of {cfg} {[jax.tree_util.keystr(p) for p, _ in want]}')
  for (path, w), (_, g) in zip(want, got):
    if tuple(w.shape) != tuple(g.shape):
      raise ExportError(f'params{jax.tree_util.keystr(path)} has shape {tuple(g.shape)}, but the '
                        f'config implies {tuple(w.shape)}; pass the config the params were '
                        'shrunk to (masks.shrink_model returns both)')
  return params


def _write_json(path, obj):
  storage.write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def _copy_tokenizer(directory, tokenizer_path):
  if tokenizer_path is None:
    return None
  target = storage.join(directory, TOKENIZER)
  if storage.join(tokenizer_path) != target:
    storage.write_bytes(target, storage.read_bytes(tokenizer_path))
  return TOKENIZER


def _check_tokenizer(tokenizer_path):
  if tokenizer_path is not None and not storage.path(tokenizer_path).is_file():
    raise ExportError(f'tokenizer_path={tokenizer_path!r}: no such file (a SentencePiece .model)')


def export_info(directory: str) -> dict:
  """config.json of a dense or HF export; 'tokenizer': tokenizer.model's absolute path or None."""
  try:
    info = json.loads(storage.read_text(storage.join(directory, 'config.json')))
  except (OSError, ValueError) as e:
    raise ExportError(f'{directory}: not an export (no readable config.json: {e}); write one with '
                      'export.save_dense or export.save_hf') from None
  tok = storage.join(directory, TOKENIZER)
  return {**info, 'tokenizer': tok if storage.path(tok).is_file() else None}


def save_dense(directory: str, params, model_cfg: ModelConfig, tokenizer_path: str | None = None,
               extra: dict | None = None) -> str:
  """Writes the dense model (any sharding; all processes call this); returns the absolute path."""
  directory = storage.join(directory)
  params = _check(params, model_cfg)
  _check_tokenizer(tokenizer_path)
  try:
    json.dumps(extra or {})
  except TypeError as e:
    raise ExportError(f'extra={extra!r}: not JSON-serializable ({e})') from None
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(storage.join(directory, 'params'), params, force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    _write_json(storage.join(directory, 'config.json'), {
        'format': DENSE_FORMAT, 'format_version': FORMAT_VERSION,
        'model': dataclasses.asdict(model_cfg), 'param_count': model_lib.param_count(model_cfg),
        'tokenizer': _copy_tokenizer(directory, tokenizer_path), 'extra': extra or {}})
  return directory


def load_dense(directory: str, sharding=None):
  """(params, model_cfg) of a save_dense directory. `export_info(directory)` has the tokenizer
  path and `extra`. sharding: one Sharding for all leaves or a params-shaped tree of them
  (default: the first local device)."""
  info = export_info(directory)
  if info.get('format') != DENSE_FORMAT:
    hint = ('; it is a Hugging Face model, use export.load_hf' if 'model_type' in info else '')
    raise ExportError(f'{directory}: not an idea_prune_jax dense export (config.json has no '
                      f'format={DENSE_FORMAT!r}){hint}')
  cfg = ModelConfig.from_dict(info['model'])
  abstract = _abstract(cfg)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, abstract)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, sharding)
  ckptr = ocp.StandardCheckpointer()
  return ckptr.restore(storage.join(directory, 'params'), target), cfg


def _host(x, dtype):
  """A C-contiguous numpy copy (gathered across processes if sharded beyond this host)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.ascontiguousarray(np.asarray(x).astype(dtype))


def hf_tensors(params, model_cfg: ModelConfig, dtype=None) -> dict[str, np.ndarray]:
  """{HF LlamaForCausalLM name: [out, in] numpy array}; no lm_head.weight when tied."""
  params = _check(params, model_cfg)
  dtype = jax.numpy.dtype(dtype or model_cfg.param_dtype)
  out = {'model.embed_tokens.weight': _host(params['embed'], dtype),
         'model.norm.weight': _host(params['final_norm']['scale'], dtype)}
  if not model_cfg.tie_embeddings:
    out['lm_head.weight'] = _host(params['lm_head'], dtype).T.copy()
  for (group, name), (hf, transpose) in _HF_LAYER.items():
    stacked = _host(params['layers'][group][name], dtype)
    for i in range(model_cfg.n_layers):
      layer = stacked[i].T if transpose else stacked[i]
      out[f'model.layers.{i}.{hf}'] = np.ascontiguousarray(layer)
  return out


def save_hf(directory: str, params, model_cfg: ModelConfig, tokenizer_path: str | None = None,
            dtype: str | None = None, max_position_embeddings: int = 2048) -> str:
  """A directory `transformers.LlamaForCausalLM.from_pretrained` loads; all processes call this.

  dtype: of the stored weights (default: model_cfg.param_dtype). BOS/EOS/PAD ids in config.json
  come from the tokenizer when one is given, else stay unset (null).
  """
  from safetensors.numpy import save, save_file  # the `hf` extra
  directory = storage.join(directory)
  _check_tokenizer(tokenizer_path)
  dtype = dtype or model_cfg.param_dtype
  if dtype not in _DTYPES:
    raise ExportError(f'dtype={dtype!r}: use one of {sorted(_DTYPES)}')
  if model_cfg.d_model % model_cfg.n_heads:
    # transformers' LlamaConfig refuses it even with head_dim given; the trainer's targets keep it.
    raise ExportError(f'd_model {model_cfg.d_model} is not a multiple of n_heads '
                      f'{model_cfg.n_heads}: transformers cannot load such a Llama; prune to a '
                      'd_model that is')
  tensors = hf_tensors(params, model_cfg, dtype)
  if jax.process_index() != 0:
    return directory
  ids = {'bos_token_id': None, 'eos_token_id': None, 'pad_token_id': None}
  tok_config = None
  if tokenizer_path is not None:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_proto=storage.read_bytes(tokenizer_path))
    special = {'bos': sp.bos_id(), 'eos': sp.eos_id(), 'pad': sp.pad_id(), 'unk': sp.unk_id()}
    ids = {f'{k}_token_id': (i if i >= 0 else None) for k, i in special.items() if k != 'unk'}
    # Training frames every document as [BOS] ids [EOS] (tokenizer.document_ids), so a prompt starts
    # with BOS; EOS ends a document, never a prompt. Without a BOS the model saw none.
    tok_config = {'tokenizer_class': 'LlamaTokenizer', 'add_bos_token': sp.bos_id() >= 0,
                  'add_eos_token': False, 'legacy': False,
                  'model_max_length': max_position_embeddings,
                  **{f'{k}_token': sp.id_to_piece(i) for k, i in special.items() if i >= 0}}
  c = model_cfg
  config = {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
      'vocab_size': c.vocab_size, 'hidden_size': c.d_model, 'intermediate_size': c.ffn_dim,
      'num_hidden_layers': c.n_layers, 'num_attention_heads': c.n_heads,
      'num_key_value_heads': c.n_kv_heads, 'head_dim': c.head_dim, 'hidden_act': 'silu',
      'rms_norm_eps': c.norm_eps, 'max_position_embeddings': max_position_embeddings,
      # rope_theta at top level for transformers 4.x, rope_parameters for 5.x (which reads both)
      'rope_theta': c.rope_theta, 'rope_scaling': None,
      'rope_parameters': {'rope_type': 'default', 'rope_theta': c.rope_theta},
      'tie_word_embeddings': c.tie_embeddings, 'attention_bias': False, 'attention_dropout': 0.0,
      'mlp_bias': False, 'initializer_range': 0.02, 'pretraining_tp': 1, 'use_cache': True,
      'torch_dtype': dtype, 'dtype': dtype, **ids}
  weights, metadata = storage.join(directory, 'model.safetensors'), {'format': 'pt'}
  if storage.is_url(directory):  # one upload of the serialized bytes
    storage.write_bytes(weights, save(tensors, metadata=metadata))
  else:
    storage.path(directory).mkdir(parents=True, exist_ok=True)
    save_file(tensors, weights, metadata=metadata)
  _copy_tokenizer(directory, tokenizer_path)
  if tok_config:
    _write_json(storage.join(directory, 'tokenizer_config.json'), tok_config)
  _write_json(storage.join(directory, 'config.json'), config)
  return directory


def _hf_config_error(directory, key, value, why):
  raise ExportError(f'{directory}: config.json {key}={value!r}: {why}')


def load_hf(directory: str, param_dtype: str | None = None):
  """(params, model_cfg) from a local HF Llama directory (safetensors, one file or sharded).

  param_dtype: cast the weights to this (default: keep the stored dtype). Refuses, with the reason,
  what our model cannot represent: RoPE scaling, biases, another activation, an odd head_dim.
  """
  from safetensors.numpy import load, load_file  # the `hf` extra
  info = export_info(directory)
  if info.get('model_type') != 'llama':
    _hf_config_error(directory, 'model_type', info.get('model_type'),
                     'not a Hugging Face Llama directory' +
                     ('; it is a dense export, use export.load_dense'
                      if info.get('format') == DENSE_FORMAT else ''))
  rope = info.get('rope_parameters') or info.get('rope_scaling') or {}
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type != 'default':
    _hf_config_error(directory, 'rope_type', rope_type, 'only plain RoPE (default) is supported')
  for key, ok in (('hidden_act', ('silu', 'swish')), ('attention_bias', (False,)),
                  ('mlp_bias', (False,))):
    if info.get(key, ok[0]) not in ok:
      _hf_config_error(directory, key, info[key], f'only {key}={ok[0]!r} is supported')
  heads = info['num_attention_heads']
  head_dim = info.get('head_dim') or info['hidden_size'] // heads
  if head_dim % 2:
    _hf_config_error(directory, 'head_dim', head_dim, 'must be even (RoPE rotates pairs)')
  files = sorted(p.name for p in storage.path(directory).glob('*.safetensors'))
  if not files:
    raise ExportError(f'{directory}: no *.safetensors weights (only safetensors are read; '
                      'convert .bin with transformers save_pretrained(safe_serialization=True))')
  tensors = {}
  for f in files:
    path = storage.join(directory, f)
    tensors.update(load(storage.read_bytes(path)) if storage.is_url(path) else load_file(path))
  stored = str(next(iter(tensors.values())).dtype)
  cfg = ModelConfig(
      vocab_size=info['vocab_size'], d_model=info['hidden_size'],
      n_layers=info['num_hidden_layers'], n_heads=heads,
      n_kv_heads=info.get('num_key_value_heads') or heads, ffn_dim=info['intermediate_size'],
      head_dim=head_dim, tie_embeddings=bool(info.get('tie_word_embeddings', False)),
      rope_theta=float(rope.get('rope_theta', info.get('rope_theta', 10000.0))),
      norm_eps=float(info.get('rms_norm_eps', 1e-6)),
      param_dtype=param_dtype or (stored if stored in _DTYPES else 'float32'))
  dtype = jax.numpy.dtype(cfg.param_dtype)

  def get(name, transpose=False):
    if name not in tensors:
      raise ExportError(f'{directory}: weight {name} missing from {files}')
    x = tensors[name].astype(dtype)
    return x.T if transpose else x

  params = {'embed': get('model.embed_tokens.weight'),
            'final_norm': {'scale': get('model.norm.weight')}, 'layers': {}}
  if not cfg.tie_embeddings:
    params['lm_head'] = get('lm_head.weight', transpose=True)
  for (group, name), (hf, transpose) in _HF_LAYER.items():
    params['layers'].setdefault(group, {})[name] = np.stack(
        [get(f'model.layers.{i}.{hf}', transpose) for i in range(cfg.n_layers)])
  params = jax.tree.map(jax.numpy.asarray, params)
  return _check(params, cfg), cfg
