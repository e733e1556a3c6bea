"Tests of alcap.metrics: WordNet offline, METEOR tokenisation, ROUGE and METEOR as HF evaluate computes them."
import os
from pathlib import Path

import numpy as np
import pytest

import alcap.metrics as M
from alcap.metrics import (LEXNAMES, build_wordnet_layout, compute_metrics, lexnames_text, load_wordnet,
                           meteor_tokenize, rouge_scores)

DEBIAN = next((d for d in ("/usr/share/wordnet", "/usr/share/wordnet/dict") if Path(d, "data.noun").is_file()), None)
needs_debian = pytest.mark.skipif(DEBIAN is None, reason="Debian's wordnet-base is not installed")
HYP = "It is a guide to action which ensures that the military always obeys the commands of the party"
REF = "It is a guide to action that ensures that the military will forever heed Party commands"


# ---- WordNet ---------------------------------------------------------------------------------------------------
def test_lexnames_file_format():
    lines = lexnames_text().splitlines()
    assert len(lines) == 45 == len(set(LEXNAMES))
    assert [l.split("\t")[0] for l in lines] == [f"{i:02d}" for i in range(45)]
    assert lines[3] == "03\tnoun.Tops\t1" and lines[29] == "29\tverb.body\t2" and lines[44] == "44\tadj.ppl\t3"


def test_lexnames_agree_with_every_synset_of_the_database():
    "Each synset's lex_filenum must name a lexicographer file of its own part of speech."
    root = Path(str(load_wordnet().root))
    if not (root / "data.noun").is_file(): pytest.skip("WordNet is zipped; cannot scan data files")
    pos_prefix = {"noun": "noun.", "verb": "verb.", "adj": "adj.", "adv": "adv."}
    for pos, prefix in pos_prefix.items():
        seen = set()
        with open(root / f"data.{pos}", encoding="utf-8") as f:
            for line in f:
                if line.startswith(" "): continue  # licence header
                seen.add(int(line.split(" ", 2)[1]))
        assert seen and all(LEXNAMES[i].startswith(prefix) for i in seen), pos


@pytest.mark.parametrize("synset,lexname", [("dog.n.01", "noun.animal"), ("car.n.01", "noun.artifact"),
                                            ("run.v.01", "verb.motion"), ("eat.v.01", "verb.consumption"),
                                            ("happy.a.01", "adj.all"), ("quickly.r.01", "adv.all")])
def test_known_lexnames(synset, lexname):
    assert load_wordnet().synset(synset).lexname() == lexname


@needs_debian
def test_build_layout_copies_files_atomically(tmp_path):
    dest = build_wordnet_layout(DEBIAN, tmp_path / "nltk_data")
    assert dest == tmp_path / "nltk_data" / "corpora" / "wordnet"
    assert (dest / "lexnames").read_text() == lexnames_text()
    for f in M._REQUIRED:  # real copies: NLTK refuses links that could leave its data root
        assert (dest / f).is_file() and not (dest / f).is_symlink() and os.stat(dest / f).st_nlink == 1
    assert not list(dest.parent.glob(".wordnet-*"))  # no temporary folder left behind
    mtime = (dest / "lexnames").stat().st_mtime_ns
    assert build_wordnet_layout(DEBIAN, tmp_path / "nltk_data") == dest  # second call reuses it
    assert (dest / "lexnames").stat().st_mtime_ns == mtime


@needs_debian
def test_load_wordnet_builds_cache_under_alcap_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALCAP_CACHE", str(tmp_path))
    wn = load_wordnet.__wrapped__(use_nltk=False)
    assert (tmp_path / "nltk_data" / "corpora" / "wordnet" / "lexnames").is_file()
    assert wn.synset("guide.n.01").lexname() == "noun.person"
    assert M.meteor([HYP], [REF], wordnet=wn) == pytest.approx(0.6944, abs=5e-5)


def test_missing_wordnet_says_how_to_install(tmp_path):
    with pytest.raises(LookupError, match="apt-get install wordnet-base wordnet-sense-index") as e:
        load_wordnet.__wrapped__(use_nltk=False, source_dirs=(), nltk_data=str(tmp_path))
    assert "nltk.download('wordnet')" in str(e.value)


