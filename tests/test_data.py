"""Reading prepared data through grain: packing, loss weights, shards, resume, errors."""

import dataclasses
import json
import os
import threading
import time

import numpy as np
import pytest
import sentencepiece as spm

from conftest import ROOT, run_config, validate
from idea_prune_jax import settings
from idea_prune_jax.data import batch as batch_lib
from idea_prune_jax.data import data, inputs, layout, prepare, provision, records, stream
from idea_prune_jax.data.inputs import DataError

SMALL_VOCAB = 512


def make_config(prepared_dir='', **data_overrides):
  config = settings.base()
  config.model.vocab_size = SMALL_VOCAB
  config.data.update(source='prepared', prepared_dir=str(prepared_dir), seq_len=32,
                     **data_overrides)
  config.train.update(batch_size=4, eval_batches=3)
  return config


def build(config, workdir: str, process_index: int = 0, process_count: int = 1) -> data.Data:
  """data.build as a run calls it, from a ConfigDict."""
  run = settings.read(config).run
  return data.build(run.data, workdir, vocab_size=run.model.vocab_size,
                    batch_size=run.train.batch_size, eval_batches=run.train.eval_batches,
                    seed=run.seed, process_index=process_index, process_count=process_count)


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  out = tmp_path_factory.mktemp('tokenizer')
  prepare.prepare('embedded:lovers_complaint,passionate_pilgrim', str(out), vocab_size=SMALL_VOCAB,
                  tokenizer_only=True, progress=False)
  return str(out / layout.TOKENIZER)


@pytest.fixture(scope='module')
def prepared(tmp_path_factory, tokenizer):
  """20 sonnets, one document each (~36 batches of 4 x 33 an epoch: resume tests cross one)."""
  src = tmp_path_factory.mktemp('src') / 'docs.jsonl'
  sonnets = [t for t in inputs.embedded_works()['sonnets'].split('\n\n') if len(t) > 100][:20]
  src.write_text(''.join(json.dumps({'text': t}) + '\n' for t in sonnets))
  out = tmp_path_factory.mktemp('prepared')
  prepare.prepare(str(src), str(out), tokenizer=tokenizer, val_fraction=0.3, progress=False)
  return out


@pytest.fixture(scope='module')
def built(prepared):
  return build(make_config(prepared), '/unused')


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_batches_are_packed_next_token_pairs(built):
  batch = next(build(make_config(built.prepared_dir, attention='causal'), '/unused').train)
  assert set(batch) == {'inputs', 'targets', 'weights'}
  assert batch['inputs'].shape == batch['targets'].shape == batch['weights'].shape == (4, 32)
  assert batch['inputs'].dtype == np.int32 and batch['weights'].dtype == np.float32
  # Rows are windows of one stream: targets are the inputs shifted by one.
  np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  assert float(batch['weights'].min()) == 1.0  # concat-then-split rows are full: no padding


def test_packing_is_lossless_and_documents_carry_bos_and_eos(prepared):
  manifest = layout.read_manifest(str(prepared))
  source = records.source(str(prepared), manifest, 'train')
  rows = list(stream._rows(source, stream.Packing(32), shuffle_seed=None))
  tokens = np.concatenate([r['tokens'] for r in rows])
  segments = np.concatenate([r['tokens_segment_ids'] for r in rows])
  docs = [records.decode(source[i])['tokens'] for i in range(len(source))]
  documents = np.concatenate(docs)
  np.testing.assert_array_equal(tokens[segments > 0], documents)  # nothing lost or reordered
  ids = manifest['special_ids']
  assert all(d[0] == ids['bos'] and d[-1] == ids['eos'] for d in docs)


def test_packed_rows_attend_within_their_document_by_default(built):
  assert settings.base().data.attention == 'document'
  assert {'segment_ids', 'positions'} <= set(next(built.train))


