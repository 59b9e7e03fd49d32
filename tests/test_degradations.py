"""auvcore.data.cohorts.degradations: each image degradation does what it says, only to the image, the same for the
same seed, larger at a larger strength; the builder's degraded cohorts keep their labels and record each case."""
import json

import numpy as np
import pytest

pytest.importorskip("scipy")
from auvcore.data.cohorts import DEGRADATIONS, STRENGTHS, build_demo
from auvcore.data.cohorts.degradations import _STRENGTH, degrade, psnr
from auvcore.data.io import read_image

SPACING = (1.8, 1.8, 3.5)


def _phantom(modality="CT", shape=(48, 40, 20)):
    """A body (an ellipse per slice) with two organs and a bright bone, in HU (CT) or MR intensities; a little
    noise so that it is an image and not a cartoon. Empty space at the far end of axis 0 (for the ghosts)."""
    rng = np.random.default_rng(0)
    idx = np.ogrid[tuple(slice(0, s) for s in shape)]
    x, y, z = (i / s for i, s in zip(idx, shape))
    body = ((x - 0.35) / 0.3) ** 2 + ((y - 0.5) / 0.42) ** 2 <= 1.0
    body = np.broadcast_to(body, shape)
    organ = ((x - 0.3) / 0.12) ** 2 + ((y - 0.35) / 0.1) ** 2 + ((z - 0.5) / 0.4) ** 2 <= 1.0
    bone = ((x - 0.45) / 0.05) ** 2 + ((y - 0.6) / 0.05) ** 2 <= 1.0
    if modality == "CT":
        img = np.where(body, 40.0, -1000.0) + np.where(organ, -800.0, 0) + np.where(bone & body, 900.0, 0)
        img = img + rng.normal(0, 10, shape)
        return np.clip(np.round(img), -1024, 3071).astype(np.int16)
    img = np.where(body, 500.0, 0.0) + np.where(organ, 400.0, 0) + np.where(bone & body, -350.0, 0)
    img = np.hypot(img + rng.normal(0, 15, shape), rng.normal(0, 15, shape))
    return np.round(img).astype(np.int16)


@pytest.fixture(scope="module", params=["CT", "MR"])
def image(request):
    return request.param, _phantom(request.param)


@pytest.mark.parametrize("kind", DEGRADATIONS)
def test_each_degradation_is_deterministic_and_recorded(kind, image):
    modality, img = image
    a, ra = degrade(np.random.default_rng(5), img, SPACING, kind, modality=modality)
    b, rb = degrade(np.random.default_rng(5), img, SPACING, kind, modality=modality)
    c, _ = degrade(np.random.default_rng(6), img, SPACING, kind, modality=modality)
    assert a.dtype == np.int16 and a.shape == img.shape
    np.testing.assert_array_equal(a, b)
    assert ra == rb and json.loads(json.dumps(ra)) == ra  # the record is plain JSON
    assert (a != img).mean() > 0.05 and (c != a).any()
    assert ra["psnr_db"] == psnr(a, img, modality) < 60
    lo, hi = (-1024, 3071) if modality == "CT" else (0, 32767)
    assert a.min() >= lo and a.max() <= hi
    assert not np.shares_memory(a, img) and (img == _phantom(modality)).all()  # the input is left alone


@pytest.mark.parametrize("kind", DEGRADATIONS)
def test_strength_orders_the_damage(kind, image):
    """PSNR against the clean image: mild > default > strong, draw by draw (the same shape at a larger size), for
    motion on average: a moved copy that no longer overlaps the anatomy cannot differ more, so the damage of one
    draw saturates."""
    modality, img = image
    ps = np.array([[degrade(np.random.default_rng(s), img, SPACING, kind, st, modality)[1]["psnr_db"]
                    for st in STRENGTHS] for s in range(4)])
    if kind == "motion":
        ps = ps.mean(0, keepdims=True)
    assert (ps[:, 0] > ps[:, 1]).all() and (ps[:, 1] > ps[:, 2]).all(), ps
    # and the ranges themselves do not overlap, so the recorded sizes order too
    for a, b in zip(STRENGTHS, STRENGTHS[1:]):
        assert _STRENGTH[a][kind][1] <= _STRENGTH[b][kind][0]


def test_noise_is_gaussian_for_ct_and_rician_for_mr():
    ct = _phantom("CT")
    out, rec = degrade(np.random.default_rng(1), ct, SPACING, "noise", modality="CT")
    d = (out.astype(float) - ct)[ct > -700]  # air, at -1000 HU, is clipped at -1024
    sd = rec["params"]["sigma"]
    assert rec["params"]["model"] == "gaussian" and abs(d.std() - sd) < 0.05 * sd and abs(d.mean()) < 0.05 * sd
    mr = _phantom("MR")
    out, rec = degrade(np.random.default_rng(1), mr, SPACING, "noise", modality="MR")
    bg = (mr == 0) | (mr < 60)  # background: Rician noise lifts it (the magnitude of noise is positive)
    assert rec["params"]["model"] == "rician" and out.min() >= 0
    sd = rec["params"]["sigma"]
    assert out[bg].mean() > 0.8 * sd * np.sqrt(np.pi / 2) - mr[bg].mean()


