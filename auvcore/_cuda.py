"""The CUDA kernels of the semantic scale (docs/method.md §1), called from ``auvcore.scale`` when ``backend="cuda"``
(or ``"auto"`` with CUDA tensors).

Tensors cross into the extension as views (pointer + shape + strides + dtype + device), read in place on the
caller's current stream. Outputs are allocated here with torch on the input's device, and C++ checks each one's
size, dtype, layout and device against what the kernel will write before it runs. CuPy arrays (or anything with
``__cuda_array_interface__`` / ``__dlpack__``) are wrapped zero-copy, and then CuPy's current stream is used.

The only host synchronisation is the error check at the end: NaN/Inf inputs (unless ``nan_to_num``) and
labels out of range are detected on the device, and raising the same errors as the CPU backend needs their
flag on the host. While a CUDA graph is being captured the check is skipped (the affected S are NaN).
"""
from __future__ import annotations

import contextlib

import torch

from . import _backend as B
from . import _torch_impl as T
from ._backend import as_cuda_tensor, device_supported


def _require_kernels():
    if not B.has_cuda_kernels():
        raise RuntimeError("backend='cuda': auvcore was built without CUDA kernels")
    if B._C.cuda_device_count() == 0:
        raise RuntimeError("backend='cuda': auvcore has CUDA kernels but no CUDA device is usable here "
                           "(no GPU or no driver); use backend='cpp' or 'torch'")


def _require_device_supported(t: torch.Tensor):
    if not device_supported(t.device.index):
        cc = ".".join(map(str, torch.cuda.get_device_capability(t.device)))
        raise RuntimeError(f"backend='cuda': auvcore's CUDA kernels were not built for {t.device} "
                           f"(compute capability {cc}; the default build covers 8.0 and newer); "
                           "use backend='torch', or rebuild with -DCMAKE_CUDA_ARCHITECTURES=<yours>")


@contextlib.contextmanager
def _on_stream(device: torch.device, stream: int | None):
    """Yields the raw stream handle the kernels run on; outputs allocated inside belong to that stream."""
    if stream is None:
        yield torch.cuda.current_stream(device).cuda_stream
        return
    ext = torch.cuda.ExternalStream(stream, device=device)
    with torch.cuda.stream(ext):
        yield stream


def _capturing(device) -> bool:
    try:
        return torch.cuda.is_current_stream_capturing()
    except RuntimeError:  # pragma: no cover - very old torch
        return False


def _decoded_gram(z: torch.Tensor, layout: str, center: bool, nan_to_num: bool, stream: int):
    """The Gram matrices [B·K, p, p] of decoded maps on z's device and stream, with their non-finite flags."""
    Bn, K = int(z.shape[0]), int(z.shape[1])
    m, n = T.class_shape(z, layout)
    p = min(m, n)
    G = torch.empty(Bn * K, p, p, dtype=torch.float64, device=z.device)
    flags = torch.zeros(Bn * K, dtype=torch.int32, device=z.device)
    B._C.cuda_decoded_gram(B.view(z), T.LAYOUTS[layout], bool(center), bool(nan_to_num), B.view(G), B.view(flags),
                           stream)
    return G, flags, p


def gram_eigenpairs(G: torch.Tensor, stream: int):
    """Eigenvalues [count, p] (descending) and eigenvectors [count, p, p] (eigenvector j as row j) of the
    symmetric float64 matrices G [count, p, p] (contiguous, on a CUDA device; not changed), on ``stream``: one
    launch of csrc/cuda/eigvec_cuda.cu (parallel Jacobi, one block per matrix, no host synchronisation,
    bit-identical run to run). Above ``_C.cuda_max_eigenpairs_size`` (256), where one block's O(p³) sweeps
    lose to a library solver, ``torch.linalg.eigh`` (cuSOLVER) instead, on the same stream."""
    count, p = int(G.shape[0]), int(G.shape[1])
    if p > B._C.cuda_max_eigenpairs_size:
        w, V = torch.linalg.eigh(G)  # ascending, eigenvectors as columns
        return w.flip(-1).contiguous(), V.flip(-1).transpose(-1, -2).contiguous()
    evals = torch.empty(count, p, dtype=torch.float64, device=G.device)
    evecs = torch.empty(count, p, p, dtype=torch.float64, device=G.device)
    B._C.cuda_gram_eigenpairs(B.view(G), B.view(evals), B.view(evecs), stream)
    return evals, evecs


