"""Loads the native module and turns tensors into the strided views the kernels read in place.

If the compiled module is missing (a source checkout without a build), the pure-PyTorch path still works
and ``backend="auto"`` falls back to it; asking for ``backend="cpp"`` then says why it is unavailable.
"""
from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import torch

try:
    from . import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - exercised only without a build
    _C = None
    _IMPORT_ERROR = exc

BACKENDS = ("auto", "cpp", "cuda", "torch")

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

_DTYPES = {
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float32: "f32",
    torch.float64: "f64",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
}


_warned = False


def why_no_native() -> str:
    """Why ``_C`` is missing, in words a user can act on. The usual cause is a source checkout on
    ``sys.path`` (the current directory of ``python -m`` or ``-c``) shadowing the installed package, whose
    ImportError reads like a circular import."""
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    for entry in sys.path:
        pkg = Path(entry or ".").resolve() / "auvcore"
        if pkg != here and pkg.is_dir() and any(pkg.glob("_C.*")):
            return (f"auvcore was imported from {here}, a source tree without the built module, which shadows "
                    f"the installed package at {pkg}; run from another directory (or `pip install -e .` for a "
                    "developer build)")
    return f"the native module is not built ({_IMPORT_ERROR}); `pip install .` builds it"


def _warn_no_native() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"auvcore: {why_no_native()}; using the pure-PyTorch path (slower, float32 results differ "
                      "in the last digits)", RuntimeWarning, stacklevel=3)


# The CPU kernels' instruction set (csrc/include/auvcore/isa.h): the best the CPU runs unless the environment
# variable AUVCORE_ISA, read once at import, or set_isa() asks for a lower one.
ISAS = ("generic", "avx2", "avx512")


def isa() -> str | None:
    """The instruction set the C++ CPU kernels run now: 'generic', 'avx2' or 'avx512' (None without a build)."""
    return ISAS[_C.isa()] if _C is not None else None


def isa_best() -> str | None:
    """The best instruction set this CPU supports (None without a build)."""
    return ISAS[_C.isa_best()] if _C is not None else None


def set_isa(name: str | None) -> str:
    """Run the CPU kernels on ``name`` ('generic', 'avx2', 'avx512'; None: the CPU's best) from now on, and
    return the path now in force. A path above the CPU's best raises ValueError: it would execute instructions
    the CPU lacks."""
    if _C is None:
        raise RuntimeError(f"set_isa: {why_no_native()}")
    if name is None:
        name = isa_best()
    if name not in ISAS:
        raise ValueError(f"isa: expected one of {ISAS} or None, got {name!r}")
    _C.set_isa(ISAS.index(name))
    return isa()


def _isa_from_env() -> None:
    """AUVCORE_ISA=generic|avx2|avx512 forces a CPU path at import. Asking above the CPU's best, or an unknown
    name, warns and keeps the best: a setting copied to another machine must not make the import fail."""
    want = os.environ.get("AUVCORE_ISA", "").strip().lower()
    if not want or _C is None:
        return
    if want not in ISAS:
        warnings.warn(f"AUVCORE_ISA={want!r}: expected one of {ISAS}; using {isa_best()!r}", RuntimeWarning,
                      stacklevel=2)
    elif ISAS.index(want) > _C.isa_best():
        warnings.warn(f"AUVCORE_ISA={want!r}: this CPU runs at most {isa_best()!r}; using that", RuntimeWarning,
                      stacklevel=2)
    else:
        _C.set_isa(ISAS.index(want))


def has_native() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and bool(getattr(_C, "with_cuda", False))


def view(t: torch.Tensor | None):
    """The native ArrayView of a tensor: pointer, dtype, shape, strides and device (-1 for host memory, else
    the CUDA device's index), no copy; C++ checks every view against what its op reads or writes. ``None``
    gives the empty view (pointer 0) that an op reads as "this optional output is not wanted"."""
    if t is None:
        return _C.ArrayView(0, _C.DType.f64, [], [])
    if t.device.type == "cpu":
        device = -1
    elif t.device.type == "cuda":
        device = t.device.index
    else:
        raise ValueError(f"auvcore's kernels read CPU or CUDA memory, got a tensor on {t.device}")
    return _C.ArrayView(t.data_ptr(), getattr(_C.DType, _DTYPES[t.dtype]), list(t.shape), list(t.stride()), device)