def test_blur_and_lowres_remove_detail_keep_the_level():
    img = _phantom("CT")

    def detail(v):  # energy of the in-plane gradient
        return float(sum((np.diff(v.astype(float), axis=a) ** 2).mean() for a in (0, 1)))

    for kind in ("blur", "lowres"):
        out, rec = degrade(np.random.default_rng(2), img, SPACING, kind, modality="CT")
        assert detail(out) < 0.6 * detail(img), kind
        assert abs(out.mean() - img.mean()) < 15, kind
    _, rec = degrade(np.random.default_rng(2), img, SPACING, "lowres", modality="CT")
    f = rec["params"]["factor"]
    assert rec["params"]["axes"] == [0, 1] and rec["params"]["low_shape"] == [round(48 / f), round(40 / f)]
    _, rec = degrade(np.random.default_rng(2), img, SPACING, "blur", modality="CT")
    np.testing.assert_allclose(rec["params"]["sigma_vox"], np.round(rec["params"]["sigma_mm"] / np.array(SPACING), 3))


def test_ghosting_puts_copies_where_there_was_nothing():
    """An object in the first third of axis 0 and nothing else: the ghosts, shifted by 1/n of the field of view
    along the ghosting axis, light up the empty rest (as bright as a · (1/n of the object − the line's mean): the
    centre line, the mean, is kept)."""
    img = np.zeros((48, 40, 20), np.int16)
    img[5:15, 10:30, 5:15] = 500
    seen = set()
    for seed in range(12):
        out, rec = degrade(np.random.default_rng(seed), img, SPACING, "ghosting", modality="MR")
        p = rec["params"]
        seen.add(p["axis"])
        if p["axis"] != 0:
            continue
        n, a = p["ghosts"], p["intensity"]
        for k in range(1, n):  # the k-th ghost starts k/n of the way along
            lo = 5 + k * 48 // n
            assert out[lo + 2:lo + 8, 12:28, 7:13].mean() > 0.9 * a * (500 / n - 500 * 10 / 48), (p, k)
        # the object gave up what its ghosts got: as much as each ghost holds
        assert out[7:13, 12:28, 7:13].mean() == pytest.approx(500 - a * (500 / n - 500 * 10 / 48), abs=2)
    assert seen == {0, 1}  # the phase-encoding axis is one of the two in-plane axes, drawn


def test_bias_is_smooth_and_as_large_as_recorded():
    img = np.full((48, 40, 20), 1000, np.int16)  # a flat image shows the field itself
    out, rec = degrade(np.random.default_rng(4), img, SPACING, "bias", modality="MR")
    g = np.log(out / 1000.0)
    amp = rec["params"]["max_log_gain"]
    assert 0.25 <= amp < 0.40 and abs(np.abs(g - np.mean(g)).max() - amp) < 0.01
    # smooth: the largest step between neighbours is a small part of the excursion
    assert max(np.abs(np.diff(g, axis=a)).max() for a in range(3)) < 0.25 * amp


def test_motion_moves_along_one_in_plane_axis():
    img = _phantom("CT")
    out, rec = degrade(np.random.default_rng(3), img, SPACING, "motion", "strong", modality="CT")
    p = rec["params"]
    assert p["axis"] in (0, 1) and 1 <= len(p["moves"]) <= 2
    assert all(0.15 <= mv["from"] < 0.85 and 4.0 <= abs(mv["rotation_deg"]) <= 12.0 for mv in p["moves"])
    # a slice-axis-0 source (sagittal) moves in its own plane (axes 1 and 2)
    _, rec = degrade(np.random.default_rng(3), img, SPACING, "motion", modality="CT", slice_axis=0)
    assert rec["params"]["axis"] in (1, 2)


def test_bad_arguments_name_themselves():
    img = _phantom("CT")
    rng = np.random.default_rng(0)
    for kw, name in ((dict(kind="fog"), "kind"), (dict(kind="noise", strength="huge"), "strength"),
                     (dict(kind="noise", modality="PET"), "modality"),
                     (dict(kind="noise", spacing=(1, 0, 1)), "spacing"),
                     (dict(kind="noise", slice_axis=3), "slice_axis")):
        args = {"spacing": SPACING, **kw}
        with pytest.raises(ValueError, match=f"^{name}"):
            degrade(rng, img, **args)
    with pytest.raises(ValueError, match="^img"):
        degrade(rng, img[0], SPACING, "noise")


# --- the builder ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    pytest.importorskip("slicerio")
    base = tmp_path_factory.mktemp("deg")
    kw = dict(n_cases=4, corrupt_fraction=0.5, seed=2, size_mm=(96.0, 96.0, 60.0))
    plain = build_demo(base / "plain", **kw)
    mixed = build_demo(base / "mixed", degrade=["noise", "ghosting"], degrade_fraction=0.5, degrade_strength="strong",
                       **kw)
    return plain, mixed


def _arr(p):
    return read_image(p)[0]


