"Property-based tests (hypothesis) of alcap.ib: exact information identities on any small discrete joint."
import numpy as np
from hypothesis import given, settings, strategies as st

from alcap.ib import encode, entropy, ib_terms, infonce_bound, infonce_loss, mutual_information, optimal_critic

FAST = settings(max_examples=40, deadline=None, database=None)


@st.composite
def joints(draw, ndim=3, max_states=4):
    "A joint distribution of `ndim` variables with 1 to `max_states` states each, some cells possibly zero."
    shape = tuple(draw(st.integers(1, max_states)) for _ in range(ndim))
    w = np.array(draw(st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0, 3.0]), min_size=int(np.prod(shape)),
                               max_size=int(np.prod(shape)))))
    if w.sum() == 0: w[0] = 1.0
    return (w / w.sum()).reshape(shape)


@FAST
@given(joints())
def test_chain_rule_and_interaction_identity(p):
    T = ib_terms(p)
    assert min(T.values()) > -1e-12                      # entropies and informations are never negative
    assert abs(T['I_xz'] - T['I_mz'] - T['I_tz_given_m']) < 1e-10
    assert abs(T['I_xz'] - (T['I_mz'] + T['I_tz'] - T['I_mt'] + T['I_mt_given_z'])) < 1e-10
    assert T['I_xz'] <= min(T['H_x'], T['H_z']) + 1e-12
    assert abs(T['H_x'] - (T['H_m'] + T['H_t'] - T['I_mt'])) < 1e-10


@FAST
@given(joints(ndim=2), st.integers(1, 4), st.integers(1, 4), st.integers(0, 10**6))
def test_separate_encoders_share_at_most_what_the_data_shares(p_mt, k_m, k_t, seed):
    "Data processing on both sides: I(z_m; z_t) <= I(m; t) for any channels p(z_m | m), p(z_t | t)."
    rng = np.random.default_rng(seed)
    enc_m, enc_t = rng.dirichlet(np.ones(k_m), p_mt.shape[0]), rng.dirichlet(np.ones(k_t), p_mt.shape[1])
    p_zz = np.einsum('mt,ma,tb->ab', p_mt, enc_m, enc_t)
    assert mutual_information(p_zz) <= mutual_information(p_mt) + 1e-12


@FAST
@given(joints(ndim=2), st.integers(2, 6), st.integers(0, 10**6))
def test_infonce_bound_never_exceeds_log_n(p_mt, n, seed):
    rng = np.random.default_rng(seed)
    pairs = np.unravel_index(rng.choice(p_mt.size, size=(5, n), p=p_mt.ravel()), p_mt.shape)
    bound = infonce_bound(infonce_loss(optimal_critic(p_mt), *pairs), n)
    assert np.all(bound <= np.log(n) + 1e-12)


def test_channel_joint_keeps_the_songs():
    p_mt = np.array([[0.4, 0.1], [0.1, 0.4]])
    p = encode(p_mt, np.full((2, 2, 3), 1 / 3))           # z independent of the song
    assert np.allclose(p.sum(-1), p_mt) and abs(mutual_information(p, (0, 1), 2)) < 1e-12
    assert abs(entropy(p) - entropy(p_mt) - np.log(3)) < 1e-12
