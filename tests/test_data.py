"Tests of the data layer: adapters, splits, the restricted unpickler, collation, the demo dataset."
import hashlib, json, os, pickle, subprocess, sys, types
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from alcap.data import (Collator, LengthGroupedBatchSampler, SI_VARIANTS, Song, SongDataset, bucket_length, get_tokenizer,
                        load_ncm_csv, load_si_csvs, load_si_json, load_si_pickle, load_songs, load_table,
                        reference_split, write_songs)
from alcap.demodata import demo_song, demo_splits, dependence_report, make_demo, predictability


# --- Song Interpretation -------------------------------------------------------------------------

@pytest.fixture
def original_record_class():
    "A class named and placed as the BART-fusion record class, so pickles refer to `LyricsCommentData.LyricsCommentData`."
    mod = types.ModuleType('LyricsCommentData')
    @dataclass
    class LyricsCommentData:
        music4all_id: str
        songmeanings_id: str
        lyrics: str
        comment: str
    LyricsCommentData.__module__ = 'LyricsCommentData'; LyricsCommentData.__qualname__ = 'LyricsCommentData'
    mod.LyricsCommentData = LyricsCommentData
    sys.modules['LyricsCommentData'] = mod
    yield LyricsCommentData
    del sys.modules['LyricsCommentData']


@pytest.mark.parametrize('protocol', [0, 2, pickle.HIGHEST_PROTOCOL])
def test_si_pickle_reads_records(tmp_path, original_record_class, protocol):
    R = original_record_class
    recs = [R('id1', '100', 'first line\nsecond line', 'About a breakup.'), R('id2', '200', 'la', 'A party.')]
    (tmp_path/'dataset_full_256.pkl').write_bytes(pickle.dumps(recs, protocol=protocol))
    songs = load_si_pickle(tmp_path/'dataset_full_256.pkl')
    assert [(s.id, s.lyrics, s.caption, s.meta['songmeanings_id']) for s in songs] == [
        ('id1', 'first line;second line', 'About a breakup.', '100'), ('id2', 'la', 'A party.', '200')]
    assert load_si_pickle(tmp_path/'dataset_full_256.pkl', lyrics_newline=None)[0].lyrics == 'first line\nsecond line'


class _Payload:
    def __init__(self, target): self.target = target
    def __reduce__(self): return (os.system, (f'touch {self.target}',))


@pytest.mark.parametrize('protocol', [0, 2, pickle.HIGHEST_PROTOCOL])
def test_si_pickle_refuses_code(tmp_path, protocol):
    target = tmp_path/'pwned'
    (tmp_path/'evil.pkl').write_bytes(pickle.dumps([_Payload(target)], protocol=protocol))
    with pytest.raises(ValueError, match=r'evil\.pkl.*refusing to load .*system'):
        load_si_pickle(tmp_path/'evil.pkl')
    assert not target.exists()


def test_si_pickle_refuses_other_classes(tmp_path):
    (tmp_path/'x.pkl').write_bytes(pickle.dumps([Counter(a=1)]))
    with pytest.raises(ValueError, match='refusing to load .collections.Counter'):
        load_si_pickle(tmp_path/'x.pkl')


def test_si_pickle_bad_record_names_field(tmp_path, original_record_class):
    (tmp_path/'p.pkl').write_bytes(pickle.dumps([original_record_class('id1', '1', 'la', '')]))
    with pytest.raises(ValueError, match=r"p\.pkl\[0\]: field 'comment'"):
        load_si_pickle(tmp_path/'p.pkl')


