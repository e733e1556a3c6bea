"""Bad input and interruptions, tried as a new user would (results/reliability.md lists them): every command answers
with one line naming the input, a non-zero exit and no traceback; nothing finished is lost or overwritten."""
import csv, hashlib, importlib.util, json, os, subprocess, sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from alcap.data import Song, load_songs, write_songs
from alcap.demodata import demo_data_cli, make_demo
from alcap.evaluate import eval_cli
from alcap.music import SR, FeatureCache, MusicnnEncoder, extract_features, features_cli, tags_cli
from alcap.train import TrainConfig, ensure_features, train, train_cli, validate

ROOT = Path(__file__).resolve().parents[1]
needs_musicnn = pytest.mark.skipif(importlib.util.find_spec('musicnn') is None, reason='musicnn wheel not installed')
# a tiny random-init run: 30 songs, batch 4, a 4+4-layer BART of width 128
TINY = dict(dataset='jsonl', method='alcap', alpha=0.1, model_size='tiny', text_init='random', vocab_size=300,
            batch_size=4, epochs=1, lr=1e-3, max_source_len=128, max_target_len=64, num_beams=1, max_new_tokens=4,
            val_generate_n=0, save_every=2)


def tiny_args(data, out, **kw):
    "alcap-train arguments of a tiny run on `tiny_data`."
    base = dict(TINY, data_dir=data/'songs', features_dir=data/'feats', output_dir=out)
    return [a for k, v in {**base, **kw}.items() for a in (f'--{k}', str(v))] + ['--quiet']


def tiny_config(data, out, **kw):
    base = dict(TINY, data_dir=str(data/'songs'), features_dir=str(data/'feats'), output_dir=str(out))
    return TrainConfig(**{**base, **kw})


def one_line_error(capsys, rc, prog, *needles):
    "The command returned 2 and wrote exactly one line `prog: ...` holding every needle, and no traceback."
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f'{prog}: ') and 'Traceback' not in err, err
    for n in needles: assert n in lines[0], (n, lines[0])
    return lines[0]


def tone(path, seconds=1.0, f0=440.0):
    sf.write(path, 0.3 * np.sin(2 * np.pi * f0 * np.arange(int(seconds * SR)) / SR), SR)
    return path


def small_encoder():
    "A random-weight musicnn on 2 s clips: the cache logic without the cost of the real encoder."
    return MusicnnEncoder(pretrained=False, seconds=2.0)


def tree_digest(folder):
    return hashlib.sha256(b''.join(p.read_bytes() for p in sorted(Path(folder).rglob('*')) if p.is_file())).hexdigest()


# --- defect 1: the training notebook only trains -----------------------------------------------------

def test_training_notebook_exits_0_and_leaves_the_package_alone(tiny_data, tmp_path):
    "papermill runs a whole tiny training: exit 0, alcap/*.py untouched; and the run learned (the check moved here)."
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (ROOT/'alcap').glob('*.py')}
    params = dict(TINY, data_dir=tiny_data/'songs', features_dir=tiny_data/'feats', epochs=2, output_dir=tmp_path/'run')
    cmd = [sys.executable, '-m', 'papermill', str(ROOT/'nbs'/'03_train.ipynb'), str(tmp_path/'out.ipynb'),
           '--no-progress-bar', *[a for k, v in params.items() for a in ('-p', k, str(v))]]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'epoch 2/2' in r.stderr or (tmp_path/'run'/'summary.json').exists()
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (ROOT/'alcap').glob('*.py')}
    assert after == before
    epochs = pd.read_csv(tmp_path/'run'/'log_epochs.csv')
    assert len(epochs) == 2 and epochs['val_loss'].iloc[-1] < epochs['val_loss'].iloc[0]


