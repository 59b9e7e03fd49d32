"""DUO loss (dynamic uncertainty-aware optimization, docs/method.md §3) and its label-noise head.

The native path (``backend="cpp"``, the default on CPU) runs the full-size part in C++: one pass over the
logits, noise logits and targets gives six sums per (sample, class); the backward is one elementwise pass
from the gradients of those sums; nothing full-size is saved for the backward. The Dice ratio, the weights
from the semantic scale S, the noise constraint R and the mean are then plain autograd on B x K numbers.
On CUDA tensors (``backend="auto"`` with a CUDA build, or ``"cuda"``) the same two passes run as CUDA
kernels (``csrc/cuda/duo_cuda.cu`` through ``_cuda.duo_sums``/``duo_backward``), deterministic run to run.
``backend="torch"`` computes the same six sums with torch ops (``_torch_impl.duo_sums``), which also
runs on any device.

float16/bfloat16 logits (e.g. under ``torch.autocast``) give a float32 loss. The CPU kernel and the torch
path cast both logit tensors to float32 first (a copy); the CUDA kernels read them as they are and compute
in float32 (only S reads a float32 copy of the segmentation logits).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _backend as B
from . import _cuda
from . import _torch_impl as T
from .scale import semantic_scale

VARIANTS = {"paper": 0, "official": 1}
REDUCTIONS = ("mean", "sum", "none")
_HALF = (torch.float16, torch.bfloat16)
_BCE, _SIGY, _SIG, _Y, _G, _G2 = range(6)


class _FusedSums(torch.autograd.Function):
    """[B, K, N] logits, noise logits, targets -> the per-(b, c) sums [B, K - c0, 6] (float64). ``path`` is
    ``DUOLoss._path``'s answer ("cuda" or "cpp"), the one dispatch point; ``check``: the CUDA kernels' input
    checks, which cost a device-to-host read."""

    @staticmethod
    def forward(ctx, z, n, y, labels, c0, variant, tau, nt, path, check):
        if path == "cuda":
            sums = _cuda.duo_sums(z, n, y, labels, c0, variant, tau, check=check)
        else:
            sums = torch.empty(z.shape[0], z.shape[1] - c0, B._C.duo_num_sums, dtype=torch.float64)
            B._C.duo_forward(B.view(z), B.view(n), B.view(y), labels, c0, variant, tau, B.view(sums), nt)
        ctx.save_for_backward(z, n, y)  # the inputs themselves: references, not copies
        ctx.args = (labels, c0, variant, tau, nt, path)
        return sums

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_sums):
        z, n, y = ctx.saved_tensors
        labels, c0, variant, tau, nt, path = ctx.args
        # The official variant's ỹ is detached: its noise logits get no gradient (None, as from autograd), on
        # every path.
        want_dn = ctx.needs_input_grad[1] and variant == VARIANTS["paper"]
        none = (None,) * 8
        if path == "cuda":
            dz, dn = _cuda.duo_backward(z, n, y, labels, c0, variant, tau, grad_sums, want_dn)
            return (dz, dn) + none
        g = grad_sums.to(torch.float64).contiguous()
        dz = torch.empty(z.shape, dtype=z.dtype)
        dn = torch.empty(z.shape, dtype=z.dtype) if want_dn else None
        B._C.duo_backward(B.view(z), B.view(n), B.view(y), labels, c0, variant, tau, B.view(g), B.view(dz),
                          B.view(dn), nt)
        return (dz, dn) + none


def _check_number(name, value, low=0.0, high=math.inf):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ValueError(f"{name}: expected a finite number in [{low}, {high}], got {value!r}")


class DUOLoss(nn.Module):
    """DUO loss: class weights from the semantic perception scale plus a learnable label-noise estimate.

    ``L = mean_{b, c} w_{b,c} (λ·BCE(z, ỹ) + Dice(σ(z), ỹ)) + β·R`` with ``ĝ = tanh(n)``,
    ``ỹ = clamp(y − τ ĝ, 0, 1)``, ``w = 1 / (1 + α S(z[b, c]))`` and
    ``R = Σ_c (mean ĝ)² + (mean ĝ² − σ0²)²`` (docs/method.md §3).

    Args:
        num_classes: K; checked against ``seg_logits.shape[1]`` if given.
        include_background: include channel 0 in the loss and in R (excluded by default; MONAI's losses include it).
        to_onehot_y: ``target`` holds class indices ``[B, 1, *spatial]`` (or ``[B, *spatial]``) that are
            compared with each class on the fly (no one-hot tensor is built on the native path).
        alpha, lambda_bce, tau, sigma0, beta: α, λ, τ, σ0 and β. τ defaults to 0.1, not the paper's 0.5: over
            three volumes with noisy labels and three seeds each (bench/RESULTS.md, "The DUO default") τ = 0.1
            had the best mean clean Dice and was never below Dice+BCE, while τ = 0.5 lost 0.15-0.17 to Dice+BCE on
            two of them (its noise head erases thin classes from the target). ``DUOLoss.paper()`` is the paper's
            setting.
        smooth: the Dice smoothing s, added to the numerator and the denominator (default 1e-5).
        smooth_nr, smooth_dr: MONAI's names: the numerator's and the denominator's smoothing separately,
            ``Dice = 1 − (2 Σσ(z)ỹ + smooth_nr) / (Σσ(z) + Σỹ + smooth_dr)``; each defaults to ``smooth``
            (give either ``smooth`` or these two).
        layout: how S reads a 3-D class map (``"D_HW"``, ``"H_DW"``, ``"W_DH"``); 2-D maps use m = H, n = W.
        detach_scale: stop the gradient through S (by default S is differentiable, a regulariser): only the
            forward S is computed (no eigenvectors, no backward of S). With ``alpha=0`` S is not computed at all
            (w = 1 whatever S is), and ``last_scales`` is NaN.
        variant: ``"paper"`` (docs/method.md §3) or ``"official"``: the authors' snippet, ``w·BCE`` only, with
            ``ỹ = stopgrad(y − σ(n)·y)``, no R, and S of the snippet (``variant="official"``: no centering,
            energy on σ + 1e-6), not detached. Its noise head receives no gradient by construction.
        reduction: ``"mean"`` (a scalar), ``"sum"`` (a scalar: the sum of the ``"none"`` values) or ``"none"``:
            the per-(b, c) losses ``[B, K']`` over the included classes, ``w·L_seg + β·R`` each, so that their
            mean is the ``"mean"`` loss. MONAI's ``LossReduction`` members are accepted too.
        sigmoid, softmax: MONAI's activation switches, accepted for drop-in use: DUO reads logits and applies a
            sigmoid per class itself, so only ``sigmoid=True`` and ``softmax=False`` are valid.
        backend: ``"auto"`` (the C++ kernels on CPU, the CUDA kernels on CUDA tensors where the build has them
            for the GPU, else torch), ``"cpp"``, ``"cuda"`` or ``"torch"``.
        num_threads: CPU threads of the native path (default ``torch.get_num_threads()``).
        check_inputs: raise on NaN/Inf logits, targets out of range and fractional class indices (default).
            On CUDA tensors each check is a device-to-host read that waits for the step's kernels; with
            ``False`` a training step has no host synchronisation of DUO's own (S's eigenpairs come from the
            project's kernel, so the step is meant to be CUDA-graph capturable; not yet run on a GPU), and bad
            inputs give a NaN loss instead of an error.
        mode, preset: the deprecated names of ``layout`` and ``variant``.

    Called as ``loss(seg_logits, noise_logits, target)`` with logits ``[B, K, *spatial]`` (2-D or 3-D).
    After each call, ``last_weights`` and ``last_scales`` hold w and S ``[B, K']`` (detached) for logging.
    """

    def __init__(self, num_classes: int | None = None, include_background: bool = False, to_onehot_y: bool = False,
                 alpha: float = 0.5, lambda_bce: float = 1.0, tau: float = 0.1, sigma0: float = 0.1,
                 beta: float = 0.1, smooth: float | None = None, layout: str = "D_HW", detach_scale: bool = False,
                 variant: str = "paper", reduction: str = "mean", backend: str = "auto",
                 num_threads: int | None = None, mode: str | None = None, preset: str | None = None,
                 smooth_nr: float | None = None, smooth_dr: float | None = None, sigmoid: bool = True,
                 softmax: bool = False, check_inputs: bool = True):
        super().__init__()
        reduction = getattr(reduction, "value", reduction)  # MONAI's LossReduction enum
        layout, layout_name = B.renamed("layout", layout, "D_HW", "mode", mode)
        variant, variant_name = B.renamed("variant", variant, "paper", "preset", preset)
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"num_classes: expected None or an int >= 1, got {num_classes!r}")
        for name, v in (("include_background", include_background), ("to_onehot_y", to_onehot_y),
                        ("detach_scale", detach_scale), ("sigmoid", sigmoid), ("softmax", softmax),
                        ("check_inputs", check_inputs)):
            if not isinstance(v, bool):
                raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
        _check_number("alpha", alpha)
        _check_number("lambda_bce", lambda_bce)
        _check_number("tau", tau)
        _check_number("sigma0", sigma0)
        _check_number("beta", beta)
        if not sigmoid:
            raise ValueError("sigmoid: DUO takes logits and applies a sigmoid per class itself (docs/method.md §3); "
                             "sigmoid=False (probabilities as input) is not supported")
        if softmax:
            raise ValueError("softmax: DUO's BCE and Dice use a sigmoid per class, not a softmax over classes; "
                             "pass logits with softmax=False")
        if smooth is not None and (smooth_nr is not None or smooth_dr is not None):
            raise ValueError("smooth: give either smooth or smooth_nr/smooth_dr, not both")
        smooth = 1e-5 if smooth is None else smooth
        smooth_nr = smooth if smooth_nr is None else smooth_nr
        smooth_dr = smooth if smooth_dr is None else smooth_dr
        _check_number("smooth", smooth)
        _check_number("smooth_nr", smooth_nr)
        _check_number("smooth_dr", smooth_dr)
        if layout not in T.LAYOUTS:
            raise ValueError(f"{layout_name}: expected one of {tuple(T.LAYOUTS)}, got {layout!r}")
        if variant not in VARIANTS:
            raise ValueError(f"{variant_name}: expected one of {tuple(VARIANTS)}, got {variant!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        if backend not in ("auto", "cpp", "cuda", "torch"):
            raise ValueError(f"backend: expected 'auto', 'cpp', 'cuda' or 'torch', got {backend!r}")
        B.threads(num_threads)
        self.num_classes, self.include_background, self.to_onehot_y = num_classes, include_background, to_onehot_y
        self.alpha, self.lambda_bce, self.tau, self.sigma0, self.beta = (
            float(alpha), float(lambda_bce), float(tau), float(sigma0), float(beta))
        self.smooth_nr, self.smooth_dr = float(smooth_nr), float(smooth_dr)
        self.layout, self.detach_scale, self.variant, self.reduction = layout, detach_scale, variant, reduction
        self.backend, self.num_threads, self.check_inputs = backend, num_threads, check_inputs
        self.last_weights: torch.Tensor | None = None
        self.last_scales: torch.Tensor | None = None

    # The paper's hyperparameters (α = 0.5, λ = 1, τ = 0.5, σ0 = 0.1, β = 0.1), by name.
    PAPER = {"alpha": 0.5, "lambda_bce": 1.0, "tau": 0.5, "sigma0": 0.1, "beta": 0.1}

    @classmethod
    def paper(cls, **kwargs) -> "DUOLoss":
        """DUO with the paper's hyperparameters (``DUOLoss.PAPER``: τ = 0.5 where the default is 0.1); any other
        argument of ``DUOLoss`` may be given, and overrides them."""
        return cls(**{**cls.PAPER, **kwargs})

    # -- validation -------------------------------------------------------------------------------------

    def _check(self, z, n, y):
        for name, t in (("seg_logits", z), ("noise_logits", n), ("target", y)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if z.dim() not in (4, 5):
            raise ValueError(f"seg_logits: expected [B, K, H, W] or [B, K, D, H, W], got shape {tuple(z.shape)}")
        if z.numel() == 0:
            raise ValueError(f"seg_logits: empty tensor of shape {tuple(z.shape)}")
        for name, t in (("seg_logits", z), ("noise_logits", n)):
            if t.dtype not in B.FLOATS:
                raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
        if n.shape != z.shape:
            raise ValueError(f"noise_logits: expected shape {tuple(z.shape)} (that of seg_logits), "
                             f"got {tuple(n.shape)}")
        for name, t in (("noise_logits", n), ("target", y)):
            if t.device != z.device:
                raise ValueError(f"{name}: on {t.device} but seg_logits on {z.device}")
        Bn, K = z.shape[:2]
        if self.num_classes is not None and K != self.num_classes:
            raise ValueError(f"seg_logits: {K} channels but num_classes={self.num_classes}")
        if K - (0 if self.include_background else 1) < 1:
            raise ValueError("seg_logits: a single channel and include_background=False leave no class")
        spatial = tuple(z.shape[2:])
        if self.to_onehot_y:
            if tuple(y.shape) not in ((Bn, 1) + spatial, (Bn,) + spatial):
                raise ValueError(f"target: expected class indices of shape {(Bn, 1) + spatial} or "
                                 f"{(Bn,) + spatial}, got {tuple(y.shape)}")
            if y.dtype not in B.INTS + B.FLOATS:
                raise TypeError(f"target: expected integer (or integral float) class indices, got {y.dtype}")
            if y.dtype in B.FLOATS and self.check_inputs and not bool((y == torch.round(y)).all()):
                raise ValueError("target: to_onehot_y=True needs integral class indices, found a fractional value")
        else:
            if tuple(y.shape) != tuple(z.shape):
                raise ValueError(f"target: expected one-hot of shape {tuple(z.shape)}, got {tuple(y.shape)} "
                                 "(pass to_onehot_y=True for class indices)")
            if y.dtype not in B.INTS + B.FLOATS + (torch.bool,):
                raise TypeError(f"target: expected a numeric dtype, got {y.dtype}")

    # -- the loss ---------------------------------------------------------------------------------------
    def forward(self, seg_logits: torch.Tensor, noise_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        z, n, y = seg_logits, noise_logits, target
        self._check(z, n, y)
        with torch.autocast(device_type=z.device.type, enabled=False):
            be = self._path(z)
            zs = z  # the logits S reads: a float32 copy of half logits, where the fused kernel reads the halves
            dt = z.dtype
            if z.dtype in _HALF or n.dtype in _HALF or n.dtype != z.dtype:
                dt = torch.float64 if torch.float64 in (z.dtype, n.dtype) else torch.float32
                if be == "cuda" and z.dtype in _HALF and n.dtype == z.dtype:
                    zs = z.to(dt) if self.alpha != 0.0 else None  # alpha = 0: no S, no copy
                else:
                    z, n = z.to(dt), n.to(dt)
                    zs = z
            per, S, w = self._torch(z, n, y) if be == "torch" else self._native(z, n, y, zs, dt, be)
        self.last_scales, self.last_weights = S.detach(), w.detach()
        if self.reduction == "none":
            return per
        return per.sum() if self.reduction == "sum" else per.mean()

    def _path(self, z) -> str:
        """Which kernels run: 'cpp' (CPU tensors, native build), 'cuda' (CUDA tensors, a CUDA build with code
        for the GPU) or 'torch'; an explicit 'cpp'/'cuda' that cannot run raises the reason."""
        if self.backend == "torch":
            return "torch"
        if self.backend == "cuda":
            return B.resolve("cuda", z)
        if z.device.type == "cpu" and B.has_native():
            return "cpp"
        if self.backend == "cpp":
            B.resolve("cpp", z)  # raises the reason
        if z.device.type == "cuda" and B.resolve("auto", z) == "cuda":
            return "cuda"
        return "torch"

    @property
    def _c0(self) -> int:
        return 0 if self.include_background else 1

    def _scale(self, z):
        """S [B, K'] of the included classes, NaN (maps too thin for a spectrum) read as 0, i.e. w = 1.

        S is taken over all K maps and sliced afterwards: the slice's gradient is then a [B, K] vector with a
        zero for the background, instead of a full-size zero-filled copy of z on the backward. A detached z
        takes semantic_scale's no-grad path: the forward S alone, no eigenvectors kept for a backward.
        Without input checks non-finite values are read as 0 (the fused sums, and so the loss, are NaN then),
        which spares the CUDA path its device-to-host read of the non-finite flags.
        """
        if self.detach_scale:
            z = z.detach()
        S = semantic_scale(z, layout=self.layout, variant=self.variant, nan_to_num=not self.check_inputs,
                           backend="torch" if self.backend == "torch" else "auto", num_threads=self.num_threads)
        S = S[:, self._c0:]
        return torch.where(torch.isnan(S), torch.zeros_like(S), S)

    def _native(self, z, n, y, zs, dtype, path):
        Bn, K = z.shape[:2]
        if self.to_onehot_y:
            y3 = y.reshape(Bn, -1)
            if y3.dtype in B.FLOATS:
                y3 = y3.long()
        else:
            y3 = y.reshape(Bn, K, -1)
            if y3.dtype == torch.bool:
                y3 = y3.view(torch.uint8)
            elif y3.dtype in _HALF:
                y3 = y3.float()
        nt = B.threads(self.num_threads)
        sums = _FusedSums.apply(z.reshape(Bn, K, -1), n.reshape(Bn, K, -1), y3, self.to_onehot_y, self._c0,
                                VARIANTS[self.variant], self.tau, nt, path, self.check_inputs)
        return self._from_sums(zs, sums, z.shape, dtype)

    def _from_sums(self, z, sums, shape, dtype):
        """The per-(b, c) losses, S and w (of ``dtype``) from the six sums of either path, S read from ``z``
        (logits of ``shape``): the loss's formula, once."""
        N = math.prod(shape[2:])
        if self.alpha == 0.0:  # w = 1 whatever S is: S, the costly part of DUO, is not computed
            S = torch.full(sums.shape[:2], math.nan, dtype=torch.float64, device=sums.device)
            w = torch.ones_like(S)
        else:
            S = self._scale(z).to(torch.float64)
            w = 1.0 / (1.0 + self.alpha * S)
        sums = sums.to(torch.float64)
        bce = sums[..., _BCE] / N
        if self.variant == "official":
            per = w * bce
        else:
            dice = 1 - (2 * sums[..., _SIGY] + self.smooth_nr) / (sums[..., _SIG] + sums[..., _Y] + self.smooth_dr)
            count = shape[0] * N
            mean_g, mean_g2 = sums[..., _G].sum(0) / count, sums[..., _G2].sum(0) / count
            R = (mean_g**2 + (mean_g2 - self.sigma0**2) ** 2).sum()
            per = w * (self.lambda_bce * bce + dice) + self.beta * R
        return per.to(dtype), S.to(dtype), w.to(dtype)

    def _torch(self, z, n, y):
        K = z.shape[1]
        for name, t in (("seg_logits", z), ("noise_logits", n)):
            if self.check_inputs and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: contains NaN or Inf")
        if self.to_onehot_y:
            lab = (y[:, 0] if y.dim() == z.dim() else y).long()
            lo, hi = int(lab.min()), int(lab.max())
            if lo < 0 or hi >= K:
                bad = lo if lo < 0 else hi
                raise ValueError(f"target: label value {bad} is outside 0..{K - 1} (num_classes={K})")
            y = nn.functional.one_hot(lab, K).movedim(-1, 1)
        else:
            yf = y.to(z.dtype)
            if self.check_inputs and not bool(((yf >= 0) & (yf <= 1)).all()):
                raise ValueError("target: values must lie in [0, 1]")
        return self._from_sums(z, T.duo_sums(z, n, y, self._c0, self.variant, self.tau), z.shape, z.dtype)


class NoiseHead(nn.Module):
    """The label-noise estimation head: a 1×1(×1) convolution from the decoder's last feature map to K
    channels, initialised to output 0 (ĝ = tanh(0) = 0: training starts from the given labels)."""

    def __init__(self, in_channels: int, num_classes: int, spatial_dims: int = 3):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims: expected 1, 2 or 3, got {spatial_dims!r}")
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]
        self.conv = conv(in_channels, num_classes, kernel_size=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(features)