def semantic_scale(z, layout: str = "D_HW", center: bool = True, eps: float = 1e-8, variant: str = "paper",
                   nan_to_num: bool = False, eigenpairs: bool = False, spectrum: bool = False):
    """S [B, K] float64 on z's device; z [B, K, D, H, W] or [B, K, H, W] (torch CUDA tensor or CuPy array).
    ``center`` and ``nan_to_num`` are taken as given (``auvcore.scale.preset_args`` resolves the official
    preset). With ``eigenpairs`` also what the backward needs: the eigenvalues [B·K, p] (descending) and
    eigenvectors [B·K, p, p] (rows) of the same Gram matrices, from this module's batched eigenpairs kernel
    (``gram_eigenpairs``): S itself still comes from the eigenvalue kernel, so it is the value the no-grad call
    returns. With ``spectrum`` also the energies [B, K, p] from the kernel's eigenvalues
    (``_torch_impl.entropy_scale``, the torch formula of the energies), on z's device."""
    _require_kernels()
    z, stream = as_cuda_tensor(z, "z")
    _require_device_supported(z)
    if layout not in T.LAYOUTS:
        raise ValueError(f"layout: expected one of {tuple(T.LAYOUTS)}, got {layout!r}")
    if variant not in T.VARIANTS:
        raise ValueError(f"variant: expected one of {tuple(T.VARIANTS)}, got {variant!r}")
    z = z.detach()
    Bn, K = int(z.shape[0]), int(z.shape[1])
    dev = z.device
    with torch.cuda.device(dev), _on_stream(dev, stream) as s:
        G, flags, p = _decoded_gram(z, layout, center, nan_to_num, s)
        # Before the S kernel, which overwrites G (the eigenpairs kernel only reads it).
        pairs = gram_eigenpairs(G, s) if eigenpairs else None
        S = torch.empty(Bn * K, dtype=torch.float64, device=dev)
        ev = torch.empty(Bn * K, p, dtype=torch.float64, device=dev) if spectrum else None
        B._C.cuda_scale_from_gram(B.view(G), B.view(None), p, float(eps), T.VARIANTS[variant], B.view(flags),
                                  B.view(S), B.view(ev), s)
        if not nan_to_num and not _capturing(dev) and bool(flags.any()):
            raise B.non_finite("z")
        if spectrum:
            return S.view(Bn, K), T.entropy_scale(ev, p, eps, variant)[1].view(Bn, K, p)
        if eigenpairs:
            return (S.view(Bn, K),) + pairs
    return S.view(Bn, K)


def scale_backward(z, layout, center, eps, variant, evals, evecs, grad_S):
    """dS/dz · grad_S on z's device and current stream from the eigenpairs of ``semantic_scale(...,
    eigenpairs=True)``; float64 for float64 z, else float32 (csrc/cuda/scale_backward_cuda.cu)."""
    dev = z.device
    gS = grad_S.to(device=dev, dtype=torch.float64).contiguous().reshape(-1)
    with torch.cuda.device(dev):
        s = torch.cuda.current_stream(dev).cuda_stream
        dz = torch.empty(z.shape, dtype=torch.float64 if z.dtype == torch.float64 else torch.float32, device=dev)
        B._C.cuda_scale_backward(B.view(z), T.LAYOUTS[layout], bool(center), float(eps), T.VARIANTS[variant],
                                 B.view(evals), B.view(evecs), B.view(gS), B.view(dz), s)
    return dz


def masked_semantic_scale(features, labels, K: int, center: bool = True, eps: float = 1e-8,
                          nan_to_num: bool = False, spectrum: bool = False):
    """S [B, K] float64 on the features' device; features [B, C, *spatial], labels [B, *spatial] in 0..K-1.
    With ``spectrum`` also the energies [B, K, C] (0 past each class's r, NaN rows where r < 2) from the
    kernel's eigenvalues (``_torch_impl.entropy_scale``), on the features' device."""
    (out,) = masked_scale_cases([(features, labels)], K, center, eps, nan_to_num, spectrum)
    if isinstance(out, Exception):
        raise out
    return out if spectrum else out[0]


