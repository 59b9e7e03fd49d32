"""Label QC: the out-of-fold label-error score (auvcore.qc) against cleanlab's own, the network, and `auvcore qc`
on a tiny demo data set: the table's OOF columns, resumption per fold, error isolation, torchrun ranks, and the
filter and report that use it by default."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import auvcore
from auvcore import qc as Q
from auvcore.app.cli import main

from cli_common import score_random3d, tiny_demo

N_CASES = 8
QC = ["--folds", "2", "--steps", "3", "--size", "16", "--no-progress"]


def _probs(rng, n, K, grid, sharp=1.0):
    p = rng.dirichlet(np.full(K, sharp), size=(n, *grid))
    return np.moveaxis(p, -1, 1)


# ---- the formula -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [0.1, 0.5, 1.0])
def test_softmin_quality_is_the_formula(T):
    rng = np.random.default_rng(0)
    p, y = _probs(rng, 3, 4, (5, 4, 3)), rng.integers(0, 4, (3, 5, 4, 3))
    s = np.take_along_axis(p, y[:, None], 1).reshape(3, -1)
    w = np.exp((1 - s) / T)
    np.testing.assert_allclose(Q.softmin_quality(p, y, T), (s * w).sum(1) / w.sum(1), rtol=1e-12)


def test_softmin_quality_matches_cleanlab_on_2d_slices():
    """cleanlab's own ``get_label_quality_scores(method="softmin")`` on 2-D images: every axial slice of random,
    near-one-hot and one-class cases; our function takes the same slices as [N, K, H, W]."""
    rank = pytest.importorskip(
        "cleanlab.segmentation.rank",
        reason="cleanlab is a test-only dependency (`pip install cleanlab`, in the `test` extra); the library "
               "never needs it")
    rng = np.random.default_rng(1)
    K = 3
    vol = np.concatenate([_probs(rng, 2, K, (9, 7, 4)), _probs(rng, 2, K, (9, 7, 4), sharp=0.05)])
    lab = rng.integers(0, K, (4, 9, 7, 4))
    lab[1] = 2  # one class everywhere
    lab[2] = vol[2].argmax(0)  # the model agrees with every pixel
    # slices: [N * Z, K, H, W] images and [N * Z, H, W] labels
    p2 = np.moveaxis(vol, -1, 1).reshape(-1, K, 9, 7)
    y2 = np.moveaxis(lab, -1, 1).reshape(-1, 9, 7)
    theirs, pixel = rank.get_label_quality_scores(y2, p2, method="softmin", verbose=False)
    np.testing.assert_allclose(Q.softmin_quality(p2, y2), theirs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(Q.self_confidence(p2, y2), pixel, rtol=0, atol=1e-12)
    for T in (0.05, 1.0):
        theirs, _ = rank.get_label_quality_scores(y2, p2, method="softmin", verbose=False, temperature=T)
        np.testing.assert_allclose(Q.softmin_quality(p2, y2, T), theirs, rtol=0, atol=1e-12)


def test_class_quality_counts_what_the_label_misses_and_adds():
    K, grid = 3, (6, 6, 4)
    lab = np.zeros((1, *grid), int)
    lab[0, :3] = 1
    p = np.full((1, K, *grid), 0.01)
    p[0, 0] = 0.98
    p[0, 1, :3], p[0, 0, :3] = 0.98, 0.01  # the model agrees on class 1 ...
    p[0, 2, 4:], p[0, 0, 4:] = 0.98, 0.01  # ... and finds a class 2 that the label lacks
    q = Q.class_quality(p, lab)
    assert q[0, 1] > 0.95 and q[0, 2] < 0.05  # class 2: the model's voxels count against the label
    assert q[0, 0] < 0.1  # background: the label gives it class 2's voxels
    lab[0, 4:] = 2
    q = Q.class_quality(p, lab)
    assert (q[0] > 0.95).all()
    p2 = p.copy()
    p2[0, 2], p2[0, 0, 4:] = 0.01, 0.98
    lab[0, 4:] = 0
    assert np.isnan(Q.class_quality(p2, lab)[0, 2])  # in neither: no score
    with pytest.raises(ValueError, match="label"):
        Q.class_quality(p, np.full((1, *grid), 3))
    with pytest.raises(ValueError, match="temperature"):
        Q.softmin_quality(p, lab, 0.0)


def test_fold_split_and_grid():
    f = Q.fold_split(10, 4, seed=3)
    assert sorted(np.bincount(f)) == [2, 2, 3, 3] and (Q.fold_split(10, 4, seed=3) == f).all()
    assert (Q.fold_split(10, 4, seed=4) != f).any()
    strata = np.r_[np.ones(4, bool), np.zeros(8, bool)]
    g = Q.fold_split(12, 4, seed=0, strata=strata)
    assert (np.bincount(g[strata], minlength=4) == 1).all()
    for bad in (1, 11, 2.5):
        with pytest.raises(ValueError, match="folds"):
            Q.fold_split(10, bad, seed=0)
    assert Q.grid_shape((224, 224, 192), 48) == (48, 48, 40)
    assert all(s % 4 == 0 for s in Q.grid_shape((300, 47, 11), 50))
    with pytest.raises(ValueError, match="size"):
        Q.grid_shape((1, 1, 1), 4)
    with pytest.raises(ValueError, match="extent_mm"):
        Q.grid_shape((1, 0, 1), 16)


def test_network_and_loss():
    net = Q.SmallUNet(1, 3)
    x = torch.randn(2, 1, 8, 12, 16)
    assert net(x).shape == (2, 3, 8, 12, 16)
    with pytest.raises(ValueError, match="multiple of 4"):
        net(torch.randn(1, 1, 8, 10, 8))
    logits, y = torch.randn(2, 3, 4, 4, 4), torch.randint(0, 3, (2, 4, 4, 4))
    loss = Q.dice_ce_loss(logits, y)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # a perfect, confident prediction: CE -> 0 and Dice -> 0
    perfect = torch.nn.functional.one_hot(y, 3).movedim(-1, 1).float() * 40
    assert Q.dice_ce_loss(perfect, y) < 1e-4


def test_dice_ce_loss_is_monais():
    losses = pytest.importorskip("monai.losses", reason="MONAI is optional (`pip install \"auvcore[monai]\"`)")
    torch.manual_seed(0)
    logits, y = torch.randn(2, 4, 6, 5, 4), torch.randint(0, 4, (2, 6, 5, 4))
    ref = losses.DiceCELoss(to_onehot_y=True, softmax=True)(logits, y[:, None])
    torch.testing.assert_close(Q.dice_ce_loss(logits, y), ref)


# ---- the job -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_demo(tmp_path_factory, N_CASES)


@pytest.fixture(scope="module")
def scored(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    assert score_random3d(data, out) == 0
    return out


@pytest.fixture(scope="module")
def qc_run(scored, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "qc"
    shutil.copytree(scored, out)
    assert main(["qc", str(out), *QC]) == 0
    return out


REAL_TRAIN_PREDICT = Q.train_predict


class Counter:
    """Wraps auvcore.qc.train_predict: counts the folds trained; ``fail`` maps a fold's seed to an exception."""

    def __init__(self, monkeypatch, fail=None):
        self.seeds, self.fail, self.real = [], fail or {}, REAL_TRAIN_PREDICT
        monkeypatch.setattr(Q, "train_predict", self)

    def __call__(self, *a, seed, **k):
        self.seeds.append(seed)
        if seed in self.fail:
            raise self.fail[seed]
        return self.real(*a, seed=seed, **k)


