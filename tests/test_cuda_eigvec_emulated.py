"""The CUDA eigenpairs kernel (csrc/cuda/eigvec_cuda.cu: batched parallel Jacobi, the eigenvectors of the
backward of S) under the host emulation (csrc/cuda/emu), against LAPACK (numpy.linalg.eigh, float64): the
spectrum, orthonormality, the reconstruction, spectral functions U f(Λ) Uᵀ (which do not depend on the basis
chosen inside a repeated eigenvalue), and the full backward of S fed with these eigenpairs against the C++
backward. Every CUDA thread is a std::thread here, so sizes stay small but for one run at the largest p.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from auvcore import _backend as B
from auvcore import _torch_impl as T
from auvcore import testing

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cuda_common import (  # noqa: E402
    EMU_DT, _rand, as_if_on_gpu, built_with_cuda, check_rc, emu_backward, emu_library, fake_buffer, gpu, i64, no_driver,
    ptr,
)

pytestmark = built_with_cuda

_MAX_P = 256  # kMaxEigenpairsSize (csrc/include/auvcore/scale_cuda.h)
_OPTIN = 227 * 1024  # the emulated device's shared-memory opt-in limit, as an H100/H200's
_EPS = np.finfo(float).eps
_SLOW_SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    lib = emu_library(tmp_path_factory)
    yield lib
    lib.emu_set_optin(_OPTIN)


def eigenpairs(lib, G):
    """(evals [count, p] descending, evecs [count, p, p] as rows) from the emulated kernel; G is not changed."""
    G = torch.as_tensor(G, dtype=torch.float64).contiguous()
    count, p = G.shape[0], G.shape[-1]
    before = G.clone()
    w = torch.full((count, p), float("nan"), dtype=torch.float64)  # every entry must be written
    V = torch.full((count, p, p), float("nan"), dtype=torch.float64)
    err = ctypes.create_string_buffer(512)
    check_rc(lib.emu_gram_eigenpairs(ptr(G), ctypes.c_int64(count), ctypes.c_int64(p), ptr(w), ptr(V), err, 512),
             err)
    assert np.array_equal(G.numpy(), before.numpy(), equal_nan=True)  # G is read only
    return w.numpy(), V.numpy()


def check_eigenpairs(a, w, V, tol=50.0):
    """One matrix a against LAPACK: spectrum, orthonormal rows, a = Vᵀ diag(w) V, and f(a) for a smooth f."""
    n = a.shape[0]
    scale = max(np.abs(a).max(), np.finfo(float).tiny)
    bound = tol * n * _EPS * scale
    want = np.linalg.eigvalsh(a)[::-1]
    assert np.all(w[:-1] >= w[1:]), "eigenvalues not in descending order"
    np.testing.assert_allclose(w, want, rtol=0, atol=bound + 1e-300)
    assert np.abs(V @ V.T - np.eye(n)).max() <= tol * n * _EPS
    # in units of max|a|: near DBL_MAX the unscaled product Vᵀ diag(w) V overflows in numpy, not in the kernel
    assert np.abs((V.T * (w / scale)) @ V - a / scale).max() <= tol * n * _EPS + 1e-300
    # A spectral function: the same whatever basis a repeated or clustered eigenvalue got.
    lam, U = np.linalg.eigh(a)
    f = lambda x: np.exp(-2.0 * x / scale)  # noqa: E731
    ref = (U * f(lam)) @ U.T
    got = (V.T * f(w)) @ V
    assert np.abs(got - ref).max() <= 4 * tol * n * _EPS * f(lam).max()


@settings(parent=_SLOW_SETTINGS, max_examples=40)
@given(n=st.integers(1, 12), kind=st.sampled_from(testing.KINDS), seed=st.integers(0, 2**32 - 1))
def test_eigenpairs_match_lapack_on_adversarial_matrices(emu, n, kind, seed):
    """Rank-deficient, clustered (to 1e-14 relative), repeated, equal, 1e-30..1e30, denormal, huge, indefinite,
    Wilkinson, diagonal and all-zero matrices of sizes 1..12 (odd ones padded inside the kernel)."""
    a = testing.matrix(np.random.default_rng(seed), n, kind)
    w, V = eigenpairs(emu, a[None])
    assert np.isfinite(w).all() and np.isfinite(V).all()
    check_eigenpairs(a, w[0], V[0])


@settings(parent=_SLOW_SETTINGS, max_examples=8)
@given(p=st.integers(2, 24), samples=st.integers(1, 30), offset=st.sampled_from([0.0, 1e3]),
       center=st.booleans(), log_scale=st.sampled_from([-150, 0, 150]), seed=st.integers(0, 2**32 - 1))
@example(p=6, samples=4, offset=1e3, center=False, log_scale=150, seed=0)  # entries near 1e307: squares overflow
@example(p=7, samples=9, offset=0.0, center=True, log_scale=-150, seed=1)  # near 1e-300: products underflow
def test_eigenpairs_of_gram_matrices(emu, p, samples, offset, center, log_scale, seed):
    """Grams as the forward builds them: centred (a zero eigenvalue), fewer samples than rows (rank-deficient),
    an offset (one dominant eigenvalue), tiny and huge units; two per launch."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((2, p, samples)) + offset) * 10.0 ** log_scale
    if center:
        x = x - x.mean(axis=1, keepdims=True)
    G = x @ x.transpose(0, 2, 1)
    # the largest eigenvalue (≈ the trace with an offset) must itself be a double: else inf is the right answer
    hypothesis.assume(np.isfinite(np.einsum("bii->b", G)).all())
    w, V = eigenpairs(emu, G)
    for i in range(2):
        check_eigenpairs(G[i], w[i], V[i])


