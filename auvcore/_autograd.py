"""Differentiable semantic scale of decoded maps (docs/method.md §1).

The native paths ("cpp" and "cuda") keep only the eigenpairs of the B·K Gram matrices (p and p² doubles
each) and z itself (an input, not a copy); the backward is analytic, in C++ or CUDA: dS/dM̄ = 2 U diag(∂S/∂λ)
Uᵀ M̄ on the smaller side of the Gram, then the centering projection. There is no 1/(λ_i − λ_j) in it, so
repeated or zero eigenvalues give finite gradients, unlike a backward through ``torch.linalg.svd``/``eigh``.

The "torch" backend differentiates the pure-torch path.
"""
from __future__ import annotations

import torch

from . import _backend as B
from . import _cpu
from . import _torch_impl as T


class _AnalyticScale(torch.autograd.Function):
    """S with the analytic backward of one backend: ``forward(z)`` gives S and the eigenpairs the backward keeps,
    ``backward(z, evals, evecs, grad_S)`` gives dS/dz · grad_S (float32 for half inputs, cast back to z's dtype
    here by autograd's rules)."""

    @staticmethod
    def forward(ctx, z, forward, backward):
        S, evals, evecs = forward(z)
        ctx.save_for_backward(z, evals, evecs)
        ctx.backward_fn = backward
        return S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_S):
        z, evals, evecs = ctx.saved_tensors
        return ctx.backward_fn(z, evals, evecs, grad_S).to(z.dtype), None, None


def semantic_scale(z, layout, center, eps, variant, nan_to_num, backend, num_threads):
    """S [B, K] with autograd (float64), the preset already resolved; called by ``auvcore.semantic_scale``
    when ``z`` requires grad."""
    center, eps, nan_to_num = bool(center), float(eps), bool(nan_to_num)
    if backend == "cpp":
        args = (layout, center, eps, variant, nan_to_num, B.threads(num_threads))
        return _AnalyticScale.apply(z, lambda x: _cpu.semantic_scale(x, *args, eigenpairs=True),
                                    lambda x, ev, vt, g: _cpu.scale_backward(x, *args, ev, vt, g))
    if backend == "cuda":
        from . import _cuda

        # The eigenvectors come from auvcore's batched Jacobi kernel (_cuda.gram_eigenpairs: one launch for all
        # B·K Grams, no host synchronisation), not a per-matrix library solver: that was 82 % of DUOLoss's
        # device time on an H200 (issue 22). torch.linalg.eigh remains only above p = 256.
        return _AnalyticScale.apply(
            z, lambda x: _cuda.semantic_scale(x, layout, center, eps, variant, nan_to_num, eigenpairs=True),
            lambda x, ev, vt, g: _cuda.scale_backward(x, layout, center, eps, variant, ev, vt, g))
    if not nan_to_num and not bool(torch.isfinite(z.detach()).all()):
        raise B.non_finite("z")
    return T.semantic_scale(z, layout, center, eps, variant, nan_to_num)
