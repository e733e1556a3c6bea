"Tests of the trainer: parameter validation, resume equality, atomic checkpoints, 2-process DDP equality."
import json, os, signal, socket, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch

from alcap.data import make_demo
from alcap.music import FeatureCache
from alcap.train import TrainConfig, load_checkpoint, save_checkpoint, train, validate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    "30 demo songs and a feature cache of random 'musicnn-msd'-named features (12 x 16) for them."
    d = tmp_path_factory.mktemp('data')
    songs = make_demo(d/'songs', n=30, seed=3, workers=1)
    cache = FeatureCache.create(d/'feats', 'musicnn-msd', dict(test=True), 12, 16)
    rng = np.random.default_rng(0)
    cache.append([s.id for s in songs], rng.standard_normal((30, 12, 16)).astype(np.float16), [12 - i % 3 for i in range(30)])
    return d


def tiny_config(data, out, **kw):
    base = dict(dataset='jsonl', data_dir=str(data/'songs'), features_dir=str(data/'feats'), method='alcap', alpha=0.1,
                model_size='tiny', text_init='random', vocab_size=300, batch_size=4, epochs=2, lr=1e-3, max_source_len=128,
                max_target_len=64, num_beams=1, max_new_tokens=4, val_generate_n=0, save_every=2, output_dir=str(out))
    return TrainConfig(**{**base, **kw})


def final_weights(out):
    return torch.load(Path(out)/'checkpoints'/'last.pt', map_location='cpu', weights_only=True)['model']


# --- parameters ------------------------------------------------------------------------------------

def test_bad_parameters_are_named(tiny_data, tmp_path):
    c = lambda **kw: validate(tiny_config(tiny_data, tmp_path, **kw).resolve())
    with pytest.raises(ValueError, match="dataset='msd'"): c(dataset='msd')
    with pytest.raises(ValueError, match='alpha=-0.5'): c(alpha=-0.5)
    with pytest.raises(ValueError, match="alpha=0.1 with method='bart-fusion'"): c(method='bart-fusion')
    with pytest.raises(ValueError, match="features_dir='/nowhere'"): c(features_dir='/nowhere')
    with pytest.raises(ValueError, match="data_dir='/nowhere'"): c(data_dir='/nowhere')
    with pytest.raises(ValueError, match='batch_size=0'): c(batch_size=0)
    with pytest.raises(ValueError, match="music_encoder='cnnsa'"): c(music_encoder='cnnsa')  # the cache holds musicnn-msd features
    assert c().method == 'alcap'


def test_notebook_stops_on_bad_parameter(tmp_path):
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError, match="dataset='msd'"):
        pm.execute_notebook(str(ROOT/'nbs'/'03_train.ipynb'), str(tmp_path/'out.ipynb'), parameters=dict(dataset='msd'),
                            progress_bar=False, cwd=str(ROOT))


def test_resuming_a_run_with_other_parameters_is_refused(tiny_data, tmp_path):
    train(tiny_config(tiny_data, tmp_path, max_steps=1), progress=False)
    with pytest.raises(ValueError, match='other parameters'):
        train(tiny_config(tiny_data, tmp_path, lr=5e-4), progress=False)


# --- checkpoints and resume ----------------------------------------------------------------------------

def test_resume_is_bit_identical(tiny_data, tmp_path):
    whole = train(tiny_config(tiny_data, tmp_path/'whole'), progress=False)
    assert whole['status'] == 'done' and (tmp_path/'whole'/'captions_test.csv').exists()
    stopped = train(tiny_config(tiny_data, tmp_path/'split', max_steps=4), progress=False)   # mid-epoch 1 (6 steps per epoch)
    assert stopped == dict(status='stopped', step=4, epoch=0, output_dir=str(tmp_path/'split'))
    resumed = train(tiny_config(tiny_data, tmp_path/'split'), progress=False)
    assert resumed['step'] == whole['step'] == 12
    a, b = final_weights(tmp_path/'whole'), final_weights(tmp_path/'split')
    assert all(torch.equal(a[k], b[k]) for k in a)   # dropout is on: equality needs the RNG state restored too
    logs = [(tmp_path/r/'log_steps.csv').read_text().splitlines() for r in ('whole', 'split')]
    assert len(logs[0]) == len(logs[1]) == 13


