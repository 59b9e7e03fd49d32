"""A real (small) training run with the DUO loss: Dice+BCE versus DUO on a chest CT (CPU by default, `--device cuda`
on a GPU), not in CI.

Data: the chest CT and its 7-class segmentation that ship inside the ``slicerio`` wheel
(``pip install slicerio==1.4.0``; 128×128×34 voxels, ribs, cervical/thoracic/lumbar vertebrae, right/left
lung, tissue), read offline with ``slicerio``/``pynrrd``. In-plane ×2 downsampling gives 64×64×34.

Labels are corrupted on purpose, as in the setting DUO is meant for: in every 4-slice slab each class is, at
random, dilated or eroded in-plane by 2 voxels, or left as is (recorded, seeded). Both runs train on the
corrupted labels and are scored against the clean ones. It is one volume: the scores measure how well each
loss fits clean structure under noisy supervision, not generalisation to new patients.

Both runs: the same tiny 3-D U-Net (8-16-32 channels), the same seed, patches, optimiser and number of
steps. Dice+BCE: ``λ·BCE + Dice`` per (sample, foreground class), averaged (the DUO formula with w = 1 and
ỹ = y). DUO: ``auvcore.DUOLoss`` with a ``NoiseHead`` on the decoder's last features.

    python bench/train_duo.py                 # 2 runs x 700 steps; writes bench/train_duo.{png,json}
    python bench/train_duo.py --steps 40 --eval-every 20 --out /tmp/smoke   # smoke run

Ablations of DUO's parts (issue "why DUO trains worse"), each a named run of ``RUNS`` over several training
seeds (the label corruption stays that of ``--seed``; ``--seeds`` vary the initialisation and the patches):

    python bench/train_duo.py --runs dice_bce duo duo_detached reweight_only noise_only no_R warmup w_mean1 \
        --seeds 0 1 2 --out bench/ablation_duo
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from auvcore import DUOLoss, NoiseHead

K = 8  # classes, background included: the chest's 8; --volume sets it from the volume's labels


def load_volume():
    import nrrd
    import slicerio

    d = os.path.join(os.path.dirname(slicerio.__file__), "data")
    img, _ = nrrd.read(os.path.join(d, "CTChest4.nrrd"))
    seg = slicerio.read_segmentation(os.path.join(d, "Segmentation.seg.nrrd"))
    lab = seg["voxels"].astype(np.int64)
    assert img.shape == lab.shape, (img.shape, lab.shape)
    names = {s["labelValue"]: s["name"] for s in seg["segments"]}
    # [X, Y, Z] -> [D=Z, H=Y, W=X]; HU clipped to [-1000, 1000] -> [-1, 1]; in-plane ×2 (mean / nearest)
    img = np.clip(img.astype(np.float32), -1000, 1000).transpose(2, 1, 0) / 1000.0
    lab = lab.transpose(2, 1, 0)
    img = img.reshape(img.shape[0], img.shape[1] // 2, 2, img.shape[2] // 2, 2).mean(axis=(2, 4))
    lab = lab[:, ::2, ::2]
    return img, lab, [names[c] for c in range(1, K)]


def load_demo_volume(source, size=(48, 64, 64)):
    """Another offline source of the demo builder (``auvcore.data.demo.load_source``): the image
    normalised (CT: HU clipped to [-1000, 1000] / 1000; MR: z-score inside the body), cropped to the labels'
    bounding box plus a margin and brought to about ``size`` voxels (mean pooling for the image, nearest for
    the labels). Returns ``(image, labels, foreground names)``; sets ``K``."""
    global K
    from scipy import ndimage

    from auvcore.data.demo import load_source

    img, lab, _, names, modality = load_source(source)
    img, lab = img.astype(np.float32), lab.astype(np.int64)
    nz = np.argwhere(lab > 0)
    lo = np.maximum(nz.min(0) - 8, 0)
    hi = np.minimum(nz.max(0) + 9, lab.shape)
    img, lab = img[tuple(map(slice, lo, hi))], lab[tuple(map(slice, lo, hi))]
    if modality == "CT":
        img = np.clip(img, -1000, 1000) / 1000.0
    else:
        body = img > np.percentile(img, 20)
        img = (img - img[body].mean()) / (img[body].std() + 1e-6)
    zoom = [min(1.0, t / n) for t, n in zip(size, img.shape)]
    img = ndimage.zoom(img, zoom, order=1).astype(np.float32)
    lab = ndimage.zoom(lab, zoom, order=0)
    # [x, y, z] (RAS) -> [D=z, H=y, W=x]; every side a multiple of 4 (two poolings), cropped
    img, lab = img.transpose(2, 1, 0), lab.transpose(2, 1, 0)
    cut = tuple(slice(0, n - n % 4) for n in img.shape)
    img, lab = np.ascontiguousarray(img[cut]), np.ascontiguousarray(lab[cut])
    K = len(names)
    return img, lab, [names[c] for c in range(1, K)]


def corrupt(lab, rng, slab=4, radius=2):
    """Per slab and class: dilate, erode or keep (1/3 each). Returns the noisy labels and the fraction of
    changed voxels."""
    from scipy import ndimage

    noisy = lab.copy()
    st = np.zeros((1, 3, 3), bool)
    st[0] = ndimage.generate_binary_structure(2, 1)
    for z0 in range(0, lab.shape[0], slab):
        for c in range(1, K):
            m = lab[z0:z0 + slab] == c
            if not m.any():
                continue
            op = rng.integers(3)
            part = noisy[z0:z0 + slab]
            if op == 0:
                grown = ndimage.binary_dilation(m, st, iterations=radius)
                part[grown & (part == 0)] = c
            elif op == 1:
                shrunk = ndimage.binary_erosion(m, st, iterations=radius)
                part[m & ~shrunk] = 0
    return noisy, float((noisy != lab).mean())


def block(cin, cout):
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.01),
                         nn.Conv3d(cout, cout, 3, padding=1), nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.01))


class TinyUNet3D(nn.Module):
    """Two poolings (in-plane and depth), 8-16-32 channels, skip connections; about 60 k parameters."""

    def __init__(self, cin=1, k=None, c=(8, 16, 32)):
        super().__init__()
        k = K if k is None else k
        self.e1, self.e2, self.e3 = block(cin, c[0]), block(c[0], c[1]), block(c[1], c[2])
        self.u2 = nn.ConvTranspose3d(c[2], c[1], 2, stride=2)
        self.d2 = block(2 * c[1], c[1])
        self.u1 = nn.ConvTranspose3d(c[1], c[0], 2, stride=2)
        self.d1 = block(2 * c[0], c[0])
        self.head = nn.Conv3d(c[0], k, 1)
        self.features = c[0]

    def forward(self, x):
        e1 = self.e1(x)
        e2 = self.e2(F.max_pool3d(e1, 2))
        e3 = self.e3(F.max_pool3d(e2, 2))
        d2 = self.d2(torch.cat([self.u2(e3), e2], 1))
        f = self.d1(torch.cat([self.u1(d2), e1], 1))
        return self.head(f), f


def dice_bce(z, y, lambda_bce=1.0, smooth=1e-5):
    """λ·BCE + Dice per (sample, foreground class), averaged: the baseline."""
    z, y = z[:, 1:].flatten(2), y[:, 1:].flatten(2)
    bce = F.binary_cross_entropy_with_logits(z, y, reduction="none").mean(-1)
    s = torch.sigmoid(z)
    dice = 1 - (2 * (s * y).sum(-1) + smooth) / (s.sum(-1) + y.sum(-1) + smooth)
    return (lambda_bce * bce + dice).mean()


def dice_scores(z, lab):
    """Per foreground class: Dice of (σ(z_c) > 0.5) against lab == c."""
    pred = torch.sigmoid(z[0]) > 0.5
    out = []
    for c in range(1, K):
        g = lab == c
        p = pred[c]
        denom = int(p.sum() + g.sum())
        out.append(2 * int((p & g).sum()) / denom if denom else 1.0)
    return out


# name -> (label, DUOLoss arguments, options of the training loop); None: the plain Dice+BCE baseline.
#   warmup: the fraction of the steps trained with w = 1 and ỹ = y (α = τ = 0) before DUO switches on;
#   w_mean1: the loss divided by the batch's mean weight (detached), so that w < 1 does not lower the
#            effective learning rate (R is divided too, by at most 2).
RUNS = {
    "dice_bce": ("Dice+BCE", None, {}),
    "duo": ("DUO, the paper's setting (DUOLoss.paper())", {}, {}),
    "duo_detached": ("DUO, detach_scale=True", {"detach_scale": True}, {}),
    "duo_off": ("DUO with α = τ = β = 0 (must equal Dice+BCE)", {"alpha": 0.0, "tau": 0.0, "beta": 0.0}, {}),
    "reweight_only": ("re-weighting only (τ = β = 0: no noise head)", {"tau": 0.0, "beta": 0.0}, {}),
    "reweight_detached": ("re-weighting only, detach_scale=True", {"tau": 0.0, "beta": 0.0, "detach_scale": True},
                          {}),
    "noise_only": ("noise head only (α = 0: w = 1)", {"alpha": 0.0}, {}),
    "no_R": ("no constraint R (β = 0)", {"beta": 0.0}, {}),
    "alpha_2": ("α = 2", {"alpha": 2.0}, {}),
    "tau_0.1": ("τ = 0.1 (DUOLoss's default since this ablation)", {"tau": 0.1}, {}),
    "warmup": ("warm-up: Dice+BCE for 30 % of the steps, then DUO", {}, {"warmup": 0.3}),
    "w_mean1": ("weights normalised to mean 1", {}, {"w_mean1": True}),
}


def run(name, img, noisy, clean, args, seed):
    torch.manual_seed(seed)
    dev = torch.device(args.device)
    net = TinyUNet3D().to(dev)
    head = NoiseHead(net.features, K).to(dev)
    _, duo_args, opts = RUNS[name]
    uses_duo = duo_args is not None
    params = list(net.parameters()) + (list(head.parameters()) if uses_duo else [])
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    # every DUO run is the paper's setting (DUOLoss.PAPER) with its own changes, as when the study was designed
    duo = DUOLoss.paper(to_onehot_y=True, **(duo_args or {}))
    alpha, tau = duo.alpha, duo.tau
    warm = int(opts.get("warmup", 0.0) * args.steps)
    rng = np.random.default_rng(seed)
    D, H, W = img.shape
    pd, ph, pw = args.patch
    x_full = torch.from_numpy(img)[None, None].to(dev)
    pad = (-D) % 4
    x_eval = F.pad(x_full, (0, 0, 0, 0, 0, pad), mode="replicate")
    clean_t, noisy_t = torch.from_numpy(clean).to(dev), torch.from_numpy(noisy).to(dev)
    hist = {"step": [], "loss": [], "eval_step": [], "dice_clean": [], "dice_noisy": [], "w": []}
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        xs, ys = [], []
        for _ in range(args.batch):
            d, h, w = rng.integers(0, D - pd + 1), rng.integers(0, H - ph + 1), rng.integers(0, W - pw + 1)
            xs.append(x_full[0, :, d:d + pd, h:h + ph, w:w + pw])
            ys.append(noisy_t[None, d:d + pd, h:h + ph, w:w + pw])
        x, y = torch.stack(xs), torch.stack(ys)
        z, f = net(x)
        if uses_duo:
            duo.alpha, duo.tau = (0.0, 0.0) if step <= warm else (alpha, tau)
            loss = duo(z, head(f), y)
            if opts.get("w_mean1"):
                loss = loss / duo.last_weights.mean()
        else:
            loss = dice_bce(z, F.one_hot(y[:, 0], K).movedim(-1, 1).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist["step"].append(step)
        hist["loss"].append(loss.item())
        if uses_duo:
            hist["w"].append(float(duo.last_weights.mean()))
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                ze = net(x_eval)[0][..., :D, :, :]
            dc, dn = dice_scores(ze, clean_t), dice_scores(ze, noisy_t)
            hist["eval_step"].append(step)
            hist["dice_clean"].append(dc)
            hist["dice_noisy"].append(dn)
            print(f"[{name} seed {seed}] step {step:4d}  loss {loss.item():.4f}  Dice vs clean {np.mean(dc):.4f}  "
                  f"vs noisy {np.mean(dn):.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    hist["seconds"] = time.perf_counter() - t0
    return hist


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--patch", type=int, nargs=3, default=(16, 32, 32))
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0, help="seed of the label corruption (and of training without --seeds)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: --seed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the whole run: network, loss, S)")
    ap.add_argument("--runs", nargs="+", default=["dice_bce", "duo"], choices=list(RUNS))
    ap.add_argument("--volume", default="chest",
                    help="chest (slicerio's CTChest4, the default) or another demo source (spine-ct, spine-mr, "
                         "brain-mni, ...: auvcore.data.demo.load_source), cropped to its labels, ~48x64x64")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_duo"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    img, clean, names = load_volume() if args.volume == "chest" else load_demo_volume(args.volume)
    noisy, frac = corrupt(clean, np.random.default_rng(args.seed))
    as_logits = F.one_hot(torch.from_numpy(noisy), K).movedim(-1, 0)[None].float() * 20 - 10
    label_dice = [round(v, 3) for v in dice_scores(as_logits, torch.from_numpy(clean))]
    print(f"volume {img.shape}, classes {names}; corrupted labels differ on {100 * frac:.1f}% of voxels "
          f"(Dice of corrupted vs clean labels per class: {label_dice})")
    seeds = args.seeds or [args.seed]
    per_seed = {name: [run(name, img, noisy, clean, args, sd) for sd in seeds] for name in args.runs}
    hists = {name: hs[0] for name, hs in per_seed.items()}  # the curves: the first seed

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    labels = {name: RUNS[name][0] for name in hists}
    for name, h in hists.items():
        k = min(10, len(h["loss"]))  # the moving mean of the loss curve
        sm = np.convolve(h["loss"], np.ones(k) / k, mode="valid")
        ax[0].plot(h["step"][k - 1:], sm, label=labels[name])
        ax[1].plot(h["eval_step"], [np.mean(d) for d in h["dice_clean"]], marker="o", ms=3, label=labels[name])
        ax[2].plot(h["eval_step"], [np.mean(d) for d in h["dice_noisy"]], marker="o", ms=3, label=labels[name])
    ax[0].set(title="training loss (moving mean of 10)", xlabel="step", yscale="log")
    ax[1].set(title=f"mean Dice vs clean labels ({K - 1} classes)", xlabel="step", ylim=(0, 1))
    ax[2].set(title="mean Dice vs corrupted training labels", xlabel="step", ylim=(0, 1))
    for a in ax:
        a.grid(alpha=0.3)
    # One legend under the panels: with many ablations a legend per panel hides the curves.
    ncol = min(3, len(hists))
    fig.legend(*ax[1].get_legend_handles_labels(), loc="lower center", ncol=ncol, fontsize=8)
    fig.suptitle(f"{args.volume} {'x'.join(map(str, img.shape))}, {args.steps} steps, patch {tuple(args.patch)}, batch {args.batch}, "
                 f"training seed {seeds[0]}")
    fig.tight_layout(rect=(0, 0.05 * -(-len(hists) // ncol), 1, 1))
    fig.savefig(args.out + ".png", dpi=110)
    summary = {name: {"final_dice_clean": float(np.mean(h["dice_clean"][-1])),
                      "final_dice_clean_per_class": dict(zip(names, map(float, h["dice_clean"][-1]))),
                      "final_dice_noisy": float(np.mean(h["dice_noisy"][-1])),
                      "best_dice_clean": float(max(np.mean(d) for d in h["dice_clean"])),
                      "loss_finite": bool(np.isfinite(h["loss"]).all()),
                      "mean_w_last_50": float(np.mean(h["w"][-50:])) if h["w"] else 1.0,
                      "seconds": h["seconds"]} for name, h in hists.items()}
    for name, hs in per_seed.items():  # over the training seeds: final mean Dice vs clean, mean and std
        final = [float(np.mean(h["dice_clean"][-1])) for h in hs]
        summary[name].update(label=RUNS[name][0], seeds=seeds, final_dice_clean_seeds=final,
                             final_dice_clean_mean=float(np.mean(final)), final_dice_clean_std=float(np.std(final)),
                             final_dice_clean_per_class_mean=dict(zip(names, np.mean(
                                 [h["dice_clean"][-1] for h in hs], 0).round(3).tolist())),
                             final_dice_noisy_mean=float(np.mean([np.mean(h["dice_noisy"][-1]) for h in hs])))
    summary["volume"] = {"source": args.volume, "shape": list(img.shape), "classes": names}
    summary["label_noise_fraction"] = frac
    summary["corrupted_label_dice"] = dict(zip(names, label_dice))
    with open(args.out + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