def masked_scale_cases(cases, K: int, center: bool = True, eps: float = 1e-8, nan_to_num: bool = False,
                       spectrum: bool = True):
    """S and energies of several cases' masked embeddings, ``cases`` a list of (features [B_i, C, *spatial_i],
    labels [B_i, *spatial_i]) on one device with one C, each grid its own: every case's Grams (its own kernel
    launches) go into one buffer and one eigen launch solves them all, so that the Grams of one case (K of them,
    one block each) do not leave the GPU idle (issue 23). Returns, per case, (S [B_i, K], energies [B_i, K, C]
    or None without ``spectrum``) on the device, or the ValueError that the case alone raises (labels out of
    range, NaN/Inf): one bad case does not fail the others. One host read for all the cases' checks (none while
    a CUDA graph is captured)."""
    if not cases:
        return []
    _require_kernels()
    views, stream = [], None
    for f, lab in cases:
        f, st = as_cuda_tensor(f, "features")
        stream = st if not views else stream  # the first case's (CuPy's current stream for CuPy input)
        lab, _ = as_cuda_tensor(lab, "labels")
        _require_device_supported(f)
        if lab.device != f.device:
            raise ValueError(f"labels: on {lab.device} but features on {f.device}")
        views.append((f.detach(), lab))
    dev, C, K = views[0][0].device, int(views[0][0].shape[1]), int(K)
    for f, _ in views:
        if f.device != dev or int(f.shape[1]) != C:
            raise ValueError(f"features: every case on {dev} with C = {C}, got {f.device} with C = {int(f.shape[1])}")
    rows = [int(f.shape[0]) * K for f, _ in views]  # Gram slots per case
    start = [sum(rows[:i]) for i in range(len(rows) + 1)]
    n = start[-1]
    with torch.cuda.device(dev), _on_stream(dev, stream) as s:
        G = torch.empty(n, C, C, dtype=torch.float64, device=dev)
        counts = torch.empty(n, dtype=torch.int64, device=dev)
        flags = torch.zeros(n, dtype=torch.int32, device=dev)
        label_error = torch.zeros(len(views), 2, dtype=torch.int64, device=dev)
        S = torch.empty(n, dtype=torch.float64, device=dev)
        ev = torch.empty(n, C, dtype=torch.float64, device=dev) if spectrum else None
        for i, (f, lab) in enumerate(views):
            a, b = start[i], start[i + 1]
            # Each class's Gram on its smaller side: n x n for a class of n < C voxels.
            B._C.cuda_masked_gram(B.view(f), B.view(lab), K, bool(center), bool(nan_to_num), B.view(G[a:b]),
                                  B.view(counts[a:b]), B.view(flags[a:b]), B.view(label_error[i]), s,
                                  smaller_side=True)
        B._C.cuda_scale_from_gram(B.view(G), B.view(counts), 0, float(eps), 0, B.view(flags), B.view(S),
                                  B.view(ev), s, sized_by_counts=True)
        spec = T.entropy_scale(ev, counts.clamp(max=C), eps, "paper")[1] if spectrum else None
        status = [[0, 0, 0]] * len(views)
        if not _capturing(dev):
            # One transfer for every case's checks: [any NaN/Inf, label error flag, offending label].
            case = torch.repeat_interleave(torch.arange(len(views), device=dev), torch.tensor(rows, device=dev),
                                           output_size=n)
            bad = torch.zeros(len(views), dtype=torch.int64, device=dev).index_add_(0, case, flags.to(torch.int64))
            status = torch.cat([bad.clamp(max=1).view(-1, 1), label_error], 1).tolist()
    out = []
    for i, (f, _) in enumerate(views):
        a, b, Bn = start[i], start[i + 1], int(f.shape[0])
        if status[i][1]:
            out.append(ValueError(f"labels: value {status[i][2]} is outside 0..{K - 1} (num_classes={K})"))
        elif status[i][0] and not nan_to_num:
            out.append(B.non_finite("features"))
        else:
            out.append((S[a:b].view(Bn, K), None if spec is None else spec[a:b].view(Bn, K, C)))
    return out


