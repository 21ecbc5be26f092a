"""Data pipeline: sources, cached tokenizer, packed resumable batches, errors that name fields."""

import json
import os

import numpy as np
import pytest

from idea_prune_jax import config as config_lib
from idea_prune_jax import data

SMALL_VOCAB = 512  # keeps SentencePiece training well under a second


def make_config(**data_overrides):
  config = config_lib.base()
  config.model.vocab_size = SMALL_VOCAB
  config.data.seq_len = 32
  config.train.batch_size = 4
  config.train.eval_batches = 3
  for k, v in data_overrides.items():
    config.data[k] = v
  return config


def write(path, text):
  path.write_text(text)
  return str(path)


@pytest.fixture(scope='module')
def works():
  return data.embedded_works()


@pytest.fixture(scope='module')
def small_docs(works):
  """Three plays for training, one for validation: enough text for a 512-piece tokenizer."""
  return [works['hamlet'], works['macbeth'], works['sonnets']], [works['tempest']]


@pytest.fixture(scope='module')
def trained(tmp_path_factory, small_docs):
  """(workdir, sp) with a tokenizer trained once for the module."""
  workdir = str(tmp_path_factory.mktemp('work'))
  return workdir, data.tokenizer(make_config(), workdir, small_docs[0])


# --- sources -------------------------------------------------------------------------------

def test_embedded_corpus_has_42_works_and_the_default_val_works(works):
  assert len(works) == 42
  assert {'hamlet', 'sonnets', 'julius_caesar', 'tempest'} <= set(works)
  assert all(len(t) > 1_000 for t in works.values())


def test_embedded_val_works_are_held_out_whole(works):
  train, val = data.load_texts(config_lib.base().data)
  assert val == [works['julius_caesar'], works['tempest']]
  assert len(train) == 40
  assert works['tempest'] not in train and works['julius_caesar'] not in train
  assert works['hamlet'] in train


def test_unknown_val_work_names_the_field():
  with pytest.raises(data.DataError, match=r"config\.data\.val_works='hamlet,nope'.*'nope'"):
    data.load_texts(make_config(val_works='hamlet,nope').data)


def test_files_hold_out_the_last_file(tmp_path):
  a, b = write(tmp_path / 'a.txt', 'alpha\n'), write(tmp_path / 'b.txt', 'beta\n')
  write(tmp_path / 'c.md', 'not matched\n')
  train, val = data.load_texts(make_config(source='files', files=f'{b},{tmp_path}/*.txt').data)
  assert (train, val) == (['alpha\n'], ['beta\n'])  # deduplicated, sorted, last held out
  assert a in data.expand_files(f'{tmp_path}/*.txt', 'data.files')


def test_single_file_holds_out_its_last_5_percent_of_lines(tmp_path):
  lines = [f'line {i}\n' for i in range(100)]
  path = write(tmp_path / 'one.txt', ''.join(lines))
  train, val = data.load_texts(make_config(source='files', files=path).data)
  assert train == [''.join(lines[:95])] and val == [''.join(lines[95:])]


def test_val_files_are_removed_from_training(tmp_path):
  a, b = write(tmp_path / 'a.txt', 'alpha\n'), write(tmp_path / 'b.txt', 'beta\n')
  train, val = data.load_texts(
      make_config(source='files', files=f'{tmp_path}/*.txt', val_files=a).data)
  assert (train, val) == (['beta\n'], ['alpha\n'])


@pytest.mark.parametrize('files, message', [
    ('{tmp}/missing.txt', r"config\.data\.files=.*missing\.txt.*no such file"),
    ('{tmp}/empty.txt', r"config\.data\.files=.*empty\.txt.* is empty"),
    ('{tmp}/*.nothing', r"config\.data\.files=.*no files match"),
    (' , ', r"config\.data\.files=' , ': empty"),
])
def test_bad_files_name_the_field(tmp_path, files, message):
  write(tmp_path / 'empty.txt', '')
  with pytest.raises(data.DataError, match=message):
    data.load_texts(make_config(source='files', files=files.format(tmp=tmp_path)).data)


