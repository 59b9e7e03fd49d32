"""bench/study_detection.py without encoders: cohort folders per rate, the tables grouped by rate, the CLI's checks."""
import numpy as np
import pytest

from bench_common import load_bench

pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def sd():
    return load_bench("study_detection")


def test_cohort_folders(sd):
    # the default rate, strength and kinds keep the first studies' folder, so their data and scores are reused
    assert sd.cohort_tag("spine-ct", 0, 0.25) == "spine-ct-0"
    assert sd.cohort_tag("spine-ct", 1, 0.1) == "spine-ct-1-f0.1-default"
    assert sd.cohort_tag("chest", 0, 0.05, "mild") == "chest-0-f0.05-mild"
    assert sd.cohort_tag("spine-mr", 0, 0.25, "default", ["boundary", "partial"]) == \
        "spine-mr-0-f0.25-default-boundary+partial"


def _cases(fractions=(0.1, 0.2), n=20, draws=2):
    rng = np.random.default_rng(0)
    rows = []
    for f in fractions:
        for d in range(draws):
            bad = set(rng.choice(n, round(f * n), replace=False))
            for i in range(n):
                rows.append({"fraction": f, "strength": "default", "source": "spine-ct", "draw": d,
                             "case": f"demo_{i:03d}", "corrupted": i in bad, "kind": "erode" if i in bad else None,
                             # a score that finds every corrupted case, and a random one
                             "auv:x": float(i in bad) + rng.random() * 0.1, "random": rng.random()})
    return pd.DataFrame(rows)


def test_tables_and_markdown_by_rate(sd):
    res = sd.tables(_cases(), 20)
    assert set(res["by_rate"]) == {"0.1", "0.2"} and "by_source" not in res
    for rate, r in res["by_rate"].items():
        assert r["by_source"]["auv:x"]["spine-ct"]["auroc"][0] == 1.0
        assert r["by_source"]["auv:x"]["spine-ct"]["prevalence"] == pytest.approx(float(rate))
        assert r["by_kind"]["auv:x"]["erode"]["n"] == round(float(rate) * 20) * 2
    meta = {"machine": "m", "commit": "c", "date": "d", "command": "x", "fractions": [0.1, 0.2],
            "strength": "default", "kinds": ["erode"], "cases": 20}
    md = sd.markdown(res, meta)
    assert "| score | spine-ct @ 0.1 | spine-ct @ 0.2 |" in md
    assert "### Corruption rate 0.1 (2 of 20 cases corrupted)" in md and "### Corruption rate 0.2 (4 of 20" in md
    # one rate: the earlier layout (by_source / by_kind at the top) is kept beside by_rate
    one = sd.tables(_cases((0.25,)), 20)
    assert set(one) == {"by_rate", "by_source", "by_kind", "unscored"}
    assert one["by_source"] == one["by_rate"]["0.25"]["by_source"] and one["unscored"] == {}


def test_a_score_without_values_is_named_not_dropped(sd):
    """A configuration with no value on any case (every class below a deep layer's grid) is said, not hidden."""
    df = _cases((0.25,))
    df["auv:deep"] = np.nan
    res = sd.tables(df, 20)
    assert "auv:deep" not in res["by_source"] and res["unscored"] == {"auv:deep": ["spine-ct"]}
    md = sd.markdown(res, {"machine": "m", "commit": "c", "date": "d", "command": "x"})
    assert "not in the tables" in md and "auv:deep (spine-ct)" in md


def test_cli_checks_the_rates(sd, capsys):
    with pytest.raises(SystemExit):
        sd.main(["--fraction", "0.2", "--fractions", "0.1"])
    assert "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sd.main(["--fractions", "0.01", "--cases", "24"])
    assert "corrupts 0 cases" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sd.main(["--strength", "huge"])
    assert "choose from 'mild', 'default', 'strong'" in capsys.readouterr().err


def test_degraded_image_cohorts(sd, capsys):
    """--degrade: clean labels, degraded images, their own folders; not together with label --kinds."""
    tag = sd.cohort_tag("chest", 0, 0.25, "default", None, ["noise", "blur"])
    assert tag == "chest-0-f0.25-default-degrade-noise+blur"
    assert sd.cohort_tag("chest", 0, 0.25, "default", None, None) == "chest-0"
    with pytest.raises(SystemExit):
        sd.main(["--degrade", "noise", "--kinds", "erode"])
    assert "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sd.main(["--degrade", "fog"])
    assert "invalid choice" in capsys.readouterr().err
    res = sd.tables(_cases((0.25,)), 20)
    md = sd.markdown(res, {"machine": "m", "commit": "c", "date": "d", "command": "x", "strength": "mild",
                           "kinds": ["erode"], "cases": 20, "degrade": ["noise", "blur"]})
    assert "Image degradation (labels clean), strength mild; kinds: noise, blur" in md
