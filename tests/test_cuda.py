"""CUDA backend of the semantic scale.

Two halves: the kernels themselves (marked ``cuda``; they skip cleanly without a GPU, a CUDA build of torch
and of auvcore), and the host side that runs everywhere: a CUDA build imports and serves the CPU ops without a
driver, the CUDA ops reject bad arguments and the missing device with clear errors, and the serial parts of
the GPU eigen solver (Sturm bisection, entropy), compiled for the host, agree with LAPACK and the SPEC.
"""
from __future__ import annotations

import ctypes.util
import math
import os

import numpy as np
import pytest
import torch

import auvcore
from auvcore import _backend as B
from auvcore import _torch_impl as T
from auvcore import testing

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

built_with_cuda = pytest.mark.skipif(not auvcore.has_cuda_kernels(), reason="auvcore built without CUDA kernels")
HAVE_GPU = torch.cuda.is_available() and auvcore.has_cuda_kernels() and B._C.cuda_device_count() > 0
gpu = pytest.mark.skipif(not HAVE_GPU, reason="needs a CUDA GPU, CUDA torch and auvcore built with CUDA")


def _no_driver() -> bool:
    return ctypes.util.find_library("cuda") is None and not os.path.exists("/dev/nvidiactl")


no_driver = pytest.mark.skipif(not _no_driver(), reason="a CUDA driver is present on this machine")


def _reference(z: torch.Tensor, mode: str, center=True, eps=1e-8, variant="paper", nan_to_num=False) -> np.ndarray:
    """S [B, K] from the float64 SVD oracle, one class matrix at a time."""
    M = T.class_matrices(z.detach().cpu().to(torch.float64), mode).numpy()
    if nan_to_num:
        M = np.nan_to_num(M, nan=0.0, posinf=0.0, neginf=0.0)
    out = np.empty(M.shape[:2])
    for b in range(M.shape[0]):
        for k in range(M.shape[1]):
            out[b, k] = T.svd_reference(M[b, k], center=center, eps=eps, variant=variant)
    return out


def _assert_scale_close(got, want, atol=1e-4):
    got = np.asarray(got.detach().cpu().to(torch.float64) if isinstance(got, torch.Tensor) else got, dtype=float)
    want = np.asarray(want, dtype=float)
    assert got.shape == want.shape
    assert np.array_equal(np.isnan(got), np.isnan(want)), (got, want)
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------------------
# Host side: runs on every machine.
# ---------------------------------------------------------------------------------------------------------


@built_with_cuda
def test_cuda_build_imports_and_reports_itself():
    assert B._C.with_cuda is True
    assert B._C.cuda_max_gram_size >= 512
    for name in ("cuda_decoded_gram", "cuda_masked_gram", "cuda_scale_from_gram", "cuda_device_count"):
        assert callable(getattr(B._C, name))


@built_with_cuda
def test_device_count_never_raises():
    n = B._C.cuda_device_count()
    assert isinstance(n, int) and n >= 0
    assert B._C.cuda_device_count() == n  # a second call (after the runtime's failed init) answers the same


@built_with_cuda
@no_driver
def test_device_count_is_zero_without_driver():
    assert B._C.cuda_device_count() == 0
    assert B._C.cuda_device_supported(0) is False
    assert B._C.cuda_device_supported(-1) is False


@built_with_cuda
@no_driver
def test_backend_cuda_without_gpu_is_a_clear_runtime_error():
    z = torch.randn(1, 2, 4, 5, 6)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        auvcore.semantic_scale(z, backend="cuda")
    f, lab = torch.randn(1, 3, 4, 5, 6), torch.randint(0, 2, (1, 4, 5, 6))
    with pytest.raises(RuntimeError, match="no CUDA device"):
        auvcore.masked_semantic_scale(f, lab, 2, backend="cuda")
    from auvcore import _cuda

    with pytest.raises(RuntimeError, match="no CUDA device"):
        _cuda.semantic_scale(z)


@built_with_cuda
@no_driver
def test_cuda_ops_without_device_raise_runtime_error_naming_the_cause():
    # Valid arguments reach the device check, which must fail cleanly (no crash, no sticky state).
    z = torch.randn(1, 2, 4, 5, 6)
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        B._C.cuda_decoded_gram(B.view(z), 0, True, False, 8, 8, 0, 0)
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        B._C.cuda_scale_from_gram(8, 1, 4, 0, 4, 1e-8, 0, 0, 8, 0, 0, 0)
    # ...and the CPU ops keep working afterwards.
    S = auvcore.semantic_scale(z, backend="cpp")
    assert torch.isfinite(S).all()