def test_tfds_missing_name_or_package_names_the_field(monkeypatch):
  with pytest.raises(data.DataError, match=r"config\.data\.tfds_name=''"):
    data.load_texts(make_config(source='tfds').data)
  monkeypatch.setitem(__import__('sys').modules, 'tensorflow_datasets', None)  # import fails
  with pytest.raises(data.DataError, match=r"config\.data\.source='tfds'.*not installed"):
    data.load_texts(make_config(source='tfds', tfds_name='lm1b').data)


def test_tfds_data_source_with_mock_data(monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  # mock_data patches tfds.data_source too (tfds 4.9.10), so the real code path runs, no TF needed.
  config = make_config(source='tfds', tfds_name='lm1b', tfds_val_split='test')
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    mocked, splits = tfds.data_source, []  # mock splits hold identical records: spy on the args
    monkeypatch.setattr(tfds, 'data_source', lambda name, split, data_dir: (
        splits.append((name, split, data_dir)) or mocked(name, split=split, data_dir=data_dir)))
    train, val = data.load_texts(config.data)
    assert splits == [('lm1b', 'train', None), ('lm1b', 'test', None)]
    assert 0 < len(train) <= 20 and 0 < len(val) <= 20  # empty records are dropped
    assert all(isinstance(d, str) and d for d in train)
    config.data.max_chars = 50
    capped, _ = data.load_texts(config.data)
    assert ''.join(capped) == ''.join(train)[:50] and len(''.join(train)) > 50
    config.data.text_key = 'body'
    with pytest.raises(data.DataError, match=r"config\.data\.text_key='body'.*\['text'\]"):
      data.load_texts(config.data)
    config.data.text_key, config.data.tfds_val_split = 'text', 'nosuch'
    def checked(name, split, data_dir):  # mock_data accepts any split; real tfds raises
      if split not in ('train', 'test'):
        raise ValueError(f'Unknown split {split!r}. Should be one of [train, test].')
      return mocked(name, split=split, data_dir=data_dir)
    monkeypatch.setattr(tfds, 'data_source', checked)
    with pytest.raises(data.DataError, match=r"config\.data\.tfds_val_split='nosuch'.*Unknown"):
      data.load_texts(config.data)



def test_tfds_split_too_big_for_memory_is_refused_before_reading(monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = make_config(source='tfds', tfds_name='lm1b', tfds_val_split='test')
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    train, _ = data.load_texts(config.data)
    size = sum(map(len, train))
    monkeypatch.setattr(data, 'TFDS_MAX_IN_MEMORY_CHARS', size // 4)
    with pytest.raises(data.DataError, match=r"config\.data\.max_chars=0: 'train' of data\.tfds_"
                       r"name='lm1b' is ~.* characters.*set data\.max_chars <= "):
      data.load_texts(config.data)
    config.data.max_chars = size // 8  # a cap under the limit reads
    capped, _ = data.load_texts(config.data)
    assert sum(map(len, capped)) == size // 8

# --- tokenizer -----------------------------------------------------------------------------

def test_tokenizer_is_trained_with_fixed_ids_and_round_trips(trained, small_docs):
  _, sp = trained
  assert sp.vocab_size() == SMALL_VOCAB
  assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
  text = small_docs[1][0][:5000]  # unseen play: newlines and indentation must survive
  assert sp.decode(sp.encode(text)) == text
  assert sp.decode(sp.encode('ünïcode ☃ text')) == 'ünïcode ☃ text'  # byte fallback
  # A newline is always its own piece (never merged into '.\n\n'): line structure stays visible.
  assert sp.encode('Exit.\n\n', out_type=str)[-3:] == ['.', '\n', '\n']


def test_tokenizer_is_reused_from_cache(trained, small_docs, monkeypatch):
  workdir, sp = trained
  (model_file,) = os.listdir(os.path.join(workdir, 'tokenizer'))
  assert model_file.startswith(f'spm_{SMALL_VOCAB}_') and model_file.endswith('.model')

  def no_training(*args, **kwargs):
    raise AssertionError('retrained although the cached model was present')
  monkeypatch.setattr(data, 'train_spm', no_training)
  again = data.tokenizer(make_config(), workdir, small_docs[0])
  assert again.serialized_model_proto() == sp.serialized_model_proto()
  with pytest.raises(AssertionError, match='retrained'):  # other text -> other key -> trains
    data.tokenizer(make_config(), workdir, small_docs[0][:2])


def test_tokenizer_training_is_deterministic(trained, small_docs):
  _, sp = trained
  assert data.tokenizer(make_config(), None, small_docs[0]).serialized_model_proto() == \
      sp.serialized_model_proto()


def test_user_tokenizer_errors_name_the_field(trained, tmp_path):
  workdir, _ = trained
  with pytest.raises(data.DataError, match=r"config\.data\.tokenizer=.*nope\.model.*no such file"):
    data.tokenizer(make_config(tokenizer=str(tmp_path / 'nope.model')), workdir)
  (model_file,) = os.listdir(os.path.join(workdir, 'tokenizer'))
  config = make_config(tokenizer=os.path.join(workdir, 'tokenizer', model_file))
  assert data.tokenizer(config, None).vocab_size() == SMALL_VOCAB
  config.model.vocab_size = 256
  with pytest.raises(data.DataError, match=r"config\.model\.vocab_size=256"):
    data.tokenizer(config, None)


@pytest.mark.parametrize('vocab_size, reason', [(4096, 'too high'), (100, 'smaller than')])
def test_untrainable_vocab_names_the_field(vocab_size, reason):
  config = make_config()
  config.model.vocab_size = vocab_size
  with pytest.raises(data.DataError, match=rf"config\.model\.vocab_size={vocab_size}.*{reason}"):
    data.tokenizer(config, None, ['hello world\n' * 50])


def test_tokenize_appends_eos_and_caches(trained, tmp_path):
  _, sp = trained
  docs = ['To be, or not to be', 'that is the question']
  tokens = data.tokenize(sp, docs, str(tmp_path), 'train')
  assert tokens.dtype == np.int32 and tokens.ndim == 1
  expected = sp.encode(docs[0]) + [3] + sp.encode(docs[1]) + [3]
  np.testing.assert_array_equal(tokens, expected)
  (cached,) = os.listdir(tmp_path)
  assert cached.startswith('train_') and cached.endswith('.npy')
  np.save(tmp_path / cached, np.array([7, 7], np.int32))  # a second call must read the file
  np.testing.assert_array_equal(data.tokenize(sp, docs, str(tmp_path), 'train'), [7, 7])


# --- batches -------------------------------------------------------------------------------

TOKENS = np.arange(10 * 33 * 8, dtype=np.int32)  # 80 windows of 33: 10 batches of 8 per epoch


def take(it, n):
  return [next(it) for _ in range(n)]


def test_packed_batches_are_windows_in_a_seeded_order():
  batches = take(data.PackedBatches(TOKENS, 32, 8, seed=0), 10)
  assert all(b.shape == (8, 33) and b.dtype == np.int32 for b in batches)
  starts = np.concatenate([b[:, 0] for b in batches])
  assert sorted(starts) == list(range(0, len(TOKENS), 33))  # one epoch: every window once
  assert all((b == b[:, :1] + np.arange(33)).all() for b in batches)  # contiguous windows
  assert not (starts == np.sort(starts)).all()  # shuffled


def test_batch_b_is_rows_b_of_the_epoch_permutation():
  it = data.PackedBatches(TOKENS, 32, 8, seed=2)
  for b, batch in enumerate(take(it, 10)):
    np.testing.assert_array_equal(batch, it.windows[it.permutation(0)[b * 8:(b + 1) * 8]])


def test_packed_batches_deterministic_per_seed_and_per_epoch():
  a = np.stack(take(data.PackedBatches(TOKENS, 32, 8, seed=0), 20))
  b = np.stack(take(data.PackedBatches(TOKENS, 32, 8, seed=0), 20))
  c = np.stack(take(data.PackedBatches(TOKENS, 32, 8, seed=1), 20))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert not np.array_equal(a[:10], a[10:])  # epoch 2 is another permutation


@pytest.mark.parametrize('consumed', [0, 3, 10, 13])  # includes an epoch boundary
def test_packed_batches_resume_exactly(consumed):
  original = data.PackedBatches(TOKENS, 32, 8, seed=5)
  take(original, consumed)
  state = json.loads(json.dumps(original.get_state()))
  resumed = data.PackedBatches(TOKENS, 32, 8, seed=5)
  resumed.set_state(state)
  for want, got in zip(take(original, 12), take(resumed, 12)):
    np.testing.assert_array_equal(want, got)


def test_state_resumes_under_another_host_count():
  single = data.PackedBatches(TOKENS, 32, 8, seed=5)
  take(single, 7)
  hosts = [data.PackedBatches(TOKENS, 32, 8, 5, i, 2) for i in range(2)]
  for host in hosts:
    host.set_state(single.get_state())
  for want in take(single, 6):
    np.testing.assert_array_equal(np.concatenate([next(h) for h in hosts]), want)


def test_set_state_rejects_other_data():
  state = data.PackedBatches(TOKENS, 32, 8, seed=0).get_state()
  with pytest.raises(data.DataError, match='saved for'):
    data.PackedBatches(TOKENS, 32, 4, seed=0).set_state(state)


@pytest.mark.parametrize('process_count', [2, 4])
def test_host_slices_concatenate_to_the_global_batch(process_count):
  single = take(data.PackedBatches(TOKENS, 32, 8, seed=3), 12)
  hosts = [take(data.PackedBatches(TOKENS, 32, 8, 3, i, process_count), 12)
           for i in range(process_count)]
  for step, want in enumerate(single):
    assert hosts[0][step].shape == (8 // process_count, 33)
    np.testing.assert_array_equal(np.concatenate([h[step] for h in hosts]), want)


def test_corpus_too_small_names_the_field():
  with pytest.raises(data.DataError, match=r"config\.train\.batch_size=8.*only 7 windows"):
    data.PackedBatches(TOKENS[:33 * 7 + 5], 32, 8, seed=0)
  with pytest.raises(data.DataError, match=r"config\.train\.batch_size=6.*not divisible"):
    data.PackedBatches(TOKENS, 32, 6, seed=0, process_count=4)


def test_val_batches_fixed_in_order_and_sliced():
  val = data.val_batches(TOKENS, 32, 8, 3)
  assert len(val) == 3
  np.testing.assert_array_equal(np.concatenate(val).ravel(), TOKENS[:3 * 8 * 33])
  halves = [data.val_batches(TOKENS, 32, 8, 3, i, 2) for i in range(2)]
  for b in range(3):
    np.testing.assert_array_equal(np.concatenate([halves[0][b], halves[1][b]]), val[b])
  assert len(data.val_batches(TOKENS[:33 * 8 * 2 + 10], 32, 8, 5)) == 2  # short split: fewer
  with pytest.raises(data.DataError, match=r"config\.train\.batch_size=8.*validation split"):
    data.val_batches(TOKENS[:33 * 7], 32, 8, 5)


def test_split_batch_and_global_batch():
  import jax
  batch = data.val_batches(TOKENS, 32, 8, 1)[0]
  pair = data.split_batch(batch)
  np.testing.assert_array_equal(pair['inputs'][:, 1:], pair['targets'][:, :-1])
  assert pair['inputs'].shape == pair['targets'].shape == (8, 32)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  arrays = data.global_batch(pair, sharding)
  assert isinstance(arrays['inputs'], jax.Array) and arrays['inputs'].shape == (8, 32)
  np.testing.assert_array_equal(np.asarray(arrays['targets']), pair['targets'])
  np.testing.assert_array_equal(np.asarray(data.global_batch(batch, sharding)), batch)


def test_build_end_to_end_from_files(tmp_path, small_docs):
  (tmp_path / 'in').mkdir()
  write(tmp_path / 'in' / 'a.txt', small_docs[0][0])
  write(tmp_path / 'in' / 'b.txt', small_docs[1][0])
  config = make_config(source='files', files=f'{tmp_path}/in/*.txt')
  workdir = str(tmp_path / 'work')
  built = data.build(config, workdir)
  assert built.sp.vocab_size() == SMALL_VOCAB and built.val_tokens < built.train_tokens
  assert len(built.val) == 3 and built.val[0].shape == (4, 33)
  assert next(built.train).max() < SMALL_VOCAB
  assert sorted(f.split('_')[0] for f in os.listdir(f'{workdir}/tokenizer')) == \
      ['spm', 'train', 'val']
  rebuilt = data.build(config, workdir, process_index=1, process_count=2)
  assert rebuilt.train_tokens == built.train_tokens and rebuilt.val[0].shape == (2, 33)
  config.train.batch_size = 4096
  with pytest.raises(data.DataError, match=r"config\.train\.batch_size=4096"):
    data.build(config, workdir)
