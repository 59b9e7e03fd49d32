"""Pure-PyTorch semantic perception scale and DUO sums: the ``backend="torch"`` fallback and the baseline the
kernels must beat. docs/method.md §1. The tests' oracles live apart from it, in ``auvcore.testing``."""
from __future__ import annotations

import torch

LAYOUTS = {"D_HW": 0, "H_DW": 1, "W_DH": 2}
VARIANTS = {"paper": 0, "official": 1}
OFFICIAL_SHIFT = 1e-6  # the authors' snippet adds this to every singular value


def class_shape(z: torch.Tensor, layout: str) -> tuple[int, int]:
    """(m, n) of the class matrices of decoded maps z, by ``layout`` (the C++ twin: ``decoded_shape``)."""
    if z.dim() == 4:
        return int(z.shape[2]), int(z.shape[3])
    _, _, D, H, W = z.shape
    return {"D_HW": (D, H * W), "H_DW": (H, D * W), "W_DH": (W, D * H)}[layout]


def class_matrices(z: torch.Tensor, layout: str) -> torch.Tensor:
    """[B, K, D, H, W] -> [B, K, m, n] per ``layout``; [B, K, H, W] is already [B, K, m=H, n=W]."""
    if z.dim() == 4:
        return z
    B, K, D, H, W = z.shape
    if layout == "D_HW":
        return z.reshape(B, K, D, H * W)
    if layout == "H_DW":
        return z.permute(0, 1, 3, 2, 4).reshape(B, K, H, D * W)
    return z.permute(0, 1, 4, 2, 3).reshape(B, K, W, D * H)


def entropy_scale(lam: torch.Tensor, r: torch.Tensor | int, eps: float, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """S and the energies p from eigenvalues ``lam`` [..., p] sorted descending; only the top ``r`` count."""
    p_dim = lam.shape[-1]
    r = torch.as_tensor(r, device=lam.device).expand(lam.shape[:-1])
    keep = torch.arange(p_dim, device=lam.device) < r.unsqueeze(-1)
    lam = torch.where(keep, lam.clamp_min(0), torch.zeros((), dtype=lam.dtype, device=lam.device))
    if variant == "official":
        q = torch.where(keep, lam.sqrt() + OFFICIAL_SHIFT, torch.zeros((), dtype=lam.dtype, device=lam.device))
        p = q / q.sum(-1, keepdim=True)
    else:
        p = lam / (lam.sum(-1, keepdim=True) + eps)
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    logr = torch.log(r.to(lam.dtype))
    S = torch.where(r >= 2, -plogp.sum(-1) / logr, torch.full_like(logr, float("nan")))
    p = torch.where((r >= 2).unsqueeze(-1), p, torch.full_like(p, float("nan")))
    return S, p


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _gram_small_side(M: torch.Tensor) -> torch.Tensor:
    m, n = M.shape[-2:]
    return M @ M.transpose(-1, -2) if m <= n else M.transpose(-1, -2) @ M


def semantic_scale(z, layout="D_HW", center=True, eps=1e-8, variant="paper", nan_to_num=False, spectrum=False):
    """Batched Gram + ``torch.linalg.eigvalsh``. Returns S [B, K] (and p [B, K, r] if ``spectrum``)."""
    # The official preset is defined in float64 (docs/method.md §1): its energy on σ, not σ², magnifies the error of
    # small float32 eigenvalues.
    M = class_matrices(z, layout).to(torch.float64 if variant == "official" else _compute_dtype(z))
    if nan_to_num:
        M = torch.nan_to_num(M, nan=0.0, posinf=0.0, neginf=0.0)
    if center:
        M = M - M.mean(dim=-2, keepdim=True)
    lam = torch.linalg.eigvalsh(_gram_small_side(M)).flip(-1)
    r = min(M.shape[-2:])
    S, p = entropy_scale(lam, r, eps, variant)
    return (S, p) if spectrum else S


def masked_semantic_scale(features, labels, num_classes, center=True, eps=1e-8, spectrum=False):
    """Per (sample, class): the Gram of the class's centred embedding vectors, C x C. Returns S [B, K]."""
    B, C = features.shape[:2]
    K = num_classes
    dt = _compute_dtype(features)
    F = features.reshape(B, C, -1).to(dt)
    L = labels.reshape(B, -1)
    G = torch.zeros(B, K, C, C, dtype=dt, device=features.device)
    counts = torch.zeros(B, K, dtype=torch.int64, device=features.device)
    for b in range(B):
        for k in range(K):
            X = F[b][:, L[b] == k]  # C x n_k
            counts[b, k] = X.shape[1]
            if X.shape[1] == 0:
                continue
            if center:
                X = X - X.mean(dim=1, keepdim=True)
            G[b, k] = X @ X.T
    lam = torch.linalg.eigvalsh(G).flip(-1)
    r = torch.clamp(counts, max=C)
    S, p = entropy_scale(lam, r, eps, "paper")
    return (S, p) if spectrum else S


def duo_sums(z, n, y, c0, variant, tau):
    """The six per-(b, c) sums of the DUO loss, ``[B, K - c0, 6]``, by torch ops: the fallback of the fused
    kernel (``csrc/cpu/duo_cpu.cpp``), in its order: Σ BCE(z, ỹ), Σ σ(z)·ỹ, Σ σ(z), Σ ỹ, Σ ĝ, Σ ĝ² over the
    voxels. ``y`` one-hot ``[B, K, *spatial]``. The official variant's ỹ = stopgrad(y − σ(n)·y) and its ĝ
    sums are 0, as in the kernel."""
    import torch.nn.functional as F

    Bn, C = z.shape[0], z.shape[1] - c0
    zf, nf, yf = (t[:, c0:].reshape(Bn, C, -1).to(z.dtype) for t in (z, n, y))
    if variant == "official":
        yt = (yf - torch.sigmoid(nf) * yf).detach()
        g = torch.zeros_like(nf)
    else:
        g = torch.tanh(nf)
        yt = torch.clamp(yf - tau * g, 0, 1)
    s = torch.sigmoid(zf)
    bce = F.binary_cross_entropy_with_logits(zf, yt, reduction="none")
    return torch.stack([bce.sum(-1), (s * yt).sum(-1), s.sum(-1), yt.sum(-1), g.sum(-1), (g * g).sum(-1)], -1)