def test_si_json_mirror(tmp_path):
    recs = [dict(music4all_id='a', songmeanings_id='1', lyrics='x\ny', comment='c1'), dict(music4all_id='b', songmeanings_id=2, lyrics='z', comment='c2')]
    (tmp_path/'si.json').write_text(json.dumps(recs))
    (tmp_path/'si.jsonl').write_text('\n'.join(json.dumps(r) for r in recs))
    for f in ('si.json', 'si.jsonl'):
        songs = load_si_json(tmp_path/f)
        assert [(s.id, s.lyrics, s.caption, s.meta['songmeanings_id']) for s in songs] == [('a', 'x;y', 'c1', '1'), ('b', 'z', 'c2', '2')]
    (tmp_path/'bad.json').write_text('[{"music4all_id": "a"')
    with pytest.raises(ValueError, match='bad.json: not valid JSON'): load_si_json(tmp_path/'bad.json')


def test_si_reference_csvs(tmp_path):
    cols = ['music4all_id', 'lyrics', 'comment']
    pd.DataFrame([['a', 'l1', 'c1'], ['b', 'l2', 'c2']], columns=cols).to_csv(tmp_path/'df_full_train.csv')  # with an index column, as pandas writes
    pd.DataFrame([['c', 'l3', 'c3']], columns=cols).to_csv(tmp_path/'df_full_val.csv', index=False)
    pd.DataFrame([['d', 'l4\nl5', 'c4']], columns=cols).to_csv(tmp_path/'df_test.csv', index=False)
    songs = load_si_csvs(tmp_path, 'full')
    assert [(s.id, s.split) for s in songs] == [('a', 'train'), ('b', 'train'), ('c', 'val'), ('d', 'test')]
    assert songs[-1].lyrics == 'l4;l5'
    pd.DataFrame([['e', 'l']], columns=['music4all_id', 'lyrics']).to_csv(tmp_path/'df_test.csv', index=False)
    with pytest.raises(ValueError, match=r"df_test\.csv: missing column\(s\) \['comment'\]"): load_si_csvs(tmp_path, 'full')
    with pytest.raises(FileNotFoundError, match='df_other_train.csv'): load_si_csvs(tmp_path, 'other')


def test_si_variants_use_the_authors_file_names():
    "run_train.py's corpora music4all_{full,not_negative,positive}, and trainer.py's name = corpus[10:]."
    names = {k: v['csv_name'] for k, v in SI_VARIANTS.items()}
    assert names == {k: corpus[10:] for k, corpus in (('si-full', 'music4all_full'), ('si-votes-ge0', 'music4all_not_negative'),
                                                      ('si-votes-gt0', 'music4all_positive'))}


def test_check_si_sizes_warns_on_other_sizes():
    from alcap.data import check_si_sizes
    songs = [Song(str(i), 'l', 'c', split=sp) for i, sp in enumerate(['train'] * 5 + ['val'] * 2 + ['test'] * 800)]
    with pytest.warns(UserWarning, match=r"si-full: your files hold 5 train items, the paper's train split has 279,283"):
        assert check_si_sizes(songs, 'si-full') == {'train': 5, 'val': 2, 'test': 800}
    import warnings
    big = [Song(str(i), 'l', 'c', split='train') for i in range(49_736)] + songs[-800:]
    with warnings.catch_warnings():
        warnings.simplefilter('error')               # the published sizes: no warning
        check_si_sizes(big, 'si-votes-gt0')


def test_reference_split_sizes():
    train, val = reference_split(310_315, seed=42)
    assert (len(train), len(val)) == (279_283, 31_032) == (SI_VARIANTS['si-full']['n_train'], 310_315 - 279_283)
    assert set(train).isdisjoint(val) and len(set(train) | set(val)) == 310_315
    # the same permutation as the reference's random_split with seed 42
    perm = torch.randperm(310_315, generator=torch.Generator().manual_seed(42)).tolist()
    assert train[:5] == perm[:5] and val[-5:] == perm[-5:]
    assert reference_split(1000, seed=1)[0] != reference_split(1000, seed=42)[0]


# --- NCM and generic tables ---------------------------------------------------------------------------

