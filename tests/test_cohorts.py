"""The demo builder's other sources (spine CT, spine MR, MNI152 brain MR, the Colin27 brain with AAL regions,
pyradiomics' lung and brain tumours): each builds a small cohort with realistic variation and recorded
corruption, and the main job (score -> filter -> report) runs on it end to end with the fast random-weight
encoder."""
import importlib.util
import json

import numpy as np
import pytest

pytest.importorskip("scipy")
pytest.importorskip("pandas")
import auvcore.data as D
from auvcore.app.cli import main
from auvcore.data.cohorts import KINDS, SOURCES, build_demo, load_source
from auvcore.data.cohorts.corruptions import applicable, corrupt
from auvcore.data.cohorts.sources import SPECS
from auvcore.data.io import read_image

# source -> (package that ships its volumes, classes, modality, small field of view for the tests)
COHORTS = {
    "spine-ct": ("TPTBox", ["background", "L2 vertebra", "L3 vertebra", "L4 vertebra"], "CT", (96.0, 96.0, 64.0)),
    "spine-mr": ("TPTBox", ["background", "C5 vertebra", "C6 vertebra", "C7 vertebra", "C5/C6 disc", "C6/C7 disc",
                            "spinal canal"], "MR", (64.0, 90.0, 72.0)),
    "brain-mni": ("nilearn", ["background", "CSF", "grey matter", "white matter"], "MR", (120.0, 144.0, 96.0)),
    # Debian's mricron-data, not a Python package: installed, or unpacked and named by AUVCORE_MRICRON_TEMPLATES
    "brain-aal": (None, ["background"] + [f"{r} {s}" for r in ("caudate", "putamen", "thalamus", "hippocampus")
                                         for s in ("left", "right")], "MR", (88.0, 104.0, 72.0)),
}
N = 5


def _need(source):
    pkg = COHORTS[source][0]
    if pkg is None:
        from auvcore.data.cohorts import MRICRON_INSTALL, mricron_templates

        if not (mricron_templates() / "aal.nii.gz").is_file():
            pytest.skip(f"the {source} cohort reads Debian's mricron-data templates, not found at "
                        f"{mricron_templates()}: {MRICRON_INSTALL}")
        return
    if importlib.util.find_spec(pkg) is None:
        pytest.skip(f"the {source} cohort needs the {pkg} package: pip install 'auvcore[cohorts]'")


@pytest.fixture(scope="module", params=sorted(COHORTS))
def cohort(request, tmp_path_factory):
    source = request.param
    _need(source)
    out = tmp_path_factory.mktemp(f"cohort-{source}") / "data"
    # 3 of 5 cases corrupted
    return source, build_demo(out, n_cases=N, corrupt_fraction=0.6, seed=2, source=source,
                              size_mm=COHORTS[source][3])


def test_sources_are_listed():
    assert SOURCES[0] == "chest" and set(COHORTS) <= set(SOURCES)
    with pytest.raises(ValueError, match="source"):
        build_demo("/nonexistent/x", source="knee")


@pytest.mark.parametrize("source", sorted(COHORTS))
def test_source_volume(source):
    _need(source)
    img, lab, aff, names, modality = load_source(source)
    assert modality == COHORTS[source][2]
    assert [names[k] for k in sorted(names)] == COHORTS[source][1]
    assert img.shape == lab.shape and img.dtype == np.float32 and lab.dtype == np.uint8
    # RAS: a positive diagonal
    assert np.all(np.diag(aff)[:3] > 0)
    counts = np.bincount(lab.ravel(), minlength=len(names))
    assert len(counts) == len(names) and (counts[1:] > 0).all(), counts
    if modality == "MR":
        assert img.min() >= 0
    else:
        assert img.min() < -500 or img.max() > 1000  # HU


def test_cohort_layout(cohort):
    source, root = cohort
    names, modality = COHORTS[source][1], COHORTS[source][2]
    ds = D.discover(root)
    assert ds.layout == "nnunet" and len(ds.cases) == N and ds.modality == modality
    assert [ds.class_names[k] for k in sorted(ds.class_names)] == names and ds.num_classes == len(names)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["name"] == f"auvcore-demo-{source}" and meta["auvcore_demo"]["source"] == source
    assert any(w in meta["licence"] for w in ("Apache", "McConnell", "mricron-data"))
    assert set(ds.corruption) == {c.case_id for c in ds.cases}
    assert sum(e["corrupted"] for e in ds.corruption.values()) == 3
    assert not list(root.parent.glob(".*building*"))
    shapes = set()
    for case in ds.cases:
        v = D.load_case(case, spacing=None, modality=modality)
        shapes.add(v.shape)
        assert v.label.shape == v.image.shape
        assert set(np.unique(v.label)) <= set(range(len(names)))
        assert (v.label > 0).mean() > 0.05
        if modality == "CT":
            assert v.image.min() >= -1024 and v.image.max() <= 3071 and v.image.max() > 500  # bone in HU
        else:
            assert v.image.min() >= 0 and 300 < np.percentile(v.image[v.label > 0], 99) < 3000
    assert len(shapes) > 1, "cases should differ in voxel size and so in shape"