@pytest.mark.parametrize("p", [1, 2, 3, 5, 33])
def test_eigenpairs_batch_sizes_and_separated_vectors(emu, p):
    """Several matrices per launch, odd sizes; with well separated eigenvalues each vector matches LAPACK's up
    to its sign; two runs give the same bits."""
    rng = np.random.default_rng(p)
    lam = np.linspace(1.0, 2.0 * p, p) * rng.choice([-1.0, 1.0], size=p)
    Q = [testing.haar_orthogonal(rng, p) for _ in range(3)]
    G = np.stack([(q * lam) @ q.T for q in Q])
    G = (G + G.transpose(0, 2, 1)) / 2
    w, V = eigenpairs(emu, G)
    for i in range(3):
        check_eigenpairs(G[i], w[i], V[i])
        lam_ref, U = np.linalg.eigh(G[i])
        dots = np.abs(np.einsum("ji,ji->j", V[i], U[:, ::-1].T))
        np.testing.assert_allclose(dots, 1.0, rtol=0, atol=1e-12)
    w2, V2 = eigenpairs(emu, G)
    assert np.array_equal(w, w2) and np.array_equal(V, V2)


@pytest.mark.parametrize("optin,what", [(6 * 1024, "A in shared memory, V in the global scratch"),
                                        (1024, "A and V in the global scratch")])
def test_eigenpairs_global_scratch_paths(emu, optin, what):
    """p = 17 with the opt-in limit lowered: the other two placements of the kernel's working set, 10 matrices
    on a grid of 8 blocks (2 per emulated SM), so blocks reuse their scratch slot."""
    emu.emu_set_optin(optin)
    try:
        rng = np.random.default_rng(optin)
        G = np.stack([testing.matrix(rng, 17, kind) for kind in ("gram", "repeated", "cluster", "zeros", "random",
                                                                  "zero", "range", "wilkinson", "equal", "rank1")])
        w, V = eigenpairs(emu, G)
    finally:
        emu.emu_set_optin(_OPTIN)
    for i in range(len(G)):
        check_eigenpairs(G[i], w[i], V[i])


def _permuted_blocks(rng, p):
    """A p x p matrix that is block-diagonal (blocks of 1..4, a few repeated eigenvalues) under a random
    permutation: it rotates index pairs all over the matrix yet converges in a few sweeps."""
    a = np.zeros((p, p))
    i = 0
    while i < p:
        b = min(int(rng.integers(1, 5)), p - i)
        x = rng.standard_normal((b, b))
        a[i:i + b, i:i + b] = x @ x.T if rng.random() < 0.8 else np.eye(b)
        i += b
    perm = rng.permutation(p)
    return a[np.ix_(perm, perm)]