def test_degraded_cohort_changes_only_the_images_it_records(cohorts):
    plain, mixed = cohorts
    rp, rm = (json.loads((d / "corruption.json").read_text()) for d in (plain, mixed))
    deg = sorted(c for c, e in rm.items() if e.get("degraded"))
    lab = sorted(c for c, e in rp.items() if e["corrupted"])
    assert len(deg) == 2 and len(lab) == 2 and not set(deg) & set(lab)
    assert sorted(rm[c]["kind"] for c in deg) == ["ghosting", "noise"]
    for cid in rm:
        # labels, clean labels and every label-corruption record: those of the cohort without degradations
        for f in (f"labelsTr/{cid}.nii.gz", f"labelsTr_clean/{cid}.nii.gz"):
            assert (plain / f).read_bytes() == (mixed / f).read_bytes(), f
        # the images before degradation are the plain cohort's images
        assert (mixed / "imagesTr_clean" / f"{cid}_0000.nii.gz").read_bytes() == \
            (plain / "imagesTr" / f"{cid}_0000.nii.gz").read_bytes()
        img, clean = _arr(mixed / "imagesTr" / f"{cid}_0000.nii.gz"), _arr(plain / "imagesTr" / f"{cid}_0000.nii.gz")
        if cid in deg:
            e = rm[cid]
            assert e["corrupted"] and e["strength"] == "strong" and e["changed_voxels"] == 0 and e["classes"] == []
            assert e["psnr_db"] == psnr(img, clean, "CT") and (img != clean).mean() > 0.2
            assert e["case_params"] == rp[cid]["case_params"]
        else:
            np.testing.assert_array_equal(img, clean)
            assert rm[cid] == rp[cid]
    meta = json.loads((mixed / "dataset.json").read_text())["auvcore_demo"]
    assert meta["degrade"] == ["noise", "ghosting"] and meta["degrade_fraction"] == 0.5
    assert meta["degrade_strength"] == "strong"
    assert "degrade" not in json.loads((plain / "dataset.json").read_text())["auvcore_demo"]
    assert not (plain / "imagesTr_clean").exists()


def test_degraded_cohort_is_idempotent_and_checks_its_arguments(cohorts, tmp_path):
    _, mixed = cohorts
    stamp = {p: p.stat().st_mtime_ns for p in mixed.rglob("*.nii.gz")}
    kw = dict(n_cases=4, corrupt_fraction=0.5, seed=2, size_mm=(96.0, 96.0, 60.0))
    assert build_demo(mixed, degrade=["noise", "ghosting"], degrade_fraction=0.5, degrade_strength="strong",
                      **kw) == mixed
    assert {p: p.stat().st_mtime_ns for p in mixed.rglob("*.nii.gz")} == stamp
    with pytest.raises(ValueError, match="degrade:"):
        build_demo(tmp_path / "x", degrade=["fog"])
    with pytest.raises(ValueError, match="degrade_fraction"):
        build_demo(tmp_path / "x", n_cases=4, corrupt_fraction=0.5, degrade=["noise"], degrade_fraction=0.75)
    with pytest.raises(ValueError, match="degrade_strength"):
        build_demo(tmp_path / "x", degrade="noise", degrade_strength="huge")
    assert not (tmp_path / "x").exists()


def test_demo_command_with_degrade(tmp_path, capsys):
    """`auvcore demo --degrade` builds a clean-label cohort with degraded images and runs the job (random3d)."""
    import importlib.util

    from auvcore.app.cli import main

    if importlib.util.find_spec("TPTBox") is None:
        pytest.skip("the spine-ct cohort needs the TPTBox package: pip install 'auvcore[cohorts]'")
    out = tmp_path / "demo"
    assert main(["demo", "--source", "spine-ct", "--cases", "4", "--encoder", "random3d", "--out", str(out),
                 "--degrade", "blur,lowres", "--fraction", "0.5", "--strength", "mild", "--no-progress"]) == 0
    assert "0.5 of them with degraded images (blur, lowres; labels clean)" in capsys.readouterr().out
    params = json.loads((out / "data" / "dataset.json").read_text())["auvcore_demo"]
    assert params["degrade"] == ["blur", "lowres"] and params["degrade_strength"] == "mild"
    assert params["corrupt_fraction"] == 0.0 and params["degrade_fraction"] == 0.5
    rec = json.loads((out / "data" / "corruption.json").read_text())
    assert sorted(e["kind"] for e in rec.values() if e["corrupted"]) == ["blur", "lowres"]
    assert all(e.get("degraded", False) == e["corrupted"] for e in rec.values())
    for cid in rec:
        assert (out / "data" / "labelsTr" / f"{cid}.nii.gz").read_bytes() == \
            (out / "data" / "labelsTr_clean" / f"{cid}.nii.gz").read_bytes()
    assert (out / "run" / "report" / "index.html").is_file()
    # both spellings; a label corruption with --degrade is refused (two cohorts), an unknown kind too
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--degrade", "noise", "--kinds", "erode"]) == 2
    assert "--kinds" in capsys.readouterr().err
    for bad in (["--degrade", "fog"], ["--degrade", "noise,fog"], ["--degrade"]):
        with pytest.raises(SystemExit):
            main(["demo", "--out", str(out), *bad])
