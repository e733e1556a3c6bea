"""SyncFreeAdafactor against transformers' Adafactor: on a GPU, where parameters of one shape are updated stacked
(the CPU cases, and the stacked path forced onto the CPU, are tested in nbs/02c_adafactor)."""
import copy

import pytest
import torch
from transformers.optimization import Adafactor

from alcap.adafactor import SyncFreeAdafactor, count_step


def net(device):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(50, 24), torch.nn.Linear(24, 48), torch.nn.LayerNorm(48),
                            torch.nn.Linear(48, 24), torch.nn.Linear(24, 24), torch.nn.Linear(24, 24))
    with torch.no_grad():
        m[1].bias.zero_()   # RMS below eps2: the step size is lr x eps2
        m[4].weight.zero_()
    return m.to(device)


def groups(m, wd=0.01):
    return [dict(params=[p for p in m.parameters() if p.ndim >= 2], weight_decay=wd),
            dict(params=[p for p in m.parameters() if p.ndim < 2], weight_decay=0.0)]


def set_grads(m, k):
    g = torch.Generator().manual_seed(k)
    for i, p in enumerate(m.parameters()):
        p.grad = torch.randn(p.shape, generator=g).mul_(10.0 ** (i % 5 - 3)).to(p.device)


@pytest.mark.gpu
@pytest.mark.parametrize('scale', [True, False])
def test_gpu_sync_free_adafactor_is_transformers(scale):
    "On a GPU: the same parameters as transformers' Adafactor after 12 steps (to float rounding), and no host read."
    assert torch.cuda.is_available()
    a, b = net('cuda'), net('cuda')
    theirs = Adafactor(groups(a), lr=0.1, scale_parameter=scale, relative_step=False, warmup_init=False)
    ours = SyncFreeAdafactor(groups(b), lr=0.1, scale_parameter=scale)
    assert ours.host_scalars is None
    reads = []
    for k in range(12):
        set_grads(a, k)
        set_grads(b, k)
        theirs.step()
        reads.append(count_step(ours)['host_reads'])
    assert reads == [0] * 12
    for p, q in zip(a.parameters(), b.parameters()): torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_gpu_resumes_transformers_state():
    "A GPU checkpoint of transformers' Adafactor goes on with SyncFreeAdafactor as transformers' would."
    a, b = net('cuda'), net('cuda')
    theirs = Adafactor(groups(a), lr=0.1, relative_step=False, warmup_init=False)
    for k in range(5):
        set_grads(a, k)
        theirs.step()
    b.load_state_dict(a.state_dict())
    ours = SyncFreeAdafactor(groups(b), lr=0.1)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    for k in range(5, 10):
        set_grads(a, k)
        set_grads(b, k)
        theirs.step()
        ours.step()
    for p, q in zip(a.parameters(), b.parameters()): torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)
