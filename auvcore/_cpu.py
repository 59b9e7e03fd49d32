"""The C++ kernels of the semantic scale on CPU tensors (``backend="cpp"``): the same functions as
``_cuda``, called by ``auvcore.scale`` (and ``_autograd``) with validated arguments and the official
preset already resolved. Outputs are allocated here; the kernels read the inputs in place, any strides."""
from __future__ import annotations

import torch

from . import _backend as B
from . import _torch_impl as T


def semantic_scale(z, layout, center, eps, variant, nan_to_num, num_threads, spectrum=False, eigenpairs=False):
    """S [B, K] (float64) of decoded maps; with ``spectrum`` also the energies [B, K, p]; with
    ``eigenpairs`` instead the eigenvalues [B·K, p] and eigenvectors [B·K, p, p] (rows) for the backward."""
    Bn, K = z.shape[:2]
    m, n = T.class_shape(z, layout)
    p = min(m, n)
    nt = B.threads(num_threads)
    G = torch.empty(Bn * K, p, p, dtype=torch.float64)
    # The official preset is defined in float64: its energy on σ magnifies float32 error in small σ.
    B._C.decoded_gram(B.view(z), T.LAYOUTS[layout], bool(center), bool(nan_to_num), B.view(G), nt,
                      variant == "official")
    r = torch.full((Bn * K,), p, dtype=torch.int64)
    S = torch.empty(Bn * K, dtype=torch.float64)
    sp = torch.empty(Bn * K, p, dtype=torch.float64) if spectrum else None
    ev = torch.empty(Bn * K, p, dtype=torch.float64) if eigenpairs else None
    vt = torch.empty(Bn * K, p, p, dtype=torch.float64) if eigenpairs else None
    B._C.scale_from_gram(B.view(G), B.view(r), float(eps), T.VARIANTS[variant], B.view(S), B.view(sp),
                         B.view(ev), B.view(vt), nt)
    S = S.view(Bn, K)
    if eigenpairs:
        return S, ev, vt
    return (S, sp.view(Bn, K, p)) if spectrum else S


def scale_backward(z, layout, center, eps, variant, nan_to_num, num_threads, evals, evecs, grad_S):
    """dS/dz · grad_S from the eigenpairs the forward kept; float64 for float64 z, else float32."""
    gS = grad_S.to(torch.float64).contiguous().reshape(-1)
    dz = torch.empty(z.shape, dtype=torch.float64 if z.dtype == torch.float64 else torch.float32)
    B._C.scale_backward(B.view(z), T.LAYOUTS[layout], bool(center), bool(nan_to_num), float(eps), T.VARIANTS[variant],
                        B.view(evals), B.view(evecs), B.view(gS), B.view(dz), B.threads(num_threads))
    return dz


def masked_semantic_scale(features, labels, K, center, eps, nan_to_num, num_threads, spectrum=False):
    """S [B, K] (float64) of masked embeddings, each class's Gram on its smaller side; with ``spectrum``
    also the energies [B, K, C] (0 past each class's r)."""
    Bn, C = features.shape[:2]
    counts = torch.empty(Bn * K, dtype=torch.int64)
    S = torch.empty(Bn * K, dtype=torch.float64)
    sp = torch.empty(Bn * K, C, dtype=torch.float64) if spectrum else None
    B._C.masked_scale(B.view(features), B.view(labels), int(K), bool(center), bool(nan_to_num), float(eps),
                      B.view(S), B.view(counts), B.view(sp), B.threads(num_threads))
    S = S.view(Bn, K)
    return (S, sp.view(Bn, K, C)) if spectrum else S


def class_moments(image: torch.Tensor, labels: torch.Tensor, K: int):
    """Per-class voxel count [K] (int64), mean and centred sum of squares [K] (float64) of ``image`` under
    ``labels`` (CPU tensors with as many elements; the image float32/float64, the labels any integer dtype)."""
    image, labels = image.contiguous(), labels.contiguous()  # held here: the views borrow their memory
    count = torch.empty(K, dtype=torch.int64)
    mean = torch.empty(K, dtype=torch.float64)
    m2 = torch.empty(K, dtype=torch.float64)
    B._C.class_moments(B.view(image), B.view(labels), int(K), B.view(count), B.view(mean), B.view(m2))
    return count, mean, m2
