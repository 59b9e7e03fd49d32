"""Differentiable semantic scale. Placeholder until the analytic C++ backward lands: autograd through the
pure-torch path."""
from __future__ import annotations

from . import _torch_impl as T


def semantic_scale_fn(z, mode, center, eps, variant, nan_to_num, backend, num_threads):
    S = T.semantic_scale(z, mode, center, eps, variant, nan_to_num)
    return S.to(z.dtype if z.dtype == S.dtype else S.dtype)