def gram_and_eigenvalues(z, layout: str = "D_HW", center: bool = True, nan_to_num: bool = True):
    """Diagnostics for tests and benchmarks: the Gram matrices [B, K, p, p] and their eigenvalues [B, K, p]
    (descending) from the CUDA kernels."""
    _require_kernels()
    z, stream = as_cuda_tensor(z, "z")
    z = z.detach()
    Bn, K = int(z.shape[0]), int(z.shape[1])
    dev = z.device
    with torch.cuda.device(dev), _on_stream(dev, stream) as s:
        G, _, p = _decoded_gram(z, layout, center, nan_to_num, s)
        Gout = G.clone()
        S = torch.empty(Bn * K, dtype=torch.float64, device=dev)
        ev = torch.empty(Bn * K, p, dtype=torch.float64, device=dev)
        B._C.cuda_scale_from_gram(B.view(G), B.view(None), p, 1e-8, 0, B.view(None), B.view(S), B.view(ev), s)
    return Gout.view(Bn, K, p, p), ev.view(Bn, K, p)


def _raise_duo_status(status, y, labels: bool, K: int, N: int):
    """The CPU kernel's errors from the forward's status [flags, first bad target index]."""
    flags, first = status
    if flags & 1:
        raise ValueError("seg_logits: contains NaN or Inf")
    if flags & 2:
        raise ValueError("noise_logits: contains NaN or Inf")
    if flags & 4:
        if labels:
            b, t = divmod(first, N)
            value = int(y[b, t])
            raise ValueError(f"target: label value {value} is outside 0..{K - 1} (num_classes={K})")
        bk, t = divmod(first, N)
        b, c = divmod(bk, K)
        raise ValueError(f"target: values must lie in [0, 1], found {float(y[b, c, t]):.6f}")


def duo_sums(z, n, y, labels: bool, c0: int, variant: int, tau: float, check: bool = True) -> torch.Tensor:
    """The six per-(b, c) sums ``[B, K - c0, 6]`` (float64) of the fused DUO loss (csrc/cuda/duo_cuda.cu, the
    twin of the CPU kernel that ``auvcore.duo`` calls as ``_C.duo_forward``) on z's device and current stream,
    bit-identical from run to run. ``z``, ``n``: ``[B, K, N]`` of one floating dtype (float16/bfloat16 read as
    such, computed in float32); ``y``: ``[B, K, N]`` targets in [0, 1] or, with ``labels``, ``[B, N]`` class
    indices; ``variant``: 0 paper, 1 official. NaN/Inf logits and targets out of range raise the CPU kernel's
    errors (one small device-to-host read; skipped while a CUDA graph is captured, or with ``check=False``)."""
    _require_kernels()
    _require_device_supported(z)
    Bn, K, N = (int(d) for d in z.shape)
    dev = z.device
    with torch.cuda.device(dev):
        s = torch.cuda.current_stream(dev).cuda_stream
        sums = torch.empty(Bn, K - int(c0), B._C.duo_num_sums, dtype=torch.float64, device=dev)
        status = torch.empty(2, dtype=torch.int64, device=dev)
        B._C.cuda_duo_forward(B.view(z), B.view(n), B.view(y), bool(labels), int(c0), int(variant), float(tau),
                              B.view(sums), B.view(status), s)
        if check and not _capturing(dev):
            _raise_duo_status(status.tolist(), y, bool(labels), K, N)
    return sums


def duo_backward(z, n, y, labels: bool, c0: int, variant: int, tau: float, grad_sums: torch.Tensor,
                 want_dn: bool = True):
    """dz, dn ``[B, K, N]`` of z's dtype from dL/d(sums) in one elementwise pass on z's device and current
    stream; dn is None unless ``want_dn`` (zeros with the official variant, whose ỹ is detached)."""
    _require_kernels()
    g = grad_sums.to(device=z.device, dtype=torch.float64).contiguous()
    dev = z.device
    with torch.cuda.device(dev):
        s = torch.cuda.current_stream(dev).cuda_stream
        dz = torch.empty(z.shape, dtype=z.dtype, device=dev)
        dn = torch.empty(z.shape, dtype=z.dtype, device=dev) if want_dn else None
        B._C.cuda_duo_backward(B.view(z), B.view(n), B.view(y), bool(labels), int(c0), int(variant), float(tau),
                               B.view(g), B.view(dz), B.view(dn), s)
    return dz, dn