@built_with_cuda
def test_cuda_ops_validate_arguments_before_touching_the_device():
    z3 = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="decoded maps"):
        B._C.cuda_decoded_gram(B.view(z3), 0, True, False, 8, 8, 0, 0)
    z = torch.randn(1, 2, 4, 5, 6)
    with pytest.raises(ValueError, match="mode"):
        B._C.cuda_decoded_gram(B.view(z), 7, True, False, 8, 8, 0, 0)
    zi = torch.zeros(1, 2, 4, 5, 6, dtype=torch.int32)
    with pytest.raises(ValueError, match="floating"):
        B._C.cuda_decoded_gram(B.view(zi), 0, True, False, 8, 8, 0, 0)
    with pytest.raises(ValueError, match="null"):
        B._C.cuda_decoded_gram(B.view(z), 0, True, False, 0, 0, 0, 0)
    big = torch.empty(1, 1, 5000, 6000)  # p = 5000 > the eigen kernel's limit
    with pytest.raises(ValueError, match="exceeds the CUDA limit"):
        B._C.cuda_decoded_gram(B.view(big), 0, True, False, 8, 8, 0, 0)
    f, lab = torch.randn(1, 3, 4, 5, 6), torch.randint(0, 2, (1, 4, 5, 7))
    with pytest.raises(ValueError, match="labels: shape"):
        B._C.cuda_masked_gram(B.view(f), B.view(lab), 2, True, False, 8, 8, 8, 8, 0, 0)
    with pytest.raises(ValueError, match="integer"):
        B._C.cuda_masked_gram(B.view(f), B.view(f[:, 0]), 2, True, False, 8, 8, 8, 8, 0, 0)
    lab = torch.randint(0, 2, (1, 4, 5, 6))
    with pytest.raises(ValueError, match="num_classes"):
        B._C.cuda_masked_gram(B.view(f), B.view(lab), 0, True, False, 8, 8, 8, 8, 0, 0)
    with pytest.raises(ValueError, match="p: expected"):
        B._C.cuda_scale_from_gram(8, 1, 0, 0, 4, 1e-8, 0, 0, 8, 0, 0, 0)
    with pytest.raises(ValueError, match="variant"):
        B._C.cuda_scale_from_gram(8, 1, 4, 0, 4, 1e-8, 5, 0, 8, 0, 0, 0)


def test_auto_on_cpu_tensors_uses_the_cpu_kernels(monkeypatch):
    if not auvcore.has_native():
        pytest.skip("native module not built")
    from auvcore import _cuda

    def boom(*a, **k):
        raise AssertionError("the CUDA path must not run for CPU tensors")

    monkeypatch.setattr(_cuda, "semantic_scale", boom)
    monkeypatch.setattr(_cuda, "masked_semantic_scale", boom)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 5, 6, 7, generator=g)
    assert B.resolve("auto", z) == "cpp"
    S = auvcore.semantic_scale(z)
    torch.testing.assert_close(S, auvcore.semantic_scale(z, backend="cpp"), rtol=0, atol=0)
    _assert_scale_close(S, _reference(z, "D_HW"), atol=1e-5)
    f, lab = torch.randn(2, 4, 5, 6, 7, generator=g), torch.randint(0, 3, (2, 5, 6, 7), generator=g)
    Sm = auvcore.masked_semantic_scale(f, lab, 3)
    torch.testing.assert_close(Sm, auvcore.masked_semantic_scale(f, lab, 3, backend="cpp"), rtol=0, atol=0)


@built_with_cuda
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 2**31 - 1), scale_exp=st.integers(-30, 30),
       kind=st.sampled_from(["random", "zero_offdiag", "repeated", "zero"]), lanes=st.sampled_from([1, 2, 4, 8, 32]))
def test_host_multisection_matches_lapack(n, seed, scale_exp, kind, lanes):
    rng = np.random.default_rng(seed)
    d = rng.standard_normal(n) * 10.0**scale_exp
    e = rng.standard_normal(n - 1) * 10.0**scale_exp
    if kind == "zero_offdiag":
        e[rng.random(n - 1) < 0.5] = 0.0
    elif kind == "repeated":
        d[:] = 10.0**scale_exp
        e[:] = 0.0
        e[::3] = 1e-3 * 10.0**scale_exp
    elif kind == "zero":
        d[:] = 0.0
        e[:] = 0.0
    Tm = np.diag(d) + np.diag(e, 1) + np.diag(e, -1)
    want = np.linalg.eigvalsh(Tm)
    got = np.array(B._C._cuda_host_tridiag_eigvalsh(d.tolist(), e.tolist(), lanes))
    norm = max(np.abs(want).max(), np.finfo(float).tiny)
    assert np.all(np.diff(got) >= 0)
    # pivmin (a few DBL_MIN) bounds the error of an all-zero matrix
    np.testing.assert_allclose(got, want, rtol=0, atol=8 * n * np.finfo(float).eps * norm + 1e-300)


@built_with_cuda
def test_host_multisection_lanes_per_eigenvalue():
    lanes = B._C._cuda_host_multisect_lanes
    assert [lanes(n, 256) for n in (1, 8, 9, 32, 33, 64, 96, 128, 129, 512)] == [32, 32, 16, 8, 4, 4, 2, 2, 1, 1]
    with pytest.raises(ValueError, match="lanes"):
        B._C._cuda_host_tridiag_eigvalsh([1.0, 2.0], [0.5], 3)