def test_training_notebook_run_stopped_by_max_steps_exits_0(tiny_data, tmp_path):
    "A run stopped by max_steps before its first epoch ends is a success too (no epoch log, no summary yet)."
    import papermill as pm
    params = dict(TINY, data_dir=str(tiny_data/'songs'), features_dir=str(tiny_data/'feats'), max_steps=2,
                  output_dir=str(tmp_path/'run'))
    pm.execute_notebook(str(ROOT/'nbs'/'03_train.ipynb'), str(tmp_path/'out.ipynb'), cwd=str(tmp_path),
                        progress_bar=False, parameters=params)
    assert not (tmp_path/'run'/'summary.json').exists() and (tmp_path/'run'/'checkpoints'/'last.pt').exists()


# --- defect 2: stale features ------------------------------------------------------------------------------

def test_changed_audio_is_recomputed_and_refused_by_training(tmp_path):
    class S:
        def __init__(self, id, audio_path): self.id, self.audio_path = id, audio_path
    songs = [S('a', tone(tmp_path/'a.wav', f0=300)), S('b', tone(tmp_path/'b.wav', f0=500))]
    enc = small_encoder()
    assert extract_features(songs, enc, tmp_path/'c', num_workers=0, progress=False)['done'] == 2
    old = FeatureCache(tmp_path/'c')['a'].copy()
    tone(tmp_path/'a.wav', seconds=1.5, f0=900)  # other audio under the same id
    # training first: it must refuse features of the old audio
    cfg = TrainConfig(dataset='jsonl', data_dir=str(tmp_path), features_dir=str(tmp_path/'c'))
    with pytest.raises(ValueError, match='features of other audio'):
        ensure_features(cfg, songs)
    r = extract_features(songs, enc, tmp_path/'c', num_workers=0, progress=False)
    assert (r['done'], r['skipped'], r['recomputed']) == (1, 1, 1)
    new = FeatureCache(tmp_path/'c')['a']
    assert not np.array_equal(old, new)
    assert FeatureCache(tmp_path/'c').stale(songs) == [] and ensure_features(cfg, songs) is not None


def test_touched_but_identical_audio_is_not_recomputed(tmp_path, monkeypatch):
    from alcap import music
    class S:
        def __init__(self, id, audio_path): self.id, self.audio_path = id, audio_path
    songs = [S('a', tone(tmp_path/'a.wav'))]
    extract_features(songs, small_encoder(), tmp_path/'c', num_workers=0, progress=False)
    os.utime(tmp_path/'a.wav', ns=(10**18, 10**18))  # as a copy to another disk would leave it
    assert extract_features(songs, small_encoder(), tmp_path/'c', num_workers=0, progress=False)['skipped'] == 1
    def no_hashing(path): raise AssertionError('hashed again')
    monkeypatch.setattr(music, 'audio_source', no_hashing)
    assert FeatureCache(tmp_path/'c').stale(songs) == []  # the new time was remembered with the unchanged hash


def test_audio_folder_ids_are_unique(tmp_path, capsys):
    data = tmp_path/'music'
    for sub in ('a', 'b'): (data/sub).mkdir(parents=True)
    tone(data/'a'/'song.wav', f0=300); tone(data/'b'/'song.wav', f0=600)
    tone(data/'b'/'tune.wav'); sf.write(data/'b'/'tune.flac', np.zeros(SR, np.float32) + 0.1, SR)
    assert features_cli(['--data', str(data), '--out', str(tmp_path/'c'), '--workers', '0', '--random-init']) == 0
    assert '4 extracted' in capsys.readouterr().out
    assert sorted(FeatureCache(tmp_path/'c').ids()) == ['a/song', 'b/song', 'b/tune.flac', 'b/tune.wav']


# --- defect 3: an interrupted extraction keeps its work ----------------------------------------------------

