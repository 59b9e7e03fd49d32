"""Differentiable semantic scale of decoded maps (docs/method.md §1).

The native path keeps only the eigenpairs of the B·K Gram matrices (p and p² doubles each) and z itself
(an input, not a copy); the backward is analytic in C++: dS/dM̄ = 2 U diag(∂S/∂λ) Uᵀ M̄ on the smaller side
of the Gram, then the centering projection. There is no 1/(λ_i − λ_j) in it, so repeated or zero eigenvalues
give finite gradients, unlike a backward through ``torch.linalg.svd``/``eigh``.

Other backends ("torch", and "cuda" until it has its own backward) differentiate the pure-torch path.
"""
from __future__ import annotations

import torch

from . import _backend as B
from . import _torch_impl as T


class _NativeScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, mode, center, eps, variant, nan_to_num, nt):
        from .scale import _decoded_native

        S, evals, evecs = _decoded_native(z, mode, center, eps, variant, nan_to_num, nt, eigenpairs=True)
        ctx.save_for_backward(z, evals, evecs)
        ctx.args = (mode, center, eps, variant, nan_to_num, nt)
        return S.to(torch.float64 if z.dtype == torch.float64 else torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_S):
        z, evals, evecs = ctx.saved_tensors
        mode, center, eps, variant, nan_to_num, nt = ctx.args
        gS = grad_S.to(torch.float64).contiguous()
        # Half inputs get a float32 gradient from the kernel, cast back to their dtype by autograd's rules.
        dz = torch.empty(z.shape, dtype=torch.float64 if z.dtype == torch.float64 else torch.float32)
        B._C.scale_backward(B.view(z), T.MODES[mode], center, nan_to_num, float(eps), T.VARIANTS[variant],
                            evals.data_ptr(), evecs.data_ptr(), gS.data_ptr(), B.view(dz), nt)
        return dz.to(z.dtype), None, None, None, None, None, None


def semantic_scale_fn(z, mode, center, eps, variant, nan_to_num, backend, num_threads):
    """S [B, K] with autograd; called by ``semantic_scale`` when ``z`` requires grad."""
    if variant == "official":
        center, nan_to_num = False, True
    if backend == "cpp":
        return _NativeScale.apply(z, mode, bool(center), float(eps), variant, bool(nan_to_num),
                                  B.threads(num_threads))
    if not nan_to_num and not bool(torch.isfinite(z.detach()).all()):
        raise ValueError("z contains NaN or Inf; pass nan_to_num=True to read them as 0")
    S = T.semantic_scale(z, mode, center, eps, variant, nan_to_num)
    return S.to(torch.float64 if z.dtype == torch.float64 else torch.float32)