@built_with_cuda
def test_host_bisection_wilkinson_and_gram_spectra():
    # Wilkinson W21+: pairs of eigenvalues agreeing to ~1e-14.
    n = 21
    d = np.abs(np.arange(n) - 10.0)
    e = np.ones(n - 1)
    got = np.array(B._C._cuda_host_tridiag_eigvalsh(d.tolist(), e.tolist()))
    want = np.linalg.eigvalsh(np.diag(d) + np.diag(e, 1) + np.diag(e, -1))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    # A rank-deficient PSD Gram (what the kernels feed the bisection): zeros stay ~0, never large negatives.
    rng = np.random.default_rng(3)
    X = rng.standard_normal((30, 5))
    G = X @ X.T
    import scipy.linalg as sla  # noqa: PLC0415

    Tri = sla.hessenberg(G)
    got = np.array(B._C._cuda_host_tridiag_eigvalsh(np.diag(Tri).tolist(), np.diag(Tri, 1).tolist()))
    want = np.linalg.eigvalsh(G)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * want.max())


@built_with_cuda
@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 12), seed=st.integers(0, 2**31 - 1),
       variant=st.sampled_from(["paper", "official"]), center=st.booleans())
def test_host_entropy_formula_matches_the_svd_oracle(m, n, seed, variant, center):
    M = np.random.default_rng(seed).standard_normal((m, n))
    want = T.svd_reference(M, center=center if variant == "paper" else False, variant=variant)
    Mc = M - M.mean(0, keepdims=True) if (center and variant == "paper") else M
    lam = np.sort(np.linalg.svd(Mc, compute_uv=False) ** 2)[::-1]
    got = B._C._cuda_host_entropy(lam.tolist(), min(m, n), 1e-8, T.VARIANTS[variant])
    if math.isnan(want):
        assert math.isnan(got)
    else:
        assert abs(got - want) < 1e-12


# ---------------------------------------------------------------------------------------------------------
# Kernels under host emulation: csrc/cuda/*.cu built with g++ against csrc/cuda/emu/cuda_runtime.h (every CUDA
# thread a std::thread, __syncthreads a barrier, shuffles through an exchange buffer). This runs the kernels'
# indexing, barriers, reductions, centring, sort and solver without a GPU; not their speed, nor races that a
# GPU's weaker memory ordering could expose.
# ---------------------------------------------------------------------------------------------------------

import ctypes  # noqa: E402
import hashlib  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_EMU_DT = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3, torch.int8: 4, torch.uint8: 5,
           torch.int16: 6, torch.int32: 7, torch.int64: 8}


def _emu_sources() -> dict[str, str]:
    """The .cu files with `k<<<g, b, s, st>>>(args)` turned into emu::launch(k, g, b, s, st, args) and
    `extern __shared__ T x[]` into the block's dynamic buffer."""
    launch = re.compile(r"^(\s*)(.+?)<<<(.+)>>>\((.*)\);\s*$")
    ext = re.compile(r"extern __shared__ (.+?) (\w+)\[\];")
    out = {}
    for f in sorted((_CSRC / "cuda").glob("*.cu")):
        lines = []
        for line in f.read_text().splitlines():
            m = launch.match(line)
            if m:
                line = f"{m[1]}::emu::launch({m[2]}, {m[3]}, {m[4]});"
            lines.append(ext.sub(lambda m: f"{m[1]}* {m[2]} = ::emu::dyn_smem<{m[1]}>();", line))
        out[f.stem + ".emu.cpp"] = "\n".join(lines) + "\n"
    return out


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler for the CUDA emulation")
    srcs = _emu_sources()
    digest = hashlib.sha256()
    for name in sorted(srcs):
        digest.update(srcs[name].encode())
    for f in sorted((_CSRC / "cuda").glob("*.h*")) + sorted((_CSRC / "cuda" / "emu").glob("*")) + sorted(
            (_CSRC / "include" / "auvcore").glob("*.h")):
        digest.update(f.read_bytes())
    build = tmp_path_factory.getbasetemp() / f"cuda_emu_{digest.hexdigest()[:12]}"
    lib_path = build / "libauvemu.so"
    if not lib_path.exists():
        build.mkdir(parents=True, exist_ok=True)
        flags = ["-std=c++20", "-O1", "-pthread", "-fPIC", f"-I{_CSRC / 'cuda' / 'emu'}", f"-I{_CSRC / 'cuda'}",
                 f"-I{_CSRC / 'include'}"]
        jobs = []
        for name, text in srcs.items():
            (build / name).write_text(text)
            jobs.append(subprocess.Popen([cxx, *flags, "-D__CUDACC__", "-c", str(build / name), "-o",
                                          str(build / (name + ".o"))], stderr=subprocess.PIPE, text=True))
        jobs.append(subprocess.Popen([cxx, *flags, "-c", str(_CSRC / "cuda" / "emu" / "emu_harness.cpp"), "-o",
                                      str(build / "harness.o")], stderr=subprocess.PIPE, text=True))
        errors = [err for j in jobs for _, err in [j.communicate()] if j.returncode != 0]
        if errors and any(("barrier" in e or "atomic_ref" in e) for e in errors) and not lib_path.exists():
            pytest.skip("the C++ compiler lacks C++20 <barrier>/std::atomic_ref needed by the CUDA emulation")
        assert not errors, "emulated build failed:\n" + errors[0][-4000:]
        subprocess.run([cxx, "-shared", "-pthread", "-o", str(lib_path), *map(str, build.glob("*.o"))], check=True)
    lib = ctypes.CDLL(str(lib_path))
    yield lib
    lib.emu_set_optin(227 * 1024)


