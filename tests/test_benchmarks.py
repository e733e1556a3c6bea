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


def test_warm_shapes_keeps_first_shapes_out_of_the_clock():
    "A long run meets each bucket shape once: with warm_shapes the timed steps meet none for the first time."
    from alcap.benchmarks import _si_data, measure_training, regime_collator, regime_config, si_model
    p = SIZES['tiny']
    tok, ds = _si_data({}, p, 0)
    c = regime_config('ours', 'tiny')
    col, cpu = regime_collator('ours', c, tok), torch.device('cpu')
    runs = {}
    for warm in (False, True):
        torch.manual_seed(0)
        runs[warm] = measure_training(si_model('tiny', tok, p['d_m']), ds['train'], col, c, cpu, steps=8, warmup=1,
                                      warm_shapes=warm)
    cold, warm = runs[False], runs[True]
    assert cold['shapes_first_seen_timed'] > 0 and warm['shapes_first_seen_timed'] == 0
    assert warm['warmup_steps'] == 1 + cold['shapes_first_seen_timed']   # one extra step per shape the clock met
    assert warm['steps'] == cold['steps'] == 8 and warm['distinct_shapes'] == cold['distinct_shapes']


def test_compile_only_times_the_reference_and_the_compiled_steps(tmp_path):
    r = _cli('--out', str(tmp_path), '--compile-only', '--budget-s', '200')
    assert r.returncode == 0, r.stderr
    R = json.loads((tmp_path/'benchmarks.json').read_text())
    names = [ph['name'] for ph in R['phases']]
    assert [n for n in names if n.startswith('training')] == [
        'training, reference regime', 'training, ours, torch.compile with CUDA graphs', 'training, ours, torch.compile']
    assert not any(n.startswith('generation') for n in names) and R['command'].endswith('--compile-only --budget-s 200')
    assert set(R['train']) == {'reference', 'ours_cuda_graphs', 'ours_compiled'}
    headline = json.loads(r.stdout.strip().splitlines()[-1])   # what the command prints last: the compiled rows too
    assert headline['cuda_graphs_train_speedup'] > 0 and headline['compiled_train_samples_per_s'] > 0, headline


def test_the_cuda_graph_step_comes_right_after_captioning(tmp_path):
    "With --compile the row that decides the speed-up runs before the extras; the compiled step without graphs last."
    R = run_benchmarks(tmp_path, 'tiny', budget_s=300, torch_compile=True)
    names = [ph['name'] for ph in R['phases']]
    graphs = names.index('training, ours, torch.compile with CUDA graphs')
    assert names.index('generation, original regime (subset)') < graphs < names.index('profile of ours'), names
    assert names[-1] == 'training, ours, torch.compile' and R['status'] == 'done', R['phases']
    assert set(R['train']) >= {'reference', 'ours', 'defaults', 'ours_cuda_graphs', 'ours_compiled'}


def test_generation_records_each_batch(tmp_path):
    R = run_benchmarks(tmp_path, 'tiny', budget_s=200)
    g = R['generation']['ours']
    assert len(g['batch_seconds']) == g['batches_timed'] and all(s > 0 for s in g['batch_seconds'])
    assert 'ours_cudnn_allowed' not in R['generation']   # a CPU has no cuDNN attention to compare with


def test_the_report_says_where_a_compiled_warm_up_went():
    from alcap.benchmarks import benchmarks_markdown, limits
    row = dict(batch_size=26, samples_per_s=500.0, warmup_seconds=310.0, compile_seconds=250.4, graphs_compiled=3,
               compile_mode='reduce-overhead', cudagraph_skips=0)
    R = dict(status='done', train=dict(reference=dict(samples_per_s=60.0), ours_cuda_graphs=row))
    assert ('Under torch.compile with CUDA graphs the warm-up took 310.0 s, 250.4 s of it compiling 3 graph(s); '
            'a run pays it once.') in limits(R)
    assert '| 3 | 250.4000 |' in benchmarks_markdown(R)   # the details table's graphs_compiled, compile_seconds
    assert not any('compiling' in s for s in limits(dict(R, train=dict(ours_cuda_graphs=dict(row, graphs_compiled=None)))))


def test_the_report_says_whether_a_step_waits_for_the_gpu():
    from alcap.benchmarks import limits
    site = dict(op='_local_scalar_dense', site='transformers/masking_utils.py:354 via model.py:194', count=1)
    waits = limits(dict(device='cuda', syncs=dict(total=1, sites=[site])))
    assert waits == ['One step of ours makes the host wait for the GPU 1 times, each emptying the queue of work ahead '
                     'of it: _local_scalar_dense at transformers/masking_utils.py:354 via model.py:194 (x1).']
    assert limits(dict(device='cuda', syncs=dict(total=0, sites=[]))) == [
        'One step of ours reads nothing back from the GPU: the host never waits for it inside a step.']
    assert limits(dict(device='cpu', syncs=dict(total=0, sites=[]))) == []   # a CPU has no queue to speak of
