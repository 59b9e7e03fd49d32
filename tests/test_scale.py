"""The semantic perception scale against the float64 SVD oracle (SPEC §2), its invariances, its degenerate
cases and its errors, for every backend on the CPU."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import auvcore
from auvcore import _torch_impl as T
from auvcore.testing import svd_reference

BACKENDS = ["cpp", "torch"]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def oracle_decoded(z, mode, center=True, eps=1e-8, variant="paper"):
    M = T.class_matrices(z.detach().double(), mode)
    return np.array([[svd_reference(M[b, k].numpy(), center, eps, variant) for k in range(M.shape[1])]
                     for b in range(M.shape[0])])


def oracle_masked(f, lab, K, center=True, eps=1e-8):
    B, C = f.shape[:2]
    F = f.double().reshape(B, C, -1)
    L = lab.reshape(B, -1)
    out = np.full((B, K), np.nan)
    for b in range(B):
        for k in range(K):
            X = F[b][:, L[b] == k].T.numpy()
            if X.shape[0] >= 2:
                out[b, k] = svd_reference(X, center, eps)
    return out


def assert_close(S, ref, tol):
    S = np.asarray(S, dtype=np.float64)
    assert S.shape == ref.shape
    assert np.array_equal(np.isnan(S), np.isnan(ref)), (S, ref)
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(S[ok], ref[ok], rtol=0, atol=tol)


def random_maps(seed, shape, dtype, kind):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "offset":  # large common offset: centering must not cancel catastrophically
        z = z * 0.5 + 40.0
    elif kind == "lowrank":  # rank-2 class matrices along the D axis
        a = torch.randn(shape[:3] + (1, 1), generator=g, dtype=torch.float64)
        b = torch.randn(shape[:3] + (1, 1), generator=g, dtype=torch.float64)
        u = torch.randn(shape[:2] + (1,) + shape[3:], generator=g, dtype=torch.float64)
        v = torch.randn(shape[:2] + (1,) + shape[3:], generator=g, dtype=torch.float64)
        z = a * u + b * v
    elif kind == "illcond":  # geometric decay of the row scales: a condition number near 1e6
        z = z * torch.logspace(0, -6, shape[2], dtype=torch.float64).view(1, 1, -1, 1, 1)
    return z.to(dtype)


dims = st.integers(1, 7)


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), K=st.integers(1, 3), D=dims, H=dims, W=dims,
       mode=st.sampled_from(["D_HW", "H_DW", "W_DH"]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
       center=st.booleans(), kind=st.sampled_from(["plain", "offset", "lowrank", "illcond"]))
def test_decoded_matches_svd_oracle(backend, seed, B, K, D, H, W, mode, dtype, center, kind):
    z = random_maps(seed, (B, K, D, H, W), dtype, kind)
    S = auvcore.semantic_scale(z, layout=mode, center=center, backend=backend)
    assert S.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(S, oracle_decoded(z, mode, center), TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=st.integers(0, 2**31 - 1), H=st.integers(1, 40), W=st.integers(1, 40),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_2d_maps_and_official_variant(backend, seed, H, W, dtype):
    z = random_maps(seed, (2, 2, H, W), dtype, "plain")
    z[0, 1, 0, 0] = float("nan")  # the official preset reads non-finite values as 0
    S = auvcore.semantic_scale(z, variant="official", backend=backend)
    assert_close(S, oracle_decoded(torch.nan_to_num(z, nan=0.0), "D_HW", variant="official"), TOL[dtype])


def test_official_variant_reproduces_the_authors_snippet():
    """The published snippet: per class, reshape to (D, H*W), nan_to_num, SVD, (σ+1e-6)/Σ, entropy / log r."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 3, 5, 4, 6, generator=g, dtype=torch.float64) * 2 + 1
    want = np.zeros((2, 3))
    for b in range(2):
        for k in range(3):
            M = torch.nan_to_num(z[b, k].reshape(5, -1))
            s = torch.linalg.svd(M, full_matrices=False).S + 1e-6
            p = s / s.sum()
            want[b, k] = float(-(p * torch.log(p)).sum() / np.log(min(M.shape)))
    assert_close(auvcore.semantic_scale(z, variant="official"), want, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=st.integers(0, 2**31 - 1), C=st.integers(1, 24), K=st.integers(1, 4),
       shape=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]), center=st.booleans(),
       offset=st.sampled_from([0.0, 30.0]))