def _i64(xs):
    return (ctypes.c_int64 * max(len(xs), 1))(*xs)


def _p(t):
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _check(rc, err):
    if rc:
        raise (ValueError if rc == 1 else RuntimeError)(err.value.decode())


def _emu_scale(lib, G, p, counts=None, r=0, eps=1e-8, variant=0, flags=None, want_evals=False):
    count = G.shape[0]
    S = torch.empty(count, dtype=torch.float64)
    ev = torch.empty(count, p, dtype=torch.float64) if want_evals else None
    err = ctypes.create_string_buffer(512)
    _check(lib.emu_scale_from_gram(_p(G), ctypes.c_int64(count), ctypes.c_int64(p), _p(counts), ctypes.c_int64(r),
                                   ctypes.c_double(eps), variant, _p(flags), _p(S), _p(ev), err, 512), err)
    return S, ev


def _emu_decoded(lib, z, mode="D_HW", center=True, nan_to_num=False, variant="paper", eps=1e-8):
    if variant == "official":
        center, nan_to_num = False, True
    Bn, K = z.shape[:2]
    m, n = (z.shape[2], z.shape[3]) if z.dim() == 4 else T.class_matrices(z[:1, :1], mode).shape[-2:]
    p = min(m, n)
    G = torch.full((Bn * K, p, p), float("nan"), dtype=torch.float64)  # the op must overwrite every entry
    flags = torch.zeros(Bn * K, dtype=torch.int32)
    err = ctypes.create_string_buffer(512)
    _check(lib.emu_decoded_gram(_p(z), _EMU_DT[z.dtype], z.dim(), _i64(z.shape), _i64(z.stride()), T.MODES[mode],
                                int(center), int(nan_to_num), _p(G), _p(flags), err, 512), err)
    G0 = G.clone()
    S, _ = _emu_scale(lib, G, p, r=p, eps=eps, variant=T.VARIANTS[variant], flags=flags)
    return G0, S.view(Bn, K), flags.view(Bn, K)


def _emu_masked(lib, f, lab, K, center=True, nan_to_num=False):
    Bn, C = f.shape[:2]
    G = torch.full((Bn * K, C, C), float("nan"), dtype=torch.float64)
    counts = torch.full((Bn * K,), -1, dtype=torch.int64)
    flags = torch.zeros(Bn * K, dtype=torch.int32)
    le = torch.zeros(2, dtype=torch.int64)
    err = ctypes.create_string_buffer(512)
    _check(lib.emu_masked_gram(_p(f), _EMU_DT[f.dtype], f.dim(), _i64(f.shape), _i64(f.stride()), _p(lab),
                               _EMU_DT[lab.dtype], _i64(lab.shape), _i64(lab.stride()), ctypes.c_int64(K),
                               int(center), int(nan_to_num), _p(G), _p(counts), _p(flags), _p(le), err, 512), err)
    G0 = G.clone()
    S, _ = _emu_scale(lib, G, C, counts=counts, flags=flags)
    return G0, S.view(Bn, K), counts.view(Bn, K), flags.view(Bn, K), le.tolist()


def _gram_ref(z, mode, center):
    M = T.class_matrices(z.to(torch.float64), mode)
    if center:
        M = M - M.mean(-2, keepdim=True)
    m, n = M.shape[-2:]
    return (M @ M.transpose(-1, -2) if m <= n else M.transpose(-1, -2) @ M).flatten(0, 1)


_EMU_ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


@built_with_cuda
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(B_=st.integers(1, 2), K=st.integers(1, 2), D=st.integers(1, 24), H=st.integers(1, 9), W=st.integers(1, 9),
       mode=st.sampled_from(list(T.MODES)), dtype=st.sampled_from(list(_EMU_ATOL)), center=st.booleans(),
       offset=st.sampled_from([0.0, 40.0]), seed=st.integers(0, 2**31 - 1))
