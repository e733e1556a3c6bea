"The alpha sweep's guards: bad input fails in one line before any training; finished runs are never retrained."
import json
from dataclasses import asdict

import pandas as pd
import pytest

from alcap.ablation import alpha_sweep, main, peak_report, plot_fig6, sweep_runs
from alcap.train import data_manifest


def one_line(capsys, rc, *needles):
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith('alcap-ablation: ') and 'Traceback' not in err, err
    for n in needles: assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize('args, needles', [
    (['--alphas', '0.02', '-p', 'alpha', '0.1'], ["['alpha']", 'the sweep sets them']),
    (['--alphas', '0.02', '-p', 'epochs', 'two'], ["epochs='two'"]),
    (['--alphas', '0.02', '-p', 'lr', '1e-3', '-p', 'lr', '1e-4'], ['-p lr: given twice']),
    (['--alphas', '0.02', '0.020'], ['repeated']),
    (['--alphas', '0.02', '-p', 'dataset', 'jsonl'], ['-p dataset', '--dataset']),
    (['--alphas', '0.02', '--dataset', 'jsonl'], ["dataset 'jsonl'", '--data']),
])
def test_cli_bad_input_one_line_and_nothing_trained(tmp_path, capsys, args, needles):
    one_line(capsys, main(['--out', str(tmp_path/'runs'), *args]), *needles)
    assert not (tmp_path/'runs').exists()


def fake_finished_run(data, runs, **change):
    "A finished run folder (config.json and summary.json, no model) of the sweep's grid point alpha 0.02, seed 0."
    params, cfg = sweep_runs(runs, (0.02,), (0,), 'jsonl', data/'songs', features_dir=str(data/'feats'))[0.02, 0]
    meta = dict(parameters={**asdict(cfg), **change}, data_manifest=data_manifest(data/'songs'))
    out = runs/'alcap_a0.02_s0'
    out.mkdir(parents=True)
    (out/'config.json').write_text(json.dumps(meta))
    (out/'summary.json').write_text('{}')
    return out


@pytest.mark.parametrize('change, needle', [
    (dict(lr=0.5), 'holds a run with other parameters'),
    (dict(), 'trained on another version of the demo data'),
])
def test_finished_run_of_other_parameters_or_data_is_an_error_and_kept(tiny_data, tmp_path, change, needle):
    out = fake_finished_run(tiny_data, tmp_path/'runs', **change)
    if not change:  # the run recorded another dataset manifest than the folder holds now
        meta = json.loads((out/'config.json').read_text())
        (out/'config.json').write_text(json.dumps({**meta, 'data_manifest': {'n': 1}}))
    before = {p: p.read_bytes() for p in out.rglob('*')}
    with pytest.raises(ValueError, match=needle):
        alpha_sweep(tmp_path/'runs', (0.02,), (0,), 'jsonl', tiny_data/'songs', features_dir=str(tiny_data/'feats'),
                    log=lambda s: None)
    assert {p: p.read_bytes() for p in out.rglob('*')} == before
    assert not (tmp_path/'runs'/'sweep.csv').exists()


def test_peak_report_one_seed_has_no_spread_and_fig6_needs_retrieval(tmp_path):
    t = pd.DataFrame(dict(alpha=[0, 0.02, 0.2], seed=0, metric='meteor', value=[0.1, 0.5, 0.1]))
    r = peak_report(t).iloc[0]
    assert r['best_alpha'] == 0.02 and not r['peak'] and 'spread is unknown' in r['verdict']
    with pytest.raises(ValueError, match='no p@k and r@k'): plot_fig6(t, tmp_path/'f.png')
