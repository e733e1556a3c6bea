"Tests of captioning new songs: the Captioner, alcap-caption for one song and for a batch, and bad input."
import csv, io, json, math, shutil, subprocess, sys, warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from alcap.caption import Captioner, CaptionError, LyricsTruncated, caption_cli, tiny_run
from alcap.core import run_command
from alcap.data import load_songs
from alcap.music import FeatureCache

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent/'shared'/'fixtures'
MP3S = [FIXTURES/'joram-moments_of_clarity-08-solipsism-59-88.mp3', FIXTURES/'TRWJAZW128F42760DD_test.mp3']
GEN = ['--generate', 'min_new_tokens=3']  # a barely trained model would otherwise often say nothing at all


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "Finished tiny runs (alcap, bart) on 10 demo songs; music: random-init musicnn, 3 s from the middle, zero-padded."
    d = tmp_path_factory.mktemp('caption')
    out = {method: tiny_run(d, method, n=10, seed=2, num_beams=1, max_new_tokens=8) for method in ('alcap', 'bart')}
    return dict(dir=d, songs=load_songs(d/'songs'), **out)


def cli(*argv, stdin=None, monkeypatch=None):
    "alcap-caption in-process: (exit status, stdout, stderr)."
    return run_command(caption_cli, argv, stdin)


def one_clear_line(rc, err, *names):
    lines = err.strip().splitlines()
    assert rc != 0 and len(lines) == 1 and lines[0].startswith('alcap-caption: '), err
    assert 'Traceback' not in err
    for n in names: assert str(n) in lines[0], (n, err)


def write_lyrics(path, text):
    Path(path).write_text(text, encoding='utf-8')
    return path


# --- what training did is what captioning does ---------------------------------------------------

def test_saved_model_records_its_preparation(runs):
    cfg = json.loads((runs['alcap']/'model'/'config.json').read_text())
    assert cfg['music_encoder'] == 'musicnn-msd' and cfg['max_source_len'] == 48
    p = cfg['music_preprocessing']
    assert (p['seconds'], p['policy'], p['pad'], p['pretrained'], p['l_m']) == (3.0, 'middle', 'zero', False, 23)
    bart = json.loads((runs['bart']/'model'/'config.json').read_text())
    assert bart['music_encoder'] is None and bart['max_source_len'] == 48


def test_training_songs_get_their_training_features(runs):
    cap, cache = Captioner.from_pretrained(runs['alcap']), FeatureCache(runs['dir']/'feats')
    for s in runs['songs'][:3]:
        h, n = cap.music_features(s.audio_path)
        np.testing.assert_allclose(h, cache[s.id].astype(np.float32), atol=1e-3)
        assert n == cache.length(s.id)


def test_models_saved_before_the_settings_were_recorded_are_read_through_their_run(runs, tmp_path):
    shutil.copytree(runs['alcap'], tmp_path/'old')
    cfg_path = tmp_path/'old'/'model'/'config.json'
    cfg = json.loads(cfg_path.read_text())
    for k in ('music_encoder', 'music_preprocessing', 'max_source_len'): cfg.pop(k)
    cfg_path.write_text(json.dumps(cfg))
    cap = Captioner.from_pretrained(tmp_path/'old')  # the run's parameters name the feature cache
    assert (cap.encoder.seconds, cap.preprocessing['policy'], cap.max_source_len) == (3.0, 'middle', 48)


# --- one song --------------------------------------------------------------------------------------

def test_cli_single_song_prints_the_caption(runs, tmp_path):
    s = runs['songs'][0]
    lyr = write_lyrics(tmp_path/'l.txt', s.lyrics)
    rc, out, err = cli('--model', runs['alcap'], '--audio', s.audio_path, '--lyrics', lyr, *GEN)
    assert rc == 0 and 'Traceback' not in err
    expected = Captioner.from_pretrained(runs['alcap'], min_new_tokens=3).caption(s.audio_path, s.lyrics)
    assert out.strip() == expected and expected
    rc2, out2, _ = cli('--model', runs['alcap']/'model', '--audio', s.audio_path, '--lyrics', tmp_path/'l.txt', *GEN)
    assert (rc2, out2) == (0, out)  # the model/ folder works as well as the run folder