def test_emulated_decoded_kernels_match_the_oracle(emu, B_, K, D, H, W, mode, dtype, center, offset, seed):
    z = _rand((B_, K, D, H, W), dtype, seed, offset)
    G, S, flags = _emu_decoded(emu, z, mode, center=center)
    assert not flags.any()
    Gref = _gram_ref(z, mode, center)
    scale = float(Gref.abs().max()) or 1.0
    assert float((G - Gref).abs().max()) <= (1e-13 if dtype == torch.float64 else 1e-6) * scale * 10
    _assert_scale_close(S, _reference(z, mode, center=center), atol=_EMU_ATOL[dtype])


@pytest.mark.slow
@built_with_cuda
@pytest.mark.parametrize("shape,mode,dtype", [
    ((1, 1, 140, 3, 50), "D_HW", torch.float32),   # p = 140 > 128: column-mean pre-pass, 2 x 2 float tiles
    ((1, 1, 100, 3, 40), "D_HW", torch.float64),   # p = 100 > 96: the same for double tiles
    ((1, 1, 300, 100), "D_HW", torch.float64),     # column side (m > n), shifted covariance over 2 x 2 tiles
    ((1, 2, 90, 3, 40), "D_HW", torch.float32),    # p = 90: one 96-tile, centred in the block
    ((1, 2, 20, 9, 30), "W_DH", torch.float32),    # rows contiguous: p-fast loads
    ((2, 2, 1100, 3), "D_HW", torch.float32),      # column side, 1100 samples: 3 chunks per job
])
def test_emulated_decoded_tile_paths(emu, shape, mode, dtype):
    z = _rand(shape, dtype, 5, offset=5.0)
    _, S, _ = _emu_decoded(emu, z, mode)
    _assert_scale_close(S, auvcore.semantic_scale(z.to(torch.float64), mode=mode, backend="cpp").numpy(),
                        atol=_EMU_ATOL[dtype])


@built_with_cuda
def test_emulated_decoded_non_contiguous_nan_and_official(emu):
    base = _rand((3, 4, 14, 22, 18), torch.float32, 11)
    z = base.permute(0, 1, 4, 2, 3)[::2, 1:, :, ::2, 1:]
    _, S, _ = _emu_decoded(emu, z, "H_DW")
    _assert_scale_close(S, _reference(z, "H_DW"), atol=1e-5)

    z = _rand((1, 3, 5, 6, 7), torch.float64, 2)
    z[0, 1, 2, 3, 4] = float("nan")
    z[0, 2, 0, 0, 0] = float("-inf")
    _, S, flags = _emu_decoded(emu, z)
    assert flags.tolist() == [[0, 1, 1]]
    assert not math.isnan(S[0, 0]) and torch.isnan(S[0, 1:]).all()
    _, S, flags = _emu_decoded(emu, z, nan_to_num=True)
    assert not flags.any()
    _assert_scale_close(S, _reference(z, "D_HW", nan_to_num=True), atol=1e-12)
    _, S, _ = _emu_decoded(emu, z, variant="official")
    _assert_scale_close(S, _reference(z, "D_HW", variant="official", nan_to_num=True), atol=1e-12)

    zero = torch.zeros(1, 2, 4, 5, 6, dtype=torch.float64)
    zero[0, 1] = 2.5
    _, S, _ = _emu_decoded(emu, zero)
    assert S.tolist() == [[0.0, 0.0]]


@built_with_cuda
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(Bn=st.integers(1, 2), C=st.integers(1, 40), K=st.integers(1, 4), D=st.integers(1, 7), H=st.integers(1, 7),
       W=st.integers(1, 7), dtype=st.sampled_from([torch.float32, torch.float64]), center=st.booleans(),
       channels_last=st.booleans(), label_dtype=st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8]),
       seed=st.integers(0, 2**31 - 1))
def test_emulated_masked_kernels_match_cpu(emu, Bn, C, K, D, H, W, dtype, center, channels_last, label_dtype, seed):
    f, lab = _masked_case(Bn, C, K, (D, H, W), dtype, seed, channels_last, absent=[(0, K - 1)] if K > 1 else [])
    lab = lab.to(label_dtype)
    _, S, counts, flags, le = _emu_masked(emu, f, lab, K, center=center)
    assert le == [0, 0] and not flags.any()
    want_counts = torch.stack([torch.bincount(lab[b].reshape(-1).long(), minlength=K) for b in range(Bn)])
    assert torch.equal(counts, want_counts)
    want = auvcore.masked_semantic_scale(f.to(torch.float64), lab, K, center=center, backend="cpp")
    _assert_scale_close(S, want.numpy(), atol=_EMU_ATOL[dtype])


