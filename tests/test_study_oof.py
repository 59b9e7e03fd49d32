"""bench/study_oof.py's core on a tiny synthetic cohort: OOF training, the label-quality scores, the tables."""
import numpy as np
import pytest

from bench_common import load_bench


@pytest.fixture(scope="module")
def oof():
    return load_bench("study_oof")


def _cohort(n=8, shape=(16, 16, 16), bad=3, seed=0):
    """Two blobs per case (class 1 bright, class 2 dark) at random places; case ``bad``'s label has the two
    classes exchanged, which a model that learned "bright = 1" contradicts on every foreground voxel."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape)
    X, Y = [], []
    for _ in range(n):
        lab = np.zeros(shape, np.int64)
        for k, off in ((1, 4), (2, 11)):
            c = np.array([off, rng.integers(5, 11), rng.integers(5, 11)])
            lab[((idx - c[:, None, None, None]) ** 2).sum(0) <= rng.integers(6, 12)] = k
        img = np.where(lab == 1, 2.0, np.where(lab == 2, -2.0, 0.0)) + rng.normal(0, 0.3, shape)
        X.append(img.astype(np.float32))
        Y.append(lab)
    label = np.stack(Y)
    clean = label.copy()
    label[bad] = np.where(clean[bad] == 1, 2, np.where(clean[bad] == 2, 1, 0))
    corrupted = np.zeros(n, bool)
    corrupted[bad] = True
    return {"ids": [f"c{i}" for i in range(n)], "image": np.stack(X)[:, None], "label": label, "clean": clean,
            "K": 3, "names": {0: "background", 1: "bright", 2: "dark"}, "shape": shape, "corrupted": corrupted,
            "kind": ["swap" if c else "" for c in corrupted]}


def test_fold_split_spreads_corrupted_cases(oof):
    corrupted = np.r_[np.ones(6, bool), np.zeros(18, bool)]
    f = oof.fold_split(corrupted, 4, seed=1)
    assert sorted(np.bincount(f)) == [6, 6, 6, 6]
    assert all(np.bincount(f[corrupted], minlength=4) >= 1)
    with pytest.raises(ValueError, match="folds"):
        oof.fold_split(corrupted, 1, seed=1)


def test_softmin_quality_matches_the_formula(oof):
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=(2, 4, 4, 4)).transpose(0, 4, 1, 2, 3)
    y = rng.integers(0, 3, (2, 4, 4, 4))
    s = np.take_along_axis(p, y[:, None], 1).reshape(2, -1)
    w = np.exp((1 - s) / 0.1)
    np.testing.assert_allclose(oof.softmin_quality(p, y), (s * w).sum(1) / w.sum(1), rtol=1e-12)


def test_oof_scores_flag_the_swapped_label(oof):
    import pandas as pd
    import torch

    torch.set_num_threads(1)
    cohort = _cohort()
    probs, fold, secs = oof.oof_probabilities(cohort, folds=2, steps=40, seed=0, log=lambda *_: None)
    assert probs.shape == (8, 3, 16, 16, 16) and len(secs) == 2
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    # the score table of a Merlin run, as far as cohort_frames reads it
    rng = np.random.default_rng(1)
    table = pd.DataFrame({"case": cohort["ids"], "auv": rng.random(8), "variance_score": rng.random(8),
                          "mahalanobis_score": rng.random(8),
                          **{f"{m}[{n}]": rng.random(8) for m in ("S", "variance", "mahalanobis")
                             for n in ("background", "bright", "dark")}})
    cases, classes = oof.cohort_frames(cohort, probs, fold, table, "synthetic", 0)
    assert len(cases) == 8 and len(classes) == 16
    for col in ("cleanlab_score", "monai_lqs", "oof_dice_score", "dice_given", "dice_clean", "auv:merlin-l2"):
        assert col in cases
    bad = cases.set_index("case").loc["c3"]
    others = cases[cases["case"] != "c3"]
    assert bad["cleanlab_score"] > others["cleanlab_score"].max()
    assert bad["oof_dice_score"] > others["oof_dice_score"].max()
    # the model learned the clean mapping: its Dice against the clean label beats the one against the swap
    assert bad["dice_clean"] > bad["dice_given"]
    res = oof.correlations(cases, classes)
    assert set(res) == {"per_class", "per_class_within", "per_case"}
    c = res["per_class"]["S (AUV's scale)"]["clean"]["synthetic"]
    assert c["n"] == 16 and -1 <= c["pearson"] <= 1 and 0 <= c["spearman_p"] <= 1
    det = oof.detection_tables(cases, n_boot=20)
    assert det["by_source"]["cleanlab_score"]["synthetic"]["auroc"][0] == 1.0
    assert "| S (AUV's scale) | synthetic | 16 |" in oof.correlation_markdown(res)
