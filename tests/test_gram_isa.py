"""The CPU Gram on every instruction-set path this machine runs (AUVCORE_ISA, issue 24), and its pre-scale:
any finite input, of any magnitude, gives a finite S that matches the float64 SVD oracle."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import auvcore
from auvcore import _backend as Bk
from cuda_common import built_with_cuda
from test_scale import TOL, assert_close, oracle_decoded, oracle_masked, random_maps

pytestmark = pytest.mark.skipif(not Bk.has_native(), reason="needs the C++ module")

PATHS = [name for name in Bk.ISAS if Bk.has_native() and Bk.ISAS.index(name) <= Bk.ISAS.index(Bk.isa_best())]


@pytest.fixture(params=PATHS)
def isa(request):
    """Run the test on one instruction-set path, and give the machine's best back afterwards."""
    before = Bk.isa()
    assert Bk.set_isa(request.param) == request.param
    yield request.param
    Bk.set_isa(before)


def _maps(seed, shape, dtype, kind, mag):
    z = random_maps(seed, shape, torch.float64, kind) * mag
    return z.to(dtype)


# ---- every path against the oracle -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["D_HW", "W_DH"])  # the row side (m <= n) and the column side
def test_each_isa_path_matches_the_oracle(isa, dtype, layout):
    # p = 13 or 29 pads to whole register tiles; 640 samples on the row side span two panels.
    z = _maps(7, (2, 2, 13, 16, 40), dtype, "offset", 1.0)
    for center in (True, False):
        S = auvcore.semantic_scale(z, layout=layout, center=center, backend="cpp")
        assert_close(S, oracle_decoded(z, layout, center), TOL[dtype])
    S = auvcore.semantic_scale(z, layout=layout, variant="official", backend="cpp")
    assert_close(S, oracle_decoded(z, layout, variant="official"), TOL[dtype])


@given(offset=st.sampled_from([1e2, 1e4, -3e5]), spread=st.sampled_from([1.0, 1e-2]), seed=st.integers(0, 2**31 - 1))
def test_float_centring_keeps_large_offsets_exact(offset, spread, seed):
    """Float maps with a common offset up to 3e5 spread-units deep: the float centring subtracts the double
    mean as a float pair (hi, lo), so S matches the float64 oracle of the same float32 input on every path.
    A mean rounded to one float (an error up to half its ulp, 2e-3 at 3e4) would shift each sample and fail."""
    g = torch.Generator().manual_seed(seed)
    z = (offset + spread * torch.randn(1, 2, 21, 12, 90, generator=g, dtype=torch.float64)).float()
    ref = oracle_decoded(z, "D_HW", True)
    for path in PATHS:
        Bk.set_isa(path)
        try:
            assert_close(auvcore.semantic_scale(z, layout="D_HW", backend="cpp"), ref, TOL[torch.float32])
        finally:
            Bk.set_isa(Bk.isa_best())


def test_chunked_centring_gives_the_general_paths_bits(isa):
    """Contiguous float maps take the one-pass chunked centring (read, column means and their subtraction 64
    samples at a time); the same values with strided samples take the general three-pass one. Same bits, on
    every path, both for a panel that ends mid-chunk (40 x 16 = 640 samples) and with a large offset."""
    g = torch.Generator().manual_seed(3)
    for offset in (0.0, 5e3):
        z = (offset + torch.randn(2, 2, 13, 16, 40, generator=g, dtype=torch.float64)).float()
        strided = z.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, samples no longer one run
        a = auvcore.semantic_scale(z, layout="D_HW", backend="cpp")
        b = auvcore.semantic_scale(strided, layout="D_HW", backend="cpp")
        assert torch.equal(a, b)


def test_each_isa_path_masked(isa):
    g = torch.Generator().manual_seed(5)
    f = torch.randn(2, 20, 9, 8, 7, generator=g) + 3
    lab = torch.randint(0, 3, (2, 9, 8, 7), generator=g)
    lab[0, :2] = 2  # class 2 of sample 0 is large, class 0 ..
    lab[1] = 0
    lab[1, 0, 0, :5] = 1  # .. class 1 of sample 1 has fewer voxels than channels: the other Gram side
    S = auvcore.masked_semantic_scale(f, lab, 3, backend="cpp")
    assert_close(S, oracle_masked(f, lab, 3), TOL[torch.float32])