@pytest.mark.slow
@built_with_cuda
def test_emulated_masked_tiles_chunks_and_errors(emu):
    # C = 130 > 128: 2 x 2 tiles; one class of 1500 voxels: several chunks; a class of 1 voxel: NaN.
    f, lab = _masked_case(1, 130, 3, (10, 12, 14), torch.float32, 4)
    lab[0] = 0
    lab[0, :9] = 1
    lab[0, 9, 0, 0] = 2
    _, S, counts, _, _ = _emu_masked(emu, f, lab, 3)
    assert counts.tolist() == [[10 * 12 * 14 - 9 * 12 * 14 - 1, 9 * 12 * 14, 1]]
    _assert_scale_close(S, auvcore.masked_semantic_scale(f.double(), lab, 3, backend="cpp").numpy(), atol=1e-5)
    assert math.isnan(S[0, 2])
    bad = lab.clone()
    bad[0, 3, 4, 5] = 7
    _, _, counts, _, le = _emu_masked(emu, f[:, :4].contiguous(), bad, 3)
    assert le == [1, 7] and int(counts.sum()) == 10 * 12 * 14 - 1  # the bad voxel joins no class
    fn = f[:, :4].clone()
    fn[0, 2, 9, 0, 0] = float("nan")  # in the voxel of class 2
    _, S, _, flags, _ = _emu_masked(emu, fn, lab, 3)
    assert flags.tolist() == [[0, 0, 1]]


@pytest.mark.slow
@built_with_cuda
def test_emulated_masked_many_classes_uses_global_histogram(emu):
    # K > 2048 classes: the histogram and the scatter skip shared memory and count with global atomics.
    K = 2100
    g = torch.Generator().manual_seed(0)
    f = torch.randn(1, 3, 3000, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 6, (1, 3000), generator=g) * 400
    _, S, counts, _, le = _emu_masked(emu, f, lab, K)
    assert le == [0, 0]
    assert torch.equal(counts[0], torch.bincount(lab[0], minlength=K))
    _assert_scale_close(S, auvcore.masked_semantic_scale(f, lab, K, backend="cpp").numpy(), atol=1e-12)


@built_with_cuda
@pytest.mark.parametrize("p", [1, 2, 3, 31, 33, 80])
@pytest.mark.parametrize("optin", [227 * 1024, 8 * 1024])  # shared-memory matrix / in place in global memory
def test_emulated_eigen_kernel(emu, p, optin):
    emu.emu_set_optin(optin)
    try:
        g = torch.Generator().manual_seed(p)
        X = torch.randn(2, p, max(p - 3, 1), generator=g, dtype=torch.float64) * 1e3
        G = X @ X.transpose(-1, -2)
        want = torch.linalg.eigvalsh(G).flip(-1)
        counts = torch.tensor([p, max(p - 1, 0)])
        S, ev = _emu_scale(emu, G.clone(), p, counts=counts, want_evals=True)
        torch.testing.assert_close(ev, want, rtol=0, atol=1e-12 * float(want.abs().max()))
        for i in range(2):
            r = min(int(counts[i]), p)
            Sref, _ = T.entropy_scale(want[i], r, 1e-8, "paper")
            if r < 2:
                assert math.isnan(S[i])
            else:
                assert abs(float(S[i]) - float(Sref)) < 1e-12
    finally:
        emu.emu_set_optin(227 * 1024)


@built_with_cuda
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), kind=st.sampled_from(testing.KINDS), seed=st.integers(0, 2**32 - 1))
def test_emulated_eigen_kernel_on_adversarial_spectra(emu, n, kind, seed):
    """The CUDA eigen kernel (Householder + multisection, run under the host emulation) on the adversarial
    matrices of the CPU solver's tests: rank-deficient, clustered, 1e-30..1e30, denormal, Wilkinson."""
    a = testing.matrix(np.random.default_rng(seed), n, kind)
    want = np.linalg.eigvalsh(a)[::-1]
    S, ev = _emu_scale(emu, torch.from_numpy(a[None].copy()), n, r=n, want_evals=True)
    scale = max(np.abs(a).max(), np.finfo(float).tiny)
    assert np.isfinite(ev.numpy()).all()
    np.testing.assert_allclose(ev[0].numpy(), want, rtol=0, atol=50 * n * np.finfo(float).eps * scale + 1e-300)
    if n >= 2 and scale > 1e-250:
        Sref, _ = T.entropy_scale(torch.from_numpy(want.copy()), n, 1e-8, "paper")
        assert abs(float(S[0]) - float(Sref)) < 1e-10


# ---------------------------------------------------------------------------------------------------------
# Kernels: need a GPU.
# ---------------------------------------------------------------------------------------------------------

_FLOAT_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _rand(shape, dtype, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3.0 + offset
    return x.to(dtype)


@pytest.mark.cuda
@gpu
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B_=st.integers(1, 2), K=st.integers(1, 3), D=st.integers(1, 20), H=st.integers(1, 12), W=st.integers(1, 12),
       mode=st.sampled_from(list(T.MODES)), dtype=st.sampled_from([torch.float32, torch.float64]),
       center=st.booleans(), offset=st.sampled_from([0.0, 50.0]), seed=st.integers(0, 2**31 - 1))
