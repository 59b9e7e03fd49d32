"""How the main job runs: --device, --dtype, --workers and the torchrun scale-out give the table of a plain
one-process CPU run (the random-weight encoder on a tiny demo data set)."""
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from auvcore.app.distributed import portable_error, resolve_device

from cli_common import score_random3d, tiny_demo

N_CASES = 6
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_demo(tmp_path_factory, N_CASES)


@pytest.fixture(scope="module")
def ref(data, tmp_path_factory):
    """The plain run: no --device, --workers or ranks."""
    out = tmp_path_factory.mktemp("runs") / "ref"
    assert score_random3d(data, out) == 0
    return out


def same_run(a: Path, b: Path):
    """Equal tables, byte-identical case arrays, the same failure records."""
    pd.testing.assert_frame_equal(pd.read_parquet(a / "scores.parquet"), pd.read_parquet(b / "scores.parquet"))
    files = sorted(p.name for p in (a / "cases").iterdir())
    assert files == sorted(p.name for p in (b / "cases").iterdir())
    for name in files:
        if name.endswith(".npz"):
            with np.load(a / "cases" / name) as x, np.load(b / "cases" / name) as y:
                assert x.files == y.files
                for k in x.files:
                    assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), (name, k)
        else:
            assert (a / "cases" / name).read_text() == (b / "cases" / name).read_text()
    assert json.loads((a / "settings.json").read_text())["dataset"] == json.loads(
        (b / "settings.json").read_text())["dataset"]


def log_lines(run: Path) -> list:
    """run.log without its time stamps."""
    p = run / "run.log"
    return [line.split(" ", 2)[2] if line[:2] == "20" else line for line in p.read_text().splitlines()] \
        if p.exists() else []


def test_device_cpu_is_the_default(data, ref, tmp_path, capsys):
    assert score_random3d(data, tmp_path / "cpu", "--device", "cpu", "--dtype", "float32") == 0
    same_run(ref, tmp_path / "cpu")
    # device and dtype are not settings: a run scored without them resumes with them (nothing to redo)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cpu" / "cases").iterdir()}
    assert score_random3d(data, tmp_path / "cpu", "--device", "auto" if not torch.cuda.is_available() else "cpu") == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cpu" / "cases").iterdir()} == stamps
    # bfloat16 changes S: it is a setting, and a float32 run is not resumed in it
    assert score_random3d(data, tmp_path / "cpu", "--dtype", "bfloat16") == 2
    assert "dtype: None -> 'bfloat16'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:7", "cuda:0"])
def test_cuda_without_a_gpu_is_refused(data, tmp_path, capsys, device):
    out = tmp_path / "r"
    assert score_random3d(data, out, "--device", device) == 2
    err = capsys.readouterr().err
    assert f"--device {device}: " in err and "use --device cpu" in err
    assert not out.exists()


def test_bad_device_is_refused(data, tmp_path, capsys):
    assert score_random3d(data, tmp_path / "r", "--device", "tpu") == 2
    assert "--device: expected auto, cpu, cuda or cuda:N, got 'tpu'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit):
        score_random3d(data, tmp_path / "r", "--workers", "-1")
    assert not (tmp_path / "r").exists()


