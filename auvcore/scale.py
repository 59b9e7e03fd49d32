"""The semantic perception scale S of class matrices (docs/method.md §1): public entry points.

Validation happens here (cheap, names the argument); the work happens in ``csrc`` (or in
``_torch_impl`` for ``backend="torch"``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import _autograd, _cpu
from . import _backend as B
from . import _torch_impl as T



def _check_common(center, eps, nan_to_num, num_threads):
    B.threads(num_threads)
    if not isinstance(center, (bool, np.bool_)):
        raise TypeError(f"center: expected a bool, got {type(center).__name__}")
    if not isinstance(nan_to_num, (bool, np.bool_)):
        raise TypeError(f"nan_to_num: expected a bool, got {type(nan_to_num).__name__}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")


def _check_float(t: torch.Tensor, name: str):
    if t.dtype not in B.FLOATS:
        raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name}: empty tensor of shape {tuple(t.shape)}")


def _out_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _finish(S: torch.Tensor, like: torch.Tensor, was_numpy: bool):
    S = S.to(_out_dtype(like))
    return S.numpy() if was_numpy else S


def _check_decoded(z, layout, variant, name="layout"):
    if z.dim() not in (4, 5):
        raise ValueError(f"z: expected decoded maps [B, K, D, H, W] or [B, K, H, W], got shape {tuple(z.shape)}")
    _check_float(z, "z")
    if layout not in T.LAYOUTS:
        raise ValueError(f"{name}: expected one of {tuple(T.LAYOUTS)}, got {layout!r}")
    if variant not in T.VARIANTS:
        raise ValueError(f"variant: expected one of {tuple(T.VARIANTS)}, got {variant!r}")


def preset_args(variant, center, nan_to_num):
    """``center`` and ``nan_to_num`` as the variant has them: the official preset is the authors' snippet,
    which neither centres nor rejects NaN. The one place every backend's arguments pass through."""
    return (False, True) if variant == "official" else (bool(center), bool(nan_to_num))


def _decoded_torch(z, layout, center, eps, variant, nan_to_num, spectrum):
    if not nan_to_num and not bool(torch.isfinite(z).all()):
        raise B.non_finite("z")
    return T.semantic_scale(z, layout, center, eps, variant, nan_to_num, spectrum=spectrum)


def semantic_scale(z, layout: str = "D_HW", center: bool = True, eps: float = 1e-8, variant: str = "paper",
                   nan_to_num: bool = False, backend: str = "auto", num_threads: int | None = None, mode=None,
                   spectrum: bool = False):
    """Semantic perception scale of decoded class maps.

    Args:
        z: ``[B, K, D, H, W]`` (or ``[B, K, H, W]``) class-wise maps, torch tensor or numpy array, any strides.
        layout: how a class map becomes the matrix M: ``"D_HW"`` (m = D, n = H·W), ``"H_DW"``, ``"W_DH"``.
            Ignored for 2-D maps (m = H, n = W).
        center: subtract the mean row of M before the spectrum.
        eps: added to the total energy.
        variant: ``"paper"`` (docs/method.md §1) or ``"official"`` (the authors' snippet: no centering, NaN→0, energy
            on σ + 1e-6).
        nan_to_num: read NaN/±Inf as 0 instead of raising.
        backend: ``"auto"``, ``"cpp"``, ``"cuda"`` or ``"torch"``.
        num_threads: CPU threads (default ``torch.get_num_threads()``).
        mode: the deprecated name of ``layout``.
        spectrum: also return the energies p_j that S is taken from (:func:`energy_spectrum`'s, float64), from
            the same pass: ``(S, p)``. Not differentiable.

    Returns:
        S ``[B, K]`` in [0, 1] (NaN where min(m, n) < 2), same kind as ``z``; float64 for float64 input,
        else float32. Differentiable w.r.t. ``z`` when ``z`` requires grad.
    """
    layout, name = B.renamed("layout", layout, "D_HW", "mode", mode)
    z, was_numpy = B.as_tensor(z, "z")
    _check_decoded(z, layout, variant, name)
    _check_common(center, eps, nan_to_num, num_threads)
    be = B.resolve(backend, z)
    center, nan_to_num = preset_args(variant, center, nan_to_num)
    if spectrum:
        S, p = _decoded_spectrum(z.detach(), layout, center, eps, variant, nan_to_num, num_threads, be)
        return _finish(S, z, was_numpy), _finish_spectrum(p, was_numpy)
    if z.requires_grad and torch.is_grad_enabled():
        return _finish(_autograd.semantic_scale(z, layout, center, eps, variant, nan_to_num, be, num_threads), z,
                       was_numpy)
    if be == "cpp":
        S = _cpu.semantic_scale(z, layout, center, eps, variant, nan_to_num, num_threads)
    elif be == "cuda":
        from . import _cuda

        S = _cuda.semantic_scale(z, layout, center, eps, variant, nan_to_num)
    else:
        S = _decoded_torch(z, layout, center, eps, variant, nan_to_num, False)
    return _finish(S, z, was_numpy)