def test_incomplete_database_folder_is_named(tmp_path):
    (tmp_path / "src").mkdir(); (tmp_path / "src" / "data.noun").write_text("")
    with pytest.raises(FileNotFoundError, match="missing index.adj"):
        build_wordnet_layout(tmp_path / "src", tmp_path / "nltk_data")


# ---- tokenisation ----------------------------------------------------------------------------------------------
def test_offline_tokenisation_matches_nltk_documented_word_tokenize():
    s = "Good muffins cost $3.88\nin New York.  Please buy me\ntwo of them.\n\nThanks."
    assert meteor_tokenize(s, offline=True) == ['Good', 'muffins', 'cost', '$', '3.88', 'in', 'New', 'York', '.',
                                                'Please', 'buy', 'me', 'two', 'of', 'them', '.', 'Thanks', '.']


def test_sentences_are_split_before_word_tokenising():
    "Without the sentence split 'it.' would be one token and would not match 'it' in METEOR."
    assert meteor_tokenize("I love it. It is good.", offline=True) == ["I", "love", "it", ".", "It", "is", "good", "."]
    assert "it." in M._treebank.tokenize("I love it. It is good.")


def test_offline_splitter_knows_common_abbreviations():
    assert meteor_tokenize("Mr. Brown sang it feat. Jay-Z at 3 p.m. today.", offline=True)[:2] == ["Mr.", "Brown"]
    assert "feat." in meteor_tokenize("A song feat. Jay-Z.", offline=True)


def test_tokenisation_equals_word_tokenize_where_punkt_is_installed():
    import nltk
    try: nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError: pytest.skip("punkt_tab not installed (offline): the fallback is tested above")
    for s in ["Good muffins cost $3.88 in New York. Please buy me two of them.", "He said: \"no!\" Then left...",
              "The song (2004) is about loss; it's sad. She can't stop."]:
        assert meteor_tokenize(s) == nltk.word_tokenize(s) == meteor_tokenize(s, offline=True)


# ---- ROUGE -----------------------------------------------------------------------------------------------------
def test_rouge_hand_computed():
    r = rouge_scores(["the cat sat"], ["the cat sat on the mat"])
    assert r["rouge1"] == pytest.approx(2 / 3) and r["rouge1_recall"] == pytest.approx(0.5)
    assert r["rouge2"] == pytest.approx(2 * 0.4 / 1.4) and r["rouge2_recall"] == pytest.approx(0.4)
    assert r["rougeL"] == pytest.approx(2 / 3)


def test_bootstrap_mid_is_median_of_resampled_means_close_to_mean():
    rng = np.random.default_rng(0)
    words = "love loss night summer river road home heart fire rain".split()
    preds = [" ".join(rng.choice(words, 12)) for _ in range(200)]
    refs = [" ".join(rng.choice(words, 15)) for _ in range(200)]
    state = np.random.get_state()
    boot, boot2 = rouge_scores(preds, refs, seed=3), rouge_scores(preds, refs, seed=3)
    assert boot == boot2  # seeded: reproducible
    assert np.all(np.random.get_state()[1] == state[1])  # global RNG restored
    mean = rouge_scores(preds, refs, bootstrap=False)
    assert all(abs(boot[k] - mean[k]) < 0.01 for k in mean)  # close to the mean...
    assert any(boot[k] != mean[k] for k in mean)  # ...but not the mean


def test_bootstrap_equals_rouge_score_aggregator_with_same_seed():
    from rouge_score import rouge_scorer, scoring
    preds, refs = ["a b c d", "a x", "b c e f g", ""], ["a b c", "x y a", "e f g b", "q"]
    scorer, agg = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False), scoring.BootstrapAggregator()
    for p, r in zip(preds, refs): agg.add_scores(scorer.score(r, p))
    np.random.seed(7)
    ref = agg.aggregate()
    ours = rouge_scores(preds, refs, seed=7)
    assert all(ours[t] == ref[t].mid.fmeasure for t in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
    assert ours["rougeL_recall"] == ref["rougeL"].mid.recall


# ---- METEOR and compute_metrics --------------------------------------------------------------------------------
def test_nltk_documented_meteor_example():
    m = compute_metrics([HYP], [REF])
    assert round(m["meteor"], 4) == 0.6944
    assert set(m) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "meteor", "rouge1_recall", "rouge2_recall", "rougeL_recall"}