def test_qc_adds_the_oof_columns(data, qc_run, capsys):
    df = pd.read_parquet(qc_run / "scores.parquet")
    assert score_random3d(data, qc_run) == 0  # `score` run again rebuilds the table with the QC's columns
    pd.testing.assert_frame_equal(pd.read_parquet(qc_run / "scores.parquet"), df)
    assert len(df) == N_CASES and (df["oof_error"] == "").all()
    assert df["oof_score"].between(0, 1).all() and sorted(df["oof_fold"].unique()) == [0, 1]
    names = [c[4:-1] for c in df.columns if c.startswith("oof[")]
    assert "right lung" in names and "background" in names
    assert df["oof_dice"].between(0, 1).all()
    # the scoring's columns are all still there
    assert {"auv", "mahalanobis_score", "variance_score", "S[right lung]", "corrupted"} <= set(df.columns)
    plan = json.loads((qc_run / "qc" / "plan.json").read_text())
    assert plan["settings"] == {"version": 1, "folds": 2, "steps": 3, "size": 16, "seed": 0}
    assert all(s % 4 == 0 for s in plan["grid"]) and max(plan["grid"]) == 16
    assert not list(qc_run.rglob("*.tmp"))


def test_a_killed_qc_resumes_at_the_next_fold(qc_run, scored, tmp_path, monkeypatch, capsys):
    r = tmp_path / "r"
    shutil.copytree(scored, r)
    before = pd.read_parquet(qc_run / "scores.parquet")
    c = Counter(monkeypatch, fail={1: KeyboardInterrupt()})  # killed while training the second fold
    assert main(["qc", str(r), *QC]) == 130
    assert (r / "qc" / "fold-0.npz").exists() and not (r / "qc" / "fold-1.npz").exists()
    assert "oof_score" not in pd.read_parquet(r / "scores.parquet")  # no columns from a QC half done
    c = Counter(monkeypatch)
    assert main(["qc", str(r), *QC]) == 0
    assert c.seeds == [1]  # only the fold that was not finished
    pd.testing.assert_frame_equal(pd.read_parquet(r / "scores.parquet"), before)
    c = Counter(monkeypatch)
    assert main(["qc", str(r), *QC]) == 0 and c.seeds == []
    # other settings are refused, --force starts over
    assert main(["qc", str(r), *QC, "--steps", "4"]) == 2
    assert "other settings" in capsys.readouterr().err
    c = Counter(monkeypatch, fail={0: KeyboardInterrupt()})
    assert main(["qc", str(r), *QC, "--steps", "4", "--force"]) == 130 and c.seeds == [0]
    assert "oof_score" not in pd.read_parquet(r / "scores.parquet")  # the old QC's scores went with it
    c = Counter(monkeypatch)
    assert main(["qc", str(r), *QC, "--steps", "4"]) == 0 and c.seeds == [0, 1]