def test_document_attention_batches_restart_positions_and_mask_boundaries(prepared):
  batches = _take(build(make_config(prepared, attention='document'), '/unused').train, 10)
  seg, pos, w = (np.concatenate([b[k] for b in batches])
                 for k in ('segment_ids', 'positions', 'weights'))
  starts = np.argwhere(np.diff(seg, axis=1) != 0)
  assert len(starts)  # some row packs more than one document
  for r, c in starts:
    assert pos[r, c + 1] == 0  # RoPE restarts inside the row
    assert w[r, c] == 0.0  # the next document's first token is not predicted across the border
  # The only other zero weights: a document starting at a row's extra target token (column L).
  zeros = {tuple(rc) for rc in np.argwhere(w == 0)} - {tuple(rc) for rc in starts}
  assert all(c == w.shape[1] - 1 for _, c in zeros)


@pytest.mark.parametrize('consumed', [0, 5, 45])  # 45 batches cross an epoch boundary
def test_resume_yields_bit_identical_batches(prepared, consumed):
  config = make_config(prepared, attention='document')
  first = build(config, '/unused').train
  _take(first, consumed)
  state = first.get_state()
  expected = _take(first, 4)
  resumed = build(config, '/unused').train
  resumed.set_state(state)
  _assert_same(_take(resumed, 4), expected)


def test_two_seeds_never_share_an_epoch_order():
  """grain's shuffle seeds epoch e with seed + e: seed 2's epoch 0 was seed 1's epoch 1."""
  import grain
  from idea_prune_jax.data import order
  n, epochs = 20, 4

  def orders(seed):
    ds = order.EpochShuffled(grain.MapDataset.range(n), seed)
    return [tuple(ds[e * n + i] for i in range(n)) for e in range(epochs)]

  one, two = orders(1), orders(2)
  assert all(sorted(o) == list(range(n)) for o in one + two)  # each epoch a permutation
  assert len(set(one)) == len(set(two)) == epochs  # reshuffled every epoch
  assert not set(one) & set(two)  # no epoch of one seed is any epoch of the other
  assert orders(1) == one


