"""The main job end to end on a tiny data set with the random-weight encoder: score, filter, report,
resumption after kill -9, and bad invocations."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from auvcore.app.cli import main

from cli_common import score_random3d, tiny_demo

N_CASES = 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_demo(tmp_path_factory, N_CASES)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    assert main(["score", str(data), "--encoder", "random3d", "--out", str(out), "--csv", "--no-progress"]) == 0
    return out


def test_score_writes_the_table(run):
    df = pd.read_parquet(run / "scores.parquet")
    assert len(df) == N_CASES and df["case"].is_unique
    assert {"case", "sample_scale", "auv", "variance_score", "mahalanobis_score", "corrupted"} <= set(df.columns)
    # AUV normalised over the whole set: the extremes are exactly 0 and 1 (up to δ)
    assert df["auv"].max() == pytest.approx(1.0) and df["auv"].min() == pytest.approx(0.0, abs=1e-6)
    assert df["auv"].idxmax() == df["sample_scale"].idxmin()
    s_cols = [c for c in df.columns if c.startswith("S[") and c != "S[background]"]
    assert s_cols and np.allclose(df[s_cols].mean(axis=1, skipna=True), df["sample_scale"])
    assert (df[[c for c in df.columns if c.startswith("voxels[")]].sum(axis=1) > 0).all()
    csv = pd.read_csv(run / "scores.csv")
    for col in ("corruption_kind", "error", "reason"):  # CSV cannot tell "" from a missing value
        csv[col] = csv[col].astype(object).fillna("")
    pd.testing.assert_frame_equal(csv, df, check_dtype=False)
    settings = json.loads((run / "settings.json").read_text())
    assert settings["encoder"] == "random3d" and settings["mode"] == "masked"
    assert len(list((run / "cases").glob("*.npz"))) == N_CASES
    assert not list(run.rglob("*.tmp"))


def test_filter_and_splits(run):
    assert main(["filter", str(run), "--quantile", "0.8"]) == 0
    f = run / "filter"
    kept = f.joinpath("kept.txt").read_text().split()
    dropped = f.joinpath("dropped.txt").read_text().split()
    df = pd.read_parquet(run / "scores.parquet")
    assert sorted(kept + dropped) == sorted(df["case"])
    assert len(dropped) == 2  # ceil(0.8 * 10) = 8 kept
    assert set(dropped) == set(df.nlargest(2, "auv")["case"])
    splits = json.loads(f.joinpath("splits_final.json").read_text())
    assert len(splits) == 5
    assert sorted(c for s in splits for c in s["val"]) == sorted(df["case"])
    for s in splits:
        assert not set(s["train"]) & set(dropped) and not set(s["train"]) & set(s["val"])
    name = "right lung"
    assert df[f"auv[{name}]"].notna().all()
    assert main(["filter", str(run), "--quantile", "0.5", "--per-class", name]) == 0
    summary = json.loads(f.joinpath("summary.json").read_text())
    assert summary["per_class"] == [name] and summary["dropped"] == 5
    assert set(f.joinpath("dropped.txt").read_text().splitlines()) == set(df.nlargest(5, f"auv[{name}]")["case"])
    # the Mahalanobis baseline as the filter's score, globally and per class
    assert main(["filter", str(run), "--quantile", "0.8", "--score", "mahalanobis"]) == 0
    assert set(f.joinpath("dropped.txt").read_text().split()) == set(df.nlargest(2, "mahalanobis_score")["case"])
    assert json.loads(f.joinpath("summary.json").read_text())["score"] == "mahalanobis"
    assert main(["filter", str(run), "--quantile", "0.5", "--score", "mahalanobis", "--per-class", name]) == 0
    assert set(f.joinpath("dropped.txt").read_text().split()) == set(df.nlargest(5, f"mahalanobis[{name}]")["case"])


def test_report(run):
    assert main(["report", str(run)]) == 0
    page = run / "report" / "index.html"
    html = page.read_text()
    for img in ("auv_hist.png", "energy.png", "class_scales.png", "gallery.png", "roc.png"):
        assert f'src="{img}"' in html and (page.parent / img).stat().st_size > 1000
    metrics = json.loads((page.parent / "metrics.json").read_text())
    assert set(metrics["scorers"]) == {"AUV (ours)", "intensity variance", "Mahalanobis"}
    for m in metrics["scorers"].values():
        assert 0.0 <= m["auroc"] <= 1.0


def test_a_report_that_fails_half_way_keeps_the_old_one_and_leaves_nothing(run, monkeypatch):
    import auvcore.app.report as R

    assert main(["report", str(run)]) == 0
    before = (run / "report" / "index.html").read_text()

    def broken(*a, **k):
        raise RuntimeError("a plotting library failed")

    monkeypatch.setattr(R, "_html", broken)
    with pytest.raises(RuntimeError, match="plotting"):
        R.write_report(run)
    assert (run / "report" / "index.html").read_text() == before
    assert not list(run.glob(".report-*"))


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="no Chromium (.ci/run installs Debian's chromium; elsewhere: apt-get install chromium)")
def test_report_opens_in_a_headless_browser(run, tmp_path):
    """In a real browser: every picture decodes, and the case table shows the filter's own decision (a
    per-class filter here, which a recomputed global cut would contradict) for every case."""
    r = tmp_path / "run"
    shutil.copytree(run, r)
    assert main(["filter", str(r), "--quantile", "0.5", "--per-class", "right lung"]) == 0
    main(["report", str(r)])
    page = (r / "report" / "index.html").resolve()
    # The DOM after load: every <img> decoded (naturalWidth > 0) means every picture loaded; then each
    # row of the case table as case=status.
    probe = page.parent / "probe.html"
    probe.write_text(page.read_text().replace(
        "</body>", "<script>window.onload=()=>{document.title='imgs:'+[...document.images]"
                   ".map(i=>i.naturalWidth>0).join(',')+'|'+[...document.querySelectorAll('#cases tr')].slice(1)"
                   ".map(t=>t.cells[0].textContent+'='+t.cells[1].textContent).join(',')}</script></body>"))
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    out = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    title = out.stdout.split("<title>")[1].split("</title>")[0]
    imgs, rows = title.removeprefix("imgs:").split("|")
    flags = imgs.split(",")
    assert len(flags) == 5 and all(f == "true" for f in flags), title
    shown = dict(x.split("=") for x in rows.split(","))
    dropped = set((r / "filter" / "dropped.txt").read_text().split())
    kept = set((r / "filter" / "kept.txt").read_text().split())
    assert set(shown) == dropped | kept and len(dropped) == 5
    assert {c for c, s in shown.items() if s == "dropped"} == dropped


def test_killed_run_resumes_to_the_same_table(data, run, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "auvcore", "score", str(data), "--encoder", "random3d", "--out", str(out),
           "--no-progress"]
    # cwd away from a source checkout, so `python -m auvcore` imports the installed package
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    t0 = time.time()
    while len(list((out / "cases").glob("*.npz"))) < 3 and time.time() - t0 < 120 and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = len(list((out / "cases").glob("*.npz")))
    assert 3 <= done < N_CASES, "the scoring process was not killed mid-run"
    assert not (out / "scores.parquet").exists()
    (out / "cases" / ".demo_000.npz.x1y2z3.tmp").write_bytes(b"PK\x03")  # a write the kill cut short
    (out / ".report-x1y2z3").mkdir()  # and a killed `auvcore report`'s folder
    assert subprocess.run(cmd, capture_output=True, cwd=tmp_path).returncode == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out / "scores.parquet"), pd.read_parquet(run / "scores.parquet"))
    assert sorted(p.name for p in (out / "cases").iterdir()) == sorted(p.name for p in (run / "cases").iterdir())
    assert not (out / ".report-x1y2z3").exists()


def test_rerun_with_other_settings_is_refused(data, run, capsys):
    assert main(["score", str(data), "--encoder", "random3d", "--mode", "decoded", "--out", str(run)]) == 2
    assert "other settings (mode: 'masked' -> 'decoded')" in capsys.readouterr().err


def test_decoded_mode(data, tmp_path):
    out = tmp_path / "dec"
    assert main(["score", str(data), "--encoder", "random3d", "--mode", "decoded", "--input", "normalized",
                 "--limit", "4", "--out", str(out), "--no-progress"]) == 0
    df = pd.read_parquet(out / "scores.parquet")
    assert len(df) == 4 and df["auv"].between(0, 1).all()


@pytest.mark.parametrize("argv, msg", [
    (["score", "/nonexistent/data", "--out", "{tmp}/r"], "error:"),
    (["score", "{empty}", "--out", "{tmp}/r"], "error:"),
    (["filter", "{run}", "--per-class", "no_such_class"], "unknown class ['no_such_class']"),
    (["filter", "{tmp}"], "holds no scoring run"),
    (["report", "{tmp}"], "holds no scoring run"),
])
def test_bad_invocations(argv, msg, run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    before = sorted(p.name for p in (run / "filter").iterdir()) if (run / "filter").exists() else None
    stamp = (run / "filter" / "summary.json").read_text() if before else None
    argv = [a.format(tmp=tmp_path, run=run, empty=tmp_path / "empty") for a in argv]
    assert main(argv) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # no partial output
    if stamp is not None:
        assert (run / "filter" / "summary.json").read_text() == stamp


@pytest.mark.parametrize("q", ["0", "1.5", "-0.1", "abc"])
def test_quantile_outside_range(q, run, capsys):
    with pytest.raises(SystemExit) as e:
        main(["filter", str(run), "--quantile", q])
    assert e.value.code == 2 and "expected a number in (0, 1]" in capsys.readouterr().err


def test_help_reads_well():
    out = subprocess.run([sys.executable, "-m", "auvcore", "--help"], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert out.returncode == 0
    for word in ("score", "filter", "report", "demo", "bench", "examples:"):
        assert word in out.stdout


@pytest.mark.parametrize("group", [1, 3])
def test_bad_cases_are_isolated_and_retried(data, tmp_path, capsys, monkeypatch, group):
    """An unreadable image, a label out of range and a bug in one case: the other cases are scored, each
    failure is in the table's error column, the log and the summary, the exit code is 3, and a restart
    after the data is mended retries exactly the failed cases. Also with S taken for groups of 3 cases (as on a
    GPU, scoring.SCALE_BATCH), the bug then striking a case of a group after its S."""
    import nibabel as nib

    import auvcore.app.scoring as P

    d = tmp_path / "data"
    shutil.copytree(data, d)
    ids = sorted(p.name[: -len(".nii.gz")] for p in (d / "labelsTr").glob("*.nii.gz"))
    broken_img, bad_label, buggy = ids[1], ids[4], ids[7]
    img_path = d / "imagesTr" / f"{broken_img}_0000.nii.gz"
    good_img = img_path.read_bytes()
    img_path.write_bytes(good_img[:200])  # truncated gzip
    lab_path = d / "labelsTr" / f"{bad_label}.nii.gz"
    good_lab = lab_path.read_bytes()
    lab = nib.load(lab_path)
    arr = np.asarray(lab.dataobj).copy()
    arr[0, 0, 0] = 99
    nib.save(nib.Nifti1Image(arr, lab.affine, lab.header), lab_path)
    monkeypatch.setitem(P.SCALE_BATCH, "cpu", group)
    real_finish = P._finish

    def _finish(state, scale, vol, *a, **k):
        if vol.case_id == buggy:
            raise IndexError("a bug in the scoring code")
        return real_finish(state, scale, vol, *a, **k)

    monkeypatch.setattr(P, "_finish", _finish)
    out = tmp_path / "r"
    assert main(["score", str(d), "--encoder", "random3d", "--out", str(out), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "3 case(s) could not be scored" in err and "Traceback" not in err
    for c in (broken_img, bad_label, buggy):
        assert f"  {c}: " in err
    df = pd.read_parquet(out / "scores.parquet")
    failed = df[df["error"] != ""]
    assert sorted(failed["case"]) == sorted([broken_img, bad_label, buggy])
    assert "99" in failed.set_index("case").loc[bad_label, "error"]
    assert failed["auv"].isna().all() and failed["sample_scale"].isna().all()
    ok = df[df["error"] == ""]
    assert len(ok) == N_CASES - 3 and ok["auv"].max() == pytest.approx(1.0) and ok["auv"].notna().all()
    log = (out / "run.log").read_text()
    assert log.count("failed:") == 3
    assert log.count("Traceback") == 1 and "IndexError: a bug in the scoring code" in log
    # filter and report go on with the cases that scored
    assert main(["filter", str(out)]) == 0
    assert main(["report", str(out)]) == 0
    assert buggy in (out / "report" / "index.html").read_text()

    # mend the data, drop the bug: the restart scores the three failed cases and nothing else
    img_path.write_bytes(good_img)
    lab_path.write_bytes(good_lab)
    monkeypatch.setattr(P, "_finish", real_finish)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cases").glob("*.npz")}
    assert main(["score", str(d), "--encoder", "random3d", "--out", str(out), "--no-progress"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cases").glob("*.npz") if p.name in stamps} == stamps
    assert not list((out / "cases").glob("*.error.json"))
    df = pd.read_parquet(out / "scores.parquet")
    assert (df["error"] == "").all() and df["auv"].notna().all()


def test_resume_rescores_changed_inputs_only(data, tmp_path):
    """A case whose label changed since it was scored is scored again; the others are not."""
    import nibabel as nib

    d = tmp_path / "data"
    shutil.copytree(data, d)
    out = tmp_path / "r"
    assert score_random3d(d, out) == 0
    before = pd.read_parquet(out / "scores.parquet").set_index("case")
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cases").glob("*.npz")}
    cid = before.index[2]
    lab_path = d / "labelsTr" / f"{cid}.nii.gz"
    lab = nib.load(lab_path)
    arr = np.asarray(lab.dataobj).copy()
    vox = [c for c in before.columns if c.startswith("voxels[")]
    gone = next(c for c in vox if before.loc[cid, c] > 0)  # delete one class that is present
    name = gone[len("voxels["):-1]
    value = int(json.loads((d / "dataset.json").read_text())["labels"][name])
    arr[arr == value] = 0
    nib.save(nib.Nifti1Image(arr, lab.affine, lab.header), lab_path)
    assert score_random3d(d, out) == 0
    after = pd.read_parquet(out / "scores.parquet").set_index("case")
    assert after.loc[cid, gone] == 0 and before.loc[cid, gone] > 0
    changed = {p.name for p in (out / "cases").glob("*.npz") if p.stat().st_mtime_ns != stamps[p.name]}
    assert changed == {f"{cid}.npz"}


def test_a_bad_argument_leaves_the_folder_usable_and_force_starts_over(data, tmp_path, capsys):
    out = tmp_path / "r"
    assert score_random3d(data, out, "--layer", "layer9") == 2
    assert "layer" in capsys.readouterr().err
    assert not (out / "settings.json").exists()  # nothing written: the corrected command is not refused
    assert score_random3d(data, out, "--limit", "3") == 0
    # other settings: refused, and --force names itself as the way out
    assert score_random3d(data, out, "--limit", "3", "--mode", "decoded") == 2
    assert "--force" in capsys.readouterr().err
    assert score_random3d(data, out, "--limit", "3", "--mode", "decoded", "--force") == 0
    assert json.loads((out / "settings.json").read_text())["mode"] == "decoded"
    # --force never deletes a folder that is not a run
    other = tmp_path / "not_a_run"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert score_random3d(data, other, "--force") == 2
    assert (other / "keep.txt").read_text() == "mine"


def test_outputs_follow_the_umask(data, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        out = tmp_path / "r"
        assert score_random3d(data, out, "--limit", "3") == 0
        assert main(["filter", str(out)]) == 0
        assert main(["report", str(out)]) == 0
    finally:
        os.umask(old)
    for p in [out / "scores.parquet", out / "settings.json", out / "filter" / "kept.txt",
              out / "report" / "index.html", *(out / "cases").glob("*.npz")]:
        assert p.stat().st_mode & 0o777 == 0o644, p
    assert (out / "report").stat().st_mode & 0o777 == 0o755


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("auvcore ")


def test_labels_checked_against_dataset_json_and_nan_explained(data, tmp_path, capsys):
    """A label value that dataset.json does not declare fails its case (naming file and values) instead of
    being scored silently; an all-background case says why it has no AUV; no AUV at all exits 4."""
    import nibabel as nib

    d = tmp_path / "data"
    shutil.copytree(data, d)
    ids = sorted(p.name[: -len(".nii.gz")] for p in (d / "labelsTr").glob("*.nii.gz"))
    present = {cid: set(np.unique(np.asarray(nib.load(d / "labelsTr" / f"{cid}.nii.gz").dataobj)).tolist())
               for cid in ids}
    meta = json.loads((d / "dataset.json").read_text())
    top = max(int(v) for v in meta["labels"].values())
    value = next(v for v in range(1, top) if any(v in present[c] for c in ids[1:]))
    name = next(k for k, v in meta["labels"].items() if int(v) == value)
    del meta["labels"][name]  # the value stays inside 0..max but is no longer a class
    (d / "dataset.json").write_text(json.dumps(meta))
    has_v = {c for c in ids[1:] if value in present[c]}
    lab = nib.load(d / "labelsTr" / f"{ids[0]}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(lab.shape, np.uint8), lab.affine), d / "labelsTr" / f"{ids[0]}.nii.gz")
    out = tmp_path / "r"
    assert score_random3d(d, out) == 3
    err = capsys.readouterr().err
    df = pd.read_parquet(out / "scores.parquet").set_index("case")
    for cid in has_v:
        assert f"values [{value}] are not among the classes of dataset.json" in df.loc[cid, "error"]
        assert f"labelsTr/{cid}.nii.gz" in df.loc[cid, "error"]
    assert df.loc[ids[0], "reason"] == "no AUV: the label has no foreground class"
    assert np.isnan(df.loc[ids[0], "auv"]) and f"{ids[0]}: no AUV" in err

    empty = tmp_path / "empty"
    shutil.copytree(data, empty)
    for p in (empty / "labelsTr").glob("*.nii.gz"):
        lab = nib.load(p)
        nib.save(nib.Nifti1Image(np.zeros(lab.shape, np.uint8), lab.affine), p)
    assert score_random3d(empty, tmp_path / "r_empty", "--limit", "2") == 4
    assert "nothing useful was scored" in capsys.readouterr().err


@pytest.mark.parametrize("argv, msg", [
    (["--encoder", "sam2"], "--checkpoint: the sam2 encoder needs it"),
    (["--encoder", "sam2", "--checkpoint", "/nonexistent.pt"], "/nonexistent.pt"),
    (["--encoder", "sam2", "--checkpoint", "x.pt", "--layer", "layer2"], "--layer: the sam2 encoder does not take it"),
    (["--encoder", "random3d", "--checkpoint", "x.pt"], "--checkpoint: the random3d encoder does not take it"),
    (["--encoder", "random3d", "--weights", "astra"], "--weights: the random3d encoder does not take it"),
])
def test_encoder_options_go_only_to_the_encoders_that_take_them(argv, msg, data, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["score", str(data), "--out", str(out), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not out.exists()


def test_report_shows_the_filters_own_decision_for_every_case(run, tmp_path):
    import re

    r = tmp_path / "r"
    shutil.copytree(run, r)
    name = "right lung"
    assert main(["filter", str(r), "--quantile", "0.5", "--per-class", name]) == 0
    dropped = set((r / "filter" / "dropped.txt").read_text().split())
    assert main(["report", str(r)]) == 0
    page = (r / "report" / "index.html").read_text()
    assert f"per-class filter on {name}" in page and f"{len(dropped)} case(s) dropped" in page
    status = dict(re.findall(r'<tr class="[^"]+"><td>([^<]+)</td><td>([^<]+)</td>', page))
    assert set(status) == set(pd.read_parquet(r / "scores.parquet")["case"])  # every case listed
    assert {c for c, s in status.items() if s == "dropped"} == dropped
    for link in ("scores.parquet", "filter/kept.txt", "filter/dropped.txt", "filter/splits_final.json"):
        assert f'href="../{link}"' in page
    # a report at another quantile than the filter's says it is not the filter's decision
    assert main(["report", str(r), "--quantile", "0.9"]) == 0
    assert "the filter ran at another quantile" in (r / "report" / "index.html").read_text()


def test_check_lists_every_problem_at_once(data, tmp_path, capsys):
    import nibabel as nib

    d = tmp_path / "data"
    shutil.copytree(data, d)
    ids = sorted(p.name[: -len(".nii.gz")] for p in (d / "labelsTr").glob("*.nii.gz"))
    (d / "imagesTr" / f"{ids[0]}_0000.nii.gz").write_bytes(b"not a nifti")
    lab = nib.load(d / "labelsTr" / f"{ids[1]}.nii.gz")
    arr = np.asarray(lab.dataobj).copy()
    arr[0, 0, 0] = 42
    nib.save(nib.Nifti1Image(arr, lab.affine, lab.header), d / "labelsTr" / f"{ids[1]}.nii.gz")
    img = nib.load(d / "imagesTr" / f"{ids[2]}_0000.nii.gz")
    x = np.asarray(img.dataobj).astype(np.float32)
    x[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(x, img.affine), d / "imagesTr" / f"{ids[2]}_0000.nii.gz")
    lab = nib.load(d / "labelsTr" / f"{ids[3]}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(lab.shape, np.uint8), lab.affine), d / "labelsTr" / f"{ids[3]}.nii.gz")
    lab = nib.load(d / "labelsTr" / f"{ids[4]}.nii.gz")
    arr = np.asarray(lab.dataobj).copy()
    k = int(np.bincount(arr.reshape(-1))[1:].nonzero()[0][0]) + 1  # a class present in the case
    arr[arr == k] = 0
    arr[tuple(s // 2 for s in arr.shape)] = k  # one voxel of it left: gone at the encoder's grid
    nib.save(nib.Nifti1Image(arr, lab.affine, lab.header), d / "labelsTr" / f"{ids[4]}.nii.gz")

    assert main(["check", str(d), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert f"{N_CASES} case(s) checked: 3 with errors," in err  # warnings: these two and the data's own
    assert f"  {ids[0]}: " in err and f"values [42] are not among the classes" in err
    assert f"  {ids[2]}: case '{ids[2]}': image contains NaN or Inf" in err
    assert f"  {ids[3]}: the label has no foreground class" in err
    assert f"  {ids[4]}: class " in err and "vanishes at the merlin feature grid" in err
    # score --check refuses before anything is written; plain score records the same errors per case
    out = tmp_path / "r"
    assert score_random3d(d, out, "--check") == 3 and not out.exists()
    assert score_random3d(d, out) == 3
    df = pd.read_parquet(out / "scores.parquet").set_index("case")
    assert (df.loc[ids[:3], "error"] != "").all() and "NaN or Inf" in df.loc[ids[2], "error"]
    assert "at the encoder's grid" in df.loc[ids[4], "reason"]  # the one-voxel class, named
    assert main(["check", str(data), "--no-progress", "--encoder", "random3d"]) == 0


def test_a_source_tree_shadowing_the_installed_package_is_named(tmp_path):
    """Run from a source checkout (no built module) with the built package further down sys.path: the
    message names both folders instead of blaming a circular import."""
    import sysconfig

    import auvcore
    import auvcore._C as built

    src, site = tmp_path / "src", tmp_path / "site"
    shutil.copytree(Path(auvcore.__file__).parent, src / "auvcore",
                    ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    shutil.copytree(Path(auvcore.__file__).parent, site / "auvcore", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(built.__file__, site / "auvcore")
    code = ("import warnings, torch, auvcore\nwarnings.simplefilter('error')\n"
            "try:\n    auvcore.semantic_scale(torch.ones(1, 1, 3, 3))\nexcept RuntimeWarning as w:\n    print(w)")
    # -S: no site hooks (an editable install's finder would bypass the shadowing); torch from PYTHONPATH
    env = {"PYTHONPATH": f"{site}:{sysconfig.get_paths()['purelib']}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=src, env=env, capture_output=True, text=True,
                         timeout=120)
    assert f"imported from {src / 'auvcore'}" in out.stdout, out.stdout + out.stderr
    assert f"shadows the installed package at {site / 'auvcore'}" in out.stdout
    assert "circular" not in out.stdout


def test_csv_without_dataset_json_says_what_is_needed_then_picks_up_the_names(data, tmp_path, capsys):
    ids = sorted(p.name[: -len(".nii.gz")] for p in (data / "labelsTr").glob("*.nii.gz"))[:3]
    csv = tmp_path / "cases.csv"
    csv.write_text("case,image,label\n" + "".join(
        f"{c},{data / 'imagesTr' / (c + '_0000.nii.gz')},{data / 'labelsTr' / (c + '.nii.gz')}\n" for c in ids))
    out = tmp_path / "r"
    assert score_random3d(csv, out) == 4  # every case failed: no AUV at all
    assert "the data set has no dataset.json to name its classes" in capsys.readouterr().err
    (tmp_path / "dataset.json").write_text((data / "dataset.json").read_text())
    assert score_random3d(csv, out) == 0  # same folder: the classes now have names and every case is scored
    df = pd.read_parquet(out / "scores.parquet")
    assert "S[right lung]" in df and (df["error"] == "").all() and df["auv"].notna().all()
    # a case removed from the data set leaves the table
    csv.write_text("\n".join(csv.read_text().splitlines()[:-1]) + "\n")
    assert score_random3d(csv, out) == 0
    assert sorted(pd.read_parquet(out / "scores.parquet")["case"]) == ids[:2]


def test_docs_cite_only_what_the_repository_holds(capsys):
    """The README and the CLI's help point at docs/method.md, which is in the repository, not at a SPEC."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    assert "SPEC" not in readme and "docs/method.md" in readme and (root / "docs" / "method.md").is_file()
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "SPEC" not in capsys.readouterr().out
