"Property-based tests (hypothesis): the dataset adapters and the collator take any unicode text and any lengths."
import csv, json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

from alcap.data import Collator, Song, SongDataset, get_tokenizer, load_si_json, load_songs, load_table, write_songs
from alcap.demodata import demo_song

# few examples, no deadline (the machine is shared), no example database written into the repository
FAST = settings(max_examples=25, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
text = st.text(max_size=300)                            # any unicode but lone surrogates (not encodable as UTF-8)
lyrics = text.filter(lambda s: s.strip() != '')         # the adapters require lyrics


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
    songs = [demo_song(i, 0, audio=False)[0] for i in range(60)]
    return get_tokenizer('/nonexistent/bart-base', texts=[t for s in songs for t in (s.lyrics, s.caption)],
                         save_dir=tmp_path_factory.mktemp('tok'), vocab_size=800)


@FAST
@given(rows=st.lists(st.tuples(lyrics, text), min_size=1, max_size=5))
def test_jsonl_songs_round_trip_any_text(tmp_path, rows):
    songs = [Song(f'id{i}', l, c, split='train') for i, (l, c) in enumerate(rows)]
    write_songs(songs, tmp_path/'metadata.jsonl')
    back = load_songs(tmp_path)
    assert [(s.lyrics, s.caption) for s in back] == rows


@FAST
@given(rows=st.lists(st.tuples(lyrics, text), min_size=1, max_size=5), fmt=st.sampled_from(['csv', 'jsonl', 'json']))
@example(rows=[('la\x85la', 'line\u2028separator')], fmt='jsonl')  # line breaks for str.splitlines, not for JSON lines
def test_generic_table_round_trip_any_text(tmp_path, rows, fmt):
    path = tmp_path/f'table.{fmt}'
    recs = [dict(id=f's{i}', lyrics=l, caption=c) for i, (l, c) in enumerate(rows)]
    if fmt == 'csv':
        with open(path, 'w', encoding='utf-8', newline='') as f:
            w = csv.DictWriter(f, ['id', 'lyrics', 'caption']); w.writeheader(); w.writerows(recs)
    elif fmt == 'jsonl':
        path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in recs), encoding='utf-8')
    else: path.write_text(json.dumps(recs, ensure_ascii=False), encoding='utf-8')
    songs = load_table(path)
    assert [(s.id, s.lyrics, s.caption) for s in songs] == [(r['id'], r['lyrics'], r['caption']) for r in recs]


@FAST
@given(rows=st.lists(st.tuples(lyrics, lyrics), min_size=1, max_size=5))
@example(rows=[('a\x1cb', 'c\u2029d')])
def test_si_json_lines_any_text(tmp_path, rows):
    recs = [dict(music4all_id=f'm{i}', songmeanings_id=str(i), lyrics=l, comment=c) for i, (l, c) in enumerate(rows)]
    (tmp_path/'si.jsonl').write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in recs), encoding='utf-8')
    songs = load_si_json(tmp_path/'si.jsonl', lyrics_newline=None)
    assert [(s.lyrics, s.caption) for s in songs] == rows


@FAST
@given(pairs=st.lists(st.tuples(lyrics, text), min_size=1, max_size=6), max_target=st.integers(4, 80),
       l_m=st.lists(st.integers(1, 7), min_size=6, max_size=6))
def test_collator_pads_labels_with_minus_100(tokenizer, pairs, max_target, l_m):
    songs = [Song(f'id{i}', l, c) for i, (l, c) in enumerate(pairs)]
    feats = {s.id: np.ones((l_m[i], 3), np.float16) for i, s in enumerate(songs)}
    ds = SongDataset(songs, tokenizer, features=feats, max_source_len=96, max_target_len=max_target)
    items = [ds[i] for i in range(len(ds))]
    b = Collator(tokenizer.pad_token_id, multiple=16, max_source_len=96, max_target_len=max_target)(items)
    for i, it in enumerate(items):
        n = len(it['labels'])
        assert n <= max_target
        assert b['labels'][i, :n].tolist() == list(it['labels'])
        assert b['labels'][i, n:].eq(-100).all()
        assert b['input_ids'][i, len(it['input_ids']):].eq(tokenizer.pad_token_id).all()
        assert b['music_attention_mask'][i].sum() == l_m[i] and b['music_features'][i, l_m[i]:].abs().sum() == 0
    assert b['labels'].shape[1] <= max_target and b['input_ids'].shape[1] <= 96