def test_too_long_documents_are_one_warning_naming_data_split(prepared, caplog):
  """~320-token sonnets: longer than a step of 4 rows x 33, shorter than 16 rows x 33."""
  def warnings(batch_size):
    config = make_config(prepared)
    config.train.batch_size = batch_size
    with caplog.at_level('WARNING'):
      caplog.clear()
      build(config, '/unused')
    return [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  (line,) = warnings(4)
  assert line.startswith('the 15 training documents average 322 tokens, ')
  assert 'more than a step reads (4 rows x 33 = 132 tokens)' in line
  assert line.endswith('e.g. --config.data.split=chunk:4000')
  assert warnings(16) == []


def test_the_order_is_seeded(prepared):
  def tokens(seed):
    config = make_config(prepared)
    config.seed = seed
    return np.concatenate([b['inputs'] for b in _take(build(config, '/unused').train, 8)])
  np.testing.assert_array_equal(tokens(1), tokens(1))
  assert not np.array_equal(tokens(1), tokens(2))


def test_copy_does_not_move_the_original(built):
  config = make_config(built.prepared_dir)
  a, b = build(config, '/unused').train, build(config, '/unused').train
  _take(a, 2)
  _take(b, 2)
  _take(a.copy(), 5)
  _assert_same(_take(a, 2), _take(b, 2))


@pytest.mark.parametrize('process_count', [2, 4])
def test_hosts_get_disjoint_rows_covering_the_global_batch(prepared, process_count):
  """One process reading every shard feeds exactly what the hosts feed, row block by block."""
  config = make_config(prepared, shards=process_count)
  config.train.batch_size = 8
  whole = _take(build(config, '/unused').train, 3)
  hosts = [_take(build(config, '/unused', i, process_count).train, 3)
           for i in range(process_count)]
  for step, batch in enumerate(whole):
    stacked = np.concatenate([h[step]['inputs'] for h in hosts])
    np.testing.assert_array_equal(stacked, batch['inputs'])
    assert all(h[step]['inputs'].shape[0] == 8 // process_count for h in hosts)
  # Shards hold different documents: two hosts' rows are not copies of each other.
  assert not np.array_equal(hosts[0][0]['inputs'], hosts[1][0]['inputs'])


def test_validation_is_a_fixed_in_order_set_read_once(prepared):
  config = make_config(prepared)
  one, two = build(config, '/unused').val, build(config, '/unused').val
  assert len(one) == 3 and all(b['inputs'].shape == (4, 32) for b in one)
  _assert_same(one, two)
  host1 = build(config, '/unused', 1, 2).val
  np.testing.assert_array_equal(host1[0]['inputs'], one[0]['inputs'][2:])


def test_documents_shorter_than_seq_len_still_pack(tmp_path):
  docs = tmp_path / 'short.jsonl'
  docs.write_text(''.join(f'{{"text": "line {i} of a tiny document"}}\n' for i in range(400)))
  out = tmp_path / 'out'
  prepare.prepare(str(docs), str(out), vocab_size=300, val_fraction=0.2, progress=False)
  config = make_config(out, attention='document')
  config.model.vocab_size = 300
  batch = next(build(config, '/unused').train)
  assert batch['segment_ids'].max() > 2  # several documents per row


def test_llama_layout_special_ids_weight_token_zero(tmp_path):
  """pad=-1, unk=0, bos=1, eos=2: id 0 is a real token, so the loss mask cannot be `targets != 0`."""
  text = ''.join(f'the snow {i} and the wind\n' for i in range(3000))  # no ☃: it becomes unk
  model_path = tmp_path / 'llama.model'
  spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()),
                                 model_prefix=str(tmp_path / 'llama'), vocab_size=64,
                                 pad_id=-1, unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
  src = tmp_path / 'docs.jsonl'
  src.write_text(''.join(f'{{"text": "snow {i} ☃☃ wind"}}\n' for i in range(300)))
  out = tmp_path / 'out'
  prepare.prepare(str(src), str(out), tokenizer=str(model_path), val_fraction=0.2,
                  progress=False)
  assert layout.read_manifest(str(out))['special_ids'] == {'pad': -1, 'unk': 0, 'bos': 1,
                                                            'eos': 2}
  config = make_config(out)
  config.model.vocab_size = 64
  built = build(config, '/unused')
  assert (built.sp.pad_id(), built.sp.bos_id(), built.sp.eos_id()) == (-1, 1, 2)
  batch = next(built.train)
  is_unk = batch['targets'] == 0
  assert is_unk.any() and float(batch['weights'][is_unk].min()) == 1.0


def test_workdir_preparation_is_reused_and_a_changed_source_refused(tmp_path):
  config = settings.base()
  config.model.vocab_size = SMALL_VOCAB
  config.data.update(val_works='tempest', seq_len=32, max_docs=3)
  config.train.batch_size = 4
  workdir = str(tmp_path)
  first = build(config, workdir)
  manifest = tmp_path / 'data' / 'manifest.json'
  mtime = manifest.stat().st_mtime_ns
  build(config, workdir)
  assert manifest.stat().st_mtime_ns == mtime  # prepared once
  assert first.prepared_dir == os.path.join(workdir, 'data')
  config.data.val_works = 'macbeth'
  with pytest.raises(DataError, match=r"was prepared with val_input='embedded:tempest'"):
    build(config, workdir)
  config.data.val_works = 'tempest'
  config.model.vocab_size = 1024
  with pytest.raises(DataError, match=r'^config.model.vocab_size=1024: .* 512 pieces'):
    build(config, workdir)
  config.model.vocab_size = SMALL_VOCAB
  config.data.split = 'file'
  with pytest.raises(DataError, match=r"was prepared with split='auto', but config.data asks "
                     r"for 'file'; use a fresh --workdir"):
    build(config, workdir)
  old = json.loads(manifest.read_text())
  del old['split']  # prepared before data.split: one document per work, as split=file
  manifest.write_text(json.dumps(old))
  build(config, workdir)


def test_the_data_cache_prepares_the_embedded_corpus_once_for_every_workdir(tmp_path, monkeypatch):
  config = settings.base()
  config.model.vocab_size = SMALL_VOCAB
  config.data.update(val_works='tempest', max_docs=3)
  calls, real = [], prepare.prepare
  monkeypatch.setattr(prepare, 'prepare', lambda **kw: calls.append(kw) or real(**kw))
  here = lambda name: provision.prepared_dir(run_config(config).data, config.model.vocab_size,
                                             str(tmp_path / name), True, lambda: None)
  files = lambda d: {n: open(os.path.join(d, n), 'rb').read() for n in os.listdir(d)}
  monkeypatch.delenv(provision.DATA_CACHE_ENV, raising=False)  # conftest sets one for the session
  uncached = files(here('plain'))
  monkeypatch.setenv(provision.DATA_CACHE_ENV, str(tmp_path / 'cache'))
  assert files(here('a')) == files(here('b')) == uncached and len(calls) == 2
  config.data.max_docs = 4  # other prepare arguments: prepared anew
  assert files(here('c')) != uncached and len(calls) == 3


def test_missing_prepared_dir_is_one_line(tmp_path):
  with pytest.raises(DataError, match=r'no manifest.json; prepare it with idea-prune prepare-data'):
    build(make_config(tmp_path / 'nowhere'), '/unused')


def test_vocab_smaller_than_the_tokenizer_names_the_field(prepared):
  config = make_config(prepared)
  config.model.vocab_size = 100
  with pytest.raises(DataError, match=r'^config.model.vocab_size=100: the prepared tokenizer has'):
    build(config, '/unused')


def test_truncated_shard_is_named(prepared, tmp_path):
  import shutil
  copy = tmp_path / 'copy'
  shutil.copytree(prepared, copy)
  shard = copy / layout.read_manifest(str(copy))['splits']['train']['shards'][0]
  shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 2])
  with pytest.raises(DataError, match=rf'{shard}: not a readable ArrayRecord shard'):
    build(make_config(copy), '/unused')