def test_cli_reads_lyrics_from_stdin(runs, tmp_path):
    s = runs['songs'][1]
    lyr = write_lyrics(tmp_path/'l.txt', s.lyrics)
    from_file = cli('--model', runs['alcap'], '--audio', s.audio_path, '--lyrics', lyr, *GEN)
    from_stdin = cli('--model', runs['alcap'], '--audio', s.audio_path, '--lyrics', '-', *GEN, stdin=s.lyrics + '\n')
    assert from_stdin[0] == 0 and from_stdin[1] == from_file[1] and from_stdin[1].strip()


def test_lyrics_only_bart_needs_no_audio(runs, tmp_path):
    s = runs['songs'][2]
    rc, out, err = cli('--model', runs['bart'], '--lyrics', write_lyrics(tmp_path/'l.txt', s.lyrics), *GEN)
    assert rc == 0 and out.strip() == Captioner.from_pretrained(runs['bart'], min_new_tokens=3).caption(lyrics=s.lyrics)


def test_long_lyrics_are_cut_with_a_warning(runs, tmp_path):
    s = runs['songs'][0]
    cap = Captioner.from_pretrained(runs['alcap'])
    long_lyrics = ' '.join(['la'] * 500)
    with pytest.warns(LyricsTruncated, match="cut to the model's limit of 48"):
        ids = cap._lyrics_ids(long_lyrics, 'x')
    assert len(ids) == 48
    rc, out, err = cli('--model', runs['alcap'], '--audio', s.audio_path, '--lyrics', '-', stdin=long_lyrics)
    assert rc == 0 and "warning: lyrics:" in err and "cut to the model's limit of 48" in err
    with warnings.catch_warnings():
        warnings.simplefilter('error', LyricsTruncated)
        cap._lyrics_ids('la la la', 'short')  # short lyrics: no warning


# --- any audio ------------------------------------------------------------------------------------

