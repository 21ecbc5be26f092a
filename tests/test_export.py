"""Export: our dense format and the Hugging Face Llama layout round-trip, and transformers loads it.

The transformers checks need the optional `hf` extra (torch, transformers) and skip without it.
"""

import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idea_prune_jax import masks
from idea_prune_jax import structure
from idea_prune_jax.data import inputs
from idea_prune_jax.data import tokenizer as tokenizer_lib
from idea_prune_jax.io import export
from idea_prune_jax.model import model as model_lib
from idea_prune_jax.model.config import ModelConfig

# GQA (4 query heads on 2 KV heads), a pruned FFN width no default has, non-default theta and eps.
CFG = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=20,
                  tie_embeddings=False, rope_theta=500.0, norm_eps=1e-5)
TIED = dataclasses.replace(CFG, tie_embeddings=True)
# head_dim 16 != d_model / n_heads = 8: MaxText's 16B and Llama-style shapes decouple them.
WIDE_HEADS = dataclasses.replace(CFG, head_dim=16)


def _params(cfg, seed=0):
  """Random params far from init: norm scales around 1, weights large enough to matter."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: nn.unbox(model_lib.init_params(cfg, jax.random.key(0))))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray(
          (1.0 + 0.2 * rng.standard_normal(x.shape)) if 'scale' in jax.tree_util.keystr(path)
          else 0.25 * rng.standard_normal(x.shape), x.dtype), shapes)


# Every width axis pruned (issue 26): d_model, n_heads, n_kv_heads and ffn_dim shrink while the
# explicit head_dim stays 8, so n_heads * head_dim != d_model and a reader that derives head_dim
# from hidden_size / num_attention_heads gets it wrong. name -> (enlarged config, kept per unit,
# the shrunk (d_model, n_heads, n_kv_heads)).
PRUNED = {
    # One head left (d_model 24 = 3 x head_dim).
    'tied_1head': (ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                               ffn_dim=48, head_dim=8),
                   {'ffn': 20, 'kv_groups': 1, 'heads': 1, 'hidden': 24}, (24, 1, 1)),
    # GQA kept (2 query heads per KV head), 4 heads of 8 over d_model 24; 3 layers -> 2.
    'untied_gqa': (ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=6, n_kv_heads=2,
                               ffn_dim=48, head_dim=8, tie_embeddings=False, rope_theta=500.0),
                   {'ffn': 20, 'kv_groups': 2, 'heads': 2, 'hidden': 24, 'layers': 2}, (24, 4, 2)),
}


@functools.cache
def _pruned(name, seed=0):
  """(params, cfg) of PRUNED[name]: random masks on its units, shrunk as the trainer does."""
  cfg, keep, _ = PRUNED[name]
  params = _params(cfg, seed)
  s = structure.llama(n_kv_heads=cfg.n_kv_heads, heads_per_group=cfg.n_heads // cfg.n_kv_heads,
                      head_dim=cfg.head_dim, tie_embeddings=cfg.tie_embeddings,
                      units=tuple(keep))
  ones = masks.init(params, s)
  keys = jax.random.split(jax.random.key(seed + 1), len(ones))
  scores = {n: jax.random.uniform(k, m.shape) for k, (n, m) in zip(keys, ones.items())}
  small_params, small_cfg = masks.shrink_model(params, masks.refresh(ones, scores, keep), s, cfg)
  assert (small_cfg.d_model, small_cfg.n_heads, small_cfg.n_kv_heads) == PRUNED[name][2]
  assert small_cfg.head_dim == 8 and small_cfg.ffn_dim == 20 and small_cfg.n_layers == 2
  assert small_cfg.n_heads * small_cfg.head_dim != small_cfg.d_model
  return small_params, small_cfg


def _tokens(cfg, shape=(2, 24)):
  return jnp.asarray(np.random.default_rng(7).integers(0, cfg.vocab_size, shape), jnp.int32)


@functools.partial(jax.jit, static_argnums=1)
def _apply(params, cfg, tokens):
  return model_lib.Transformer(cfg).apply({'params': params}, tokens)


def _logits(params, cfg, tokens):
  return np.asarray(_apply(params, cfg, tokens))


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def spm_model(tmp_path_factory):
  """A small SentencePiece model trained as the pipeline trains its own (PAD 0, BOS 2, EOS 3)."""
  text = next(iter(inputs.embedded_works().values()))[:100_000]
  path = tmp_path_factory.mktemp('tok') / 'spm.model'
  path.write_bytes(tokenizer_lib.train_spm(list(tokenizer_lib.spm_chunks(text)), 512))
  return str(path)


@pytest.mark.parametrize('cfg', [CFG, dataclasses.replace(TIED, param_dtype='bfloat16')],
                         ids=['untied_f32', 'tied_bf16'])
def test_dense_round_trip_is_exact(tmp_path, cfg, spm_model):
  params, tokens = _params(cfg), _tokens(cfg)
  extra = {'pipeline': 'idea', 'ffn_enlarged': 60, 'step': 12}
  out = export.save_dense(str(tmp_path / 'dense'), params, cfg, tokenizer_path=spm_model,
                          extra=extra)
  loaded, loaded_cfg = export.load_dense(out)
  assert loaded_cfg == cfg and loaded_cfg.ffn_dim == 20
  _assert_trees_equal(loaded, params)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # a tree of shardings works too
  _assert_trees_equal(export.load_dense(out, jax.tree.map(lambda _: device, params))[0], params)
  np.testing.assert_array_equal(_logits(loaded, loaded_cfg, tokens), _logits(params, cfg, tokens))
  info = export.export_info(out)
  assert info['model']['ffn_dim'] == 20 and info['extra'] == extra
  assert info['param_count'] == model_lib.param_count(cfg)
  with open(info['tokenizer'], 'rb') as f, open(spm_model, 'rb') as g:
    assert f.read() == g.read()


def test_save_rejects_params_that_do_not_match_the_config(tmp_path):
  # Shrunk params saved with the enlarged config: caught before anything is written.
  with pytest.raises(export.ExportError, match=r"mlp.*shape \(2, 20, 32\).*\(2, 60, 32\)"):
    export.save_dense(str(tmp_path / 'd'), _params(CFG), dataclasses.replace(CFG, ffn_dim=60))
  with pytest.raises(export.ExportError, match='ffn_dim|shape'):
    export.save_hf(str(tmp_path / 'h'), _params(CFG), dataclasses.replace(CFG, ffn_dim=60))
  with pytest.raises(export.ExportError, match='lm_head'):  # untied params, tied config
    export.save_dense(str(tmp_path / 'd'), _params(CFG), TIED)
  with pytest.raises(export.ExportError, match='not JSON-serializable'):
    export.save_dense(str(tmp_path / 'd'), _params(CFG), CFG, extra={'x': object()})
  assert not os.listdir(tmp_path)


def test_loaders_reject_directories_that_are_not_their_export(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  for load in (export.load_dense, export.load_hf):
    with pytest.raises(export.ExportError, match='not an export'):
      load(str(empty))
    with pytest.raises(ValueError):  # ExportError is a ValueError
      load(str(tmp_path / 'missing'))
  hf = export.save_hf(str(tmp_path / 'hf'), _params(CFG), CFG)
  dense = export.save_dense(str(tmp_path / 'dense'), _params(CFG), CFG)
  with pytest.raises(export.ExportError, match='not an idea_prune_jax dense export.*load_hf'):
    export.load_dense(hf)
  with pytest.raises(export.ExportError, match='not a Hugging Face Llama.*load_dense'):
    export.load_hf(dense)
  # One line each, so a CLI can print it as is.
  with pytest.raises(export.ExportError) as e:
    export.load_dense(str(empty))
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('cfg', [CFG, TIED, WIDE_HEADS], ids=['untied', 'tied', 'head_dim16'])
def test_hf_round_trip_is_exact(tmp_path, cfg):
  params, tokens = _params(cfg), _tokens(cfg)
  out = export.save_hf(str(tmp_path / 'hf'), params, cfg)
  loaded, loaded_cfg = export.load_hf(out)
  assert loaded_cfg == cfg
  _assert_trees_equal(loaded, params)
  np.testing.assert_array_equal(_logits(loaded, loaded_cfg, tokens), _logits(params, cfg, tokens))


def test_hf_layout_and_config(tmp_path, spm_model):
  from safetensors.numpy import load_file
  params = _params(CFG)
  out = export.save_hf(str(tmp_path / 'hf'), params, CFG, tokenizer_path=spm_model)
  tensors = load_file(os.path.join(out, 'model.safetensors'))
  assert len(tensors) == 2 + 1 + 9 * CFG.n_layers
  np.testing.assert_array_equal(tensors['model.layers.1.self_attn.k_proj.weight'],
                                np.asarray(params['layers']['attn']['k'][1]).T)
  assert tensors['model.layers.0.mlp.down_proj.weight'].shape == (32, 20)
  assert tensors['model.layers.0.mlp.gate_proj.weight'].shape == (20, 32)
  assert tensors['lm_head.weight'].shape == (96, 32)
  with open(os.path.join(out, 'config.json')) as f:
    config = json.load(f)
  assert config['intermediate_size'] == 20 and config['num_key_value_heads'] == 2
  assert config['head_dim'] == 8 and config['rope_theta'] == 500.0
  assert (config['bos_token_id'], config['eos_token_id'], config['pad_token_id']) == (
      tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID, tokenizer_lib.PAD_ID)
  tied = export.save_hf(str(tmp_path / 'tied'), _params(TIED), TIED)
  assert 'lm_head.weight' not in load_file(os.path.join(tied, 'model.safetensors'))


def test_load_hf_refuses_what_our_model_cannot_represent(tmp_path):
  out = export.save_hf(str(tmp_path / 'hf'), _params(CFG), CFG)
  path = os.path.join(out, 'config.json')
  with open(path) as f:
    good = json.load(f)
  for change, match in [({'rope_parameters': {'rope_type': 'llama3', 'factor': 8.0}}, 'rope_type'),
                        ({'mlp_bias': True}, 'mlp_bias'),
                        ({'hidden_act': 'gelu'}, 'hidden_act'),
                        ({'head_dim': 15}, 'head_dim')]:
    with open(path, 'w') as f:
      json.dump({**good, **change}, f)
    with pytest.raises(export.ExportError, match=match):
      export.load_hf(out)


@pytest.fixture
def transformers(monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('TRANSFORMERS_OFFLINE', '1')
  pytest.importorskip('torch')
  return pytest.importorskip('transformers')


@pytest.mark.parametrize('cfg', [CFG, TIED, WIDE_HEADS], ids=['untied', 'tied', 'head_dim16'])
def test_transformers_llama_loads_the_export_with_our_logits(tmp_path, cfg, transformers):
  import torch
  params, tokens = _params(cfg), _tokens(cfg)
  out = export.save_hf(str(tmp_path / 'hf'), params, cfg)
  model = transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
  assert model.config.intermediate_size == cfg.ffn_dim
  assert model.config.num_key_value_heads == cfg.n_kv_heads < model.config.num_attention_heads
  assert model.dtype == torch.float32
  head, embed = model.lm_head.weight, model.model.embed_tokens.weight
  assert (head.data_ptr() == embed.data_ptr()) == cfg.tie_embeddings
  with torch.no_grad():
    theirs = model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()
  ours = _logits(params, cfg, tokens)
  assert np.abs(ours).max() > 1.0  # logits large enough for the comparison to mean something
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize('name', PRUNED)
def test_pruned_on_every_axis_round_trips_dense_and_hf(tmp_path, name):
  params, cfg = _pruned(name)
  tokens = _tokens(cfg)
  want = _logits(params, cfg, tokens)
  dense, dense_cfg = export.load_dense(export.save_dense(str(tmp_path / 'dense'), params, cfg))
  assert dense_cfg == cfg and dense_cfg.head_dim == 8
  _assert_trees_equal(dense, params)
  np.testing.assert_array_equal(_logits(dense, dense_cfg, tokens), want)

  out = export.save_hf(str(tmp_path / 'hf'), params, cfg)
  hf, hf_cfg = export.load_hf(out)
  assert hf_cfg == cfg
  _assert_trees_equal(hf, params)
  np.testing.assert_array_equal(_logits(hf, hf_cfg, tokens), want)


def test_an_export_transformers_cannot_load_is_refused(tmp_path):
  params, cfg = _pruned('untied_gqa')
  cfg = dataclasses.replace(cfg, d_model=22)
  with pytest.raises(export.ExportError, match='d_model 22 is not a multiple of n_heads 4: '
                                               'transformers cannot load such a Llama'):
    export.save_hf(str(tmp_path / 'hf'), params, cfg)


@pytest.mark.parametrize('name', PRUNED)
def test_transformers_loads_the_pruned_on_every_axis_export_with_our_logits(tmp_path, name,
                                                                            transformers):
  import torch
  params, cfg = _pruned(name)
  tokens = _tokens(cfg, (3, 16))
  out = export.save_hf(str(tmp_path / 'hf'), params, cfg)
  model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
  hidden = cfg.d_model
  c = model.config
  assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
          c.intermediate_size, c.tie_word_embeddings) == (
              hidden, cfg.n_heads, cfg.n_kv_heads, 8, 20, cfg.tie_embeddings)
  attn = model.model.layers[0].self_attn
  assert attn.q_proj.weight.shape == (cfg.n_heads * 8, hidden) != (hidden, hidden)
  assert attn.k_proj.weight.shape == (cfg.n_kv_heads * 8, hidden)
  assert attn.o_proj.weight.shape == (hidden, cfg.n_heads * 8)
  assert model.dtype == torch.float32
  with torch.no_grad():
    theirs = model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()
  ours = _logits(params, cfg, tokens)
  assert np.abs(ours).max() > 1.0  # logits large enough for the comparison to mean something
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_transformers_tokenizer_matches_sentencepiece(tmp_path, spm_model, transformers):
  import sentencepiece as spm
  out = export.save_hf(str(tmp_path / 'hf'), _params(CFG), CFG, tokenizer_path=spm_model)
  tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  sp = spm.SentencePieceProcessor(model_file=spm_model)
  assert (tok.eos_token_id, tok.pad_token_id) == (tokenizer_lib.EOS_ID, tokenizer_lib.PAD_ID)
  # Text starting with whitespace or a newline is where HF's converted tokenizer can differ.
  for text in ['First Citizen:\nBefore we proceed any further, hear me speak.',
               'Wherefore art thou Romeo?\n\nDeny thy father  and refuse thy name.',
               'ünï 日本 🙂']:
    # BOS first, as training frames every document ([BOS] ids [EOS], tokenizer.document_ids).
    assert tok(text)['input_ids'] == [tokenizer_lib.BOS_ID] + sp.encode(text)
    assert tok.decode(sp.encode(text)) == text


def test_transformers_and_ours_score_text_alike_each_with_its_own_tokenizer(tmp_path, spm_model,
                                                                              transformers):
  """An lm-eval style request: log p(continuation | context), the context tokenized by each side's
  own tokenizer (HF adds what its tokenizer_config says; ours starts from the tokenizer's BOS)."""
  import sentencepiece as spm
  import torch
  from idea_prune_jax.eval import evaluate
  cfg = dataclasses.replace(CFG, vocab_size=512)
  params = _params(cfg)
  out = export.save_hf(str(tmp_path / 'hf'), params, cfg, tokenizer_path=spm_model)
  model = transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
  tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  sp = spm.SentencePieceProcessor(model_file=spm_model)
  context, continuation = 'First Citizen:\nBefore we proceed any further,', ' hear me speak.'
  ctx, whole = sp.encode(context), sp.encode(context + continuation)
  assert whole[:len(ctx)] == ctx
  ours, _ = evaluate.loglikelihood(params, cfg, ctx, whole[len(ctx):], sp=sp)
  hf_ctx, hf_whole = tok(context)['input_ids'], tok(context + continuation)['input_ids']
  n = len(hf_whole) - len(hf_ctx)
  with torch.no_grad():
    logits = model(torch.tensor([hf_whole[:-1]])).logits[0]
  logp = torch.log_softmax(logits, -1)[-n:].gather(-1, torch.tensor(hf_whole[-n:])[:, None])
  assert abs(ours) > 1.0  # a score large enough for the comparison to mean something
  np.testing.assert_allclose(float(logp.sum()), ours, rtol=1e-5, atol=1e-4)