@pytest.mark.parametrize('field, value, message', [
    ('shards', 3, r'config.train.batch_size=4: not divisible by the 3 data shards'),
])
def test_impossible_shard_split_names_the_field(prepared, field, value, message):
  with pytest.raises(DataError, match=message):
    build(make_config(prepared, **{field: value}), '/unused')


def test_config_validation_names_data_fields():
  config = settings.base()
  config.data.attention = 'full'
  with pytest.raises(settings.ConfigError, match=r"^config.data.attention='full'"):
    validate(config, 1)
  config = settings.base()
  config.data.source = 'prepared'
  with pytest.raises(settings.ConfigError, match=r"^config.data.prepared_dir=''"):
    validate(config, 1)


def test_from_rows_and_global_batch():
  import jax
  rows = np.arange(8 * 33, dtype=np.int32).reshape(8, 33)
  pair = batch_lib.from_rows(rows)
  np.testing.assert_array_equal(pair['inputs'][:, 1:], pair['targets'][:, :-1])
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  arrays = batch_lib.global_batch(pair, sharding)
  np.testing.assert_array_equal(np.asarray(arrays['targets']), pair['targets'])


def test_packing_dataclass_from_config():
  config = make_config('/x', attention='document', read_threads=1, prefetch=0, workers=0)
  assert stream.Packing.from_config(run_config(config).data) == dataclasses.replace(
      stream.Packing(32), document_attention=True, read_threads=1, prefetch=0)


def test_epochs_follow_the_iterator_position_and_survive_a_restore(prepared):
  """epochs = documents of the train split read / documents in it, from the grain state alone."""
  config = make_config(prepared)
  manifest = layout.read_manifest(str(prepared))
  it = build(config, '/unused').train
  assert it.epochs() == 0.0
  per_batch = config.train.batch_size * (config.data.seq_len + 1)
  seen = []
  for k in range(1, 46):  # ~36 batches an epoch: crosses one boundary
    next(it)
    seen.append(it.epochs())
    consumed = k * per_batch / manifest['splits']['train']['tokens']
    assert seen[-1] == pytest.approx(consumed, abs=0.15)  # documents, not tokens: close
  assert seen == sorted(seen) and seen[0] < 1 < seen[-1] < 2
  resumed = build(config, '/unused').train
  resumed.set_state(it.get_state())
  assert resumed.epochs() == seen[-1]
  assert it.epochs(build(config, '/unused').train.get_state()) == 0.0


