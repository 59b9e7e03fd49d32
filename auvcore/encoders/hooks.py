"""Features from any ``torch.nn.Module`` through forward hooks on named sub-modules."""
from __future__ import annotations

import torch

from .common import ct_input


class HookEncoder:
    """Wrap any ``torch.nn.Module``; calling it runs the module and returns the outputs of the
    sub-modules named in ``layer_names`` (names as in ``module.named_modules()``).

    One name → the tensor ``[B, C, *grid]``; several → ``{name: tensor}``. ``preprocess`` maps an
    ``[X, Y, Z]`` volume to ``[1, 1, X, Y, Z]``; by default HU −1000..1000 → 0..1 (pass
    ``preprocess=callable`` to replace it). ``stride`` is measured from the last call
    (input size / feature size per axis), ``None`` before the first call.
    """

    def __init__(self, module: torch.nn.Module, layer_names, preprocess=None, spacing=(1.5, 1.5, 3.0),
                 max_shape=None, name: str | None = None):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        if isinstance(layer_names, str):
            layer_names = [layer_names]
        layer_names = list(layer_names)
        if not layer_names:
            raise ValueError("layer_names: give at least one sub-module name")
        mods = dict(module.named_modules())
        missing = [n for n in layer_names if n not in mods]
        if missing:
            some = [n for n in mods if n][:12]
            raise ValueError(f"layer_names: {missing} not in the module (it has e.g. {some})")
        self.module = module.eval()
        self.layer_names = layer_names
        self.spacing = spacing
        self.max_shape = max_shape
        self._pre = preprocess
        self._name = name or f"hook-{type(module).__name__}-{'+'.join(layer_names)}"
        self._out: dict = {}
        self.stride = None
        self._handles = [mods[n].register_forward_hook(self._hook(n)) for n in layer_names]

    def _hook(self, name):
        def fn(_mod, _inp, out):
            self._out[name] = out[0] if isinstance(out, (tuple, list)) else out
        return fn

    @property
    def name(self):
        return self._name

    def preprocess(self, volume_hu, normalized: bool = False) -> torch.Tensor:
        if self._pre is not None:
            return self._pre(volume_hu, normalized) if normalized else self._pre(volume_hu)
        return ct_input(volume_hu, normalized)

    @torch.no_grad()
    def __call__(self, x):
        self._out = {}
        self.module(x)
        missing = [n for n in self.layer_names if n not in self._out]
        if missing:
            raise RuntimeError(f"HookEncoder: layers {missing} did not run in the forward pass")
        first = self._out[self.layer_names[0]]
        if isinstance(x, torch.Tensor) and first.dim() == x.dim():
            self.stride = tuple(-(-a // b) for a, b in zip(x.shape[2:], first.shape[2:]))
        if len(self.layer_names) == 1:
            return first
        return dict(self._out)

    def remove(self):
        """Detach the hooks from the module."""
        for h in self._handles:
            h.remove()
        self._handles = []
