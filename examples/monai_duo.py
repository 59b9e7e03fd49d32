"""Train a MONAI network with the DUO loss: ``python examples/monai_duo.py [--steps 60] [--device cpu]``.

Everything but the loss is MONAI: a ``BasicUNet``, dictionary transforms, ``monai.data.Dataset`` and
``DataLoader``, ``DiceMetric``. DUO adds its label-noise head on the decoder's last feature map (the input of
BasicUNet's ``final_conv``, taken with a forward pre-hook) and reads the network's logits and the head's
noise logits together: ``DUOLoss(to_onehot_y=True, sigmoid=True, smooth_nr=..., smooth_dr=...)`` is spelled
as MONAI's ``DiceCELoss`` would be.

The data: a tiny synthetic 3-D set (noisy volumes with a bright sphere, class 1, and a dark box, class 2)
whose labels are partly wrong: in a third of the training cases the sphere's label is shifted by a few
voxels, the kind of label noise the noise head is there to absorb. Needs ``pip install monai`` (the
``monai`` extra of auvcore).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.metrics import DiceMetric
from monai.networks.nets import BasicUNet
from monai.transforms import Compose, EnsureTyped, RandFlipd, RandSpatialCropd, ScaleIntensityd
from monai.utils import set_determinism
from torch import nn

from auvcore import DUOLoss, NoiseHead

NUM_CLASSES = 3  # background, sphere, box


def synthetic_case(rng: np.random.Generator, size: int = 40, wrong_label: bool = False) -> dict:
    """One volume ``[1, size, size, size]`` float32 and its label map ``[1, size, size, size]`` (int64)."""
    zz, yy, xx = np.mgrid[:size, :size, :size]
    label = np.zeros((size,) * 3, dtype=np.int64)
    c = rng.uniform(0.3 * size, 0.7 * size, 3)
    r = rng.uniform(0.12 * size, 0.2 * size)
    sphere = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r**2
    lo = rng.integers(2, size // 2 - 2, 3)
    hi = lo + rng.integers(size // 5, size // 3, 3)
    box = np.zeros_like(sphere)
    box[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    box &= ~sphere
    image = rng.normal(0.0, 0.35, label.shape) + 1.0 * sphere - 0.8 * box
    label[box], label[sphere] = 2, 1
    if wrong_label:  # the annotation of the sphere is off by a few voxels
        shift = tuple(int(s) for s in rng.integers(3, 6, 3) * rng.choice([-1, 1], 3))
        moved = np.roll(sphere, shift, axis=(0, 1, 2))
        label[label == 1] = 0
        label[moved] = 1
    return {"image": image[None].astype(np.float32), "label": label[None]}


class WithNoiseHead(nn.Module):
    """A MONAI segmentation network and DUO's noise head on the input of its last layer.

    ``forward(x)`` returns ``(seg_logits, noise_logits)``. The head reads the feature map that enters
    ``last_layer`` (for BasicUNet: ``final_conv``, the decoder's last features), so the network itself is
    unchanged and its checkpoint keys stay those of MONAI (prefixed ``net.``).
    """

    def __init__(self, net: nn.Module, last_layer: nn.Conv3d, num_classes: int, spatial_dims: int = 3):
        super().__init__()
        self.net = net
        self.noise_head = NoiseHead(last_layer.in_channels, num_classes, spatial_dims)
        self._features = None
        last_layer.register_forward_pre_hook(self._keep)

    def _keep(self, module, args):
        self._features = args[0]

    def forward(self, x):
        seg = self.net(x)
        features, self._features = self._features, None
        return seg, self.noise_head(features)


def make_loaders(n_train: int = 12, n_val: int = 4, roi: int = 32, batch_size: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    train = [synthetic_case(rng, wrong_label=(i % 3 == 0)) for i in range(n_train)]
    val = [synthetic_case(rng) for _ in range(n_val)]
    keys = ["image", "label"]
    train_tf = Compose([
        ScaleIntensityd(keys="image"),
        RandSpatialCropd(keys=keys, roi_size=(roi,) * 3, random_size=False),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
        EnsureTyped(keys=keys, track_meta=False),
    ])
    val_tf = Compose([ScaleIntensityd(keys="image"), EnsureTyped(keys=keys, track_meta=False)])
    return (DataLoader(Dataset(train, transform=train_tf), batch_size=batch_size, shuffle=True, num_workers=0),
            DataLoader(Dataset(val, transform=val_tf), batch_size=1, num_workers=0))


def build_model(num_classes: int = NUM_CLASSES) -> WithNoiseHead:
    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=num_classes, features=(8, 8, 16, 32, 64, 8))
    return WithNoiseHead(net, net.final_conv, num_classes)


def validate(model: WithNoiseHead, loader, device) -> float:
    """Mean Dice of the foreground classes (argmax of the logits) on the clean validation cases."""
    metric = DiceMetric(include_background=False, reduction="mean")
    model.eval()
    with torch.no_grad():
        for batch in loader:
            seg, _ = model(batch["image"].to(device))
            pred = nn.functional.one_hot(seg.argmax(1), NUM_CLASSES).movedim(-1, 1)
            ref = nn.functional.one_hot(batch["label"][:, 0].long().to(device), NUM_CLASSES).movedim(-1, 1)
            metric(pred, ref)
    model.train()
    return float(metric.aggregate())


def train(steps: int = 60, seed: int = 0, device: str = "cpu", lr: float = 3e-3, log_every: int = 10,
          verbose: bool = True) -> dict:
    """Train for ``steps`` optimiser steps; return the loss of each step and the final validation Dice."""
    set_determinism(seed)
    torch.manual_seed(seed)
    dev = torch.device(device)
    train_loader, val_loader = make_loaders(seed=seed)
    model = build_model().to(dev)
    # MONAI's DiceCELoss(include_background=True, to_onehot_y=True, sigmoid=True, smooth_nr=..., smooth_dr=...)
    # spelled for DUO; include_background=True so that the argmax at inference sees a trained background.
    loss_fn = DUOLoss(num_classes=NUM_CLASSES, include_background=True, to_onehot_y=True, sigmoid=True,
                      smooth_nr=1e-5, smooth_dr=1e-5, reduction="mean")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses, step, t0 = [], 0, time.perf_counter()
    while step < steps:
        for batch in train_loader:
            image, label = batch["image"].to(dev), batch["label"].to(dev)
            seg, noise = model(image)
            loss = loss_fn(seg, noise, label)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if verbose and (step % log_every == 0 or step == steps):
                w = loss_fn.last_weights.mean(0).tolist()
                print(f"step {step:4d}  loss {loss.item():.4f}  mean w per class {[round(v, 3) for v in w]}  "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
            if step == steps:
                break
    dice = validate(model, val_loader, dev)
    if verbose:
        print(f"validation Dice (foreground, clean labels): {dice:.3f}")
    return {"losses": losses, "val_dice": dice, "model": model}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    train(steps=args.steps, seed=args.seed, device=args.device, lr=args.lr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