def test_epochs_of_one_host_of_several_count_the_whole_split(prepared):
  config = make_config(prepared, shards=2)
  one_process = build(config, '/unused').train
  host0 = build(config, '/unused', 0, 2).train
  for _ in range(24):
    next(one_process)
    next(host0)
  assert host0.epochs() == pytest.approx(one_process.epochs(), abs=0.15)
  assert 0.5 < host0.epochs() < 1.5


class _CountingReader:
  """ArrayRecordReader standing in for a slow file system: counts opens, the most at once."""
  opens, active, most, real = 0, 0, 0, None
  lock = threading.Lock()

  def __init__(self, *args, **kwargs):
    cls = type(self)
    with cls.lock:
      cls.opens, cls.active = cls.opens + 1, cls.active + 1
      cls.most = max(cls.most, cls.active)
    time.sleep(0.05)
    with cls.lock:
      cls.active -= 1
    self._reader = cls.real(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self._reader, name)


def test_shards_are_opened_in_parallel_and_read_lazily(tmp_path, tokenizer, monkeypatch):
  from array_record.python import array_record_module
  src = tmp_path / 'docs.jsonl'
  src.write_text(''.join(json.dumps({'text': f'document {i} ' * 20}) + '\n' for i in range(64)))
  out = tmp_path / 'prepared'
  prepare.prepare(str(src), str(out), tokenizer=tokenizer, val_fraction=0.1, progress=False,
                  records_per_shard=4)
  manifest = layout.read_manifest(str(out))
  n = len(manifest['splits']['train']['shards'])
  assert n >= 8
  for name, value in (('real', array_record_module.ArrayRecordReader), ('opens', 0), ('most', 0)):
    monkeypatch.setattr(_CountingReader, name, value)
  monkeypatch.setattr(array_record_module, 'ArrayRecordReader', _CountingReader)
  source = records.source(str(out), manifest, 'train')
  assert len(source) == manifest['splits']['train']['documents']
  assert _CountingReader.opens == n  # counted once each; the reader of a shard opens on a read
  assert _CountingReader.most > 1  # not one after another
  source[0]
  assert _CountingReader.opens == n + 1


def test_epochs_reach_metrics_and_report_are_logged_once_and_survive_resume(prepared, tmp_path,
                                                                            caplog):
  """A scratch run over the sonnets (~9 steps of 16 x 33 an epoch), whole and resumed from 6."""
  import shutil
  from idea_prune_jax.experiments import experiment

  def run(workdir):
    config = settings.load(os.path.join(ROOT, 'configs/tiny.py:test'))
    config.pipeline = 'scratch'
    config.data.update(source='prepared', prepared_dir=str(prepared))
    config.train.update(steps=12, batch_size=16, ckpt_every=6, eval_every=12, keep_ckpts=10)
    with caplog.at_level('INFO'):
      caplog.clear()
      experiment.run_experiment(run_config(config), str(workdir), do_export=False)
      crossings = [r.getMessage() for r in caplog.records if 'epoch 2 of the train' in
                   r.getMessage()]
    rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
    epochs = {r['step']: r['epochs'] for r in rows if 'loss' in r}  # a resume rewrites its steps
    return epochs, json.load(open(workdir / 'report.json'))['epochs'], crossings

  whole, whole_report, crossings = run(tmp_path / 'whole')
  assert len(crossings) == 1 and whole[0] == 0.0 and whole[6] < 1 < whole[11] < 2
  assert whole_report == whole[11]
  shutil.copytree(tmp_path / 'whole', tmp_path / 'resumed')
  shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / '12')
  resumed, resumed_report, crossings = run(tmp_path / 'resumed')
  assert resumed == whole and resumed_report == whole_report and len(crossings) == 1