def _check_masked(features, labels, num_classes):
    if features.dim() < 3:
        raise ValueError(f"features: expected [B, C, *spatial], got shape {tuple(features.shape)}")
    _check_float(features, "features")
    if labels.dtype not in B.INTS:
        raise TypeError(f"labels: expected an integer dtype, got {labels.dtype}")
    want = (features.shape[0],) + tuple(features.shape[2:])
    if tuple(labels.shape) != want:
        raise ValueError(f"labels: expected shape {want} to match features {tuple(features.shape)}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != features.device:
        raise ValueError(f"labels: on {labels.device} but features on {features.device}")
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes: expected an int >= 1, got {num_classes!r}")


def _masked_torch(features, labels, num_classes, center, eps, nan_to_num, spectrum):
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"labels: value {bad} is outside 0..{num_classes - 1} (num_classes={num_classes})")
    if nan_to_num:
        features = torch.nan_to_num(features, nan=0.0, posinf=0.0, neginf=0.0)
    elif not bool(torch.isfinite(features).all()):
        raise B.non_finite("features")
    return T.masked_semantic_scale(features, labels, int(num_classes), center, eps, spectrum=spectrum)


def masked_semantic_scale(features, labels, num_classes: int, center: bool = True, eps: float = 1e-8,
                          nan_to_num: bool = False, backend: str = "auto", num_threads: int | None = None,
                          spectrum: bool = False):
    """Semantic perception scale of the embeddings inside each class (within-class feature covariance).

    Args:
        features: ``[B, C, *spatial]`` embeddings (torch or numpy, any strides).
        labels: ``[B, *spatial]`` integer labels in ``0..num_classes-1`` on the same grid.
        num_classes: K.
        spectrum: also return the energies p_j (:func:`energy_spectrum`'s ``[B, K, C]``, float64) from the same
            pass: ``(S, p)``.

    Returns:
        S ``[B, K]``: for class k of sample b, M stacks the n = #(labels == k) embedding vectors (n x C);
        NaN where n < 2. The Gram is taken on the smaller side (n x n for a class of at most C voxels, else
        C x C); r = min(n, C).
    """
    features, was_numpy = B.as_tensor(features, "features")
    labels, _ = B.as_tensor(labels, "labels")
    _check_masked(features, labels, num_classes)
    _check_common(center, eps, nan_to_num, num_threads)
    be = B.resolve(backend, features)
    S, p = _masked(features.detach() if spectrum else features, labels, num_classes, center, eps, nan_to_num,
                   num_threads, be, spectrum)
    return (_finish(S, features, was_numpy), _finish_spectrum(p, was_numpy)) if spectrum else \
        _finish(S, features, was_numpy)


def _masked(features, labels, num_classes, center, eps, nan_to_num, num_threads, be, spectrum):
    """(S, energies or None) of validated masked input on backend ``be``: one pass gives both."""
    K = int(num_classes)
    if be == "cpp":
        out = _cpu.masked_semantic_scale(features, labels, K, center, eps, nan_to_num, num_threads, spectrum=spectrum)
    elif be == "cuda":
        from . import _cuda

        out = _cuda.masked_semantic_scale(features, labels, K, center, eps, nan_to_num, spectrum=spectrum)
    else:
        out = _masked_torch(features, labels, num_classes, center, eps, nan_to_num, spectrum)
    return out if spectrum else (out, None)


def _decoded_spectrum(z, layout, center, eps, variant, nan_to_num, num_threads, be):
    """(S, energies) of validated decoded maps (preset resolved) on backend ``be``, in one pass."""
    if be == "cpp":
        return _cpu.semantic_scale(z, layout, center, eps, variant, nan_to_num, num_threads, spectrum=True)
    if be == "cuda":
        from . import _cuda

        return _cuda.semantic_scale(z, layout, center, eps, variant, nan_to_num, spectrum=True)
    return _decoded_torch(z, layout, center, eps, variant, nan_to_num, True)


def _finish_spectrum(p, was_numpy):
    p = p.to(torch.float64)
    return p.numpy() if was_numpy else p


def energy_spectrum(x, labels=None, num_classes: int | None = None, layout: str = "D_HW", center: bool = True,
                    eps: float = 1e-8, variant: str = "paper", nan_to_num: bool = False, backend: str = "auto",
                    num_threads: int | None = None, mode=None):
    """Normalised energies p_j (descending) per (sample, class), for cumulative-energy plots (paper Fig. 2).

    Decoded maps (``labels=None``): ``[B, K, r]``, r = min(m, n). Masked (``labels`` given): ``[B, K, C]``,
    zero past each class's r, all NaN for classes with fewer than 2 voxels. Always float64.
    """
    layout, name = B.renamed("layout", layout, "D_HW", "mode", mode)
    x, was_numpy = B.as_tensor(x, "x")
    if labels is None:
        _check_decoded(x, layout, variant, name)
        _check_common(center, eps, nan_to_num, num_threads)
        be = B.resolve(backend, x)
        center, nan_to_num = preset_args(variant, center, nan_to_num)
        _, p = _decoded_spectrum(x.detach(), layout, center, eps, variant, nan_to_num, num_threads, be)
    else:
        labels, _ = B.as_tensor(labels, "labels")
        _check_masked(x, labels, num_classes)
        _check_common(center, eps, nan_to_num, num_threads)
        be = B.resolve(backend, x)
        _, p = _masked(x.detach(), labels, num_classes, center, eps, nan_to_num, num_threads, be, True)
    return _finish_spectrum(p, was_numpy)
