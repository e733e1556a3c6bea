"The main job end to end on a tiny demo (slow: three papermill trainings)."
import os
from pathlib import Path

import pandas as pd
import pytest

from alcap.demo import main
from alcap.core import parse_value

ROOT = Path(__file__).resolve().parents[1]


def test_param_values_typed_like_papermill():
    assert [parse_value(v) for v in ('2', '0.5', 'true', 'None', 'after_encoder')] == [2, 0.5, True, None, 'after_encoder']


@pytest.mark.slow
def test_main_job_on_a_tiny_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    main(['--data', str(tmp_path/'data'), '--runs', str(tmp_path/'runs'), '--results', str(tmp_path/'results'), '--n', '40',
          '-p', 'epochs', '2', '-p', 'num_beams', '1', '-p', 'max_new_tokens', '16'])
    res = tmp_path/'results'
    for f in ('dataset.md', 'table1.md', 'table2.csv', 'attributes.csv', 'attributes.md', 'loss.png'): assert (res/f).exists(), f
    att = pd.read_csv(res/'attributes.csv')
    assert sorted(att['method']) == ['alcap', 'bart', 'bart-fusion'] and (att['n_test'] == 4).all()
    assert 'random' in (res/'attributes.md').read_text()
    for m in ('bart', 'bart-fusion', 'alcap'):
        caps = pd.read_csv(res/f'captions_test_{m}_s0.csv')
        assert len(caps) == 4 and list(caps.columns) == ['id', 'lyrics', 'reference', 'prediction']
        assert (tmp_path/'runs'/f'{m}_s0'/'train.ipynb').exists()   # the executed training notebook, in its run folder