def test_killed_extraction_resumes_where_it_stopped(tmp_path):
    for i in range(8): tone(tmp_path/f's{i}.wav', f0=200 + 50 * i)
    (tmp_path/'bad.wav').write_text('not audio')
    script = f'''
import os
from pathlib import Path
from argparse import Namespace
from alcap.music import MusicnnEncoder, extract_features
enc = MusicnnEncoder(pretrained=False, seconds=2.0)
calls = [0]
forward = enc.forward
def dying(x):
    calls[0] += 1
    if calls[0] == 3: os._exit(9)   # killed while the third batch is encoded
    return forward(x)
enc.forward = dying
d = Path({str(tmp_path)!r})
songs = [Namespace(id=i, audio_path=str(d/f'{{i}}.wav')) for i in ['bad'] + [f's{{k}}' for k in range(8)]]
extract_features(songs, enc, d/'c', batch_size=2, num_workers=0, progress=False, commit_every_s=0)
'''
    r = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 9, r.stderr[-2000:]
    assert len(FeatureCache(tmp_path/'c')) == 3  # batches 1 (bad + s0) and 2 (s1, s2) were committed
    with open(tmp_path/'c'/'failures.csv') as f: assert [row['id'] for row in csv.DictReader(f)] == ['bad']
    songs = [Namespace(id=i, audio_path=str(tmp_path/f'{i}.wav')) for i in ['bad'] + [f's{k}' for k in range(8)]]
    r = extract_features(songs, small_encoder(), tmp_path/'c', batch_size=2, num_workers=0, progress=False)
    assert (r['skipped'], r['done'], r['failed']) == (3, 5, 1)


def test_all_nan_audio_is_a_failure_row_not_silence(tmp_path):
    class S:
        def __init__(self, id, audio_path): self.id, self.audio_path = id, audio_path
    sf.write(tmp_path/'nan.wav', np.full(SR, np.nan, np.float32), SR, subtype='FLOAT')
    r = extract_features([S('nan', tmp_path/'nan.wav')], small_encoder(), tmp_path/'c', num_workers=0, progress=False)
    assert r['failed'] == 1 and 'no finite sample' in r['failures'][0][2]
    assert 'nan' not in FeatureCache(tmp_path/'c')


# --- defect 4: best_metric ------------------------------------------------------------------------------

def test_best_metric_checked_before_training(tiny_data, tmp_path):
    with pytest.raises(ValueError, match='val_generate_n > 0'):
        train(tiny_config(tiny_data, tmp_path, best_metric='rougeL'), progress=False)
    assert not (tmp_path/'checkpoints'/'last.pt').exists()
    with pytest.raises(ValueError, match="best_metric='val_bleu'"):
        validate(tiny_config(tiny_data, tmp_path, best_metric='bleu').resolve())


@pytest.mark.parametrize('name', ['rougeL', 'val_rougeL'])
def test_best_metric_documented_names_train(tiny_data, tmp_path, name):
    s = train(tiny_config(tiny_data, tmp_path, best_metric=name, val_generate_n=2), progress=False)
    assert s['status'] == 'done' and s['best_metric'] == 'val_rougeL' and (tmp_path/'checkpoints'/'best.pt').exists()


# --- defect 5: one line, no traceback ------------------------------------------------------------------------

def test_train_bad_line_in_data_file(tiny_data, tmp_path, capsys):
    (tmp_path/'d').mkdir()
    lines = (tiny_data/'songs'/'metadata.jsonl').read_text().splitlines()
    (tmp_path/'d'/'metadata.jsonl').write_text('\n'.join([lines[0], '{"id": "x", "lyr', *lines[1:]]) + '\n')
    rc = train_cli(tiny_args(tiny_data, tmp_path/'run', data_dir=tmp_path/'d', method='bart', alpha=0))
    one_line_error(capsys, rc, 'alcap-train', 'metadata.jsonl:2', 'not valid JSON')


def test_train_song_without_split(tiny_data, tmp_path, capsys):
    songs = load_songs(tiny_data/'songs'); songs[3].split = None
    write_songs(songs, tmp_path/'d'/'metadata.jsonl')
    rc = train_cli(tiny_args(tiny_data, tmp_path/'run', data_dir=tmp_path/'d', method='bart', alpha=0))
    one_line_error(capsys, rc, 'alcap-train', "split ['None']")