@pytest.mark.slow
def test_eigenpairs_at_the_largest_size(emu):
    """p = 256 (kMaxEigenpairsSize), where on this emulated H100 neither A nor V fits in shared memory."""
    a = _permuted_blocks(np.random.default_rng(0), _MAX_P)
    w, V = eigenpairs(emu, a[None])
    check_eigenpairs(a, w[0], V[0])


@pytest.mark.slow
def test_eigenpairs_of_a_dense_decoded_size_gram(emu):
    """p = 96 (a 96³ decoded map's Gram), dense and centred, in shared memory: the size DUOLoss trains at."""
    x = np.random.default_rng(1).standard_normal((96, 300)) + 3.0
    x -= x.mean(axis=0, keepdims=True)
    a = x @ x.T
    w, V = eigenpairs(emu, a[None])
    check_eigenpairs(a, w[0], V[0])


def test_eigenpairs_errors_and_non_finite(emu):
    for p in (0, _MAX_P + 1):
        with pytest.raises(ValueError, match=rf"p: expected 1..{_MAX_P} for the CUDA eigenpairs kernel, got {p}"):
            eigenpairs(emu, np.zeros((1, p, p)))
    w, V = eigenpairs(emu, np.zeros((0, 4, 4)))
    assert w.shape == (0, 4) and V.shape == (0, 4, 4)
    G = np.stack([np.eye(3), np.eye(3), np.eye(3)])
    G[1, 0, 2] = G[1, 2, 0] = np.nan
    G[2, 1, 1] = np.inf
    w, V = eigenpairs(emu, G)
    assert np.isnan(w[1:]).all() and np.isnan(V[1:]).all()
    check_eigenpairs(G[0], w[0], V[0])


# ---- the full backward of S fed with these eigenpairs ----------------------------------------------------------

def _emu_decoded_gram(lib, z, mode, center, nan_to_num):
    Bn, K = z.shape[:2]
    m, n = T.class_shape(z, mode)
    p = min(m, n)
    G = torch.full((Bn * K, p, p), float("nan"), dtype=torch.float64)
    flags = torch.zeros(Bn * K, dtype=torch.int32)
    err = ctypes.create_string_buffer(512)
    check_rc(lib.emu_decoded_gram(ptr(z), EMU_DT[z.dtype], z.dim(), i64(z.shape), i64(z.stride()), T.LAYOUTS[mode],
                                  int(center), int(nan_to_num), ptr(G), ptr(flags), err, 512), err)
    return G


def _exact_eigenpairs(G):
    """Eigenpairs of each float64 Gram to 40 digits, rounded once: the oracle's own eigensolver must not add
    error. LAPACK's does on ill-conditioned maps: the official variant divides by σ (v = Mᵀu / σ), so on an
    8 x 8 map with σ_min / σ_max = 1.5e-3 LAPACK's eigenpairs move the gradient by 2e-11 of its size against
    these, where the kernel's move it by 1e-11 (hypothesis found two such maps)."""
    mpmath = pytest.importorskip("mpmath")
    ev, vt = [], []
    with mpmath.workdps(40):
        for g in G.numpy():
            E, Q = mpmath.eigsy(mpmath.matrix(g.tolist()))
            order = sorted(range(len(g)), key=lambda i: -E[i])
            ev.append([float(E[i]) for i in order])
            vt.append([[float(Q[r, i]) for r in range(len(g))] for i in order])
    return (torch.tensor(ev, dtype=torch.float64).reshape(G.shape[:2]),
            torch.tensor(vt, dtype=torch.float64).reshape(G.shape))


@settings(parent=_SLOW_SETTINGS, max_examples=12)
@given(K=st.integers(1, 2), D=st.integers(1, 10), H=st.integers(1, 5), W=st.integers(1, 5),
       mode=st.sampled_from(list(T.LAYOUTS)), dtype=st.sampled_from([torch.float32, torch.float64]),
       center=st.booleans(), variant=st.sampled_from(["paper", "official"]), offset=st.sampled_from([0.0, 30.0]),
       seed=st.integers(0, 2**31 - 1))
