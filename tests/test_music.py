"""Tests of alcap.music: audio loading, musicnn from TF checkpoints, CNNSA, the feature cache and its CLI."""
import csv, importlib.util, json, os, shutil, warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from alcap import music
from alcap.music import (SR, AudioError, FeatureCache, excerpt, extract_features, features_cli, get_encoder, load_audio,
                         load_cnnsa, read_tf_checkpoint, tag_file, tags_cli)

FIXTURES = Path(__file__).resolve().parents[1].parent / 'shared' / 'fixtures'
MTT_CLIP = FIXTURES / 'joram-moments_of_clarity-08-solipsism-59-88.mp3'
PUBLISHED_MTT_TOP10 = ['techno', 'electronic', 'synth', 'fast', 'beat', 'drums', 'no vocals', 'no vocal', 'dance', 'ambient']
needs_musicnn = pytest.mark.skipif(importlib.util.find_spec('musicnn') is None, reason='musicnn==0.1.0 wheel not installed')
needs_fixtures = pytest.mark.skipif(not MTT_CLIP.exists(), reason='../shared/fixtures not present')


def tone(path, seconds=4.0, sr=SR, f0=440.0, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    y = 0.3 * np.sin(2 * np.pi * f0 * t)
    sf.write(path, np.stack([y] * channels, 1) if channels > 1 else y, sr)
    return path


@pytest.fixture(scope='module')
def msd_encoder():
    return get_encoder('musicnn-msd')


# ---------------------------------------------------------------- audio and bad input
def test_stereo_8k_becomes_mono_16k(tmp_path):
    y = load_audio(tone(tmp_path / 's.wav', seconds=2, sr=8000, channels=2))
    assert y.dtype == np.float32 and y.shape == (2 * SR,)
    # a 440 Hz tone survives resampling: its spectrum peaks at 440 Hz
    spec = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spec) * SR / len(y) - 440) < 2


@pytest.mark.parametrize('name,content', [('lyrics.wav', b'not audio at all, just lyrics\n' * 20),
                                          ('broken.mp3', b'ID3\x03\x00\x00\x00\x00\x00\x00' + bytes(range(256)) * 40),
                                          ('empty.flac', b'')])
def test_unreadable_files_raise_naming_the_file(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(AudioError, match=name):
        load_audio(tmp_path / name)


def test_zero_length_wav(tmp_path):
    sf.write(tmp_path / 'zero.wav', np.zeros(0, np.float32), SR)
    assert (tmp_path / 'zero.wav').stat().st_size > 0  # a valid header, no samples
    with pytest.raises(AudioError, match='zero.wav'):
        load_audio(tmp_path / 'zero.wav')


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match='nope.wav'):
        load_audio(tmp_path / 'nope.wav')


def test_nan_samples_are_repaired_with_a_warning(tmp_path, msd_encoder):
    y = 0.5 * np.sin(np.arange(3 * SR) / 10).astype(np.float32)
    y[100:200] = np.nan; y[300] = np.inf; y[400] = 3.0  # damaged and over full scale
    sf.write(tmp_path / 'nan.wav', y, SR, subtype='FLOAT')
    with pytest.warns(UserWarning, match='nan.wav'):
        z = load_audio(tmp_path / 'nan.wav')
    assert np.isfinite(z).all() and np.abs(z).max() <= 1 and z[150] == 0
    h = msd_encoder(torch.from_numpy(excerpt(z)[0])[None])
    assert torch.isfinite(h).all()


def test_two_second_clip_is_repeat_padded(tmp_path, msd_encoder):
    y = load_audio(tone(tmp_path / 'short.wav', seconds=2))
    clip, n_real = excerpt(y)
    assert clip.shape == (15 * SR,) and n_real == 15 * SR
    np.testing.assert_array_equal(clip[2 * SR:4 * SR], y)
    clip0, n0 = excerpt(y, pad='zero')
    assert n0 == 2 * SR and not clip0[2 * SR:].any()
    assert msd_encoder(torch.from_numpy(clip)[None]).shape == (1, 117, 753)


def test_excerpt_policies():
    y = np.arange(20 * SR, dtype=np.float32)
    assert excerpt(y)[0][0] == 0
    assert excerpt(y, policy='middle')[0][0] == 2.5 * SR
    with pytest.raises(ValueError, match='policy'):
        excerpt(y, policy='end')