def test_train_songs_without_features(tiny_data, tmp_path, capsys):
    FeatureCache.create(tmp_path/'f', 'musicnn-msd', {}, 12, 16).append(['demo_00000'], np.zeros((1, 12, 16)), [12])
    rc = train_cli(tiny_args(tiny_data, tmp_path/'run', features_dir=tmp_path/'f'))
    one_line_error(capsys, rc, 'alcap-train', 'no music features', str(tmp_path/'f'), 'alcap-features')


@pytest.mark.parametrize('arg, value, needle', [('lr', 'abc', "--lr 'abc': must be a number"),
                                                ('symmetric', 'ture', "--symmetric 'ture': must be true or false"),
                                                ('epochs', '1.5', "--epochs '1.5': must be an integer"),
                                                ('best_metric', 'bleu', "best_metric='val_bleu'")])
def test_train_bad_parameter_values_are_named(tiny_data, tmp_path, capsys, arg, value, needle):
    rc = train_cli(tiny_args(tiny_data, tmp_path/'run', **{arg: value}))
    one_line_error(capsys, rc, 'alcap-train', needle)
    assert not (tmp_path/'run').exists()


def test_papermill_string_for_a_boolean_is_refused(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="symmetric='ture': must be True or False"):
        validate(tiny_config(tiny_data, tmp_path, symmetric='ture').resolve())


def test_train_other_parameters_in_output_folder(tiny_data, tmp_path, capsys):
    assert train_cli(tiny_args(tiny_data, tmp_path/'run', max_steps=1)) is None
    capsys.readouterr()
    rc = train_cli(tiny_args(tiny_data, tmp_path/'run', lr=5e-4))
    one_line_error(capsys, rc, 'alcap-train', str(tmp_path/'run'), 'other parameters')


def test_train_truncated_checkpoint(tiny_data, tmp_path, capsys):
    assert train_cli(tiny_args(tiny_data, tmp_path/'run', max_steps=2)) is None
    last = tmp_path/'run'/'checkpoints'/'last.pt'
    last.write_bytes(last.read_bytes()[:1000])
    capsys.readouterr()
    rc = train_cli(tiny_args(tiny_data, tmp_path/'run', max_steps=4))
    one_line_error(capsys, rc, 'alcap-train', str(last), 'delete it to restart')


def test_debug_flag_shows_the_traceback(tiny_data, tmp_path):
    with pytest.raises(ValueError, match='--lr'):
        train_cli(tiny_args(tiny_data, tmp_path/'run', lr='abc') + ['--debug'])


def test_max_steps_is_an_absolute_step(tiny_data, tmp_path, capsys):
    runs = [train(tiny_config(tiny_data, tmp_path, max_steps=3), progress=False) for _ in range(3)]
    assert [r['step'] for r in runs] == [3, 3, 3]
    assert 'nothing to train' in runs[1]['note'] and 'max_steps is 3' in capsys.readouterr().err
    assert len(pd.read_csv(tmp_path/'log_steps.csv')) == 3


def test_rerunning_a_finished_run_keeps_its_results(tiny_data, tmp_path):
    first = train(tiny_config(tiny_data, tmp_path), progress=False)
    captions = (tmp_path/'captions_test.csv').stat().st_mtime_ns
    again = train(tiny_config(tiny_data, tmp_path), progress=False)
    assert again['status'] == 'done' and 'finished run' in again['note'] and again['step'] == first['step']
    assert (tmp_path/'captions_test.csv').stat().st_mtime_ns == captions


def make_run(root, rows, header='id,lyrics,reference,prediction'):
    root.mkdir(parents=True, exist_ok=True)
    cfg = dict(dataset='demo', method='alcap', alpha=0.02, seed=0, text_init='random', music_encoder='musicnn-msd',
               hardware='test', command='test')
    (root/'config.json').write_text(json.dumps(cfg))
    (root/'captions_test.csv').write_text(header + '\n' + ''.join(r + '\n' for r in rows))
    return root