def test_decoded_matches_svd_reference(B_, K, D, H, W, mode, dtype, center, offset, seed):
    z = _rand((B_, K, D, H, W), dtype, seed, offset)
    S = auvcore.semantic_scale(z.cuda(), mode=mode, center=center, backend="cuda")
    assert S.device.type == "cuda" and S.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _assert_scale_close(S, _reference(z, mode, center=center), atol=_FLOAT_TOL[dtype])


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("shape,mode", [
    ((1, 2, 140, 3, 50), "D_HW"),   # row side, p = 140 > the largest tile: column-mean pre-pass, 2 x 2 tiles
    ((1, 2, 300, 4, 5), "D_HW"),    # column side (m > n): shifted one-pass covariance
    ((2, 3, 40, 9, 70), "W_DH"),    # row side with the rows contiguous (p-fast loads)
    ((1, 1, 520, 600), "D_HW"),     # 2-D, p = 520: eigen solver in global memory
    ((1, 2, 96, 24, 24), "H_DW"),   # p = 24 < n, D folded into columns with stride
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoded_shapes_that_cross_tile_and_memory_limits(shape, mode, dtype):
    z = _rand(shape, dtype, 7, offset=5.0)
    S = auvcore.semantic_scale(z.cuda(), mode=mode, backend="cuda")
    _assert_scale_close(S, auvcore.semantic_scale(z.to(torch.float64), mode=mode, backend="cpp").numpy(),
                        atol=_FLOAT_TOL[dtype])


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decoded_half_inputs_accumulate_in_float32(dtype):
    z = _rand((2, 3, 12, 10, 11), dtype, 1)
    S = auvcore.semantic_scale(z.cuda(), backend="cuda")
    assert S.dtype == torch.float32
    _assert_scale_close(S, _reference(z.to(torch.float64), "D_HW"), atol=1e-4)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoded_non_contiguous_input(dtype):
    base = _rand((3, 4, 14, 22, 18), dtype, 11).cuda()
    z = base.permute(0, 1, 4, 2, 3)[::2, 1:, :, ::2, 1:]  # odd strides, a negative-free view
    assert not z.is_contiguous()
    S = auvcore.semantic_scale(z, mode="H_DW", backend="cuda")
    _assert_scale_close(S, _reference(z.cpu(), "H_DW"), atol=_FLOAT_TOL[dtype])


@pytest.mark.cuda
@gpu
def test_decoded_official_variant_and_nan_handling():
    z = _rand((2, 3, 8, 9, 10), torch.float64, 5)
    z[0, 1, 2, 3, 4] = float("nan")
    z[1, 2, 0, 0, 0] = float("inf")
    zc = z.cuda()
    with pytest.raises(ValueError, match="NaN or Inf"):
        auvcore.semantic_scale(zc, backend="cuda")
    S = auvcore.semantic_scale(zc, nan_to_num=True, backend="cuda")
    _assert_scale_close(S, _reference(z, "D_HW", nan_to_num=True), atol=1e-9)
    So = auvcore.semantic_scale(zc, variant="official", backend="cuda")
    _assert_scale_close(So, _reference(z, "D_HW", variant="official", nan_to_num=True), atol=1e-9)


@pytest.mark.cuda
@gpu
def test_decoded_degenerate_cases():
    z = torch.zeros(1, 2, 6, 7, 8, dtype=torch.float64, device="cuda")
    z[0, 1] = 3.0  # constant map: centred it is all zero
    S = auvcore.semantic_scale(z, backend="cuda")
    assert S.tolist() == [[0.0, 0.0]]
    z1 = torch.randn(1, 2, 1, 7, 8, device="cuda")  # m = 1 -> r = 1 -> NaN
    assert torch.isnan(auvcore.semantic_scale(z1, backend="cuda")).all()


@pytest.mark.cuda
@gpu
def test_gram_and_eigenvalues_match_torch():
    from auvcore import _cuda

    z = _rand((2, 2, 30, 7, 9), torch.float64, 3, offset=20.0).cuda()
    G, ev = _cuda.gram_and_eigenvalues(z, "D_HW")
    M = T.class_matrices(z, "D_HW")
    M = M - M.mean(-2, keepdim=True)
    Gref = M @ M.transpose(-1, -2)
    torch.testing.assert_close(G, Gref, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(ev, torch.linalg.eigvalsh(Gref).flip(-1), rtol=0, atol=1e-10 * float(ev.max()))


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("p", [1, 2, 3, 17, 64, 65, 128, 140, 257, 512, 700])
def test_eigen_kernel_on_random_psd_matrices(p):
    g = torch.Generator().manual_seed(p)
    X = torch.randn(3, p, max(p // 2, 1), generator=g, dtype=torch.float64)
    G = (X @ X.transpose(-1, -2)).cuda()
    want = torch.linalg.eigvalsh(G).flip(-1)
    Gw = G.clone()
    S = torch.empty(3, dtype=torch.float64, device="cuda")
    ev = torch.empty(3, p, dtype=torch.float64, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    B._C.cuda_scale_from_gram(Gw.data_ptr(), 3, p, 0, p, 1e-8, 0, 0, S.data_ptr(), ev.data_ptr(), stream,
                              G.device.index)
    torch.testing.assert_close(ev, want, rtol=0, atol=1e-11 * float(want.abs().max()))
    if p >= 2:
        Sref, _ = T.entropy_scale(want, p, 1e-8, "paper")
        torch.testing.assert_close(S, Sref, rtol=0, atol=1e-10)


def _masked_case(Bn, C, K, shape, dtype, seed, channels_last=False, absent=()):
    g = torch.Generator().manual_seed(seed)
    f = (torch.randn((Bn, C) + shape, generator=g, dtype=torch.float64) * 2.0 + 3.0).to(dtype)
    lab = torch.randint(0, K, (Bn,) + shape, generator=g)
    for b, k in absent:
        lab[b][lab[b] == k] = (k + 1) % K
    if channels_last:
        f = f.movedim(1, -1).contiguous().movedim(-1, 1)
    return f, lab


@pytest.mark.cuda
@gpu
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(Bn=st.integers(1, 2), C=st.integers(1, 70), K=st.integers(1, 5), D=st.integers(1, 9), H=st.integers(1, 9),
       W=st.integers(1, 9), dtype=st.sampled_from([torch.float32, torch.float64]), center=st.booleans(),
       channels_last=st.booleans(), label_dtype=st.sampled_from([torch.int64, torch.int32, torch.uint8]),
       seed=st.integers(0, 2**31 - 1))
def test_masked_matches_cpu(Bn, C, K, D, H, W, dtype, center, channels_last, label_dtype, seed):
    f, lab = _masked_case(Bn, C, K, (D, H, W), dtype, seed, channels_last, absent=[(0, K - 1)] if K > 1 else [])
    lab = lab.to(label_dtype)
    S = auvcore.masked_semantic_scale(f.cuda(), lab.cuda(), K, center=center, backend="cuda")
    want = auvcore.masked_semantic_scale(f.to(torch.float64), lab, K, center=center, backend="cpp")
    _assert_scale_close(S, want.numpy(), atol=_FLOAT_TOL[dtype])


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("C", [130, 256])
def test_masked_wide_features_and_large_classes(C):
    f, lab = _masked_case(1, C, 4, (16, 16, 12), torch.float32, 2)
    lab[0, :2] = 3  # one class of many voxels, spanning several chunks
    S = auvcore.masked_semantic_scale(f.cuda(), lab.cuda(), 4, backend="cuda")
    want = auvcore.masked_semantic_scale(f.to(torch.float64), lab, 4, backend="cpp")
    _assert_scale_close(S, want.numpy(), atol=1e-4)


@pytest.mark.cuda
@gpu
def test_masked_errors():
    f, lab = _masked_case(1, 4, 3, (4, 5, 6), torch.float32, 0)
    bad = lab.clone()
    bad[0, 1, 1, 1] = 7
    with pytest.raises(ValueError, match="outside 0..2"):
        auvcore.masked_semantic_scale(f.cuda(), bad.cuda(), 3, backend="cuda")
    fn = f.clone()
    fn[0, 2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        auvcore.masked_semantic_scale(fn.cuda(), lab.cuda(), 3, backend="cuda")
    S = auvcore.masked_semantic_scale(fn.cuda(), lab.cuda(), 3, nan_to_num=True, backend="cuda")
    want = auvcore.masked_semantic_scale(fn.double(), lab, 3, nan_to_num=True, backend="cpp")
    _assert_scale_close(S, want.numpy(), atol=1e-4)


@pytest.mark.cuda
@gpu
def test_non_default_stream():
    z = _rand((2, 3, 24, 20, 20), torch.float32, 9).cuda()
    want = auvcore.semantic_scale(z, backend="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # queue more work than one call, then compare after the stream's own sync
            got = auvcore.semantic_scale(z, backend="cuda")
    s.synchronize()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.cuda
@gpu
def test_cupy_input():
    cupy = pytest.importorskip("cupy")
    z = _rand((2, 3, 10, 11, 12), torch.float32, 4)
    zc = cupy.asarray(z.numpy())
    S = auvcore.semantic_scale(zc, backend="cuda")
    _assert_scale_close(S, _reference(z, "D_HW"), atol=1e-4)
    from auvcore import _cuda

    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        S2 = _cuda.semantic_scale(zc)
    s.synchronize()
    _assert_scale_close(S2, _reference(z, "D_HW"), atol=1e-4)


@pytest.mark.cuda
@gpu
def test_auto_uses_cuda_for_cuda_tensors():
    z = torch.randn(1, 2, 5, 6, 7, device="cuda")
    supported = B._C.cuda_device_supported(z.device.index)
    assert supported == (torch.cuda.get_device_capability(z.device) >= (8, 0))
    assert B.resolve("auto", z) == ("cuda" if supported else "torch")
