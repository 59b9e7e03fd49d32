"""The CUDA Gram's tensor-core engine (AUVCORE_CUDA_GRAM=3xtf32, issue 24) under the host emulation, whose
wmma (csrc/cuda/emu/mma.h) reads only the TF32 bits of each operand and truncates each MMA's sum, as the hardware
does: the split-precision products must keep S within the float32 tolerance of the float64 oracle on the
adversarial inputs (large offsets, 1e-30..1e30, rank-deficient and ill-conditioned maps), on every tile size,
decoded and masked. The same kernel without the low parts misses the Gram's bound by 6x, and chaining a chunk's
products in one accumulator by 3.4x. Speed only on a GPU (bench/gpu_session.sh)."""
from __future__ import annotations

import pytest
import torch

from auvcore import _torch_impl as T

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cuda_common import _rand, built_with_cuda, emu_library  # noqa: E402
from test_cuda_emulated import _emu_decoded, _emu_masked, _gram_ref, _masked_gram_ref  # noqa: E402
from test_scale import TOL, assert_close, oracle_decoded, oracle_masked, random_maps  # noqa: E402

pytestmark = built_with_cuda
F32 = TOL[torch.float32]  # 2e-5


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return emu_library(tmp_path_factory)


@pytest.fixture
def tensor_cores(monkeypatch):
    monkeypatch.setenv("AUVCORE_CUDA_GRAM", "3xtf32")


def _maps(kind, shape, seed, mag):
    if kind == "rank1":
        g = torch.Generator().manual_seed(seed)
        z = (torch.randn(shape[:3] + (1, 1), generator=g, dtype=torch.float64)
             * torch.randn(shape[:2] + (1,) + shape[3:], generator=g, dtype=torch.float64))
    elif kind == "range":  # samples whose magnitudes span 1e-6..1e6 within one matrix
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(shape, generator=g, dtype=torch.float64) * 10.0 ** (12 * torch.rand(shape, generator=g) - 6)
    else:
        z = random_maps(seed, shape, torch.float64, kind)
    return (z * mag).float()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(B_=st.integers(1, 2), K=st.integers(1, 2), D=st.integers(1, 40), H=st.integers(1, 6), W=st.integers(1, 6),
       layout=st.sampled_from(["D_HW", "W_DH"]), center=st.booleans(),
       kind=st.sampled_from(["plain", "offset", "lowrank", "illcond", "rank1", "range"]),
       mag=st.integers(-30, 30).map(lambda k: 10.0**k), seed=st.integers(0, 2**31 - 1))
# the column side's shifted covariance, its shift (the first sample) far from the mean: Σ(x - x0)² - n d² cancels
# 26-fold (1.4e-6 on both engines; 1.0e-5 when the engine chained its products in one truncating accumulator)
@example(B_=1, K=1, D=26, H=1, W=1, layout="D_HW", center=True, kind="illcond", mag=1.0, seed=0)
def test_tensor_core_decoded_gram_matches_the_oracle(emu, tensor_cores, B_, K, D, H, W, layout, center, kind, mag,
                                                     seed):
    z = _maps(kind, (B_, K, D, H, W), seed, mag)
    G, S, flags = _emu_decoded(emu, z, layout, center=center)
    assert not flags.any() and torch.isfinite(G).all()
    ref = _gram_ref(z, layout, center)
    scale = ref.flatten(1).abs().max(1).values.clamp_min(1e-300).view(-1, 1, 1)
    assert float(((G - ref).abs() / scale).max()) <= 1e-5
    assert_close(S, oracle_decoded(z, layout, center), F32)


@pytest.mark.parametrize("shape,layout", [
    ((1, 2, 20, 9, 30), "D_HW"),   # p = 20: the 32 tile (one warp's sub-tile per quarter of the warps)
    ((1, 1, 60, 3, 40), "D_HW"),   # p = 60: the 64 tile
    ((1, 1, 96, 2, 64), "D_HW"),   # p = 96: the 96 tile, 36 sub-tiles over 8 warps
    ((1, 1, 120, 3, 45), "D_HW"),  # p = 120: the 128 tile, eight sub-tiles per warp
    ((1, 1, 40, 2, 700), "W_DH"),  # rows contiguous (p-fast loads), 1400 samples: three chunks
])
def test_tensor_core_engine_on_every_tile_size(emu, tensor_cores, shape, layout):
    z = _rand(shape, torch.float32, 5, offset=5.0)
    G, S, _ = _emu_decoded(emu, z, layout)
    ref = _gram_ref(z, layout, True)
    assert float((G - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert_close(S, oracle_decoded(z, layout, True), F32)


@pytest.mark.slow
def test_tensor_core_engine_across_tiles(emu, tensor_cores):
    """p = 140 > 128: four tile pairs, the column means from the pre-pass; with an offset of 40."""
    z = _maps("offset", (1, 1, 140, 3, 50), 7, 1.0)
    G, S, _ = _emu_decoded(emu, z, "D_HW")
    ref = _gram_ref(z, "D_HW", True)
    assert float((G - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert_close(S, oracle_decoded(z, "D_HW", True), F32)


@pytest.mark.parametrize("C,mag", [(5, 1.0), (40, 1e30), (40, 1e-30)])
def test_tensor_core_engine_masked(emu, tensor_cores, C, mag):
    """The masked Gram (shifted one-pass covariance, its row sums read before the split)."""
    g = torch.Generator().manual_seed(C)
    f = ((torch.randn(1, C, 6, 7, 8, generator=g, dtype=torch.float64) + 3) * mag).float()
    lab = torch.randint(0, 3, (1, 6, 7, 8), generator=g)
    G, S, counts, flags, le = _emu_masked(emu, f, lab, 3)
    assert le == [0, 0] and not flags.any() and torch.isfinite(G).all()
    for k, ref in enumerate(_masked_gram_ref(f, lab, 3)):
        # 3e-5: the shift of the one-pass covariance is the class's first voxel in the order the sort's atomics
        # leave; a shift far from the mean makes Σ(x - x0)² - n d² cancel (0.6-2.1e-6 on either engine, varying
        # from run to run). S is held to the float32 tolerance below.
        assert float((G[k] - ref).abs().max()) <= 3e-5 * float(ref.abs().max())
    assert_close(S, oracle_masked(f, lab, 3), F32)


def test_engine_variable_is_checked(emu, monkeypatch):
    monkeypatch.setenv("AUVCORE_CUDA_GRAM", "tf32")
    with pytest.raises(ValueError, match="AUVCORE_CUDA_GRAM: expected 'fp32' or '3xtf32', got 'tf32'"):
        _emu_decoded(emu, _rand((1, 1, 4, 5, 6), torch.float32, 0), "D_HW")
    monkeypatch.setenv("AUVCORE_CUDA_GRAM", "3xtf32")  # float64 input: the engine does not apply
    z = _rand((1, 1, 4, 5, 6), torch.float64, 0)
    G, _, _ = _emu_decoded(emu, z, "D_HW")
    assert float((G - _gram_ref(z, "D_HW", True)).abs().max()) <= 1e-12 * float(G.abs().max())