def test_wordnet_synonyms_count_in_meteor():
    "'car' and 'auto' share a synset: METEOR with WordNet beats exact and stem matching alone."
    # (NLTK compares synonyms with the *Porter-stemmed* leftovers, so e.g. 'automobile' -> 'automobil' would not match)
    from nltk.translate.meteor_score import single_meteor_score
    h, r = meteor_tokenize("they drive the car home"), meteor_tokenize("they drive the auto home")
    class NoWordNet:
        def synsets(self, *_): return []
    assert single_meteor_score(r, h, wordnet=load_wordnet()) > single_meteor_score(r, h, wordnet=NoWordNet())


def test_empty_texts_score_zero_and_count_in_mean():
    m = compute_metrics(["", "the song is sad", ""], ["the song is sad", "", ""])
    assert all(v == 0.0 for v in m.values())
    m = compute_metrics(["the song is sad", ""], ["the song is sad", "x"], bootstrap=False)
    assert m["rouge1"] == 0.5 and 0.49 < m["meteor"] < 0.5


def test_unicode():
    m = compute_metrics(["東京の夜の歌", "café crème brûlée"], ["東京の夜の歌", "café crème brûlée"], bootstrap=False)
    # rouge_score keeps [a-z0-9] only: CJK has no tokens (0), accented words still match in their ASCII pieces
    assert m["rouge1"] == 0.5
    # METEOR keeps unicode words: an identical 4-word unicode text scores as an identical 4-word ASCII text
    u, a = "東京の夜の歌 café crème brûlée", "w x y z"
    assert compute_metrics([u], [u])["meteor"] == compute_metrics([a], [a])["meteor"] > 0.9


def test_very_long_texts():
    rng = np.random.default_rng(1)
    words = "the song is about love and loss and a summer night with friends".split()
    long = " ".join(rng.choice(words, 1000))
    m = compute_metrics([long, long[::-1]], [long, long], bootstrap=False)
    assert all(0.0 <= v <= 1.0 for v in m.values())
    assert compute_metrics([long], [long])["rouge1"] == 1.0


@pytest.mark.parametrize("preds,refs,err,msg", [
    (["a"], ["a", "b"], ValueError, "1 predictions but 2 references"),
    ([], [], ValueError, "no \\(prediction, reference\\) pairs"),
    ("a song", "a song", TypeError, "not a single string"),
    (["a", None], ["a", "b"], TypeError, r"predictions\[1\] is NoneType"),
])
def test_bad_input_errors(preds, refs, err, msg):
    with pytest.raises(err, match=msg): compute_metrics(preds, refs)


# ---- parity with Hugging Face evaluate, where its modules load -------------------------------------------------
def _load(name):
    try:
        import evaluate
        return evaluate.load(name)
    except Exception as e:  # offline: the module scripts live on the hub
        pytest.skip(f"evaluate.load({name!r}) unavailable: {type(e).__name__}")


def test_parity_with_evaluate_rouge():
    rouge = _load("rouge")
    preds, refs = ["the cat sat on a mat", "hello there", "a b c d e"], ["the cat sat on the mat", "hello", "e d c b a"]
    np.random.seed(11)
    theirs = rouge.compute(predictions=preds, references=refs)
    ours = rouge_scores(preds, refs, seed=11)
    for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"): assert ours[k] == pytest.approx(theirs[k], abs=1e-12)


def test_parity_with_evaluate_meteor():
    meteor = _load("meteor")
    preds, refs = [HYP, "the song is about a long night"], [REF, "this song describes a night that lasts"]
    assert compute_metrics(preds, refs)["meteor"] == pytest.approx(meteor.compute(predictions=preds, references=refs)["meteor"], abs=1e-9)


@needs_debian
def test_unwritable_cache_falls_back_to_temporary_folder(tmp_path, monkeypatch):
    (tmp_path / "not_a_dir").write_text("")
    monkeypatch.setenv("ALCAP_CACHE", str(tmp_path / "not_a_dir"))
    monkeypatch.setattr(M.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    wn = load_wordnet.__wrapped__(use_nltk=False)
    assert str(wn.root).startswith(str(tmp_path / "tmp")) and wn.synset("dog.n.01").lexname() == "noun.animal"
