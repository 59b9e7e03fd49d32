"""Label QC by out-of-fold disagreement: the score that finds corrupted labels (bench/RESULTS.md).

A small 3-D U-Net is trained with k-fold cross-validation on the data set's own labels; each case is predicted
by the model of the fold that held it out, so its out-of-fold (OOF) probabilities never saw its label. Where
the label says one thing and a model trained on every other case says another, the label is suspect. The
per-case score is cleanlab's segmentation label-quality score (``cleanlab.segmentation.rank.
get_label_quality_scores``, ``method="softmin"``, temperature 0.1): the self-confidence ``p[given label]`` of
every voxel pooled by a softmin, dominated by the voxels the model contradicts. It is written here
(:func:`softmin_quality`, cleanlab 2.9's two lines) so that cleanlab is never needed at run time; the tests
check it against cleanlab's own function.

This module is the arrays-in, arrays-out part (grid, network, training, scores); ``auvcore.app.qc`` runs it on
a data set into a run folder (resumable per fold, folds shared over torchrun ranks). ``bench/study_oof.py``
imports it: one place for the model and the formula.

The network is the project's own (:class:`SmallUNet`, the shape of MONAI's ``UNet(spatial_dims=3, channels=(8,
16, 32), strides=(2, 2), num_res_units=1)`` that the evidence study first used), so label QC needs torch only.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The defaults of the evidence study (bench/study_oof.py): 4 folds, 200 steps of batch 2, a 48-voxel grid.
FOLDS, STEPS, SIZE, SEED, BATCH, LR, TEMPERATURE = 4, 200, 48, 0, 2, 3e-3, 0.1


# ---- grid -----------------------------------------------------------------------------------------------

def grid_shape(extent_mm, size: int) -> tuple[int, int, int]:
    """The model grid: the field of view ``extent_mm`` (x, y, z) on ``size`` voxels along its longest side,
    every side a multiple of 4 (the network's two stride-2 levels) and at least 8."""
    if isinstance(size, bool) or int(size) != size or size < 8:
        raise ValueError(f"size: expected an integer of at least 8 voxels, got {size!r}")
    mm = np.asarray(extent_mm, dtype=float)
    if mm.shape != (3,) or not np.isfinite(mm).all() or mm.min() <= 0:
        raise ValueError(f"extent_mm: expected three positive sizes in mm, got {extent_mm!r}")
    return tuple(int(max(8, 4 * round(size * m / mm.max() / 4))) for m in mm)


def normalize(x: np.ndarray) -> np.ndarray:
    """Clipped to the case's 0.5-99.5 percentiles, then z-scored (CT and MR alike: the model compares cases
    with each other, not with Hounsfield units)."""
    lo, hi = np.percentile(x, [0.5, 99.5])
    x = np.clip(x, lo, hi)
    return ((x - x.mean()) / max(float(x.std()), 1e-6)).astype(np.float32)


def resize_label(label: np.ndarray, shape, num_classes: int) -> np.ndarray:
    """A label map on ``shape``: trilinear interpolation of its one-hot map, then argmax, so thin structures
    survive down-sampling better than with nearest neighbour."""
    lab = torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))
    oh = F.one_hot(lab, num_classes).permute(3, 0, 1, 2)[None].float()
    return F.interpolate(oh, size=tuple(shape), mode="trilinear", align_corners=False)[0].argmax(0).numpy()