def test_resume_after_kill(tiny_data, tmp_path):
    "A run killed with SIGKILL mid-training resumes from its last checkpoint and ends like an uninterrupted run."
    args = [f'--{k}={v}' for k, v in vars(tiny_config(tiny_data, tmp_path/'killed', epochs=3)).items() if v is not None]
    cmd = [sys.executable, '-c', 'from alcap.train import train_cli; train_cli()', '--quiet', *args]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, t0 = tmp_path/'killed'/'log_steps.csv', time.time()
    while time.time() - t0 < 120 and not (log.exists() and len(log.read_text().splitlines()) > 8): time.sleep(0.02)
    p.send_signal(signal.SIGKILL); p.wait()
    killed_at = len(log.read_text().splitlines()) - 1
    train(tiny_config(tiny_data, tmp_path/'killed', epochs=3), progress=False)
    train(tiny_config(tiny_data, tmp_path/'ref', epochs=3), progress=False)
    a, b = final_weights(tmp_path/'ref'), final_weights(tmp_path/'killed')
    assert all(torch.equal(a[k], b[k]) for k in a), f'killed after step {killed_at}'


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    "A process killed while writing a checkpoint leaves the previous one loadable."
    script = f'''
import os, torch
from alcap.train import save_checkpoint
m = torch.nn.Linear(4, 4); o = torch.optim.AdamW(m.parameters()); s = torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0)
torch.nn.init.constant_(m.weight, 1.0)
save_checkpoint({str(tmp_path/'last.pt')!r}, m, o, s, dict(step=1))
torch.nn.init.constant_(m.weight, 2.0)
os.fsync = lambda fd: os._exit(9)   # die after the new bytes are written, before they are committed
save_checkpoint({str(tmp_path/'last.pt')!r}, m, o, s, dict(step=2))
'''
    r = subprocess.run([sys.executable, '-c', script])
    assert r.returncode == 9
    m = torch.nn.Linear(4, 4)
    assert load_checkpoint(tmp_path/'last.pt', m) == dict(step=1)
    assert torch.equal(m.weight, torch.ones(4, 4))


# --- several processes ----------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def test_two_processes_equal_one_with_double_batch(tiny_data, tmp_path):
    "DDP on 2 CPU processes (gloo), batch 4 each, ends where 1 process with batch 8 does (dropout off)."
    common = dict(dropout=0.0, epochs=2, save_every=100)
    train(tiny_config(tiny_data, tmp_path/'one', batch_size=8, **common), progress=False)
    args = [f'--{k}={v}' for k, v in vars(tiny_config(tiny_data, tmp_path/'two', batch_size=4, **common)).items() if v is not None]
    script = tmp_path/'run.py'; script.write_text('from alcap.train import train_cli; train_cli()\n')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={_free_port()}', str(script), '--quiet', *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = final_weights(tmp_path/'one'), final_weights(tmp_path/'two')
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 2e-5, worst   # the same math, summed in another order
    cfg = json.loads((tmp_path/'two'/'config.json').read_text())
    assert cfg['world_size'] == 2


def test_a_demo_folder_is_never_overwritten(tmp_path):
    make_demo(tmp_path/'demo', n=12, seed=0, workers=1)
    with pytest.raises(ValueError, match='demo_n=20: .* holds a demo of 12 songs'):
        train(TrainConfig(dataset='demo', data_dir=str(tmp_path/'demo'), demo_n=20, method='bart', alpha=0, output_dir=str(tmp_path/'run')), progress=False)
    assert len(list((tmp_path/'demo'/'audio').iterdir())) == 12


def test_benchmark_regimes_differ_in_shapes():
    from alcap.data import demo_song, get_tokenizer
    from alcap.train import benchmark_training
    songs = [demo_song(i, 0, audio=False)[0] for i in range(24)]
    tok = get_tokenizer('/nonexistent', texts=[t for s in songs for t in (s.lyrics, s.caption)], vocab_size=300)
    ref, ours = (benchmark_training(songs, tok, r, batch_size=4, steps=2, l_m=8, d_m=16) for r in ('reference', 'ours'))
    assert ref['distinct_shapes'] == 1 and ref['optimizer'] == 'adafactor' and ours['optimizer'] == 'adamw'
    assert ref['samples_per_s'] > 0 and ours['samples_per_s'] > 0
    with pytest.raises(ValueError, match="regime='fast'"): benchmark_training(songs, tok, 'fast')
