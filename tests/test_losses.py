"Tests for alcap.losses: InfoNCE against an independent computation, pooling, duplicates."
import math
import pytest, torch, torch.nn.functional as F
from alcap.losses import InfoNCE, masked_mean, info_nce_logits, first_occurrence
from alcap.losses import identity_nce, info_nce_by_loop, kept_rows_nce


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    B = 6
    h_m, h_t = torch.randn(B, 20, 24, generator=g), torch.randn(B, 9, 16, generator=g)
    mm, tm = torch.ones(B, 20, dtype=torch.long), torch.ones(B, 9, dtype=torch.long)
    mm[0, 15:] = 0; tm[2, 4:] = 0
    return h_m, h_t, mm, tm

@pytest.mark.parametrize('sim', ['cosine', 'dot'])
@pytest.mark.parametrize('symmetric', [False, True])
def test_infonce_matches_independent_computation(data, sim, symmetric):
    h_m, h_t, mm, tm = data
    nce = InfoNCE(16, 24, proj_dim=8, similarity=sim, tau=0.3, symmetric=symmetric)
    out = nce(h_m, h_t, mm, tm)
    z_m, z_t = nce.embed(h_m, h_t, mm, tm)
    m2t = info_nce_by_loop(z_m, z_t, sim, 0.3)
    assert out['loss_m2t'].item() == pytest.approx(m2t, rel=1e-5)
    if symmetric:
        t2m = info_nce_by_loop(z_t, z_m, sim, 0.3)
        assert out['loss_t2m'].item() == pytest.approx(t2m, rel=1e-5)
        assert out['loss_contrast'].item() == pytest.approx((m2t + t2m) / 2, rel=1e-5)
    else:
        assert 'loss_t2m' not in out and out['loss_contrast'].item() == pytest.approx(m2t, rel=1e-5)

def test_infonce_matches_cross_entropy_over_similarity_matrix(data):
    h_m, h_t, mm, tm = data
    nce = InfoNCE(16, 24, proj_dim=None, similarity='cosine', tau=0.3)   # original: text -> d_m, music raw
    z_m, z_t = nce.embed(h_m, h_t, mm, tm)
    assert z_m.shape == z_t.shape == (6, 24)
    torch.testing.assert_close(z_m, masked_mean(h_m, mm))
    s = F.normalize(z_m, dim=-1) @ F.normalize(z_t, dim=-1).T / 0.3
    torch.testing.assert_close(nce(h_m, h_t, mm, tm)['loss_contrast'], F.cross_entropy(s, torch.arange(6)))

@pytest.mark.parametrize('sim,tau', [('cosine', 0.05), ('dot', 0.1)])
def test_separable_pairs_near_zero(sim, tau):
    n = 16
    aligned = torch.eye(n)[:, None, :] * 3
    assert identity_nce(n, similarity=sim, tau=tau)(aligned, aligned)['loss_contrast'].item() < 1e-6

def test_unrelated_pairs_near_log_n():
    n = 64
    g = torch.Generator().manual_seed(1)
    music = torch.eye(n)[:, None, :]
    same_text = torch.ones(n, 1, n)                      # every lyric identical: nothing to tell songs apart
    assert identity_nce(n)(music, same_text)['loss_contrast'].item() == pytest.approx(math.log(n), abs=1e-5)
    h_m, h_t = torch.randn(n, 1, 512, generator=g), torch.randn(n, 1, 512, generator=g)   # independent
    loss = identity_nce(512, similarity='cosine', tau=1.0)(h_m, h_t)['loss_contrast'].item()
    assert loss == pytest.approx(math.log(n), abs=0.05)

def test_padding_does_not_change_pooled_vectors_or_loss(data):
    h_m, h_t, mm, tm = data
    nce = InfoNCE(16, 24, proj_dim=8)
    g = torch.Generator().manual_seed(2)
    h_m2 = torch.cat([h_m, 100 * torch.randn(6, 7, 24, generator=g)], 1)   # garbage in extra padding
    h_t2 = torch.cat([h_t, 100 * torch.randn(6, 3, 16, generator=g)], 1)
    mm2, tm2 = F.pad(mm, (0, 7)), F.pad(tm, (0, 3))
    torch.testing.assert_close(masked_mean(h_m2, mm2), masked_mean(h_m, mm))
    torch.testing.assert_close(masked_mean(h_m, mm)[0], h_m[0, :15].mean(0))
    torch.testing.assert_close(nce(h_m2, h_t2, mm2, tm2)['loss_contrast'], nce(h_m, h_t, mm, tm)['loss_contrast'])
    assert torch.isfinite(masked_mean(h_m, torch.zeros_like(mm))).all()