# the two 8 x 8 maps (σ_min / σ_max ~ 1.5e-3) on which LAPACK's eigenpairs, not the kernel's, missed the bound
@example(K=1, D=8, H=2, W=4, mode="D_HW", dtype=torch.float64, center=False, variant="official", offset=0.0, seed=8)
@example(K=1, D=8, H=2, W=4, mode="D_HW", dtype=torch.float64, center=False, variant="official", offset=30.0, seed=24)
def test_cuda_backward_with_kernel_eigenpairs_matches_the_cpp_backward(emu, K, D, H, W, mode, dtype, center,
                                                                         variant, offset, seed):
    """The CUDA path of the backward end to end under the emulation: the decoded Gram kernel, this eigenpairs
    kernel, the backward kernels. Against the C++ backward fed with the exact eigenpairs of the same Gram (any
    dtype: a float32 map's Gram is accumulated in float32 on the GPU, so another Gram would move ill-conditioned
    gradients by more than the solver does), and in float64 against the C++ forward + backward throughout."""
    from auvcore import _cpu

    z = _rand((1, K, D, H, W), dtype, seed, offset)
    nan_to_num = variant == "official"
    if variant == "official":
        center = False
    grad_S = torch.randn(K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    G = _emu_decoded_gram(emu, z, mode, center, nan_to_num)
    w, V = eigenpairs(emu, G)
    dz_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    got = emu_backward(emu, z, mode, center, 1e-8, variant, torch.from_numpy(w), torch.from_numpy(V), grad_S,
                        dz_dtype).double()
    assert torch.isfinite(got).all()

    ev, vt = _exact_eigenpairs(G)
    want = _cpu.scale_backward(z, mode, center, 1e-8, variant, nan_to_num, 1, ev, vt, grad_S).double()
    # S is scale-free, so dS/dz is of order |grad_S| / ‖z_k‖: the rounding floor of a gradient that cancels
    # (an offset map's one dominant direction) is relative to that, not to the small result
    znorm = float(z.double().nan_to_num().flatten(2).norm(dim=2).clamp_min(1e-300).min())
    floor = float(grad_S.abs().max()) / znorm
    scale = max(float(want.abs().max()), floor) or 1.0
    tol = 1e-11 if dtype == torch.float64 else 2e-6  # float32: the rounding of dz itself
    assert float((got - want).abs().max()) <= tol * scale
    if dtype == torch.float64:
        # the C++ path end to end, with its own eigensolver: it may differ from the kernel's by its own distance
        # from the exact-eigenpair result (2e-11 of the gradient's size on the ill-conditioned examples above)
        _, ev, vt = _cpu.semantic_scale(z, mode, center, 1e-8, variant, nan_to_num, 1, eigenpairs=True)
        cpu = _cpu.scale_backward(z, mode, center, 1e-8, variant, nan_to_num, 1, ev, vt, grad_S).double()
        own = float((cpu - want).abs().max())
        assert float((got - cpu).abs().max()) <= 1e-11 * scale + own


def test_cuda_backward_with_kernel_eigenpairs_matches_torch_autograd(emu):
    """An independent oracle in float64: autograd through the pure-torch S, on rank-3 maps of 12 rows and 20
    samples, whose centred 12 x 12 Grams have 9 zero eigenvalues (a cluster the eigenvectors must only span)."""
    g = torch.Generator().manual_seed(4)
    z = (torch.randn(2, 12, 3, generator=g, dtype=torch.float64) @ torch.randn(2, 3, 20, generator=g,
                                                                              dtype=torch.float64) + 5.0)
    z = z.view(1, 2, 12, 4, 5)
    zt = z.clone().requires_grad_(True)
    T.semantic_scale(zt, "D_HW", True, 1e-8, "paper", False).sum().backward()
    G = _emu_decoded_gram(emu, z, "D_HW", True, False)
    w, V = eigenpairs(emu, G)
    assert (np.abs(w[:, 3:]) < 1e-12 * np.abs(w[:, :1])).all() and (w[:, 2] > 1e-3 * w[:, 0]).all()
    got = emu_backward(emu, z, "D_HW", True, 1e-8, "paper", torch.from_numpy(w), torch.from_numpy(V),
                        torch.ones(2, dtype=torch.float64), torch.float64)
    torch.testing.assert_close(got, zt.grad, rtol=1e-8, atol=1e-10 * float(zt.grad.abs().max()))


# ---- the binding and the Python side (no GPU needed) ------------------------------------------------------------

def test_binding_checks_every_buffer_before_the_device():
    assert B._C.cuda_max_eigenpairs_size == _MAX_P
    args = {"G": fake_buffer((3, 4, 4)), "evals": fake_buffer((3, 4)), "evecs": fake_buffer((3, 4, 4)), "stream": 0}
    for name, bad in (("G", fake_buffer((3, 4, 5))), ("G", fake_buffer((3, 4, 4), torch.float32)),
                      ("evals", fake_buffer((3, 5))), ("evecs", fake_buffer((2, 4, 4))),
                      ("evecs", fake_buffer((3, 4, 4), strides=[16, 1, 4])), ("evals", fake_buffer((3, 4), device=2))):
        with pytest.raises(ValueError, match=f"^{name}: "):
            B._C.cuda_gram_eigenpairs(**{**args, name: bad})
    with pytest.raises(ValueError, match="G: expected CUDA device memory, got host memory"):
        B._C.cuda_gram_eigenpairs(B.view(torch.eye(4, dtype=torch.float64)[None]), args["evals"], args["evecs"], 0)
    big = _MAX_P + 1
    with pytest.raises(ValueError, match=f"p: expected 1..{_MAX_P} for the CUDA eigenpairs kernel, got {big}"):
        B._C.cuda_gram_eigenpairs(fake_buffer((1, big, big)), fake_buffer((1, big)), fake_buffer((1, big, big)), 0)


@no_driver
def test_binding_without_a_device_raises_runtime_error():
    G = torch.eye(4, dtype=torch.float64)[None]
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        B._C.cuda_gram_eigenpairs(as_if_on_gpu(G), fake_buffer((1, 4)), fake_buffer((1, 4, 4)), 0)


def test_python_falls_back_to_torch_eigh_above_the_kernel_limit():
    """Above 256 ``_cuda.gram_eigenpairs`` hands the matrices to torch.linalg.eigh, in the kernel's layout
    (descending, eigenvectors as rows); run here on CPU tensors, which that branch accepts as well."""
    from auvcore import _cuda

    rng = np.random.default_rng(3)
    a = testing.matrix(rng, _MAX_P + 1, "gram", haar=False)
    w, V = _cuda.gram_eigenpairs(torch.from_numpy(a[None].copy()), 0)
    assert V.is_contiguous() and w.is_contiguous()
    check_eigenpairs(a, w[0].numpy(), V[0].numpy())


# ---- on a GPU (skips without one) -------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("p", [1, 2, 7, 96, 128, 140, 256])
def test_eigenpairs_on_the_gpu_match_lapack_and_are_bit_identical(p):
    """All three placements of the working set on a real device (140: V in global memory on an H100/H200; 256:
    A as well), a batch of centred rank-deficient Grams, two runs bit for bit, no host synchronisation inside
    (checked by capturing the call in a CUDA graph)."""
    from auvcore import _cuda

    rng = np.random.default_rng(p)
    x = rng.standard_normal((6, p, max(p // 2, 1))) + 2.0
    x -= x.mean(axis=1, keepdims=True)
    G = torch.from_numpy(x @ x.transpose(0, 2, 1)).cuda()
    s = torch.cuda.current_stream().cuda_stream
    w1, V1 = _cuda.gram_eigenpairs(G, s)
    w2, V2 = _cuda.gram_eigenpairs(G, s)
    assert torch.equal(w1, w2) and torch.equal(V1, V2)
    for i in range(len(G)):
        check_eigenpairs(G[i].cpu().numpy(), w1[i].cpu().numpy(), V1[i].cpu().numpy())
    if p <= 128:  # shared-memory placement: no workspace, so the launch is capturable as it stands
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            w3, V3 = _cuda.gram_eigenpairs(G, torch.cuda.current_stream().cuda_stream)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(w3, w1) and torch.equal(V3, V1)