def test_paths_agree_with_each_other():
    """The paths differ only in the order of float32 sums: S agrees to float32 rounding."""
    z = _maps(3, (1, 3, 24, 30, 30), torch.float32, "plain", 1.0)
    before = Bk.isa()
    out = []
    try:
        for name in PATHS:
            Bk.set_isa(name)
            out.append(auvcore.semantic_scale(z, backend="cpp").double())
    finally:
        Bk.set_isa(before)
    for S in out[1:]:
        assert_close(S, out[0].numpy(), 1e-6)


# ---- choosing the path ---------------------------------------------------------------------------------

def test_isa_accessors():
    assert Bk.isa() in Bk.ISAS and Bk.isa_best() in Bk.ISAS
    assert Bk.ISAS.index(Bk.isa()) <= Bk.ISAS.index(Bk.isa_best())
    with pytest.raises(ValueError, match="isa: expected one of"):
        Bk.set_isa("sse9")
    with pytest.raises(ValueError, match="isa: expected 0"):
        Bk._C.set_isa(3)
    if Bk.isa_best() != "avx512":  # above the CPU's best: a clear error, never an illegal instruction
        with pytest.raises(ValueError, match="this CPU runs at most"):
            Bk.set_isa("avx512")


def test_environment_variable_forces_and_clamps_the_path():
    code = ("import warnings; warnings.simplefilter('always');\n"
            "from auvcore import _backend as B; print(B.isa(), B.isa_best())")
    # The subprocess imports the auvcore under test (a source tree or the installed one): it runs in the folder
    # that holds that package, since `python -c` puts its cwd first on sys.path (run from a checkout, the source
    # tree without the built module would shadow an installed package otherwise).
    root = os.path.dirname(os.path.dirname(os.path.abspath(auvcore.__file__)))
    path = os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    run = lambda value: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: E731
                                       env={**os.environ, "AUVCORE_ISA": value, "PYTHONPATH": path}, cwd=root,
                                       check=True)
    out = run("generic")
    assert out.stdout.split()[0] == "generic", out
    out = run("AVX9")
    best = out.stdout.split()[1]
    assert out.stdout.split()[0] == best and "AUVCORE_ISA='avx9': expected one of" in out.stderr, out
    if best != "avx512":
        out = run("avx512")
        assert out.stdout.split()[0] == best and "this CPU runs at most" in out.stderr, out


# ---- no overflow, no underflow ---------------------------------------------------------------------------

magnitudes = st.integers(-30, 30).map(lambda k: 10.0**k)


@given(seed=st.integers(0, 2**31 - 1), mag=magnitudes, dtype=st.sampled_from([torch.float32, torch.float64]),
       layout=st.sampled_from(["D_HW", "W_DH"]), center=st.booleans(),
       kind=st.sampled_from(["plain", "offset", "rank1", "lowrank"]), variant=st.sampled_from(["paper", "official"]))
def test_any_magnitude_decoded(seed, mag, dtype, layout, center, kind, variant):
    shape = (1, 2, 5, 6, 7)
    if kind == "rank1":
        g = torch.Generator().manual_seed(seed)
        z = (torch.randn(1, 2, 5, 1, 1, generator=g, dtype=torch.float64)
             * torch.randn(1, 2, 1, 6, 7, generator=g, dtype=torch.float64) * mag).to(dtype)
    else:
        z = _maps(seed, shape, dtype, kind, mag)
    if variant == "official" and kind in ("rank1", "lowrank"):
        # Its energy on σ = sqrt(λ) turns the Gram's rounding of zero eigenvalues (1e-16 λ₁) into σ of 1e-8 σ₁
        # next to its 1e-6 shift, at every magnitude: a limit of the Gram route, not of the scale.
        variant = "paper"
    S = auvcore.semantic_scale(z, layout=layout, center=center, variant=variant, backend="cpp")
    assert torch.isfinite(S).all()
    assert_close(S, oracle_decoded(z, layout, center, variant=variant), TOL[dtype])
    if variant == "paper":
        # Without ε, S does not depend on the scale at all: a Gram that underflowed to 0 (S = 0) or
        # overflowed would fail here at every magnitude, not only at the large ones.
        S0 = auvcore.semantic_scale(z, layout=layout, center=center, eps=0.0, backend="cpp")
        assert_close(S0, oracle_decoded(z, layout, center, eps=0.0), TOL[dtype])


@given(seed=st.integers(0, 2**31 - 1), mag=magnitudes, dtype=st.sampled_from([torch.float32, torch.float64]),
       center=st.booleans(), C=st.sampled_from([4, 30]))