def test_eval_missing_captions_file(tmp_path, capsys):
    run = make_run(tmp_path/'r', ['a,la,x,y']); (run/'captions_test.csv').unlink()
    rc = eval_cli([str(run), '--out', str(tmp_path/'o'), '--no-retrieval'])
    one_line_error(capsys, rc, 'alcap-eval', 'captions_test.csv: missing')


@pytest.mark.parametrize('rows, needle', [(['a,la,x,y', 'b,la,x'], "row 3 has 3 fields, no 'prediction'"),
                                          (['a,la,x,y,z'], 'row 2 has 5 fields'),
                                          (['"a,la,x,y'], 'row 2 has 1 fields')])
def test_eval_malformed_captions_rows_are_named(tmp_path, capsys, rows, needle):
    run = make_run(tmp_path/'r', rows)
    one_line_error(capsys, eval_cli([str(run), '--out', str(tmp_path/'o'), '--no-retrieval']), 'alcap-eval',
                   str(run/'captions_test.csv'), needle)


def test_eval_binary_captions_file(tmp_path, capsys):
    run = make_run(tmp_path/'r', []); (run/'captions_test.csv').write_bytes(b'\xff\xfe\x00garbage\x89')
    rc = eval_cli([str(run), '--out', str(tmp_path/'o'), '--no-retrieval'])
    one_line_error(capsys, rc, 'alcap-eval', 'captions_test.csv')


def test_eval_empty_prediction_is_a_caption(tmp_path, capsys):
    run = make_run(tmp_path/'r', ['a,la la,a song about rain,', 'b,lo,a song about sun,a song about sun'])
    assert eval_cli([str(run), '--out', str(tmp_path/'o'), '--no-retrieval']) is None
    assert '2 items' in capsys.readouterr().out


def test_eval_without_runs_keeps_tables_of_ours(tmp_path, capsys):
    run = make_run(tmp_path/'r', ['a,la la,a song about rain,a song about rain'])
    eval_cli([str(run), '--out', str(tmp_path/'o'), '--no-retrieval'])
    before = tree_digest(tmp_path/'o'); capsys.readouterr()
    one_line_error(capsys, eval_cli(['--out', str(tmp_path/'o')]), 'alcap-eval', 'table1.csv holds scores of runs')
    assert tree_digest(tmp_path/'o') == before
    assert eval_cli(['--out', str(tmp_path/'fresh')]) is None  # no tables of ours there: placeholder tables written


def test_features_cli_missing_folder(tmp_path, capsys):
    rc = features_cli(['--data', str(tmp_path/'nope'), '--out', str(tmp_path/'c')])
    one_line_error(capsys, rc, 'alcap-features', 'nope')


def test_features_cli_two_files_one_id(tmp_path, capsys):
    (tmp_path/'d').mkdir()
    tone(tmp_path/'d'/'a.wav'); tone(tmp_path/'d'/'b.wav')
    write_songs([Song('x', 'la', audio_path=p) for p in ('a.wav', 'b.wav')], tmp_path/'d'/'metadata.jsonl')
    rc = features_cli(['--data', str(tmp_path/'d'), '--out', str(tmp_path/'c'), '--random-init', '--workers', '0'])
    one_line_error(capsys, rc, 'alcap-features', "song id 'x' names two audio files")


def test_tags_cli_not_audio(tmp_path, capsys):
    (tmp_path/'x.wav').write_text('lyrics, not audio')
    one_line_error(capsys, tags_cli([str(tmp_path/'x.wav')]), 'alcap-tags', 'x.wav')


def test_tags_cli_all_nan(tmp_path, capsys):
    sf.write(tmp_path/'nan.wav', np.full(SR, np.nan, np.float32), SR, subtype='FLOAT')
    one_line_error(capsys, tags_cli([str(tmp_path/'nan.wav')]), 'alcap-tags', 'nan.wav: no finite sample')


@needs_musicnn
def test_tags_cli_ten_samples(tmp_path, capsys):
    sf.write(tmp_path/'ten.wav', np.full(10, 0.2, np.float32), SR)
    assert tags_cli([str(tmp_path/'ten.wav'), '--top', '3']) == 0
    assert len(capsys.readouterr().out.split()) >= 3