def test_silence_gives_finite_features(msd_encoder):
    cnnsa = get_encoder('cnnsa', pretrained=False)
    x = torch.zeros(1, 15 * SR)
    assert torch.isfinite(msd_encoder(x)).all() and torch.isfinite(cnnsa(x)).all()


# ---------------------------------------------------------------- musicnn from the TF checkpoint
@needs_musicnn
def test_tf_checkpoint_reader_shapes_and_crc(tmp_path):
    w = read_tf_checkpoint(music.musicnn_checkpoint('MSD_musicnn'))
    assert w['conv2d/kernel'].shape == (7, 38, 1, 204) and w['conv2d_2/kernel'].shape == (128, 1, 1, 51)
    assert w['dense/kernel'].shape == (1506, 200) and w['dense_1/kernel'].shape == (200, 50)
    assert not any('Adam' in k for k in w) and len(w) == 11 * 4 + 10 * 2
    assert np.all(w['batch_normalization_9/moving_variance'] > 0)
    # a flipped byte inside a weight is caught by its CRC32C
    src = Path(music.musicnn_checkpoint('MSD_musicnn'))
    for f in ('.index', '.data-00000-of-00001'):
        shutil.copy(src / f, tmp_path / f)
    data = bytearray((tmp_path / '.data-00000-of-00001').read_bytes())
    data[1_000_000] ^= 0xFF
    (tmp_path / '.data-00000-of-00001').write_bytes(bytes(data))
    with pytest.raises(ValueError, match='CRC32C'):
        read_tf_checkpoint(str(tmp_path) + '/')


@needs_musicnn
def test_conversion_is_cached_as_safetensors(tmp_path, monkeypatch):
    monkeypatch.setenv('ALCAP_CACHE', str(tmp_path))
    a = music.load_musicnn('MTT_musicnn')
    st = tmp_path / 'musicnn' / 'MTT_musicnn.safetensors'
    assert st.exists() and not [p for p in st.parent.iterdir() if p.name.endswith('.tmp')]
    b = music.load_musicnn('MTT_musicnn')  # now read from the cache
    torch.testing.assert_close(a.state_dict(), b.state_dict())
    w = read_tf_checkpoint(music.musicnn_checkpoint('MTT_musicnn'))
    np.testing.assert_array_equal(b.out.weight.detach().numpy(), w['dense_1/kernel'].T)


@needs_musicnn
@needs_fixtures
def test_mtt_musicnn_reproduces_published_top10():
    probs = tag_file(MTT_CLIP, 'MTT_musicnn')
    assert list(probs)[:10] == PUBLISHED_MTT_TOP10


@needs_musicnn
@needs_fixtures
def test_tags_cli(capsys):
    assert tags_cli([str(MTT_CLIP), '--model', 'MTT_musicnn', '--top', '3']) == 0
    assert capsys.readouterr().out.split('\n')[:3] == PUBLISHED_MTT_TOP10[:3]


def test_tags_cli_bad_file(tmp_path, capsys):
    (tmp_path / 'x.wav').write_text('text')
    assert tags_cli([str(tmp_path / 'x.wav')]) == 2  # bad input: one line, exit status 2 (alcap.data.user_errors)
    assert 'x.wav' in capsys.readouterr().err