def test_ncm_csv(tmp_path):
    pd.DataFrame({'title': ['T1', 'T2'], 'artist': ['A1', 'A2'], 'lyrics': ['l1', 'l2'], 'review': ['r1', 'r2']}).to_csv(tmp_path/'ncm.csv', index=False)
    songs = load_ncm_csv(tmp_path/'ncm.csv', audio_dir=tmp_path/'mp3')
    assert [(s.id, s.title, s.artist, s.lyrics, s.caption) for s in songs] == [('ncm_0', 'T1', 'A1', 'l1', 'r1'), ('ncm_1', 'T2', 'A2', 'l2', 'r2')]
    assert songs[1].audio_path == str(tmp_path/'mp3'/'ncm_1.mp3')
    pd.DataFrame({'title': ['T1'], 'lyrics': ['l1']}).to_csv(tmp_path/'bad.csv', index=False)
    with pytest.raises(ValueError, match=r"bad\.csv: missing column 'review'"): load_ncm_csv(tmp_path/'bad.csv')


@pytest.mark.parametrize('fmt', ['csv', 'json', 'jsonl'])
def test_generic_table(tmp_path, fmt):
    rows = [dict(song='s1', text='hello', interp='about hi', wav='a/s1.wav', split='train'),
            dict(song='s2', text='bye', interp='about bye', wav='/abs/s2.wav', split='test')]
    f = tmp_path/f'songs.{fmt}'
    if fmt == 'csv': pd.DataFrame(rows).to_csv(f, index=False)
    elif fmt == 'json': f.write_text(json.dumps(rows))
    else: f.write_text('\n'.join(json.dumps(r) for r in rows))
    songs = load_table(f, id_col='song', lyrics_col='text', caption_col='interp', audio_col='wav')
    assert [(s.id, s.lyrics, s.caption, s.split) for s in songs] == [('s1', 'hello', 'about hi', 'train'), ('s2', 'bye', 'about bye', 'test')]
    assert songs[0].audio_path == str(tmp_path/'a'/'s1.wav') and songs[1].audio_path == '/abs/s2.wav'


def test_generic_table_errors_name_row_and_field(tmp_path):
    (tmp_path/'t.jsonl').write_text(json.dumps(dict(id='a', lyrics='x', caption='c')) + '\n' + json.dumps(dict(id='b', lyrics='', caption='c')))
    with pytest.raises(ValueError, match=r"t\.jsonl: row 2: field 'lyrics'"): load_table(tmp_path/'t.jsonl')