def test_a_bad_case_and_a_failing_fold_do_not_stop_the_qc(data, scored, tmp_path, monkeypatch, capsys):
    d, r = tmp_path / "data", tmp_path / "r"
    shutil.copytree(data, d)
    shutil.copytree(scored, r)
    settings = json.loads((r / "settings.json").read_text())
    settings["dataset"] = str(d)
    (r / "settings.json").write_text(json.dumps(settings))
    bad = sorted((d / "imagesTr").iterdir())[2]
    bad.write_bytes(b"not a nifti file")
    Counter(monkeypatch, fail={1: RuntimeError("out of memory")})
    assert main(["qc", str(r), *QC]) == 3
    err = capsys.readouterr().err
    df = pd.read_parquet(r / "scores.parquet").set_index("case")
    bad_id = bad.name.split("_0000")[0].split(".nii")[0]
    assert bad_id in df.index and "oof_error" in df
    assert df.loc[bad_id, "oof_error"] and np.isnan(df.loc[bad_id, "oof_score"])
    fold1 = df["oof_fold"] == 1
    assert df.loc[fold1, "oof_error"].str.contains("fold 2 failed: RuntimeError: out of memory").all()
    ok = ~fold1 & (df.index != bad_id)
    assert ok.sum() >= 3 and df.loc[ok, "oof_score"].notna().all() and (df.loc[ok, "oof_error"] == "").all()
    assert "out of memory" in err and bad_id in err
    assert "RuntimeError" in (r / "run.log").read_text()  # a bug: its traceback in the log
    # the rerun retries the failed fold only
    c = Counter(monkeypatch)
    assert main(["qc", str(r), *QC]) == 3 and c.seeds == [1]  # the unreadable case stays unreadable
    df = pd.read_parquet(r / "scores.parquet").set_index("case")
    assert (df["oof_error"] != "").sum() == 1


