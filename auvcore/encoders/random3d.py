"""A small random-weight 3-D conv net: a fast, deterministic stand-in encoder for tests and CLI
smoke runs (its features carry no learned semantics)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .common import ct_input

LAYERS = ("layer1", "layer2", "layer3")
_WIDTHS = {"layer1": 16, "layer2": 32, "layer3": 64}
STRIDES = {"layer1": (2, 2, 2), "layer2": (4, 4, 4), "layer3": (8, 8, 8)}


class Random3DEncoder:
    """Three stride-2 conv + ReLU stages (16/32/64 channels) with seeded He-normal weights.

    ``layer``: ``"layer1"`` (stride 2), ``"layer2"`` (stride 4, default) or ``"layer3"``
    (stride 8) on every axis. ``seed`` fixes the weights, so two encoders with the same seed give
    identical features. Input and preprocessing as :class:`MerlinEncoder` (HU −1000..1000 → 0..1;
    x̂ −5..5 → 0..1 with ``normalized=True``).
    """

    spacing = (1.5, 1.5, 3.0)

    def __init__(self, layer: str = "layer2", seed: int = 0, dtype=torch.float32, device="cpu",
                 max_shape=(224, 224, 160)):
        if layer not in LAYERS:
            raise ValueError(f"layer: expected one of {LAYERS}, got {layer!r}")
        self.layer, self.seed, self.dtype = layer, int(seed), dtype
        self.device = torch.device(device)
        self.max_shape = tuple(max_shape) if max_shape is not None else None
        # Built on the meta device and given its storage on ``device`` (no initialisation on the CPU and move);
        # the weights are drawn from a seeded CPU generator, so every device gets the same ones.
        g = torch.Generator().manual_seed(self.seed)
        mods, cin = [], 1
        with torch.device("meta"):
            for name in LAYERS[: LAYERS.index(layer) + 1]:
                cout = _WIDTHS[name]
                # no GroupNorm: its whole-volume statistics would make tiled and whole forwards differ
                mods += [nn.Conv3d(cin, cout, 3, stride=2, padding=1), nn.ReLU()]
                cin = cout
            net = nn.Sequential(*mods).to(dtype)
        self.net = net.to_empty(device=self.device).eval()
        with torch.no_grad():
            for conv in self.net:
                if isinstance(conv, nn.Conv3d):
                    conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * np.sqrt(2.0 / conv.weight[0].numel()))
                    conv.bias.zero_()
        for p in self.net.parameters():
            p.requires_grad_(False)

    @property
    def stride(self):
        return STRIDES[self.layer]

    @property
    def channels(self):
        return _WIDTHS[self.layer]

    @property
    def name(self):
        return f"random3d-s{self.seed}-{self.layer}"

    def preprocess(self, volume_hu, normalized: bool = False) -> torch.Tensor:
        """``[X, Y, Z]`` → ``[1, 1, X, Y, Z]`` float32 in 0..1 (see class doc)."""
        return ct_input(volume_hu, normalized)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"x: expected a tensor [B, 1, X, Y, Z], got {getattr(x, 'shape', type(x))}")
        return self.net(x.to(self.device, self.dtype))

    def __repr__(self):
        return f"Random3DEncoder(layer={self.layer!r}, seed={self.seed})"