def test_duplicates_drop_equals_deduplicated_batch(data):
    h_m, h_t, mm, tm = data
    nce = InfoNCE(16, 24, proj_dim=8)
    ids = torch.tensor([0, 1, 0, 2, 1, 3])
    keep = torch.tensor([True, True, False, True, False, True])
    assert first_occurrence(ids).tolist() == keep.tolist()
    torch.testing.assert_close(nce(h_m, h_t, mm, tm, ids)['loss_contrast'],
                               nce(h_m[keep], h_t[keep], mm[keep], tm[keep])['loss_contrast'])

def test_duplicates_mask_removes_other_copies_from_negatives(data):
    h_m, h_t, mm, tm = data
    nce = InfoNCE(16, 24, proj_dim=8, similarity='dot', duplicates='mask')
    ids = torch.tensor([0, 1, 0, 2, 1, 3])
    z_m, z_t = nce.embed(h_m, h_t, mm, tm)
    z_m, z_t = z_m.detach().double(), z_t.detach().double()
    total = 0.0
    for i in range(6):
        ks = [k for k in range(6) if k == i or ids[k] != ids[i]]          # my own pair + other songs only
        logits = [float(z_m[i] @ z_t[k]) / 0.3 for k in ks]
        total -= float(z_m[i] @ z_t[i]) / 0.3 - math.log(sum(math.exp(x) for x in logits))
    assert nce(h_m, h_t, mm, tm, ids)['loss_contrast'].item() == pytest.approx(total / 6, rel=1e-5)
    # without duplicates, 'mask' and 'drop' agree
    plain = InfoNCE(16, 24, proj_dim=8, similarity='dot'); plain.load_state_dict(nce.state_dict())
    torch.testing.assert_close(nce(h_m, h_t, mm, tm, torch.arange(6))['loss_contrast'], plain(h_m, h_t, mm, tm, torch.arange(6))['loss_contrast'])

def test_bad_options_raise():
    with pytest.raises(ValueError, match="'cosine' or 'dot'"): info_nce_logits(torch.ones(2, 3), torch.ones(2, 3), 'l2')
    with pytest.raises(ValueError, match="'drop' or 'mask'"): InfoNCE(4, 4, duplicates='keep')

def test_gradients_reach_both_projection_heads(data):
    h_m, h_t, mm, tm = data
    nce = InfoNCE(16, 24, proj_dim=8)
    nce(h_m, h_t, mm, tm)['loss_contrast'].backward()
    for p in nce.parameters(): assert p.grad is not None and p.grad.abs().sum() > 0


def test_kept_rows_nce_is_eq1_on_the_kept_songs():
    "The masked loss is eq. (1) on the kept songs alone; the dropped songs get exactly zero gradient, not NaN."
    g = torch.Generator().manual_seed(3)
    z_m, z_t = torch.randn(6, 5, generator=g, requires_grad=True), torch.randn(6, 5, generator=g, requires_grad=True)
    keep = torch.tensor([True, False, True, True, False, True])
    s = info_nce_logits(z_m, z_t, 'cosine', 0.3)
    m2t, t2m = kept_rows_nce(s, keep), kept_rows_nce(s.T, keep)
    assert float(m2t.detach()) == pytest.approx(info_nce_by_loop(z_m[keep], z_t[keep]), abs=1e-5)
    assert float(t2m.detach()) == pytest.approx(info_nce_by_loop(z_t[keep], z_m[keep]), abs=1e-5)
    for grad in torch.autograd.grad(m2t + t2m, [z_m, z_t]):
        assert torch.isfinite(grad).all()
        assert torch.equal(grad[~keep], torch.zeros_like(grad[~keep]))
        assert grad[keep].abs().sum() > 0
