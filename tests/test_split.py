"""Texts into documents (split rules) and the mixing criterion; the config field that names them."""

import pytest

from conftest import validate
from idea_prune_jax import settings
from idea_prune_jax.data import inputs, split

PLAY = ('TITLE\n\nPERSONS.\n\n\nACT I.\n\nSCENE I. A heath.\n\nFirst Witch.\nWhen?\n\n[Exeunt.]\n'
        '\n\nScene 2. A camp.\n\nscene I would see\nin verse.\n\nACT II. SCENE I. Court.\n\nEnd.\n')


def test_scenes_cut_before_headings_with_the_act_line_above():
  assert split.scenes(PLAY) == [
      'TITLE\n\nPERSONS.\n\n\n',
      'ACT I.\n\nSCENE I. A heath.\n\nFirst Witch.\nWhen?\n\n[Exeunt.]\n\n\n',
      'Scene 2. A camp.\n\nscene I would see\nin verse.\n\n',  # lower case: verse, not a heading
      'ACT II. SCENE I. Court.\n\nEnd.\n']
  assert split.scenes('no headings\n') == ['no headings\n']


def test_paragraphs_keep_their_blank_lines():
  assert split.paragraphs('a\nb\n\n\nc\n \nd') == ['a\nb\n\n\n', 'c\n \n', 'd']


def test_chunks_are_bounded_greedy_and_move_a_heading_on():
  text = 'aaaa\n\nbbbb\n\nII\n\ncccc\n\n' + 'x' * 25 + '\n'
  pieces = split.chunks(text, 14)
  assert ''.join(pieces) == text and max(map(len, pieces)) <= 14
  assert pieces[:3] == ['aaaa\n\nbbbb\n\n', 'II\n\ncccc\n\n', 'x' * 14]  # 'II' opens its piece


@pytest.mark.parametrize('rule', ['auto', 'file', 'paragraphs', 'chunk:1', 'chunk:700'])
def test_every_rule_is_lossless_on_every_work(rule):
  parsed = split.parse(rule)
  for text in inputs.embedded_works().values():
    assert ''.join(split.documents(text, parsed, record=False)) == text


def test_auto_keeps_records_whole_and_cuts_texts():
  long = 'line of text\n\n' * 1000  # 14,000 characters
  auto = split.parse('auto')
  assert split.documents(long, auto, record=True) == [long]
  assert len(split.documents(long, auto, record=False)) == 2
  assert len(split.documents(long, split.parse('chunk:1400'), record=True)) == 10
  assert split.documents(long, split.parse('file'), record=False) == [long]


def test_the_embedded_corpus_is_cut_into_about_a_thousand_bounded_documents():
  works = inputs.embedded_works()
  docs = [d for t in works.values() for d in split.documents(t, split.parse('auto'), False)]
  assert 1000 < len(docs) < 1200 and max(map(len, docs)) <= split.AUTO_CHUNK_CHARS


@pytest.mark.parametrize('text', ['chunks:5', 'chunk:0', 'chunk:', 'scene', ''])
def test_a_bad_rule_is_one_line_naming_the_flag(text):
  with pytest.raises(split.SplitError, match=rf"^--split='{text}': use auto, file, paragraphs, "):
    split.parse(text)


def test_config_checks_the_split_field():
  config = settings.base()
  assert config.data.split == 'auto'
  config.data.split = 'chunk:x'
  with pytest.raises(settings.ConfigError, match=r"^config.data.split='chunk:x': use auto"):
    validate(config, 1)


def test_mixing_flags_whole_works_not_scenes_at_the_tiny_step():
  """The embedded corpus prepared at vocab 4096 (DATA.md): 40 works, 1,041 scene documents."""
  works = {'documents': 40, 'tokens': 1_606_588}
  scenes = {'documents': 1_041, 'tokens': 1_608_860}
  problem = split.mixing_problem(works, *split.DEFAULT_STEP, '--split')
  assert problem.startswith('the 40 training documents average 40,165 tokens, more than a step '
                            'reads (16 rows x 129 = 2,064 tokens)')
  assert problem.endswith('e.g. --split=chunk:4000') and '\n' not in problem
  assert split.mixing_problem(scenes, *split.DEFAULT_STEP, '--split') is None
  # Per shard: two shards of 8 rows each read half as much of their stream per step.
  assert split.mixing_problem({'documents': 1, 'tokens': 1500}, 8, 129, 'x')


def test_the_default_step_is_the_default_config_s():
  config = settings.base()
  assert split.DEFAULT_STEP == (config.train.batch_size, config.data.seq_len + 1)
