"""Fixtures shared by the test files."""
import numpy as np
import pytest

from alcap.demodata import make_demo
from alcap.music import FeatureCache


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    "30 demo songs and a feature cache of random 'musicnn-msd'-named features (12 x 16, 10-12 frames real) for them."
    d = tmp_path_factory.mktemp('data')
    songs = make_demo(d/'songs', n=30, seed=3, workers=1)
    cache = FeatureCache.create(d/'feats', 'musicnn-msd', dict(test=True), 12, 16)
    h_m = np.random.default_rng(0).standard_normal((30, 12, 16)).astype(np.float16)
    cache.append([s.id for s in songs], h_m, [12 - i % 3 for i in range(30)])
    return d


@pytest.fixture
def sdpa_cudnn_flags(monkeypatch):
    "A list that receives, at every `scaled_dot_product_attention` call, whether cuDNN's kernels were allowed then."
    import torch
    import torch.nn.functional as F
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(*a, **kw):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*a, **kw)

    monkeypatch.setattr(F, 'scaled_dot_product_attention', spy)
    return seen
