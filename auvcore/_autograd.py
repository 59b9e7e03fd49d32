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


class _NativeScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, layout, center, eps, variant, nan_to_num, nt):
        S, evals, evecs = _cpu.semantic_scale(z, layout, center, eps, variant, nan_to_num, nt, eigenpairs=True)
        ctx.save_for_backward(z, evals, evecs)
        ctx.args = (layout, center, eps, variant, nan_to_num, nt)
        return S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_S):
        z, evals, evecs = ctx.saved_tensors
        # Half inputs get a float32 gradient from the kernel, cast back to their dtype by autograd's rules.
        dz = _cpu.scale_backward(z, *ctx.args, evals, evecs, grad_S)
        return dz.to(z.dtype), None, None, None, None, None, None


class _CudaScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, layout, center, eps, variant, nan_to_num):
        from . import _cuda

        S, evals, evecs = _cuda.semantic_scale(z, layout, center, eps, variant, nan_to_num, eigenpairs=True)
        ctx.save_for_backward(z, evals, evecs)
        ctx.args = (layout, center, eps, variant)
        return S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_S):
        from . import _cuda

        z, evals, evecs = ctx.saved_tensors
        dz = _cuda.scale_backward(z, *ctx.args, evals, evecs, grad_S)
        return dz.to(z.dtype), None, None, None, None, None


def semantic_scale(z, layout, center, eps, variant, nan_to_num, backend, num_threads):
    """S [B, K] with autograd (float64), the preset already resolved; called by ``auvcore.semantic_scale``
    when ``z`` requires grad."""
    if backend == "cpp":
        return _NativeScale.apply(z, layout, bool(center), float(eps), variant, bool(nan_to_num),
                                  B.threads(num_threads))
    if backend == "cuda":
        return _CudaScale.apply(z, layout, bool(center), float(eps), variant, bool(nan_to_num))
    if not nan_to_num and not bool(torch.isfinite(z.detach()).all()):
        raise B.non_finite("z")
    return T.semantic_scale(z, layout, center, eps, variant, nan_to_num)