def test_songs_jsonl_roundtrip(tmp_path):
    songs = [Song('a', 'l', 'c', 'audio/a.flac', 'T', 'A', 3, 'val', {'k': [1, 2]})]
    write_songs(songs, tmp_path/'metadata.jsonl')
    back = load_songs(tmp_path)
    assert back[0].audio_path == str(tmp_path/'audio'/'a.flac')
    back[0].audio_path = 'audio/a.flac'
    assert back == songs
    (tmp_path/'metadata.jsonl').write_text('{"id": "a", "lyrics": "l", "colour": 1}\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl:1: unknown field\(s\) \['colour'\]"): load_songs(tmp_path)


# --- tokenisation and collation ------------------------------------------------------------------

@pytest.fixture(scope='module')
def demo_songs():
    return [demo_song(i, 0, audio=False)[0] for i in range(120)]


@pytest.fixture(scope='module')
def tokenizer(demo_songs, tmp_path_factory):
    texts = [s.lyrics for s in demo_songs] + [s.caption for s in demo_songs]
    return get_tokenizer('/nonexistent/bart-base', texts=texts, save_dir=tmp_path_factory.mktemp('tok'), vocab_size=1500)


def test_tokenizer_offline_bpe(tokenizer):
    assert tokenizer.alcap_source == 'bpe-trained-on-dataset'
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    text = 'I think this song is about freedom — and ünïcode.'
    assert tokenizer.decode(tokenizer(text)['input_ids'], skip_special_tokens=True) == text  # byte-level: lossless


def test_tokenizer_unreachable_without_texts():
    with pytest.raises(OSError, match='not reachable'): get_tokenizer('/nonexistent/bart-base')


def test_collation_pads_and_buckets(demo_songs, tokenizer):
    ds = SongDataset(demo_songs[:10], tokenizer, max_source_len=512, max_target_len=100)
    batch = Collator(tokenizer.pad_token_id, max_target_len=100)([ds[i] for i in range(10)])
    L, T = batch['input_ids'].shape[1], batch['labels'].shape[1]
    assert L % 64 == 0 and L == bucket_length(max(len(ds[i]['input_ids']) for i in range(10)))
    assert T == 100  # captions are longer than 64 tokens here and truncated at 100
    for i in range(10):
        n_src, n_tgt = len(ds[i]['input_ids']), len(ds[i]['labels'])
        assert batch['labels'][i, n_tgt:].eq(-100).all() and batch['labels'][i, :n_tgt].ge(0).all()
        assert batch['input_ids'][i, n_src:].eq(tokenizer.pad_token_id).all()
        assert batch['attention_mask'][i].sum() == n_src
    assert batch['song_ids'].tolist() == list(range(10))


def test_duplicate_songs_share_song_ids(tokenizer):
    songs = [Song('x', 'la la', 'c1'), Song('y', 'lo', 'c2'), Song('x', 'la la', 'c3')]
    ds = SongDataset(songs, tokenizer)
    assert Collator(1)([ds[i] for i in range(3)])['song_ids'].tolist() == [0, 1, 0]


def test_collation_music_mask():
    items = [dict(input_ids=[0, 2], labels=[0, 2], h_m=np.full((5, 4), 2.0, np.float16)), dict(input_ids=[0, 2], labels=[0, 2], h_m=np.ones((3, 4), np.float16))]
    b = Collator(1)(items)
    assert b['music_features'].shape == (2, 5, 4) and b['music_features'].dtype == torch.float32
    assert b['music_attention_mask'].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert b['music_features'][1, 3:].abs().sum() == 0


def test_missing_features_named(tokenizer):
    with pytest.raises(KeyError, match='no music features'): SongDataset([Song('x', 'l', 'c')], tokenizer, features={})


def test_length_grouped_sampler():
    lengths = np.random.default_rng(0).integers(1, 1000, 503)
    s = LengthGroupedBatchSampler(lengths, batch_size=10, seed=3)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(503))
    assert np.mean([np.ptp(lengths[b]) for b in batches]) < 0.2 * np.mean([np.ptp(lengths[np.random.default_rng(k).choice(503, 10)]) for k in range(50)])
    assert list(LengthGroupedBatchSampler(lengths, 10, seed=3)) == batches      # seeded
    s.set_epoch(1); assert list(s) != batches                                  # reshuffled per epoch
    s.set_epoch(0, skip=7); assert list(s) == batches[7:] and len(s) == len(batches) - 7
    assert len(list(LengthGroupedBatchSampler(lengths, 10, drop_last=True))) == 50
    ev = list(LengthGroupedBatchSampler(lengths, 10, shuffle=False))
    assert lengths[ev[0]].min() >= lengths[ev[-1]].max()


