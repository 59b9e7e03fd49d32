"""Merlin feature extraction: time and peak memory per case, per layer, on CPU; ``--litemedsam``: LiteMedSAM's
decoded maps per case, the batched decoder next to the per-prompt one it replaced, in one process.

Builds (or reuses) the demo data set, loads cases at Merlin's spacing (1.5×1.5×3 mm) and, for each
layer, in a fresh process (so peak memory is that layer's alone): loads the encoder, warms up,
then times ``encode_case`` (preprocess + forward + labels onto the grid) per case.

    python bench/bench_encoders.py --threads 2 --cases 3 --repeats 2 --out bench/RESULTS_encoders.md

Memory is the process's resident set: with the model loaded, and its peak (VmHWM, reset after
loading) while encoding, i.e. what encoding adds on top of the loaded model.

    python bench/bench_encoders.py --litemedsam --threads 2 --cases 1 --repeats 1 --out bench/RESULTS_litemedsam.md

times ``LiteMedSAMEncoder.encode`` (decoded mode, the demo case on its own grid as ``auvcore score`` gives it)
and the same case through the per-prompt decoder (``tests/litemedsam_reference.py``: SAM's decoder on a copy of
the slice's embedding per box, 8 boxes per call, the code before issue 23), alternating new / old per repeat
on the same case so that both see the same load; ``--slices N`` times the N middle slices only. Reports the
wall and CPU time of each (CPU time, of all threads, moves less with the load of a shared machine), the image
encoder's share of the new path, the largest difference of the maps, the load.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

from _util import cpu_name

ROOT = Path(__file__).resolve().parents[1]


def _rss_kb(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak():
    try:  # Linux >= 4.0: "5" resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _worker(args, q):
    import torch

    torch.set_num_threads(args["threads"])
    from auvcore.data import discover, load_case
    from auvcore.encoders import MerlinEncoder, encode_case

    ds = discover(args["data"])
    vols = [load_case(c, spacing=(1.5, 1.5, 3.0)) for c in ds.cases[: args["cases"]]]
    if args.get("shape"):
        import numpy as np

        from auvcore.data import Volume
        rng = np.random.default_rng(0)
        shp = tuple(args["shape"])
        vols = [Volume(rng.normal(-300, 300, shp).astype("float32"), np.ones(shp, "int64"),
                       (1.5, 1.5, 3.0), np.eye(4), "synthetic")]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args["dtype"]]
    t0 = time.perf_counter()
    enc = MerlinEncoder(args["layer"], weights=args["weights"], dtype=dtype, max_shape=None)
    t_load = time.perf_counter() - t0
    load_peak = _rss_kb("VmHWM")  # includes the bf16 file and its float copy side by side
    rss_before = _rss_kb()
    reset = _reset_peak()
    encode_case(enc, vols[0])  # warm-up (allocator, oneDNN primitive cache)
    times, cpu = [], []
    for v in vols:
        for _ in range(args["repeats"]):
            t, c = time.perf_counter(), time.process_time()
            f, l = encode_case(enc, v)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    q.put({"layer": args["layer"], "dtype": args["dtype"], "load_s": t_load,
           "shape": list(vols[0].shape), "grid": list(f.shape[1:]),
           "times": times, "cpu": cpu, "rss_before_mb": rss_before / 1024, "load_peak_mb": load_peak / 1024,
           "peak_mb": _rss_kb("VmHWM") / 1024, "peak_reset": reset})


def run(args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(args, q))
    p.start()
    res = q.get()
    p.join()
    return res


def _sh(cmd):
    try:
        return subprocess.check_output(cmd, shell=True, text=True, stderr=subprocess.DEVNULL).strip()
    except subprocess.CalledProcessError:
        return ""


def litemedsam(a, data):
    """New (batched) and old (per-prompt) LiteMedSAM side by side; rows for the report."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from litemedsam_reference import ReferenceLiteMedSAM

    from auvcore.data import Volume, discover, load_case
    from auvcore.encoders import LiteMedSAMEncoder

    torch.set_num_threads(a.threads)
    enc = LiteMedSAMEncoder(device=a.device)
    old = ReferenceLiteMedSAM(enc)
    phase = {"embed": 0.0, "decode": 0.0}

    def timed(name, f):
        def g(*args, **kw):
            t = time.perf_counter()
            r = f(*args, **kw)
            if enc.device.type == "cuda":
                torch.cuda.synchronize()
            phase[name] += time.perf_counter() - t
            return r
        return g

    enc._embed, enc._decode = timed("embed", enc._embed), timed("decode", enc._decode)
    rows = []
    for case in discover(data).cases[: a.cases]:
        v = load_case(case)  # the case's own grid, as `auvcore score --encoder litemedsam` loads it
        if a.slices:
            z0 = max(0, v.shape[2] // 2 - a.slices // 2)
            v = Volume(v.image[..., z0:z0 + a.slices], v.label[..., z0:z0 + a.slices], v.spacing, v.affine,
                       f"{v.case_id}[z{z0}:{z0 + a.slices}]", v.modality)
        nprompts = sum(len(p) for p in enc._box_prompts(
            np.ascontiguousarray(np.transpose(np.asarray(v.label), (2, 1, 0))[:, ::-1, ::-1]),  # display [Z, R, C]
            sorted(int(c) for c in np.unique(v.label) if c > 0), enc._slice_size(*v.shape[:2], v.spacing)).values())
        new_t, old_t, diff = [], [], 0.0
        for r in range(a.repeats):
            phase.update(embed=0.0, decode=0.0)
            load0 = os.getloadavg()[0]
            for which in ("new", "old") if r % 2 == 0 else ("old", "new"):  # alternate the order: a changing load
                t, c = time.perf_counter(), time.process_time()
                if which == "new":
                    mn, _ = enc.encode(v)
                    new_t.append((time.perf_counter() - t, dict(phase), time.process_time() - c))
                else:
                    mo, _ = old.encode(v)
                    old_t.append((time.perf_counter() - t, time.process_time() - c))
            diff = max(diff, float((mn - mo).abs().max() / mo.abs().max()))
            row = {"case": v.case_id, "shape": list(v.shape), "prompts": nprompts, "repeat": r,
                   "new_s": new_t[-1][0], "new_embed_s": new_t[-1][1]["embed"],
                   "new_decode_s": new_t[-1][1]["decode"], "old_s": old_t[-1][0], "new_cpu_s": new_t[-1][2],
                   "old_cpu_s": old_t[-1][1], "max_rel_diff": diff,
                   "load_start": load0, "load_end": os.getloadavg()[0]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def write_litemedsam(a, rows, out: Path):
    import torch

    commit = _sh(f"git -C {ROOT} rev-parse --short HEAD")
    lines = [
        "# LiteMedSAM decoded maps per case: batched decoder vs the per-prompt one", "",
        f"- command: `python bench/bench_encoders.py {' '.join(sys.argv[1:])}`",
        f"- machine: {cpu_name()} (lscpu), torch {torch.__version__}, {a.threads} torch threads, device {a.device}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, git commit {commit}",
        "- new: `LiteMedSAMEncoder.encode` (batched decoder); old: the per-prompt decoder "
        "(tests/litemedsam_reference.py), run right after it on the same case", "",
        "| case (X,Y,Z) | box prompts | new: wall (image encoder + decoder) | old: wall | old / new, wall | "
        "CPU time new / old | old / new, CPU | max map difference / max logit | load average (start → end) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} ({'×'.join(map(str, r['shape']))}) | {r['prompts']} | {r['new_s']:.1f} s "
                     f"({r['new_embed_s']:.1f} + {r['new_decode_s']:.1f}) | {r['old_s']:.1f} s | "
                     f"{r['old_s'] / r['new_s']:.2f} | {r['new_cpu_s']:.0f} / {r['old_cpu_s']:.0f} s | "
                     f"{r['old_cpu_s'] / r['new_cpu_s']:.2f} | {r['max_rel_diff']:.1e} | {r['load_start']:.0f} → "
                     f"{r['load_end']:.0f} |")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="data set folder (default: build the demo in /tmp)")
    ap.add_argument("--layers", default="layer1,layer2,layer3")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--weights", default="astra")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="also time layer4 on a 224×224×160 volume (SPEC's 26 s figure)")
    ap.add_argument("--out", default=None, help="write a markdown report here")
    ap.add_argument("--quick", action="store_true", help="one case, one repeat, layer2 only")
    ap.add_argument("--litemedsam", action="store_true", help="LiteMedSAM decoded maps: batched vs per-prompt")
    ap.add_argument("--slices", type=int, default=0, help="--litemedsam: time the N middle slices only")
    ap.add_argument("--device", default="cpu", help="--litemedsam: cpu, cuda, auto")
    a = ap.parse_args()
    if a.quick:
        a.cases, a.repeats, a.layers, a.full = 1, 1, "layer2", False
    data = a.data
    if data is None:
        from auvcore.data.demo import build_demo
        t = time.perf_counter()
        data = str(build_demo("/tmp/auvcore-bench-demo", n_cases=24))
        print(f"demo (24 cases) ready in {time.perf_counter() - t:.1f} s", flush=True)
    if a.litemedsam:
        rows = litemedsam(a, data)
        if a.out:
            write_litemedsam(a, rows, Path(a.out))
        return
    rows = []
    for dt in a.dtypes.split(","):
        for layer in a.layers.split(","):
            r = run({"data": data, "layer": layer, "dtype": dt, "weights": a.weights, "threads": a.threads,
                     "cases": a.cases, "repeats": a.repeats})
            rows.append(r)
            print(json.dumps(r), flush=True)
    if a.full:
        r = run({"data": data, "layer": "layer4", "dtype": "float32", "weights": a.weights, "threads": a.threads,
                 "cases": 1, "repeats": 1, "shape": [224, 224, 160]})
        rows.append(r)
        print(json.dumps(r), flush=True)
    if a.out:
        write_report(a, rows, Path(a.out))


def write_report(a, rows, out: Path):
    import statistics

    import torch

    cpu = cpu_name()
    commit = _sh(f"git -C {ROOT} rev-parse --short HEAD")
    load = os.getloadavg()
    lines = [
        "# Merlin encoder: time and memory per case (CPU)", "",
        f"- command: `python bench/bench_encoders.py {' '.join(sys.argv[1:])}`",
        f"- machine: {cpu} (lscpu), torch {torch.__version__}, {a.threads} torch threads",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, git commit {commit}",
        f"- load average at the end of the run: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(the machine was shared with other jobs; times are medians)",
        f"- weights: {a.weights}; cases from the demo data set at 1.5×1.5×3 mm; time = `encode_case` "
        "(window, forward, labels onto the grid)", "",
        "| layer | dtype | case shape (X,Y,Z) | feature map [C, grid] | time / case, median (min–max) | CPU time / case | model load (time, peak RSS) | RSS with model loaded | peak RSS while encoding | encoding peak over loaded model |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ts = r["times"]
        lines.append(
            f"| {r['layer']} | {r['dtype']} | {'×'.join(map(str, r['shape']))} | {r['grid']} | "
            f"{statistics.median(ts):.2f} s ({min(ts):.2f}–{max(ts):.2f}) | {statistics.median(r['cpu']):.2f} s | {r['load_s']:.1f} s, {r['load_peak_mb']:.0f} MB | "
            f"{r['rss_before_mb']:.0f} MB | {r['peak_mb']:.0f} MB | {r['peak_mb'] - r['rss_before_mb']:.0f} MB |")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