def test_cohort_record_matches_label_changes(cohort):
    source, root = cohort
    rec = json.loads((root / "corruption.json").read_text())
    skipped = set(json.loads((root / "dataset.json").read_text()).get("skipped_kinds", []))
    for cid, e in rec.items():
        lab, aff = read_image(root / "labelsTr" / f"{cid}.nii.gz")
        clean, caff = read_image(root / "labelsTr_clean" / f"{cid}.nii.gz")
        img, iaff = read_image(root / "imagesTr" / f"{cid}_0000.nii.gz")
        np.testing.assert_allclose(aff, iaff)
        np.testing.assert_allclose(caff, iaff)
        assert lab.shape == img.shape and img.dtype == np.int16
        diff = lab != clean
        assert int(diff.sum()) == e["changed_voxels"]
        if not e["corrupted"]:
            assert e["kind"] is None and not diff.any()
            continue
        assert e["kind"] in KINDS and e["kind"] not in skipped and diff.sum() > 0
        involved = np.isin(clean[diff], e["classes"]) | np.isin(lab[diff], e["classes"])
        assert involved.all(), (cid, e)
        if e["kind"] == "swap":
            assert tuple(e["classes"]) in SPECS[source].swap_pairs


def test_cohort_main_job_end_to_end(cohort, tmp_path):
    """score -> filter -> report with the random3d encoder: every case scored, nothing failed."""
    import pandas as pd

    from auvcore.app.filter import filter_run
    from auvcore.app.scoring import score_dataset
    from auvcore.app.report import write_report

    source, root = cohort
    run = tmp_path / "run"
    table = score_dataset(root, run, encoder="random3d", progress=False)
    df = pd.read_parquet(table)
    assert len(df) == N and df["case"].is_unique
    assert json.loads((run / "settings.json").read_text())["modality"] == COHORTS[source][2]
    assert df["sample_scale"].notna().all() and df["auv"].notna().all()
    assert df["auv"].max() == pytest.approx(1.0) and df["auv"].min() == pytest.approx(0.0, abs=1e-6)
    assert df["corrupted"].sum() == 3
    f = filter_run(run, 0.8)
    assert len(f.joinpath("dropped.txt").read_text().split()) == 1
    page = write_report(run)
    assert page.is_file() and 'src="roc.png"' in page.read_text()


def test_brain_skips_drop_and_refuses_only_drop(tmp_path):
    _need("brain-mni")
    with pytest.raises(ValueError, match="kinds"):
        build_demo(tmp_path / "b", n_cases=2, corrupt_fraction=1.0, source="brain-mni", kinds=["drop"])
    assert not (tmp_path / "b").exists()
    root = build_demo(tmp_path / "b", n_cases=2, corrupt_fraction=1.0, source="brain-mni", kinds=["drop", "erode"],
                      size_mm=(80.0, 96.0, 64.0))
    assert json.loads((root / "dataset.json").read_text())["skipped_kinds"] == ["drop"]
    assert {e["kind"] for e in json.loads((root / "corruption.json").read_text()).values()} == {"erode"}


def test_inapplicable_kinds_are_not_applied():
    lab = np.zeros((20, 20, 10), np.uint8)
    lab[5:15, 5:15, 2:8] = 1
    assert not applicable("swap", lab, 4) and applicable("erode", lab, 4) and applicable("drop", lab, 4)
    assert not applicable("erode", np.zeros_like(lab), 4)
    with pytest.raises(ValueError, match="swap"):
        corrupt(np.random.default_rng(0), lab, "swap", 4)
    # "partial" needs a class on two slices or more (the chest's slice axis is z); "boundary" a boundary
    assert applicable("partial", lab, 4) and applicable("boundary", lab, 4)
    flat = np.zeros_like(lab)
    flat[5:15, 5:15, 4] = 1
    assert not applicable("partial", flat, 4) and applicable("boundary", flat, 4)
    assert not applicable("boundary", np.ones_like(lab), 4)
    with pytest.raises(ValueError, match="partial"):
        corrupt(np.random.default_rng(0), flat, "partial", 4)