@needs_musicnn
def test_musicnn_is_fully_convolutional_in_time(msd_encoder):
    # frame features of a 6 s clip, away from the borders, equal those of its two 3 s halves' interiors
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 6 * SR, generator=g) - 0.5) * 0.2
    out = msd_encoder.net(music.musicnn_logmel(x))['frames']
    assert out.shape[:2] == (1, 1 + 6 * SR // 256)
    out_half = msd_encoder.net(music.musicnn_logmel(x[:, :3 * SR]))['frames']
    torch.testing.assert_close(out[0, 40:60], out_half[0, 40:60], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- CNNSA and its checkpoint
def cnnsa_reference_state_dict(seed=0):
    """A state dict with the key names and shapes of the authors' model_cnnsa.pth, written out independently."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05
    sd = {}
    def bn(p, c):
        sd.update({f'{p}.weight': 1 + r(c), f'{p}.bias': r(c), f'{p}.running_mean': r(c), f'{p}.running_var': 1 + r(c).abs(),
                   f'{p}.num_batches_tracked': torch.tensor(100)})
    bn('spec_bn', 1)
    chans = [(1, 128), (128, 128), (128, 256)] + [(256, 256)] * 4
    for i, (a, b) in enumerate(chans, 1):
        for j, cin in ((1, a), (2, b), (3, a)):
            sd[f'layer{i}.conv_{j}.weight'], sd[f'layer{i}.conv_{j}.bias'] = r(b, cin, 3, 3), r(b)
            bn(f'layer{i}.bn_{j}', b)
    for l in range(2):
        p = f'encoder.layer.{l}'
        for n in ('query', 'key', 'value'):
            sd[f'{p}.attention.self.{n}.weight'], sd[f'{p}.attention.self.{n}.bias'] = r(256, 256), r(256)
        sd[f'{p}.attention.output.dense.weight'], sd[f'{p}.attention.output.dense.bias'] = r(256, 256), r(256)
        sd[f'{p}.intermediate.dense.weight'], sd[f'{p}.intermediate.dense.bias'] = r(1024, 256), r(1024)
        sd[f'{p}.output.dense.weight'], sd[f'{p}.output.dense.bias'] = r(256, 1024), r(256)
        for ln in ('attention.output.LayerNorm', 'output.LayerNorm'):
            sd[f'{p}.{ln}.weight'], sd[f'{p}.{ln}.bias'] = 1 + r(256), r(256)
    sd['pooler.dense.weight'], sd['pooler.dense.bias'] = r(256, 256), r(256)
    sd['dense.weight'], sd['dense.bias'] = r(50, 256), r(50)
    sd['spec.mel_scale.fb'] = torch.empty(0)  # the old torchaudio quirk: an empty, lazily filled filter bank
    sd['spec.spectrogram.window'] = torch.hann_window(512)
    return sd


def test_cnnsa_loads_reference_state_dict(tmp_path):
    sd = cnnsa_reference_state_dict()
    torch.save({f'module.{k}': v for k, v in sd.items()}, tmp_path / 'model_cnnsa.pth')  # DataParallel-style keys
    model = load_cnnsa(tmp_path / 'model_cnnsa.pth')
    torch.testing.assert_close(model.layer4.conv_2.weight, sd['layer4.conv_2.weight'])
    torch.testing.assert_close(model.encoder.layer[1].attention.self.value.bias, sd['encoder.layer.1.attention.self.value.bias'])
    assert model.spec.mel_scale.fb.shape == (257, 128)  # rebuilt, not the empty checkpoint buffer
    x = (torch.rand(2, 15 * SR, generator=torch.Generator().manual_seed(1)) - 0.5) * 0.2
    with torch.no_grad():
        h1, h2 = model(x), load_cnnsa(tmp_path / 'model_cnnsa.pth')(x)
        tags = model.tags(x)
    assert h1.shape == (2, 119, 256) and tags.shape == (2, 50)
    torch.testing.assert_close(h1, h2, rtol=0, atol=0)  # deterministic in eval mode
    with torch.no_grad():
        assert not torch.allclose(h1, load_cnnsa(None)(x))  # the checkpoint's weights are used
    enc = get_encoder('cnnsa', checkpoint=tmp_path / 'model_cnnsa.pth')
    assert (enc.l_m, enc.d_m) == (119, 256) and enc.config['pretrained']


def test_cnnsa_rejects_wrong_state_dicts(tmp_path):
    sd = cnnsa_reference_state_dict()
    del sd['layer7.bn_3.running_var']
    torch.save(sd, tmp_path / 'partial.pth')
    with pytest.raises(ValueError, match='partial.pth'):
        load_cnnsa(tmp_path / 'partial.pth')
    torch.save({'w': FeatureCache}, tmp_path / 'code.pth')  # a pickle that names code: refused by weights_only
    with pytest.raises(ValueError, match='code.pth'):
        load_cnnsa(tmp_path / 'code.pth')


# ---------------------------------------------------------------- feature cache and extraction
class S:
    def __init__(self, id, audio_path): self.id, self.audio_path = id, audio_path


def test_extract_features_resumes_and_records_failures(tmp_path, msd_encoder):
    songs = [S(f's{i}', tone(tmp_path / f's{i}.flac', seconds=3 + i, f0=200 + 100 * i)) for i in range(3)]
    (tmp_path / 'bad.mp3').write_bytes(b'\xff\xfb' + os.urandom(5000))
    songs.append(S('bad', tmp_path / 'bad.mp3'))
    songs.append(S('noaudio', None))
    out = tmp_path / 'cache'
    r = extract_features(songs, msd_encoder, out, batch_size=2, num_workers=2, progress=False)
    assert (r['done'], r['failed'], r['skipped']) == (3, 2, 0)
    with open(out / 'failures.csv') as f:
        rows = list(csv.DictReader(f))
    assert [x['id'] for x in rows] == ['bad', 'noaudio'] and 'bad.mp3' in rows[0]['error']
    cache = FeatureCache(out)
    assert (len(cache), cache.encoder_name, cache.l_m, cache.d_m) == (3, 'musicnn-msd', 117, 753)
    h = cache['s1']
    assert h.dtype == np.float16 and h.shape == (117, 753)
    expect = msd_encoder(torch.from_numpy(excerpt(load_audio(songs[1].audio_path))[0])[None])[0].numpy()
    np.testing.assert_allclose(h.astype(np.float32), expect, rtol=2e-3, atol=2e-3)
    assert not list(out.rglob('*.tmp'))
    manifest = json.loads((out / 'manifest.json').read_text())
    assert manifest['config']['model'] == 'MSD_musicnn' and manifest['config']['pretrained'] is True
    # rerun: the three done songs are skipped, the failures retried
    r2 = extract_features(songs, msd_encoder, out, num_workers=0, progress=False)
    assert (r2['done'], r2['skipped'], r2['failed']) == (0, 3, 2)
    assert len(list((out / 'shards').glob('*.npy'))) == 1
    with pytest.raises(KeyError, match='bad'):
        cache['bad']


def test_zero_padding_records_real_frames(tmp_path, msd_encoder):
    songs = [S('short', tone(tmp_path / 'short.wav', seconds=2))]
    extract_features(songs, msd_encoder, tmp_path / 'c', pad='zero', num_workers=0, progress=False)
    assert FeatureCache(tmp_path / 'c').length('short') == int(np.ceil(117 * 2 / 15))


def test_cache_refuses_another_encoder(tmp_path, msd_encoder):
    songs = [S('a', tone(tmp_path / 'a.wav', seconds=1))]
    extract_features(songs, msd_encoder, tmp_path / 'c', num_workers=0, progress=False)
    with pytest.raises(ValueError, match='another --out'):
        extract_features(songs, get_encoder('cnnsa', pretrained=False), tmp_path / 'c', num_workers=0, progress=False)


def test_cache_append_and_memory_map(tmp_path):
    c = FeatureCache.create(tmp_path / 'fc', 'toy', {'k': 1}, l_m=4, d_m=3)
    c.append(['a', 'b'], np.ones((2, 4, 3)), [4, 4])
    c.append(['c'], np.full((1, 4, 3), 2.0), [1])
    with pytest.raises(ValueError):
        c.append(['d'], np.ones((1, 5, 3)), [5])
    c2 = FeatureCache(tmp_path / 'fc')
    assert sorted(c2.ids()) == ['a', 'b', 'c'] and c2.length('c') == 1
    assert isinstance(c2._shard('00000'), np.memmap)
    np.testing.assert_array_equal(c2['c'], np.full((4, 3), 2, np.float16))
    with pytest.raises(FileNotFoundError, match='manifest'):
        FeatureCache(tmp_path)


def test_features_cli_exit_status(tmp_path):
    data = tmp_path / 'data'; data.mkdir()
    tone(data / 'good.wav', seconds=1)
    out = tmp_path / 'out'
    assert features_cli(['--data', str(data), '--out', str(out), '--workers', '0']) == 0
    (data / 'bad.wav').write_text('not audio')
    assert features_cli(['--data', str(data), '--out', str(out), '--workers', '0']) == 1
    assert 'good' in FeatureCache(out) and 'bad' not in FeatureCache(out)
    assert features_cli(['--data', str(data), '--encoder', 'cnnsa', '--out', str(tmp_path / 'o2')]) == 2  # no checkpoint
    assert features_cli(['--data', str(tmp_path / 'missing'), '--out', str(out)]) == 2
