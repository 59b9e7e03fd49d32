"""bench/study_training.py's core without a demo cohort: the arms' drops, one short training per loss on a tiny
synthetic volume, the summary and its markdown (seconds; the study itself runs from the CLI)."""
import importlib.util

import numpy as np
import pytest

from bench_common import load_bench


@pytest.fixture(scope="module")
def st():
    return load_bench("study_training")


# the study's network and losses are MONAI's; the README's test command installs it (extra "test")
needs_monai = pytest.mark.skipif(importlib.util.find_spec("monai") is None,
                                 reason="monai not installed (pip install 'auvcore[monai]')")


def test_drop_counts_and_picks(st):
    assert st.n_drop(24, 0.9) == 2 and st.n_drop(24, 0.95) == 1 and st.n_drop(24, 1.0) == 0
    with pytest.raises(ValueError, match="keep"):
        st.n_drop(24, 0.0)
    # highest first, NaN never dropped, returned in case order
    assert st.top_cases(np.array([0.1, np.nan, 0.9, 0.5]), 2).tolist() == [2, 3]
    r = st.random_cases(24, 2, seed=0)
    assert len(set(r.tolist())) == 2 and r.tolist() == st.random_cases(24, 2, seed=0).tolist()


def test_arms(st):
    cohort = {"ids": [f"c{i}" for i in range(20)], "corrupted": np.arange(20) % 5 == 0}
    auv = np.linspace(0, 1, 20)
    arms = st.arms(cohort, auv, None, [0.9], seed=0)
    assert set(arms) == {"all", "auv90", "random90", "oracle", "dice_bce", "duo"}  # no cleanlab scores: no arm
    assert arms["auv90"][0].tolist() == [18, 19] and len(arms["random90"][0]) == 2
    assert arms["oracle"][0].tolist() == [0, 5, 10, 15]
    assert [arms[a][1] for a in ("all", "oracle", "dice_bce", "duo")] == ["dice_ce", "dice_ce", "dice_bce", "duo"]
    assert "cleanlab90" in st.arms(cohort, auv, -auv, [0.9], seed=0)


@needs_monai
@pytest.mark.parametrize("loss", ["dice_ce", "dice_bce", "duo"])
def test_train_eval_runs(st, loss):
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    label = np.zeros((3, 8, 8, 8), np.int64)
    label[:, 2:5, 2:5, 2:5] = 1
    label[:, 5:7, 5:7, 5:7] = 2
    image = (label[:, None] + rng.normal(0, 0.1, (3, 1, 8, 8, 8))).astype(np.float32)
    pred = st.train_eval(image, label, np.array([0, 1]), image[[2]], K=3, loss=loss, steps=2, seed=0)
    assert pred.shape == (1, 8, 8, 8) and pred.min() >= 0 and pred.max() <= 2
    with pytest.raises(ValueError, match="loss"):
        st.train_eval(image, label, np.array([0]), image[[2]], K=3, loss="ce", steps=1, seed=0)


def test_summary_and_markdown(st):
    runs = []
    for seed, base in ((0, 0.8), (1, 0.7)):
        runs.append({"arm": "all", "seed": seed, "dropped": [], "dropped_corrupted": 0, "n_train": 4,
                     "dice": [[base, base], [base, np.nan]], "seconds": 1.0})
        runs.append({"arm": "oracle", "seed": seed, "dropped": ["c0"], "dropped_corrupted": 1, "n_train": 3,
                     "dice": [[base + 0.1, base + 0.1], [base + 0.1, base + 0.1]], "seconds": 1.0})
    res = {"source": "s", "draw": 0, "grid": [8, 8, 8], "classes": ["a", "b"], "n_train_cohort": 4,
           "n_corrupted": 1, "n_test": 2, "cleanlab": None, "corrupted_ids": ["c0"], "runs": runs}
    rows = {r["arm"]: r for r in st.summarise(res)}
    assert rows["all"]["dice_mean"] == pytest.approx(0.75)
    assert rows["all"]["dice_std"] == pytest.approx(np.std([0.8, 0.7], ddof=1))
    assert rows["oracle"]["delta_mean"] == pytest.approx(0.1) and rows["oracle"]["delta_std"] == pytest.approx(0)
    res["summary"] = list(rows.values())
    md = st.markdown([res], {"machine": "m", "commit": "c", "date": "d", "command": "x", "lr": 3e-3, "steps": 2,
                             "size": 8, "seeds": [0, 1]})
    assert "| oracle: recorded corrupted cases dropped | 3 (1; 1) | 0.8500 ± 0.0707 | +0.1000 ± 0.0000 |" in md