def resize_case(image: np.ndarray, label: np.ndarray, shape, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (trilinear, then :func:`normalize`) and label (:func:`resize_label`) of one case on ``shape``."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    x = F.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0].numpy()
    return normalize(x), resize_label(label, shape, num_classes)


def fold_split(n: int, folds: int, seed: int, strata=None) -> np.ndarray:
    """Fold index of each of ``n`` cases: shuffled (seeded) and dealt round-robin, so fold sizes differ by at
    most one. ``strata`` (e.g. the corruption flag of a study cohort) deals each stratum in turn, so every fold
    holds its share of each; the main job has no such record and passes none."""
    if isinstance(folds, bool) or int(folds) != folds or not 2 <= folds <= n:
        raise ValueError(f"folds: expected 2..{n} (the number of cases), got {folds!r}")
    rng = np.random.default_rng(seed)
    strata = np.zeros(n, dtype=int) if strata is None else np.asarray(strata)
    if strata.shape != (n,):
        raise ValueError(f"strata: expected {n} entries, got shape {strata.shape}")
    out = np.empty(n, dtype=int)
    start = 0
    for s in np.unique(strata)[::-1]:  # a study's corrupted flag: the corrupted cases (True) dealt first
        group = rng.permutation(np.flatnonzero(strata == s))
        out[group] = (start + np.arange(len(group))) % folds
        start += len(group)
    return out


# ---- network ----------------------------------------------------------------------------------------------

class _Unit(nn.Module):
    """conv (3³, stride s) + instance norm + PReLU, plus a residual path (a 3³ strided conv when the shape
    changes, a 1³ conv when only the channels do)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, last: bool = False):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, stride, padding=1)
        self.post = nn.Identity() if last else nn.Sequential(nn.InstanceNorm3d(cout, affine=True), nn.PReLU())
        self.res = (nn.Identity() if cin == cout and stride == 1 else
                    nn.Conv3d(cin, cout, 3 if stride > 1 else 1, stride, padding=1 if stride > 1 else 0))

    def forward(self, x):
        return self.post(self.conv(x)) + self.res(x)


class _Up(nn.Module):
    """transposed conv (stride 2) + norm + PReLU, then a residual unit; ``last``: plain convs for the logits."""

    def __init__(self, cin: int, cout: int, last: bool = False):
        super().__init__()
        self.up = nn.ConvTranspose3d(cin, cout, 3, 2, padding=1, output_padding=1)
        self.post = nn.Identity() if last else nn.Sequential(nn.InstanceNorm3d(cout, affine=True), nn.PReLU())
        self.unit = _Unit(cout, cout, 1, last=last)

    def forward(self, x):
        return self.unit(self.post(self.up(x)))


class SmallUNet(nn.Module):
    """A 3-D U-Net of two stride-2 levels (8, 16, 32 channels; 36 k parameters with one input channel and 3
    classes): ``[B, in_channels, D, H, W]`` with every side a multiple of 4 -> logits ``[B, classes, D, H, W]``."""

    def __init__(self, in_channels: int = 1, classes: int = 2, channels=(8, 16, 32)):
        super().__init__()
        c1, c2, c3 = channels
        self.down1 = _Unit(in_channels, c1, 2)
        self.down2 = _Unit(c1, c2, 2)
        self.bottom = _Unit(c2, c3, 1)
        self.up2 = _Up(c2 + c3, c1)
        self.up1 = _Up(c1 + c1, classes, last=True)

    def forward(self, x):
        if any(s % 4 for s in x.shape[2:]):
            raise ValueError(f"x: every spatial side must be a multiple of 4, got {tuple(x.shape[2:])}")
        d1 = self.down1(x)
        d2 = self.down2(d1)
        u2 = self.up2(torch.cat([d2, self.bottom(d2)], 1))
        return self.up1(torch.cat([d1, u2], 1))


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice (softmax, background included, per sample and class, then the mean) + cross-entropy, as
    MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` with its defaults. ``target``: ``[B, *grid]``."""
    K = logits.shape[1]
    p = torch.softmax(logits, 1)
    oh = F.one_hot(target, K).movedim(-1, 1).to(p.dtype)
    dims = tuple(range(2, logits.ndim))
    inter = (p * oh).sum(dims)
    dice = 1.0 - (2.0 * inter + smooth) / (p.sum(dims) + oh.sum(dims) + smooth)
    return dice.mean() + F.cross_entropy(logits, target)


# ---- training ---------------------------------------------------------------------------------------------

def train_fold(image: np.ndarray, label: np.ndarray, train, classes: int, steps: int = STEPS, seed: int = 0,
               device="cpu", batch: int = BATCH, lr: float = LR, on_step=None) -> SmallUNet:
    """Train a :class:`SmallUNet` on the cases ``train`` of ``image [N, 1, *grid]`` / ``label [N, *grid]`` for
    ``steps`` steps of ``batch`` cases (Adam, cosine schedule, Dice + CE), seeded by ``seed``. Each sample gets
    a random gain (0.9-1.1) and offset (±0.1): the held-out case must not be judged on its intensity scale.
    ``on_step(i)`` is called after each step (progress)."""
    train = np.asarray(train, dtype=int)
    if len(train) < 1:
        raise ValueError("train: no case to train on")
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps: expected a positive number of training steps, got {steps!r}")
    device = torch.device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = SmallUNet(image.shape[1], classes).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    xs = torch.from_numpy(np.ascontiguousarray(image[train], dtype=np.float32)).to(device)
    ys = torch.from_numpy(np.ascontiguousarray(label[train], dtype=np.int64)).to(device)
    b = min(batch, len(train))
    net.train()
    for i in range(steps):
        idx = rng.choice(len(train), size=b, replace=False)
        gain = torch.from_numpy(rng.uniform(0.9, 1.1, (b, 1, 1, 1, 1)).astype(np.float32)).to(device)
        offset = torch.from_numpy(rng.uniform(-0.1, 0.1, (b, 1, 1, 1, 1)).astype(np.float32)).to(device)
        sel = torch.from_numpy(idx).to(device)
        loss = dice_ce_loss(net(xs[sel] * gain + offset), ys[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(i)
    net.eval()
    return net


@torch.no_grad()
def predict(net: nn.Module, image: np.ndarray, cases, device="cpu") -> np.ndarray:
    """Softmax of ``net`` on the cases ``cases`` of ``image [N, 1, *grid]``, one at a time: ``[len(cases), K,
    *grid]`` float32 on the CPU."""
    out = [torch.softmax(net(torch.from_numpy(image[[i]]).to(device)).float(), 1).cpu() for i in cases]
    return torch.cat(out).numpy()


def train_predict(image, label, train, test, classes: int, steps: int = STEPS, seed: int = 0, device="cpu",
                  batch: int = BATCH, lr: float = LR, on_step=None) -> np.ndarray:
    """:func:`train_fold` on ``train``, then :func:`predict` of ``test``: the out-of-fold softmax of the
    held-out cases ``[len(test), K, *grid]`` float32."""
    net = train_fold(image, label, train, classes, steps, seed, device, batch, lr, on_step)
    return predict(net, image, test, device)


# ---- scores -----------------------------------------------------------------------------------------------

def self_confidence(probs: np.ndarray, label: np.ndarray) -> np.ndarray:
    """``p[given label]`` per voxel: ``probs [N, K, *grid]``, ``label [N, *grid]`` -> ``[N, *grid]`` float64."""
    probs, label = np.asarray(probs), np.asarray(label)
    if probs.ndim < 3 or label.shape != probs.shape[:1] + probs.shape[2:]:
        raise ValueError(f"probs and label: expected [N, K, *grid] and [N, *grid], got {probs.shape} and "
                         f"{label.shape}")
    K = probs.shape[1]
    if label.size and (label.min() < 0 or label.max() >= K):
        raise ValueError(f"label: values must lie in 0..{K - 1} (the classes of probs)")
    return np.take_along_axis(probs.astype(np.float64), label[:, None].astype(np.int64), 1)[:, 0]


def _softmin(s: np.ndarray, temperature: float) -> float:
    """cleanlab 2.9's ``softmin`` pooling of one set of scores: ``sum(s · softmax((1 − s) / T))``."""
    z = (1.0 - s) / temperature
    w = np.exp(z - z.max())  # cleanlab's shift: the same weights, no overflow
    return float((s * w).sum() / w.sum())


def softmin_quality(probs: np.ndarray, label: np.ndarray, temperature: float = TEMPERATURE) -> np.ndarray:
    """cleanlab's segmentation label-quality score (``method="softmin"``) per case, ``[N]`` in [0, 1]: the
    self-confidence of every voxel pooled by a softmin; 1 = the model agrees with every voxel's label."""
    if not temperature > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    s = self_confidence(probs, label)
    return np.array([_softmin(si.ravel(), temperature) for si in s])


def class_quality(probs: np.ndarray, label: np.ndarray, temperature: float = TEMPERATURE) -> np.ndarray:
    """The same softmin per class, ``[N, K]``: over the voxels that the label *or* the model's argmax gives to
    class k, so a class the label misses (the model finds it) and a class the label adds where the model sees
    none both count against it. NaN where neither has the class. Beyond cleanlab, which pools per image."""
    if not temperature > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    s = self_confidence(probs, label)
    pred = np.asarray(probs).argmax(1)
    K = probs.shape[1]
    out = np.full((len(s), K), np.nan)
    for i in range(len(s)):
        for k in range(K):
            m = (label[i] == k) | (pred[i] == k)
            if m.any():
                out[i, k] = _softmin(s[i][m], temperature)
    return out


def dice_per_class(pred: np.ndarray, ref: np.ndarray, classes: int) -> np.ndarray:
    """``[N, K]`` Dice of the hard prediction against ``ref`` per class; NaN where the class is in neither (a
    class the reference lacks but the prediction has gets 0)."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    out = np.full((len(pred), classes), np.nan)
    for k in range(classes):
        p, r = (pred == k).reshape(len(pred), -1), (ref == k).reshape(len(ref), -1)
        ps, rs, inter = p.sum(1), r.sum(1), (p & r).sum(1)
        has = (ps + rs) > 0
        out[has, k] = 2.0 * inter[has] / (ps[has] + rs[has])
    return out