def test_device_index_beyond_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"--device cuda:7: this machine has 2 CUDA device\(s\) \(cuda:0..cuda:1\)"):
        resolve_device("cuda:7")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    # under torchrun, cuda and auto mean this rank's GPU
    assert resolve_device("auto", local_rank=1, world_size=2) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="LOCAL_RANK=2 needs cuda:2"):
        resolve_device("cuda", local_rank=2, world_size=3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", local_rank=1, world_size=2) == torch.device("cpu")


def test_workers_give_the_same_run_and_failures(data, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(data, d)
    ids = sorted(p.name[: -len(".nii.gz")] for p in (d / "labelsTr").glob("*.nii.gz"))
    img = d / "imagesTr" / f"{ids[2]}_0000.nii.gz"
    img.write_bytes(img.read_bytes()[:200])  # truncated gzip
    assert score_random3d(d, tmp_path / "w0", "--workers", "0") == 3
    assert score_random3d(d, tmp_path / "w2", "--workers", "2") == 3
    same_run(tmp_path / "w0", tmp_path / "w2")
    err = json.loads((tmp_path / "w2" / "cases" / f"{ids[2]}.error.json").read_text())
    assert err["bug"] is False and ids[2] in err["error"]
    assert log_lines(tmp_path / "w0") == log_lines(tmp_path / "w2") and len(log_lines(tmp_path / "w2")) == 1


def test_an_error_from_a_worker_keeps_its_name_and_traceback():
    class Odd(ValueError):  # a local class: cannot be pickled by reference
        def __init__(self, a, b):
            super().__init__(f"{a} and {b}")

    try:
        raise Odd(1, 2)
    except Odd as e:
        back = pickle.loads(pickle.dumps(portable_error(e)))
    assert type(back).__name__ == "Odd" and isinstance(back, ValueError) and str(back) == "1 and 2"
    assert "raise Odd(1, 2)" in back.auvcore_traceback
    try:
        raise IndexError("a bug")
    except IndexError as e:
        back = pickle.loads(pickle.dumps(portable_error(e)))
    assert type(back) is IndexError and "raise IndexError" in back.auvcore_traceback


def torchrun(args, cwd, timeout=240):
    return subprocess.run(TORCHRUN + args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_two_gloo_ranks_give_the_table_of_one_process(data, ref, tmp_path):
    out = tmp_path / "ranks"
    p = torchrun(["-m", "auvcore", "score", str(data), "--encoder", "random3d", "--out", str(out), "--no-progress",
                  "--timing", str(tmp_path / "t.json")], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("scores: ") == 1  # rank 0 speaks for the run
    same_run(ref, out)
    t = [json.loads((tmp_path / f"t.rank{r}.json").read_text()) for r in (0, 1)]
    assert [x["rank"] for x in t] == [0, 1] and all(x["world"] == 2 for x in t)
    assert sum(x["cases"] for x in t) == N_CASES and all(x["cases"] == N_CASES // 2 for x in t)


KILLER = """
import os, signal, sys
import auvcore.app.scoring as S
from auvcore.app.cli import main
real = S.save_result
def save_result(run, case_id, result):
    real(run, case_id, result)
    if os.environ["RANK"] == "1":  # rank 1 dies right after its first case
        os.kill(os.getpid(), signal.SIGKILL)
S.save_result = save_result
sys.exit(main(sys.argv[1:]))
"""


def test_a_dead_rank_leaves_its_cases_and_the_rerun_finishes(data, ref, tmp_path):
    out = tmp_path / "r"
    args = ["score", str(data), "--encoder", "random3d", "--out", str(out), "--no-progress"]
    (tmp_path / "killer.py").write_text(KILLER)
    p = torchrun([str(tmp_path / "killer.py"), *args], cwd=tmp_path)
    assert p.returncode != 0
    assert not (out / "scores.parquet").exists()
    done = {f.name: f.stat().st_mtime_ns for f in (out / "cases").glob("*.npz")}
    ids = sorted(c.name[: -len(".nii.gz")] for c in (Path(data) / "labelsTr").glob("*.nii.gz"))
    assert f"{ids[1]}.npz" in done and 1 <= len(done) < N_CASES  # rank 1's first case
    p = torchrun(["-m", "auvcore", *args], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    same_run(ref, out)
    assert {n: (out / "cases" / n).stat().st_mtime_ns for n in done} == done  # finished cases were kept


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["masked", "decoded"])
def test_device_cuda_gives_the_cpu_table(data, tmp_path, mode):
    """The encoder and S on the GPU: the same cases, counts and failures; S within 2e-3 of the CPU run's (cuDNN
    convolutions run in TF32 by default, so the features differ in their fourth digit before S sees them)."""
    assert score_random3d(data, tmp_path / "cpu", "--device", "cpu", "--mode", mode) == 0
    assert score_random3d(data, tmp_path / "gpu", "--device", "cuda", "--mode", mode) == 0
    a, b = (pd.read_parquet(tmp_path / r / "scores.parquet") for r in ("cpu", "gpu"))
    assert list(a.columns) == list(b.columns) and list(a["case"]) == list(b["case"])
    num = [c for c in a.columns if a[c].dtype.kind == "f"]
    other = [c for c in a.columns if c not in num]
    pd.testing.assert_frame_equal(a[other], b[other])
    S = [c for c in num if c.startswith("S[")]
    np.testing.assert_allclose(b[S].to_numpy(), a[S].to_numpy(), rtol=0, atol=2e-3)


@pytest.mark.parametrize("group", [4, 100])
def test_cases_in_groups_give_the_same_run(data, ref, tmp_path, monkeypatch, group):
    """S taken for groups of cases (scoring.SCALE_BATCH, 16 on a GPU), a last group short or one group for all:
    every case keeps its own result, byte for byte (the GPU's single eigen launch per group is the GPU test
    above)."""
    import auvcore.app.scoring as P

    monkeypatch.setitem(P.SCALE_BATCH, "cpu", group)
    out = tmp_path / "groups"
    assert score_random3d(data, out, "--workers", "1") == 0
    same_run(ref, out)
    # the group's Grams are held to GROUP_BYTES: many classes or wide features make smaller groups
    assert P._group_size(torch.device("cuda"), "masked", 8, 512) == 16
    assert P._group_size(torch.device("cuda"), "masked", 100, 512) == 5  # 210 MB a case
    assert P._group_size(torch.device("cuda"), "masked", 100, 4096) == 1
    assert P._group_size(torch.device("cuda"), "decoded", 8, 512) == 1


def test_workers_auto(data, ref, tmp_path, monkeypatch):
    from auvcore.app.distributed import auto_workers

    # the rule (distributed.auto_workers): no loader beside a CPU encoder on a small machine, one from 8 cores;
    # on a GPU the cores of the rank's share less one, 1..4
    assert [auto_workers("cpu", n) for n in (1, 2, 7, 8, 64)] == [0, 0, 0, 1, 1]
    assert [auto_workers("cuda", n) for n in (1, 2, 4, 16, 128)] == [1, 1, 3, 4, 4]
    assert auto_workers("cuda:1", 16, ranks_per_node=8) == 1 and auto_workers("cuda", 16, ranks_per_node=4) == 3
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert auto_workers("cpu") == 1
    out = tmp_path / "auto"
    assert score_random3d(data, out, "--workers", "auto", "--timing", str(tmp_path / "t.json")) == 0
    same_run(ref, out)
    assert json.loads((tmp_path / "t.json").read_text())["workers"] == 1
    with pytest.raises(SystemExit):
        score_random3d(data, tmp_path / "r", "--workers", "many")


def test_loaders_that_only_read_give_the_volumes_of_load_case(data):
    """The GPU's way (the loader processes read, the scoring process resamples and counts), taken on the CPU:
    the same volumes, label counts and errors as reading and resampling in one go."""
    from auvcore.app.distributed import loaded_cases
    from auvcore.data import discover, load_case

    ds = discover(data)
    cases = ds.cases[:3]
    got = list(loaded_cases(cases, (1.5, 1.5, 3.0), "CT", ds, workers=2, resample_in_loaders=False))
    assert [c.case_id for c, *_ in got] == [c.case_id for c in cases]
    for case, vol, err, dt in got:
        assert err is None and dt > 0
        want = load_case(case, (1.5, 1.5, 3.0))
        np.testing.assert_array_equal(vol.image, want.image)
        np.testing.assert_array_equal(vol.label, want.label)
        np.testing.assert_array_equal(vol.label_counts, np.bincount(want.label.reshape(-1)))
        np.testing.assert_array_equal(vol.affine, want.affine)