def test_demo_data_cli_refuses_another_demo(tmp_path, capsys):
    make_demo(tmp_path/'d', n=6, seed=1, workers=1)
    before = tree_digest(tmp_path/'d')
    one_line_error(capsys, demo_data_cli(['--out', str(tmp_path/'d'), '--n', '6', '--workers', '1']), 'alcap-demo-data',
                   "'seed': 1", '--overwrite')
    assert tree_digest(tmp_path/'d') == before


def test_demo_refuses_to_regenerate_another_seed(tmp_path, capsys):
    from alcap.demo import main
    make_demo(tmp_path/'d', n=6, seed=1, workers=1)
    (tmp_path/'d'/'features'/'musicnn-msd').mkdir(parents=True)
    (tmp_path/'d'/'features'/'musicnn-msd'/'x').write_text('kept')
    before = tree_digest(tmp_path/'d')
    rc = main(['--data', str(tmp_path/'d'), '--n', '6', '--results', str(tmp_path/'r'), '--stages', 'data'])
    one_line_error(capsys, rc, 'alcap-demo', "'seed': 1", '--regenerate')
    assert tree_digest(tmp_path/'d') == before


def test_train_uses_a_demo_folder_made_with_another_seed_as_it_is(tmp_path):
    make_demo(tmp_path/'d', n=12, seed=1, workers=1)
    (tmp_path/'d'/'features').mkdir(); (tmp_path/'d'/'features'/'keep').write_text('kept')
    before = tree_digest(tmp_path/'d')
    cfg = TrainConfig(dataset='demo', data_dir=str(tmp_path/'d'), method='bart', alpha=0, max_steps=1, vocab_size=300,
                      output_dir=str(tmp_path/'run'))
    assert train(cfg, progress=False)['status'] == 'stopped'
    assert tree_digest(tmp_path/'d') == before
    assert json.loads((tmp_path/'run'/'config.json').read_text())['data_manifest']['seed'] == 1


# --- progress ------------------------------------------------------------------------------------------------

def test_training_and_captioning_show_progress_with_time_left(tiny_data, tmp_path, capsys):
    train(tiny_config(tiny_data, tmp_path), progress=True)
    err = capsys.readouterr().err
    assert 'epoch 1/1' in err and 'captions test' in err and '<' in err  # tqdm's "elapsed<remaining"


def test_demo_data_cli_shows_progress(tmp_path, capsys):
    assert demo_data_cli(['--out', str(tmp_path/'d'), '--n', '4', '--workers', '1']) is None
    assert 'demo songs' in capsys.readouterr().err


def test_papermill_training_progress_reaches_the_terminal(tiny_data, tmp_path):
    "alcap-demo's way of running the training notebook: its progress bars (with time left) arrive on our stderr."
    params = dict(dataset='jsonl', data_dir=str(tiny_data/'songs'), features_dir=str(tiny_data/'feats'), alpha=0.1,
                  model_size='tiny', text_init='random', vocab_size=300, batch_size=4, epochs=1, max_source_len=128,
                  max_target_len=64, num_beams=1, max_new_tokens=4, val_generate_n=0, output_dir=str(tmp_path/'run'))
    script = f'from alcap.runs import run_training_notebook; run_training_notebook({str(tmp_path/"run")!r}, {params!r})'
    r = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'epoch 1/1' in r.stderr and 'captions test' in r.stderr and '<' in r.stderr, r.stderr[-2000:]


def test_a_failed_papermill_training_is_one_line(tmp_path):
    from alcap.runs import run_training_notebook
    with pytest.raises(ValueError) as e:
        run_training_notebook(tmp_path/'run', dict(dataset='msd', output_dir=str(tmp_path/'run')))
    msg = str(e.value)
    assert "dataset='msd'" in msg and str(tmp_path/'run'/'train.ipynb') in msg and '\n' not in msg