def test_qc_refuses_what_it_cannot_do(scored, tmp_path, capsys):
    r = tmp_path / "r"
    shutil.copytree(scored, r)
    assert main(["qc", str(r), *QC, "--folds", "5"]) == 2  # 8 cases: at most 4 folds of 2
    assert "at least 10 cases" in capsys.readouterr().err and not (r / "qc").exists()
    assert main(["qc", str(tmp_path / "nothing"), *QC]) == 2
    assert main(["qc", str(r), *QC, "--device", "cuda:7"]) == 2 and not (r / "qc").exists()
    assert main(["filter", str(r), "--score", "oof"]) == 2
    assert "auvcore qc" in capsys.readouterr().err


def test_filter_and_report_default_to_the_oof_score(qc_run, tmp_path):
    r = tmp_path / "r"
    shutil.copytree(qc_run, r)
    df = pd.read_parquet(r / "scores.parquet")
    assert main(["filter", str(r), "--quantile", "0.75"]) == 0
    summary = json.loads((r / "filter" / "summary.json").read_text())
    assert summary["score"] == "oof" and summary["default_score"] and summary["dropped"] == 2
    assert set((r / "filter" / "dropped.txt").read_text().split()) == set(df.nlargest(2, "oof_score")["case"])
    assert main(["report", str(r)]) == 0
    page = (r / "report" / "index.html").read_text()
    assert 'id="panel-oof"' in page and 'id="panel-outlier"' in page and 'id="panel-auv"' in page
    assert "global filter, out-of-fold label-error score cut" in page
    assert page.count('data-above="1"') == 2 + 2  # the OOF panel's and the outlier panel's cases above the cut
    metrics = json.loads((r / "report" / "metrics.json").read_text())
    assert metrics["decision_score"] == "oof" and set(metrics["cuts"]) == {"oof", "outlier"}
    assert "out-of-fold label-error score" in metrics["scorers"]
    # the paper's AUV one flag away; the outlier score by its name
    for score, col in (("auv", "auv"), ("outlier", "mahalanobis_score")):
        assert main(["filter", str(r), "--quantile", "0.75", "--score", score]) == 0
        assert set((r / "filter" / "dropped.txt").read_text().split()) == set(df.nlargest(2, col)["case"])
    assert main(["filter", str(r), "--quantile", "0.5", "--score", "oof", "--per-class", "right lung"]) == 0
    assert set((r / "filter" / "dropped.txt").read_text().split()) == set(df.nlargest(4, "oof[right lung]")["case"])


def test_without_qc_the_filter_and_report_use_the_auv(scored, tmp_path):
    r = tmp_path / "r"
    shutil.copytree(scored, r)
    assert main(["filter", str(r), "--quantile", "0.75"]) == 0
    assert json.loads((r / "filter" / "summary.json").read_text())["score"] == "auv"
    assert main(["report", str(r)]) == 0
    page = (r / "report" / "index.html").read_text()
    assert "<code>auvcore qc RUN</code> adds it" in page and 'id="panel-outlier"' in page


def test_two_ranks_share_the_folds_and_give_the_table_of_one_process(qc_run, scored, tmp_path):
    r = tmp_path / "r"
    shutil.copytree(scored, r)
    env = {**os.environ, "PYTHONPATH": str(Path(auvcore.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "auvcore", "qc", str(r), *QC], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("scores: ") == 1
    pd.testing.assert_frame_equal(pd.read_parquet(r / "scores.parquet"), pd.read_parquet(qc_run / "scores.parquet"),
                                  check_exact=False, atol=1e-5)