def test_sampler_two_replicas_equal_one_with_double_batch():
    lengths = np.random.default_rng(1).integers(1, 300, 101)
    one = list(LengthGroupedBatchSampler(lengths, 8, seed=5))
    two = [list(LengthGroupedBatchSampler(lengths, 4, seed=5, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(two[0]) == len(two[1]) == len(one)
    assert all(sorted(a + b) == sorted(c) for a, b, c in zip(*two, one[:-1]))
    assert all(len(b) > 0 for b in two[0] + two[1])


# --- the demo dataset ---------------------------------------------------------------------------

def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob('*')):
        if p.is_file(): h.update(p.relative_to(folder).as_posix().encode()); h.update(p.read_bytes())
    return h.hexdigest()


def test_demo_cli_deterministic(tmp_path):
    cmd = [sys.executable, '-c', 'from alcap.demodata import demo_data_cli; demo_data_cli()']
    for name, workers in (('a', '1'), ('b', '2')):
        out = subprocess.run(cmd + ['--out', str(tmp_path/name), '--n', '24', '--seed', '7', '--workers', workers], capture_output=True, text=True, check=True).stdout
        assert 'wrote 24 songs' in out
    assert _digest(tmp_path/'a') == _digest(tmp_path/'b')                       # byte-identical audio and metadata
    make_demo(tmp_path/'c', n=24, seed=8, workers=1)
    assert _digest(tmp_path/'a') != _digest(tmp_path/'c')


def test_demo_audio_and_records(tmp_path):
    import soundfile as sf
    songs = make_demo(tmp_path, n=12, seed=0, workers=1)
    x, sr = sf.read(songs[0].audio_path if os.path.isabs(songs[0].audio_path) else tmp_path/songs[0].audio_path)
    assert sr == 16_000 and x.shape == (240_000,) and 0.5 < np.abs(x).max() < 0.9
    for s in load_songs(tmp_path):
        assert 30 <= len(s.caption.split()) <= 150
        assert {'theme', 'instrument', 'tempo', 'mode', 'mood', 'drums', 'style', 'bpm', 'register', 'groove'} <= set(s.meta)
        assert Path(s.audio_path).exists()
    assert json.loads((tmp_path/'dataset.json').read_text())['n'] == 12


def test_demo_splits():
    assert Counter(demo_splits(800, 0)) == Counter(train=640, val=80, test=80)
    assert demo_splits(800, 0) == demo_splits(800, 0) != demo_splits(800, 1)


def test_demo_timbres_differ():
    "Played the same way (pattern, register, settings) and before any recording, the instruments differ in spectrum."
    from alcap.demodata import DEMO_INSTRUMENTS, _play_instrument, sample_performance
    for seed in range(4):
        cents = {}
        # one performance for all four: the same pattern number, register and settings
        perf = sample_performance(np.random.default_rng(seed), dict(instrument='guitar', groove=('busy', 'sparse')[seed % 2], register='mid'))
        for inst in DEMO_INSTRUMENTS:
            buf = np.zeros(8 * 16_000)
            _play_instrument(buf, dict(instrument=inst, mode='major', root=50), 0.6, np.random.default_rng(1), perf)
            spec, f = np.abs(np.fft.rfft(buf)), np.fft.rfftfreq(len(buf), 1 / 16_000)
            cents[inst] = (spec * f).sum() / spec.sum()
        assert min(abs(a - b) for a in cents.values() for b in cents.values() if a != b) > 100, cents


def test_demo_dependence_structure():
    "Since generator version 3 the theme sets the music strongly (version 2: only a 3-to-1 lean of the mode; 4: 95%)."
    from alcap.demodata import DEMO_MUSIC_VALUES, demo_attribute_joint
    songs = [demo_song(i, 0, audio=False)[0] for i in range(800)]
    for attr in DEMO_MUSIC_VALUES:                                     # each music attribute follows the theme 95% of the time
        assert 0.92 < predictability(songs, 'theme', attr) < 0.98, attr
    assert predictability(songs, 'theme', 'instrument') < 0.35          # ... the instrument is independent of the theme
    # the music tells the theme often but does not fix it: in-sample, as the generator's exact Bayes accuracy (0.93)
    j = demo_attribute_joint().groupby(['theme', *DEMO_MUSIC_VALUES])['p'].sum()
    bayes = j.groupby(level=list(range(1, 1 + len(DEMO_MUSIC_VALUES)))).max().sum()
    assert 0.9 < bayes < 0.95 and abs(predictability(songs, tuple(DEMO_MUSIC_VALUES), 'theme') - bayes) < 0.06
    rep = dependence_report(songs[:400])
    assert rep.loc['theme', 'from_lyrics'] > 0.9 and rep.loc['instrument', 'from_lyrics'] < 0.4
    assert rep.loc['instrument', 'from_caption'] > 0.9 and rep.loc['mood', 'from_caption'] > 0.9
