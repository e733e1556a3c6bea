"Tests of the benchmark: its command line, its time budget, and that the fast path computes the loss the fp32 path does."
import json, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alcap.benchmarks import (SIZES, converge_both, precision_name, regime_losses, run_benchmarks, si_shaped_songs,
                              si_tokenizer)
from alcap.data import SongDataset

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    return subprocess.run([sys.executable, '-m', 'alcap.benchmarks', *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize('args, message', [(['--budget-s', '0'], '--budget-s must be positive'),
                                           (['--size', 'full'], '--size full needs a CUDA GPU')])
def test_bad_arguments_get_one_line(tmp_path, args, message):
    r = _cli('--out', str(tmp_path), *args)
    assert r.returncode != 0 and message in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path/'benchmarks.json').exists()


def test_the_budget_is_respected(tmp_path):
    "With no time left every phase is skipped, and the files say so."
    R = run_benchmarks(tmp_path, 'tiny', budget_s=1e-3)
    saved = json.loads((tmp_path/'benchmarks.json').read_text())
    assert R['status'] == saved['status'] == 'partial'
    assert saved['phases'] and all(p['status'].startswith('skipped') for p in saved['phases'])
    assert 'Status: partial' in (tmp_path/'benchmarks.md').read_text()


def test_fast_path_loss_matches_fp32():
    p = SIZES['tiny']
    songs = si_shaped_songs(8, seed=1, scale=p['scale'])
    tok = si_tokenizer(songs, vocab_size=500)
    feats = {s.id: np.random.default_rng(i).standard_normal((p['l_m'], p['d_m'])).astype(np.float16) for i, s in enumerate(songs)}
    ds = SongDataset(songs, tok, feats, 64, 64)
    L = regime_losses([ds[i] for i in range(8)], tok, seed=1)
    assert L['reference_shape'] != L['ours_shape']
    assert abs(L['ours'] - L['reference']) < 1e-2 * L['reference'], L


@pytest.mark.slow
def test_both_paths_converge_alike():
    conv = converge_both(200)
    assert conv['ours']['final'] < 0.7 * conv['ours']['first']
    assert abs(conv['ours']['final'] - conv['reference']['final']) < max(0.05 * conv['reference']['final'], 2 * conv['reference']['std']), conv


def test_a_failed_check_is_one_line_and_recorded(tmp_path, monkeypatch, capsys):
    "A library that breaks the model fails the smoke check: one line, exit 1, the status and traceback on disk."
    import alcap.benchmarks as b
    def broken(device): raise TypeError("forward() got an unexpected keyword argument 'cache'")
    monkeypatch.setattr(b, 'smoke_check', broken)
    with pytest.raises(SystemExit) as e: b.main(['--out', str(tmp_path), '--size', 'tiny'])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and "unexpected keyword argument 'cache'" in err
    assert json.loads((tmp_path/'benchmarks.json').read_text())['status'] == 'error'
    assert 'Traceback' in (tmp_path/'benchmarks_errors.txt').read_text()


def test_precision_names_say_what_runs():
    "The tables name what a precision computes in on the device it ran on: TF32 and bf16 only where they happen."
    cpu, gpu = torch.device('cpu'), torch.device('cuda')
    kinds = ('fp32', 'tf32', 'auto', 'bf16', 'tf32-emulated')
    names = {p: (precision_name(p, cpu), precision_name(p, gpu)) for p in kinds}
    assert names == {'fp32': ('fp32', 'fp32'), 'tf32': ('fp32', 'tf32'), 'auto': ('fp32', 'bf16 autocast'),
                     'bf16': ('bf16 autocast', 'bf16 autocast'), 'tf32-emulated': ('tf32 (emulated)', 'tf32 (emulated)')}