def test_spine_mr_partial_erases_sagittal_slices():
    """The spine MR is sliced sagittally: an annotation stopped early misses a block of x slices."""
    _need("spine-mr")
    _, lab, _, names, _ = load_source("spine-mr")
    spec = SPECS["spine-mr"]
    for seed in range(4):
        out, rec = corrupt(np.random.default_rng(seed), lab, "partial", len(names), spec)
        lo, hi = rec["params"]["slices"]
        assert rec["params"]["axis"] == spec.slice_axis == 0 and hi > lo
        diff = out != lab
        assert diff[lo:hi].any() and not diff[:lo].any() and not diff[hi:].any()
        assert (out[diff] == 0).all() and set(np.unique(lab[diff])) == set(rec["classes"])


def test_spine_swap_exchanges_adjacent_vertebrae():
    _need("spine-ct")
    _, lab, _, names, _ = load_source("spine-ct")
    out, rec = corrupt(np.random.default_rng(0), lab, "swap", len(names), SPECS["spine-ct"])
    a, b = rec["classes"]
    assert abs(a - b) == 1
    assert ((out == a) == (lab == b)).all() and ((out == b) == (lab == a)).all()


def test_aal_swap_is_a_laterality_or_neighbour_slip():
    _need("brain-aal")
    _, lab, _, names, _ = load_source("brain-aal")
    for seed in range(3):
        out, rec = corrupt(np.random.default_rng(seed), lab, "swap", len(names), SPECS["brain-aal"])
        a, b = rec["classes"]
        assert {names[a].split()[0], names[b].split()[0]} in ({"caudate"}, {"putamen"}, {"thalamus"},
                                                              {"hippocampus"}, {"caudate", "putamen"})
        assert ((out == a) == (lab == b)).all() and ((out == b) == (lab == a)).all()


def test_aal_source_errors_name_the_templates(tmp_path, monkeypatch):
    """No templates: the error says where it looked and how to get them; a relabelled atlas is refused."""
    from auvcore.data.cohorts import MRICRON_ENV

    monkeypatch.setenv(MRICRON_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=MRICRON_ENV) as e:
        build_demo(tmp_path / "d", n_cases=2, source="brain-aal")
    assert "apt-get download mricron-data" in str(e.value) and "ch2.nii.gz" in str(e.value)
    assert not (tmp_path / "d").exists()
    for f in ("ch2.nii.gz", "aal.nii.gz"):
        (tmp_path / f).write_bytes(b"")
    (tmp_path / "aal.nii.txt").write_text("1 Precentral_L 2001\n71 Caudate_L 7001\n")
    with pytest.raises(ValueError, match="Putamen_L"):
        load_source("brain-aal")


def test_demo_command_with_source(tmp_path, capsys):
    """`auvcore demo --source spine-ct` builds that cohort and runs the whole job (random3d encoder)."""
    _need("spine-ct")
    out = tmp_path / "demo"
    assert main(["demo", "--source", "spine-ct", "--cases", "4", "--encoder", "random3d", "--out", str(out),
                 "--fraction", "0.5", "--kinds", "partial", "boundary", "--strength", "mild"]) == 0
    assert "lumbar spine CT" in capsys.readouterr().out
    params = json.loads((out / "data" / "dataset.json").read_text())["auvcore_demo"]
    assert params["source"] == "spine-ct" and params["strength"] == "mild" and params["corrupt_fraction"] == 0.5
    rec = json.loads((out / "data" / "corruption.json").read_text())
    assert sorted(e["kind"] for e in rec.values() if e["corrupted"]) == ["boundary", "partial"]
    assert (out / "run" / "report" / "index.html").is_file()
    for bad in (["--source", "knee"], ["--kinds", "blur"], ["--strength", "huge"], ["--fraction", "0"]):
        with pytest.raises(SystemExit):
            main(["demo", "--out", str(out), *bad])


# The tumour sources of pyradiomics 3.0.1's source archive: two patients each, read from the tarball the user
# downloaded (CI downloads it into .ci/cache). Small fields of view keep the builds to a few seconds.
TUMOUR = {"lung-tumour": ("CT", ("lung1", "lung2")), "brain-tumour": ("MR", ("brain1", "brain2"))}


def _need_sdist():
    import os
    from pathlib import Path

    from auvcore.data.cohorts import PYRADIOMICS_DOWNLOAD, PYRADIOMICS_ENV

    p = os.environ.get(PYRADIOMICS_ENV, "")
    if not p or not Path(p).is_file():
        pytest.skip(f"the tumour cohorts read pyradiomics' source archive: `{PYRADIOMICS_DOWNLOAD}` and set "
                    f"{PYRADIOMICS_ENV} to the .tar.gz ({'unset' if not p else p + ' is missing'})")


@pytest.fixture(scope="module", params=sorted(TUMOUR))
def tumour_cohort(request, tmp_path_factory):
    source = request.param
    _need_sdist()
    out = tmp_path_factory.mktemp(f"cohort-{source}") / "data"
    # every kind asked for (swap must be skipped), every case corrupted, so the kinds cycle through both patients
    root = build_demo(out, n_cases=6, corrupt_fraction=1.0, seed=1, source=source, kinds=KINDS,
                      size_mm=(64.0, 64.0, 48.0))
    return source, root