def test_any_magnitude_masked(seed, mag, dtype, center, C):
    """C = 4: every class has more voxels than channels (C x C Gram); C = 30: small classes take the other side."""
    g = torch.Generator().manual_seed(seed)
    f = ((torch.randn(1, C, 4, 5, 3, generator=g, dtype=torch.float64) + 5) * mag).to(dtype)
    lab = torch.randint(0, 3, (1, 4, 5, 3), generator=g)
    for eps in (1e-8, 0.0):
        S = auvcore.masked_semantic_scale(f, lab, 3, center=center, eps=eps, backend="cpp")
        assert not torch.isinf(S).any()
        assert_close(S, oracle_masked(f, lab, 3, center, eps), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_magnitudes_varying_across_panels_and_threads(isa, dtype):
    """Samples whose magnitudes span 1e-30..1e30 (float32) over several panels and two threads: each panel
    has its own pre-scale, and the pieces of a job are brought to one scale before they are added."""
    rng = np.random.default_rng(0)
    hi = 30 if dtype == torch.float32 else 150
    M = rng.standard_normal((1, 1, 6, 2100)) * 10.0 ** rng.uniform(-hi, hi, size=(1, 1, 1, 2100))
    z = torch.from_numpy(M).to(dtype)
    for center in (True, False):
        for nt in (1, 2):
            S = auvcore.semantic_scale(z, center=center, num_threads=nt, backend="cpp")
            assert_close(S, oracle_decoded(z, "D_HW", center), TOL[dtype])


def test_relative_accuracy_at_tiny_energy():
    """Near zero energy S ~ Σσ²/ε is tiny but not 0: the Gram must not underflow, in float32 products too."""
    z = _maps(11, (1, 2, 6, 7, 8), torch.float32, "plain", 1e-22)
    S = auvcore.semantic_scale(z, backend="cpp").double().numpy()
    ref = oracle_decoded(z, "D_HW")
    assert (ref > 1e-36).all()  # a normal float32, where products of 1e-44 would be (sub)normal dust
    np.testing.assert_allclose(S, ref, rtol=1e-4)


def test_float64_beyond_the_double_range_of_the_gram():
    """|x| ~ 1e200: the Gram itself exceeds the double range; S (scale-invariant there) stays right."""
    z = _maps(2, (1, 2, 5, 6, 7), torch.float64, "plain", 1e200)
    S = auvcore.semantic_scale(z, backend="cpp")
    assert_close(S, oracle_decoded(z / 1e200, "D_HW"), 1e-10)


# ---- the same on CUDA, under the host emulation ------------------------------------------------------------

@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    from cuda_common import emu_library

    return emu_library(tmp_path_factory)


@built_with_cuda  # as tests/test_cuda_emulated.py: the emulation is built and run beside a CUDA build
@pytest.mark.parametrize("mag", [1e-30, 1e30])
@pytest.mark.parametrize("layout,center", [("D_HW", True), ("D_HW", False), ("W_DH", True), ("W_DH", False)])
def test_emulated_cuda_gram_any_magnitude(emu_lib, mag, layout, center):
    """The CUDA kernels' pre-scale (one power of two per matrix from a max-magnitude pre-pass): float32 input
    at 1e-30..1e30 gives the oracle's S without ε (scale-free) and a finite Gram at the true scale."""
    from test_cuda_emulated import _emu_decoded, _gram_ref

    z = _maps(4, (1, 2, 6, 7, 9), torch.float32, "offset", mag)
    G, S, flags = _emu_decoded(emu_lib, z, layout, center=center, eps=0.0)
    assert not flags.any() and torch.isfinite(G).all()
    assert_close(S, oracle_decoded(z, layout, center, eps=0.0), TOL[torch.float32])
    ref = _gram_ref(z, layout, center)
    assert float((G - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@built_with_cuda
@pytest.mark.parametrize("mag", [1e-30, 1e30])
def test_emulated_cuda_masked_any_magnitude(emu_lib, mag):
    from test_cuda_emulated import _emu_masked, _masked_gram_ref

    g = torch.Generator().manual_seed(8)
    f = ((torch.randn(1, 5, 4, 5, 6, generator=g, dtype=torch.float64) + 3) * mag).float()
    lab = torch.randint(0, 3, (1, 4, 5, 6), generator=g)
    G, S, counts, flags, _ = _emu_masked(emu_lib, f, lab, 3)
    assert not flags.any() and torch.isfinite(G).all() and torch.isfinite(S).all()
    for k, ref in enumerate(_masked_gram_ref(f, lab, 3)):
        assert float((G[k] - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