def as_tensor(x, name: str) -> tuple[torch.Tensor, bool]:
    """A torch view of ``x`` (torch tensor or numpy array) and whether ``x`` was numpy."""
    if isinstance(x, torch.Tensor):
        return x, False
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{name}: expected a numeric array, got dtype {x.dtype}")
        try:
            return torch.from_numpy(x), True
        except (ValueError, TypeError):  # negative strides or a non-native byte order
            return torch.from_numpy(np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))), True
    if hasattr(x, "__cuda_array_interface__"):  # CuPy and friends: a zero-copy torch view on the same device
        return as_cuda_tensor(x, name)[0], False
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


@functools.lru_cache(maxsize=None)
def device_supported(index: int) -> bool:
    """Whether the compiled kernels run on CUDA device ``index`` (sm_80 and newer in the default build)."""
    return has_cuda_kernels() and bool(_C.cuda_device_supported(int(index)))


def as_cuda_tensor(x, name: str) -> tuple[torch.Tensor, int | None]:
    """A torch view of a CUDA array without a copy, and the stream to run on when it is not torch's
    (CuPy's current stream for CuPy input, else None)."""
    if isinstance(x, torch.Tensor):
        t, stream = x, None
    else:
        stream = None
        mod = type(x).__module__.split(".")[0]
        if mod == "cupy":
            import cupy  # noqa: PLC0415 - optional dependency, present when x is a CuPy array

            stream = cupy.cuda.get_current_stream().ptr or None  # 0: the legacy default stream, torch's too
        if hasattr(x, "__dlpack__"):
            t = torch.from_dlpack(x)
        elif hasattr(x, "__cuda_array_interface__"):
            t = torch.as_tensor(x, device="cuda")
        else:
            raise TypeError(f"{name}: expected a CUDA torch.Tensor or a CUDA array (CuPy, DLPack), "
                            f"got {type(x).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{name}: backend='cuda' needs CUDA tensors, got device {t.device}")
    return t, stream


def renamed(new: str, new_value, default, old: str, old_value):
    """A public argument under its new name, or under its old one with a DeprecationWarning: (value, the name
    the caller used, so that errors name what they passed)."""
    if old_value is None:
        return new_value, new
    if new_value != default:
        raise TypeError(f"{old}: a deprecated name of {new}; pass only {new}")
    warnings.warn(f"{old}= is deprecated; it is now called {new}= (same values)", DeprecationWarning, stacklevel=3)
    return old_value, old


def non_finite(name: str) -> ValueError:
    """The error for NaN/Inf in an input, the same from every backend (the C++ kernels raise its twin)."""
    return ValueError(f"{name} contains NaN or Inf; pass nan_to_num=True to read them as 0")


def resolve(backend: str, t: torch.Tensor) -> str:
    """The backend that will run: 'cpp', 'cuda' or 'torch'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if t.device.type == "cpu":
            if has_native():
                return "cpp"
            _warn_no_native()
            return "torch"
        if t.device.type == "cuda" and has_cuda_kernels():
            if device_supported(t.device.index):  # else a GPU older than the build's architectures
                return "cuda"
        return "torch"
    if backend == "cpp":
        if not has_native():
            raise RuntimeError(f"backend='cpp': {why_no_native()}")
        if t.device.type != "cpu":
            raise ValueError(f"backend='cpp' needs CPU tensors, got device {t.device}")
    if backend == "cuda":
        if not has_cuda_kernels():
            raise RuntimeError("backend='cuda': auvcore was built without CUDA kernels")
        if _C.cuda_device_count() == 0:
            raise RuntimeError("backend='cuda': auvcore has CUDA kernels but no CUDA device is usable here "
                               "(no GPU or no driver); use backend='cpp' or 'torch'")
        if t.device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got device {t.device}")
    return backend


def threads(num_threads: int | None) -> int:
    if num_threads is None:
        return torch.get_num_threads()
    if int(num_threads) < 1:
        raise ValueError(f"num_threads: expected >= 1, got {num_threads}")
    return int(num_threads)


_isa_from_env()