def test_tumour_cohort_has_both_patients(tumour_cohort):
    source, root = tumour_cohort
    modality, patients = TUMOUR[source]
    ds = D.discover(root)
    assert len(ds.cases) == 6 and ds.modality == modality
    assert [ds.class_names[k] for k in sorted(ds.class_names)] == ["background", "tumour"]
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["auvcore_demo"]["source"] == source and "BSD-3-Clause" in meta["licence"]
    assert meta["skipped_kinds"] == ["swap"]
    rec = json.loads((root / "corruption.json").read_text())
    # cases alternate between the patients, recorded per case and per patient
    assert [rec[c]["case_params"]["patient"] for c in sorted(rec)] == [patients[i % 2] for i in range(6)]
    assert meta["patients"] == {p: [c for c in sorted(rec) if rec[c]["case_params"]["patient"] == p]
                                for p in patients}
    kinds = [e["kind"] for e in rec.values()]
    assert all(e["corrupted"] for e in rec.values()) and "swap" not in kinds and set(kinds) <= set(KINDS)
    for cid, e in rec.items():
        lab, _ = read_image(root / "labelsTr" / f"{cid}.nii.gz")
        clean, _ = read_image(root / "labelsTr_clean" / f"{cid}.nii.gz")
        img, _ = read_image(root / "imagesTr" / f"{cid}_0000.nii.gz")
        assert set(np.unique(clean)) == {0, 1}, cid  # the tumour is in every case's field of view
        assert int((lab != clean).sum()) == e["changed_voxels"] > 0 and e["classes"] == [1]
        if modality == "CT":
            assert img.min() >= -1024 and img.max() > 0
        else:
            assert img.min() >= 0 and 300 < np.percentile(img[clean > 0], 99) < 3000


@pytest.mark.parametrize("source", ["brain-tumour"])  # the lung CTs take seconds to read: their cohort covers them
def test_tumour_source_patients(source):
    _need_sdist()
    modality, patients = TUMOUR[source]
    vols = SPECS[source].load(patients)  # both patients in one pass through the archive
    for img, lab, aff, names, mod in vols:
        assert mod == modality and names == {0: "background", 1: "tumour"} and np.all(np.diag(aff)[:3] > 0)
        assert img.shape == lab.shape and set(np.unique(lab)) == {0, 1}
    assert vols[0][0].shape != vols[1][0].shape  # two different scans
    with pytest.raises(ValueError, match="patient"):
        load_source(source, "breast1")  # refused before the archive is opened


def test_tumour_source_without_sdist_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    from auvcore.data.cohorts import PYRADIOMICS_ENV

    monkeypatch.delenv(PYRADIOMICS_ENV, raising=False)
    cmd = "pip download pyradiomics==3.0.1 --no-deps --no-binary :all: --no-build-isolation -d DIR"
    with pytest.raises(FileNotFoundError, match=PYRADIOMICS_ENV) as e:
        build_demo(tmp_path / "t", n_cases=2, source="lung-tumour")
    assert cmd in str(e.value) and not (tmp_path / "t").exists()
    monkeypatch.setenv(PYRADIOMICS_ENV, str(tmp_path / "nope.tar.gz"))
    with pytest.raises(FileNotFoundError, match="nope.tar.gz") as e:
        load_source("brain-tumour")
    assert cmd in str(e.value)
    # a file that is not the archive: the error names the variable too
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tarball")
    monkeypatch.setenv(PYRADIOMICS_ENV, str(tmp_path / "bad.tar.gz"))
    with pytest.raises(ValueError, match=PYRADIOMICS_ENV):
        load_source("lung-tumour")
    # the command line reports it as an error line, not a traceback
    monkeypatch.delenv(PYRADIOMICS_ENV)
    capsys.readouterr()
    assert main(["demo", "--source", "lung-tumour", "--cases", "2", "--encoder", "random3d",
                 "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert "auvcore: error:" in err and PYRADIOMICS_ENV in err and cmd in err


def test_tumour_demo_command(tmp_path, capsys):
    """`auvcore demo --source lung-tumour` builds the two-patient cohort and runs the whole job (random3d)."""
    _need_sdist()
    out = tmp_path / "demo"
    assert main(["demo", "--source", "lung-tumour", "--cases", "2", "--encoder", "random3d", "--out", str(out)]) == 0
    meta = json.loads((out / "data" / "dataset.json").read_text())
    assert meta["auvcore_demo"]["source"] == "lung-tumour" and set(meta["patients"]) == {"lung1", "lung2"}
    assert (out / "run" / "report" / "index.html").is_file()