def test_any_length_and_format(runs, tmp_path):
    cap = Captioner.from_pretrained(runs['alcap'])
    sf.write(tmp_path/'tiny.wav', np.random.default_rng(0).uniform(-0.5, 0.5, 10), 22050)  # 10 samples
    t = np.arange(44100) / 44100
    sf.write(tmp_path/'one_second.wav', np.stack([np.sin(2 * np.pi * 440 * t)] * 2, 1) * 0.3, 44100)  # stereo, 44.1 kHz
    long = np.sin(2 * np.pi * 220 * np.arange(40 * 16000) / 16000) * 0.3
    long[20 * 16000:] *= 0.1  # a quieter second half: the excerpt must come from the middle
    sf.write(tmp_path/'long.flac', long, 16000)
    sf.write(tmp_path/'two_seconds.ogg', long[:32000], 16000)
    h_tiny, n_tiny = cap.music_features(tmp_path/'tiny.wav')
    h_sec, n_sec = cap.music_features(tmp_path/'one_second.wav')
    h_long, n_long = cap.music_features(tmp_path/'long.flac')
    assert cap.music_features(tmp_path/'two_seconds.ogg')[0].shape == (23, 753)
    assert h_tiny.shape == h_sec.shape == h_long.shape == (23, 753) and np.isfinite(h_long).all()
    assert (n_tiny, n_sec, n_long) == (1, math.ceil(23 / 3), 23)  # zero-padded clips: only their real frames count
    mid, _ = cap._clip(tmp_path/'long.flac')
    np.testing.assert_allclose(mid, long[(len(long) - 48000) // 2:][:48000], atol=1e-3)
    assert cap.caption(tmp_path/'tiny.wav', 'la la la') is not None


@pytest.mark.skipif(not MP3S[0].exists(), reason='../shared/fixtures not present')
def test_real_mp3s(runs, tmp_path):
    rows = [dict(id=p.stem, audio=str(p), lyrics='I hear the city lights at night') for p in MP3S]
    with open(tmp_path/'songs.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, ['id', 'audio', 'lyrics']); w.writeheader(); w.writerows(rows)
    rc, _, err = cli('--model', runs['alcap'], '--batch', tmp_path/'songs.csv', '--out', tmp_path/'c.jsonl', *GEN)
    assert rc == 0, err
    assert 'captioning: 100%' in err and '2/2' in err  # the progress bar
    assert [json.loads(l)['id'] for l in (tmp_path/'c.jsonl').read_text().splitlines()] == [p.stem for p in MP3S]


# --- many songs -----------------------------------------------------------------------------------

def song_table(runs, path, n=5, broken=None):
    "A CSV of n songs (audio relative to the CSV, lyrics as text or files); `broken`: an id whose audio is garbage."
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, s in enumerate(runs['songs'][:n]):
        audio = Path(s.audio_path)
        if s.id == broken: (path.parent/'broken.mp3').write_bytes(b'not audio at all' * 100)
        else: shutil.copy(audio, path.parent/audio.name)
        if s.id == broken: audio = path.parent/'broken.mp3'
        lyr = write_lyrics(path.parent/f'{s.id}.txt', s.lyrics).name if k % 2 else ''
        rows.append(dict(id=s.id, audio_path=audio.name, lyrics='' if k % 2 else s.lyrics, lyrics_path=lyr))
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, ['id', 'audio_path', 'lyrics', 'lyrics_path']); w.writeheader(); w.writerows(rows)
    return path


def test_batch_appends_and_a_restart_skips_finished_songs(runs, tmp_path):
    table, out = song_table(runs, tmp_path/'in'/'songs.csv'), tmp_path/'out'/'captions.jsonl'
    run = lambda: cli('--model', runs['alcap'], '--batch', table, '--out', out, '--batch-size', 2, '--quiet', *GEN)
    rc, _, err = run()
    first = [json.loads(l) for l in out.read_text().splitlines()]
    assert rc == 0 and [r['id'] for r in first] == [s.id for s in runs['songs'][:5]]
    assert all(r['caption'] for r in first)
    cap = Captioner.from_pretrained(runs['alcap'], min_new_tokens=3)
    s = runs['songs'][3]
    assert first[3]['caption'] == cap.caption(s.audio_path, s.lyrics)  # a batch captions as one song does
    # as if killed while writing the fourth line: two captions missing, one torn
    out.write_text(''.join(json.dumps(r) + '\n' for r in first[:3]) + '{"id": "demo_0', encoding='utf-8')
    rc, _, err = run()
    assert rc == 0 and '2 captioned, 3 already done, 0 failed' in err
    assert [json.loads(l) for l in out.read_text().splitlines()] == first
    rc, _, err = run()
    assert rc == 0 and '0 captioned, 5 already done' in err and len(out.read_text().splitlines()) == 5


def test_batch_reports_a_bad_song_and_goes_on(runs, tmp_path):
    bad = runs['songs'][1].id
    table, out = song_table(runs, tmp_path/'in'/'songs.csv', n=4, broken=bad), tmp_path/'captions.jsonl'
    rc, _, err = cli('--model', runs['alcap'], '--batch', table, '--out', out, '--quiet', '--workers', 1, *GEN)
    assert rc == 1 and f'song {bad}:' in err and 'broken.mp3' in err and '3 captioned, 0 already done, 1 failed' in err
    assert bad not in [json.loads(l)['id'] for l in out.read_text().splitlines()]
    assert 'Traceback' not in err


def test_batch_output_of_another_model_is_not_mixed(runs, tmp_path):
    table, out = song_table(runs, tmp_path/'songs.csv', n=2), tmp_path/'captions.jsonl'
    assert cli('--model', runs['alcap'], '--batch', table, '--out', out, '--quiet')[0] == 0
    before = out.read_text()
    rc, _, err = cli('--model', runs['bart'], '--batch', table, '--out', out, '--quiet')
    one_clear_line(rc, err, out, 'another model')
    assert out.read_text() == before


# --- imported features ----------------------------------------------------------------------------

def test_model_on_imported_features_says_so_and_takes_h_m(runs, tmp_path):
    shutil.copytree(runs['alcap']/'model', tmp_path/'model')
    cfg_path = tmp_path/'model'/'config.json'
    cfg = json.loads(cfg_path.read_text())
    imported = dict(pretrained=True, checkpoint=None, seconds=15.0, l_m=23, d_m=753)  # no CNNSA weights recorded
    cfg.update(music_encoder='cnnsa', music_preprocessing=imported)
    cfg_path.write_text(json.dumps(cfg))
    s = runs['songs'][0]
    lyr = write_lyrics(tmp_path/'l.txt', s.lyrics)
    rc, _, err = cli('--model', tmp_path/'model', '--audio', s.audio_path, '--lyrics', lyr)
    one_clear_line(rc, err, 'imported', 'cnnsa', '--features')
    np.save(tmp_path/'h_m.npy', FeatureCache(runs['dir']/'feats')[s.id])
    np.savez(tmp_path/'h_m.npz', a=FeatureCache(runs['dir']/'feats')[s.id][None])  # the authors' layout: key a
    rc1, out1, err1 = cli('--model', tmp_path/'model', '--features', tmp_path/'h_m.npy', '--lyrics', lyr, *GEN)
    rc2, out2, _ = cli('--model', tmp_path/'model', '--features', tmp_path/'h_m.npz', '--lyrics', lyr, *GEN)
    assert rc1 == rc2 == 0 and out1 == out2 and out1.strip(), err1
    assert 'cannot compute h_m from audio' in repr(Captioner.from_pretrained(tmp_path/'model'))


def test_cnnsa_checkpoint_not_at_hand_is_named(runs, tmp_path):
    shutil.copytree(runs['alcap']/'model', tmp_path/'model')
    cfg_path = tmp_path/'model'/'config.json'
    cfg = json.loads(cfg_path.read_text())
    gone = dict(pretrained=True, checkpoint='/gone/model_cnnsa.pth', seconds=15.0)
    cfg.update(music_encoder='cnnsa', music_preprocessing=gone)
    cfg_path.write_text(json.dumps(cfg))
    s = runs['songs'][0]
    lyr = write_lyrics(tmp_path/'l.txt', 'la')
    rc, _, err = cli('--model', tmp_path/'model', '--audio', s.audio_path, '--lyrics', lyr)
    one_clear_line(rc, err, '/gone/model_cnnsa.pth', '--music-checkpoint')


# --- bad input: one clear line, non-zero exit, no traceback ---------------------------------------

def test_bad_inputs_get_one_clear_line(runs, tmp_path):
    s, m, t = runs['songs'][0], runs['alcap'], tmp_path
    lyr = write_lyrics(tmp_path/'l.txt', s.lyrics)
    (tmp_path/'garbage.mp3').write_bytes(b'\x00\x01not audio' * 50)
    write_lyrics(tmp_path/'empty.txt', '  \n\n')
    (tmp_path/'unfinished'/'checkpoints').mkdir(parents=True)
    (tmp_path/'cols.csv').write_text('name,file\nx,y.mp3\n')
    (tmp_path/'dup.csv').write_text(f'id,audio,lyrics\na,{s.audio_path},la\na,{s.audio_path},la\n')
    cases = [
        (('--model', t/'nowhere', '--audio', s.audio_path, '--lyrics', lyr), [t/'nowhere', 'no such folder']),
        (('--model', tmp_path/'unfinished', '--audio', s.audio_path, '--lyrics', lyr), ['unfinished', 'not finished']),
        (('--model', m, '--audio', t/'missing.mp3', '--lyrics', lyr), [t/'missing.mp3', 'no such audio file']),
        (('--model', m, '--audio', tmp_path/'garbage.mp3', '--lyrics', lyr), [tmp_path/'garbage.mp3', 'cannot decode']),
        (('--model', m, '--audio', s.audio_path, '--lyrics', tmp_path/'empty.txt'), [tmp_path/'empty.txt', 'empty']),
        (('--model', m, '--audio', s.audio_path, '--lyrics', tmp_path/'nolyrics.txt'), [tmp_path/'nolyrics.txt']),
        (('--model', m, '--lyrics', lyr), ['--audio is required']),
        (('--model', m, '--batch', tmp_path/'cols.csv', '--out', tmp_path/'o.jsonl'), [tmp_path/'cols.csv', 'id']),
        (('--model', m, '--batch', t/'dup.csv', '--out', t/'o.jsonl'), [t/'dup.csv', "'a'", 'line 3']),
        (('--model', m, '--batch', t/'none.csv', '--out', t/'o.jsonl'), [t/'none.csv', 'no such file']),
        (('--model', m, '--batch', t/'dup.csv'), ['--out']),
        (('--model', m, '--audio', s.audio_path, '--lyrics', lyr, '--device', 'gpu'), ['--device gpu']),
    ]
    if not torch.cuda.is_available():
        argv = ('--model', m, '--audio', s.audio_path, '--lyrics', lyr, '--device', 'cuda')
        cases.append((argv, ['--device cuda', 'no CUDA']))
    for argv, names in cases:
        rc, out, err = cli(*argv)
        one_clear_line(rc, err, *names)
        assert out == ''
    rc, _, err = cli('--model', m, '--audio', s.audio_path, '--lyrics', '-', stdin='   \n')
    one_clear_line(rc, err, 'standard input', 'empty')
    with pytest.raises(CaptionError, match='empty lyrics'): Captioner.from_pretrained(m).caption(s.audio_path, '')


def test_console_process_exits_non_zero_without_traceback(tmp_path):
    code = 'import sys; from alcap.caption import caption_cli; sys.exit(caption_cli())'
    r = subprocess.run([sys.executable, '-c', code, '--model', str(tmp_path/'nowhere'), '--lyrics', '-'], input='la',
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f'alcap-caption: --model {tmp_path/"nowhere"}: no such folder'  # one line, no traceback


@pytest.mark.gpu
def test_gpu_captions_match_the_cpu(runs, tmp_path):
    "On a GPU, the captioner runs there (bf16 autocast as training) and in fp32 gives the CPU's captions."
    assert torch.cuda.is_available()
    s = runs['songs'][:4]
    songs = [dict(id=x.id, audio=x.audio_path, lyrics=x.lyrics) for x in s]
    gpu = Captioner.from_pretrained(runs['alcap'], min_new_tokens=3)
    assert gpu.device.type == 'cuda' and next(gpu.model.parameters()).is_cuda
    assert all(gpu.caption_batch(songs))  # bf16
    cpu = Captioner.from_pretrained(runs['alcap'], device='cpu', min_new_tokens=3)
    fp32 = Captioner.from_pretrained(runs['alcap'], precision='fp32', min_new_tokens=3)
    h_cpu, n_cpu = cpu.music_features(s[0].audio_path)
    h_gpu, n_gpu = fp32.music_features(s[0].audio_path)
    assert n_cpu == n_gpu and np.abs(h_cpu - h_gpu).max() < 1e-2  # cuDNN convolutions may use TF32
    given = [dict(x, h_m=cpu.music_features(x['audio'])[0]) for x in songs]
    assert fp32.caption_batch(given) == cpu.caption_batch(given)


def test_captioner_decodes_without_cudnn_attention(runs, sdpa_cudnn_flags):
    "cuDNN builds a plan per new key length: every attention call while captioning runs with it switched off."
    s = runs['songs'][3]
    assert Captioner.from_pretrained(runs['alcap'], min_new_tokens=3).caption(s.audio_path, s.lyrics)
    assert sdpa_cudnn_flags and not any(sdpa_cudnn_flags)
    assert torch.backends.cuda.cudnn_sdp_enabled()   # put back after