def test_masked_matches_svd_oracle(backend, seed, C, K, shape, dtype, center, offset):
    g = torch.Generator().manual_seed(seed)
    f = (torch.randn((2, C) + shape, generator=g, dtype=torch.float64) + offset).to(dtype)
    lab = torch.randint(0, K, (2,) + shape, generator=g)
    S = auvcore.masked_semantic_scale(f, lab, K, center=center, backend=backend)
    assert_close(S, oracle_masked(f, lab, K, center), TOL[dtype])


def test_large_classes_split_across_threads_agree():
    """A class much larger than the others is split into pieces summed afterwards: same S as one thread."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(1, 20, 40, 40, 12, generator=g) + 2
    lab = (torch.rand(1, 40, 40, 12, generator=g) < 0.05).long()  # class 0 holds 95% of the voxels
    one = auvcore.masked_semantic_scale(f, lab, 2, num_threads=1)
    many = auvcore.masked_semantic_scale(f, lab, 2, num_threads=4)
    assert_close(many, oracle_masked(f, lab, 2), 2e-5)
    assert_close(one, many.numpy().astype(np.float64), 1e-6)


# ---- invariances -------------------------------------------------------------------------------------

def _S(M, **kw):
    return float(auvcore.semantic_scale(M[None, None], **kw)[0, 0])


@given(seed=st.integers(0, 2**31 - 1), m=st.integers(2, 12), n=st.integers(2, 30))
def test_invariances(seed, m, n):
    rng = np.random.default_rng(seed)
    M = torch.from_numpy(rng.standard_normal((m, n)) * rng.uniform(0.1, 10, size=(1, n)))
    base = _S(M)
    assert abs(_S(M[torch.from_numpy(rng.permutation(m))]) - base) < 1e-10  # rows
    assert abs(_S(M[:, torch.from_numpy(rng.permutation(n))]) - base) < 1e-10  # columns
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    assert abs(_S(M @ torch.from_numpy(Q)) - base) < 1e-9  # orthogonal transform of the columns
    assert abs(_S(M * 7.5, eps=0.0) - _S(M, eps=0.0)) < 1e-10  # positive scale


# ---- degenerate cases (SPEC §2.5) --------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_cases(backend):
    z = torch.randn(1, 3, 1, 4, 4, dtype=torch.float64)  # D = 1 -> r = 1 -> NaN
    assert torch.isnan(auvcore.semantic_scale(z, backend=backend)).all()
    z = torch.randn(1, 2, 5, 4, 4, dtype=torch.float64)
    z[0, 1] = z[0, 1, :1]  # every row the same: the centred matrix is zero -> S = 0
    S = auvcore.semantic_scale(z, backend=backend)
    assert abs(float(S[0, 1])) < 1e-12 and 0 < S[0, 0] <= 1  # zero up to the rounding of the mean
    z = torch.zeros(1, 1, 4, 3, 3)
    assert auvcore.semantic_scale(z, center=False, backend=backend)[0, 0] == 0.0
    f = torch.randn(1, 6, 4, 4, 4)
    lab = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    lab[0, 0, 0, 0] = 1  # class 1: one voxel; class 2 absent
    S = auvcore.masked_semantic_scale(f, lab, 3, backend=backend)
    assert not torch.isnan(S[0, 0]) and torch.isnan(S[0, 1]) and torch.isnan(S[0, 2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_values(backend):
    z = torch.randn(1, 2, 4, 5, 5)
    z[0, 1, 2, 2, 2] = float("inf")
    with pytest.raises(ValueError, match="z contains NaN or Inf"):
        auvcore.semantic_scale(z, backend=backend)
    S = auvcore.semantic_scale(z, nan_to_num=True, backend=backend)
    assert_close(S, oracle_decoded(torch.nan_to_num(z, posinf=0.0), "D_HW"), 2e-5)
    f = torch.randn(1, 3, 4, 4)
    f[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="features contains NaN"):
        auvcore.masked_semantic_scale(f, torch.zeros(1, 4, 4, dtype=torch.long), 1, backend=backend)


# ---- kinds of input ----------------------------------------------------------------------------------

def test_numpy_in_numpy_out_and_strided_views():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((2, 3, 6, 8, 5))
    S = auvcore.semantic_scale(z)
    assert isinstance(S, np.ndarray) and S.dtype == np.float64
    assert_close(S, oracle_decoded(torch.from_numpy(z), "D_HW"), 1e-10)
    # non-contiguous views are read in place, with their strides (numpy negative strides included)
    zt = torch.from_numpy(z)
    for view in (zt.transpose(3, 4).contiguous().transpose(3, 4), zt[:, ::2], zt[..., 1:7, :]):
        assert_close(auvcore.semantic_scale(view), oracle_decoded(view, "D_HW"), 1e-10)
    assert_close(auvcore.semantic_scale(z[:, :, ::-1]), oracle_decoded(torch.from_numpy(z[:, :, ::-1].copy()), "D_HW"), 1e-10)
    f = torch.randn(2, 8, 6, 6).transpose(2, 3)
    lab = torch.randint(0, 3, (2, 6, 6), dtype=torch.int32).transpose(1, 2)
    assert_close(auvcore.masked_semantic_scale(f, lab, 3), oracle_masked(f, lab, 3), 2e-5)
    assert_close(auvcore.masked_semantic_scale(f.numpy(), lab.numpy().astype(np.uint8), 3), oracle_masked(f, lab, 3), 2e-5)


def test_energy_spectrum():
    z = torch.randn(2, 3, 6, 5, 5, dtype=torch.float64)
    p = auvcore.energy_spectrum(z)
    assert p.shape == (2, 3, 6)
    assert torch.all(p[..., :-1] >= p[..., 1:])  # sorted descending
    np.testing.assert_allclose(p.sum(-1).numpy(), 1.0, atol=1e-7)
    ps = auvcore.energy_spectrum(z, backend="torch")
    np.testing.assert_allclose(p.numpy(), ps.numpy(), atol=1e-12)
    S = -torch.special.xlogy(p, p).sum(-1) / np.log(6)
    np.testing.assert_allclose(S.numpy(), auvcore.semantic_scale(z).numpy(), atol=1e-12)
    f = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    lab = torch.zeros(1, 5, 5, dtype=torch.long)
    lab[0, :, :1] = 1  # 5 voxels -> r = 4 = C
    lab[0, 0, 1] = 2  # 1 voxel -> NaN
    pm = auvcore.energy_spectrum(f, labels=lab, num_classes=3)
    assert pm.shape == (1, 3, 4) and torch.isnan(pm[0, 2]).all()
    np.testing.assert_allclose(pm[0, :2].sum(-1).numpy(), 1.0, atol=1e-7)


# ---- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, err, msg", [
    (lambda: auvcore.semantic_scale(torch.randn(3, 4, 5)), ValueError, r"z: expected decoded maps"),
    (lambda: auvcore.semantic_scale(torch.randint(0, 3, (1, 2, 3, 4, 5))), TypeError, r"z: expected float"),
    (lambda: auvcore.semantic_scale(torch.randn(1, 0, 3, 4, 5)), ValueError, r"z: empty"),
    (lambda: auvcore.semantic_scale(torch.randn(1, 2, 3, 4, 5), mode="HW"), ValueError, r"mode: expected"),
    (lambda: auvcore.semantic_scale(torch.randn(1, 2, 3, 4, 5), variant="x"), ValueError, r"variant: expected"),
    (lambda: auvcore.semantic_scale(torch.randn(1, 2, 3, 4, 5), eps=-1.0), ValueError, r"eps: expected"),
    (lambda: auvcore.semantic_scale(torch.randn(1, 2, 3, 4, 5), backend="gpu"), ValueError, r"backend: expected"),
    (lambda: auvcore.semantic_scale(torch.randn(1, 2, 3, 4, 5), num_threads=0), ValueError, r"num_threads"),
    (lambda: auvcore.semantic_scale([[1.0]]), TypeError, r"z: expected a torch.Tensor or numpy.ndarray"),
    (lambda: auvcore.masked_semantic_scale(torch.randn(1, 4, 5, 5), torch.zeros(1, 5, 6, dtype=torch.long), 2),
     ValueError, r"labels: expected shape"),
    (lambda: auvcore.masked_semantic_scale(torch.randn(1, 4, 5, 5), torch.zeros(1, 5, 5), 2), TypeError,
     r"labels: expected an integer dtype"),
    (lambda: auvcore.masked_semantic_scale(torch.randn(1, 4, 5, 5), torch.full((1, 5, 5), 2), 2), ValueError,
     r"labels: value 2 .* outside 0..1"),
    (lambda: auvcore.masked_semantic_scale(torch.randn(1, 4, 5, 5), torch.full((1, 5, 5), -1), 2), ValueError,
     r"labels: value -1"),
    (lambda: auvcore.masked_semantic_scale(torch.randn(1, 4, 5, 5), torch.zeros(1, 5, 5, dtype=torch.long), 0),
     ValueError, r"num_classes: expected"),
    (lambda: auvcore.masked_semantic_scale(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), 2), ValueError,
     r"features: expected \[B, C, \*spatial\]"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_argument(call, err, msg, backend, monkeypatch):
    import auvcore._backend as B

    real = B.resolve
    monkeypatch.setattr(B, "resolve", lambda be, t: real(backend if be == "auto" else be, t))
    with pytest.raises(err, match=msg):
        call()


def test_native_ops_check_every_buffer_before_writing():
    """The boundary cannot corrupt memory: a buffer of the wrong size, dtype or layout is an error naming it."""
    from auvcore import _backend as B

    z = torch.randn(2, 3, 4, 5, 6)
    good = torch.empty(6, 4, 4, dtype=torch.float64)
    B._C.decoded_gram(B.view(z), 0, True, False, B.view(good), 1, False)
    for bad, msg in ((torch.empty(5, 4, 4, dtype=torch.float64), r"G: expected shape \[6, 4, 4\], got \[5, 4, 4\]"),
                     (torch.empty(6, 4, 4, dtype=torch.float32), "G: wrong dtype"),
                     (torch.empty(6, 4, 8, dtype=torch.float64)[..., ::2], "G: expected a contiguous buffer"),
                     (None, "G: this buffer is required")):
        with pytest.raises(ValueError, match=msg):
            B._C.decoded_gram(B.view(z), 0, True, False, B.view(bad), 1, False)
    f, lab = torch.randn(1, 5, 3, 3), torch.zeros(1, 3, 3, dtype=torch.int64)
    S, cnt = torch.empty(2, dtype=torch.float64), torch.empty(2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"spectrum: expected shape \[2, 5\]"):
        B._C.masked_scale(B.view(f), B.view(lab), 2, True, False, 1e-8, B.view(S), B.view(cnt),
                          B.view(torch.empty(2, 4, dtype=torch.float64)), 1)
    with pytest.raises(ValueError, match=r"r: expected shape \[6\]"):
        B._C.scale_from_gram(B.view(good), B.view(torch.full((5,), 4)), 1e-8, 0, B.view(torch.empty(6, dtype=torch.float64)),
                             B.view(None), B.view(None), B.view(None), 1)


def test_renamed_arguments_still_work_with_a_deprecation_warning():
    """`layout` (was `mode`) and DUOLoss's `variant` (was `preset`): the old names keep working, warn, and
    errors name the argument the caller used; passing both names is an error."""
    z = torch.randn(1, 2, 3, 4, 5, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="mode= is deprecated"):
        S = auvcore.semantic_scale(z, mode="H_DW")
    torch.testing.assert_close(S, auvcore.semantic_scale(z, layout="H_DW"), rtol=0, atol=0)
    with pytest.warns(DeprecationWarning):
        p = auvcore.energy_spectrum(z, mode="W_DH")
    torch.testing.assert_close(p, auvcore.energy_spectrum(z, layout="W_DH"), rtol=0, atol=0)
    with pytest.raises(TypeError, match="pass only layout"):
        auvcore.semantic_scale(z, layout="H_DW", mode="D_HW")
    with pytest.warns(DeprecationWarning, match="preset= is deprecated"):
        loss = auvcore.DUOLoss(preset="official", mode="H_DW")
    assert loss.variant == "official" and loss.layout == "H_DW"
    with pytest.raises(ValueError, match="layout: expected one of"):
        auvcore.semantic_scale(z, layout="HW")
