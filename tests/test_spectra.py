"""The eigensolver and the masked scale on adversarial input (issue: never fail on a real input): every
finite symmetric matrix gets a spectrum, rank-deficient Grams included, equal to LAPACK's within the
rounding the Householder reduction itself commits; S equals the float64 oracle on tiny classes,
duplicated voxels, constant features."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import auvcore
from auvcore import _C, testing
from auvcore import _torch_impl as T

from test_scale import TOL, assert_close, oracle_masked


def check_spectrum(a, w, vt=None):
    """w (descending) against LAPACK on the same matrix, within c·n·eps·‖A‖; vt reconstructs A."""
    n = a.shape[-1]
    ref = np.linalg.eigvalsh(a)[::-1]
    scale = max(np.abs(a).max(), np.finfo(float).tiny)
    assert np.all(np.isfinite(w))
    assert np.all(np.diff(w) <= 0)
    np.testing.assert_allclose(w, ref, rtol=0, atol=50 * n * np.finfo(float).eps * scale)
    if vt is not None:
        np.testing.assert_allclose(vt @ vt.T, np.eye(n), rtol=0, atol=50 * n * np.finfo(float).eps)
        np.testing.assert_allclose((vt.T * w) @ vt, a, rtol=0, atol=50 * n * np.finfo(float).eps * scale)
    # S of the two spectra: the quantity the library reports.
    if n >= 2 and scale > 1e-250:
        s = lambda lam: float(T.entropy_scale(torch.from_numpy(lam.copy()), n, 0.0, "paper")[0])
        np.testing.assert_allclose(s(w / scale), s(ref / scale), rtol=0, atol=1e-10)


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 48), kind=st.sampled_from(testing.KINDS),
       vectors=st.booleans(), force_jacobi=st.booleans())
def test_eigh_adversarial_spectra(seed, n, kind, vectors, force_jacobi):
    a = testing.matrix(np.random.default_rng(seed), n, kind)
    w, vt = _C.eigh(a[None], vectors, force_jacobi, 1)
    check_spectrum(a, w[0], vt[0] if vectors else None)


def test_eigh_issue_reproduction_and_large_sizes():
    # The rank-3 Gram of 65 channels that stalled QL, and sizes up to 1024 of the hardest kinds.
    g = torch.Generator().manual_seed(0)
    f = (torch.randn((1, 65, 1, 1, 3), generator=g, dtype=torch.float64) * 2.0 + 3.0)
    x = f.reshape(65, 3).numpy()
    check_spectrum(x @ x.T, _C.eigh((x @ x.T)[None], False, False, 1)[0][0])
    rng = np.random.default_rng(1)
    for n, kind in [(300, "zeros"), (300, "cluster"), (1024, "gram")]:
        a = testing.matrix(rng, n, kind)
        check_spectrum(a, _C.eigh(a[None], False, False, 2)[0][0])


def test_eigh_rejects_non_finite_and_bad_shape():
    a = np.eye(3)
    a[1, 2] = a[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"A\[0\]: eigh: the matrix has a NaN or Inf entry"):
        _C.eigh(a[None])
    with pytest.raises(ValueError, match=r"A: expected \[count, n, n\]"):
        _C.eigh(np.eye(3))


def test_issue_reproduction_and_sweep():
    """The issue's reproduction and its sweep of tiny classes (C = 2..199 channels, 2..7 voxels)."""
    g = torch.Generator().manual_seed(0)
    f = (torch.randn((1, 65, 1, 1, 3), generator=g, dtype=torch.float64) * 2.0 + 3.0)
    lab = torch.randint(0, 1, (1, 1, 1, 3), generator=g)
    S = auvcore.masked_semantic_scale(f, lab, 1, center=False, backend="cpp")
    assert_close(S, oracle_masked(f, lab, 1, center=False), 1e-10)
    rng = np.random.default_rng(0)
    for C in range(2, 200, 3):
        n = int(rng.integers(2, 8))
        f = torch.from_numpy(rng.standard_normal((1, C, 1, 1, n)) * 2.0 + 3.0)
        lab = torch.zeros((1, 1, 1, n), dtype=torch.int64)
        for center in (False, True):
            S = auvcore.masked_semantic_scale(f, lab, 1, center=center, backend="cpp")
            assert_close(S, oracle_masked(f, lab, 1, center=center), 1e-10)


@given(seed=st.integers(0, 2**32 - 1), C=st.integers(1, 80), N=st.integers(1, 40), K=st.integers(1, 4),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]), center=st.booleans(),
       kind=st.sampled_from(["tiny_classes", "duplicates", "constant", "offset", "rank1"]),
       backend=st.sampled_from(["cpp", "torch"]))
def test_masked_adversarial(seed, C, N, K, dtype, center, kind, backend):
    """Classes of a few voxels next to many channels, duplicated voxels, constant features, a large
    offset, rank-1 features: S equals the oracle, NaN exactly where a class has < 2 voxels."""
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((1, C, N))
    lab = rng.integers(0, K, size=(1, N))
    if kind == "tiny_classes":
        lab = np.where(rng.random((1, N)) < 0.9, 0, lab)
    elif kind == "duplicates":  # every voxel repeated: rank <= N/2
        f[..., 1::2] = f[..., 0::2][..., : N // 2]
    elif kind == "constant":
        f[:, : max(1, C // 2)] = rng.standard_normal() * 5
    elif kind == "offset":
        f = f * 0.01 + 100.0
    elif kind == "rank1":
        f = rng.standard_normal((1, C, 1)) * rng.standard_normal((1, 1, N))
    f = torch.from_numpy(f).to(dtype)
    lab = torch.from_numpy(lab)
    S = auvcore.masked_semantic_scale(f, lab, K, center=center, backend=backend)
    ref = oracle_masked(f, lab, K, center=center)
    assert_close(S, ref, TOL[dtype])
