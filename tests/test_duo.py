"""Differentiable semantic scale (analytic C++ backward) and the fused DUO loss, against the pure-torch oracle."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import auvcore
from auvcore import DUOLoss, NoiseHead, semantic_scale
from auvcore import _torch_impl as T
from auvcore.testing import svd_reference

pytestmark = pytest.mark.skipif(not auvcore.has_native(), reason="native module not built")

FEW = settings(max_examples=12, deadline=None)


def native_S(z, **kw):
    return semantic_scale(z, backend="cpp", num_threads=1, **kw)  # tiny inputs: no OpenMP team


def grad_of(fn, *xs):
    out = fn(*xs)
    return torch.autograd.grad(out.sum(), xs, allow_unused=True)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------------
# semantic_scale backward


@st.composite
def decoded_shapes(draw):
    b, k = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    if draw(st.booleans()):
        return (b, k, draw(st.integers(2, 7)), draw(st.integers(2, 7))), "D_HW"
    dims = tuple(draw(st.integers(1, 5)) for _ in range(3))
    mode = draw(st.sampled_from(sorted(T.LAYOUTS)))
    m, n = T.class_matrices(torch.zeros((1, 1) + dims), mode).shape[-2:]
    if min(m, n) < 2:
        dims = (dims[0] + 1, dims[1] + 1, dims[2] + 1)
    return (b, k) + dims, mode


@FEW
@given(decoded_shapes(), st.booleans(), st.integers(0, 2**31 - 1))
def test_scale_gradcheck_random(shape_mode, center, seed):
    shape, mode = shape_mode
    z = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: native_S(z, layout=mode, center=center), (z,))
    # and it equals autograd through the torch eigvalsh path
    (g,) = grad_of(lambda z: native_S(z, layout=mode, center=center), z)
    (ref,) = grad_of(lambda z: semantic_scale(z, layout=mode, center=center, backend="torch"), z)
    assert torch.allclose(g, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("shape", [(2, 2, 6, 4, 5), (1, 2, 9, 2, 2)])  # row side (m <= n) and column side
def test_scale_gradcheck_low_rank(rank, shape):
    g = torch.Generator().manual_seed(rank)
    Bn, K, D = shape[:3]
    n = shape[3] * shape[4]
    z = (torch.randn(Bn, K, D, rank, dtype=torch.float64, generator=g)
         @ torch.randn(Bn, K, rank, n, dtype=torch.float64, generator=g)).reshape(shape).requires_grad_()
    for center in (True, False):
        assert torch.autograd.gradcheck(lambda z: native_S(z, center=center), (z,))
        (grad,) = grad_of(lambda z: native_S(z, center=center), z)
        assert torch.isfinite(grad).all()


def test_scale_repeated_eigenvalues_finite_and_correct():
    # Rows 2σ, σ, σ, σ (orthogonal): three equal singular values, where an SVD/eigh backward divides by
    # σ_i² − σ_j² = 0. The analytic backward must stay finite and match finite differences.
    q = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
    rows = q[:4] * torch.tensor([2.0, 1.0, 1.0, 1.0], dtype=torch.float64)[:, None]
    z = rows.reshape(1, 1, 4, 3, 4).clone().requires_grad_()
    (grad,) = grad_of(lambda z: native_S(z, center=False), z)
    assert torch.isfinite(grad).all() and grad.abs().max() > 1e-3  # a real, non-zero gradient
    assert torch.autograd.gradcheck(lambda z: native_S(z, center=False), (z,))
    # fully degenerate: every singular value equal, S = 1 is a maximum, so the gradient vanishes
    flat = q[:4].reshape(1, 1, 4, 3, 4).clone().requires_grad_()
    (grad,) = grad_of(lambda z: native_S(z, center=False), flat)
    assert torch.isfinite(grad).all() and grad.abs().max() < 1e-8


def test_scale_zero_map_zero_gradient():
    for eps in (1e-8, 0.0):
        z = torch.zeros(1, 2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
        (grad,) = grad_of(lambda z: native_S(z, eps=eps), z)
        assert torch.equal(grad, torch.zeros_like(grad))
    # constant rows vanish after centering: M̄ = 0 as well
    z = torch.ones(1, 1, 4, 3, 3, dtype=torch.float64).mul(3.0).requires_grad_()
    (grad,) = grad_of(native_S, z)
    assert torch.isfinite(grad).all() and grad.abs().max() == 0


def test_scale_gradient_official_variant():
    z = torch.randn(2, 2, 4, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: native_S(z, variant="official"), (z,))
    (g,) = grad_of(lambda z: native_S(z, variant="official"), z)
    (ref,) = grad_of(lambda z: semantic_scale(z, variant="official", backend="torch"), z)
    assert torch.allclose(g, ref, rtol=1e-9, atol=1e-12)


def test_scale_gradient_strided_half_and_nan_to_num():
    base = torch.randn(2, 3, 6, 5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # a permuted, sliced view: the gradient lands in z's layout
    view = base.permute(0, 1, 2, 4, 3)[:, ::2].detach().requires_grad_()
    (g,) = grad_of(native_S, view)
    dense = view.detach().contiguous().requires_grad_()
    (gd,) = grad_of(native_S, dense)
    assert torch.allclose(g, gd, rtol=1e-12, atol=1e-14)
    # float32 gradient within float32 rounding of the float64 one
    z32 = base.float().requires_grad_()
    (g32,) = grad_of(native_S, z32)
    (g64,) = grad_of(native_S, base.clone().requires_grad_())
    assert g32.dtype == torch.float32 and rel(g32.double(), g64) < 1e-4
    # bfloat16 maps: gradient of the same dtype, finite
    zb = base.bfloat16().requires_grad_()
    (gb,) = grad_of(native_S, zb)
    assert gb.dtype == torch.bfloat16 and torch.isfinite(gb.float()).all()
    # entries read as 0 by nan_to_num get gradient 0; the rest equals the gradient at 0
    zn = base.clone()
    zn[0, 0, 1, 2, 3] = float("nan")
    zn.requires_grad_()
    (gn,) = grad_of(lambda z: native_S(z, nan_to_num=True), zn)
    z0 = torch.nan_to_num(zn.detach(), nan=0.0).requires_grad_()
    (g0,) = grad_of(native_S, z0)
    assert gn[0, 0, 1, 2, 3] == 0
    mask = torch.ones_like(gn, dtype=torch.bool)
    mask[0, 0, 1, 2, 3] = False
    assert torch.allclose(gn[mask], g0[mask], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------
# fused DUO loss versus the torch composition


@st.composite
def duo_problems(draw):
    b, k = draw(st.integers(1, 3)), draw(st.integers(2, 4))
    spatial = tuple(draw(st.integers(2, 6)) for _ in range(draw(st.sampled_from([2, 3]))))
    return (b, k) + spatial, draw(st.integers(0, 2**31 - 1))


def make_inputs(shape, seed, dtype, onehot_labels):
    g = torch.Generator().manual_seed(seed)
    z = (2 * torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_()
    n = torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
    lab = torch.randint(0, shape[1], (shape[0], 1) + shape[2:], generator=g)
    y = lab if onehot_labels else F.one_hot(lab[:, 0], shape[1]).movedim(-1, 1).to(dtype)
    return z, n, y


@FEW
@given(duo_problems(), st.booleans(), st.sampled_from(["paper", "official"]))
def test_both_paths_equal_the_independent_reference(problem, include_background, variant):
    """The fused kernel and the torch sums share the loss's formula (DUOLoss._from_sums); the oracle composes
    the loss on its own (auvcore.testing.duo_loss_reference), so it checks that formula too, with gradients."""
    from auvcore import testing

    shape, seed = problem
    z, n, y = make_inputs(shape, seed, torch.float64, False)
    ref = testing.duo_loss_reference(z, n, y, c0=0 if include_background else 1, variant=variant)
    ref_grads = torch.autograd.grad(ref.sum(), (z, n), allow_unused=True)
    for backend in ("cpp", "torch"):
        per = DUOLoss(include_background=include_background, variant=variant, backend=backend,
                      reduction="none")(z, n, y)
        torch.testing.assert_close(per, ref, rtol=1e-10, atol=1e-12)
        for g, r in zip(torch.autograd.grad(per.sum(), (z, n), allow_unused=True), ref_grads):
            if r is None:
                assert g is None or not g.any()
            else:
                torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-12)


def both_backends(shape, seed, dtype, to_onehot_y, **kw):
    z, n, y = make_inputs(shape, seed, dtype, to_onehot_y)
    out = []
    for backend in ("cpp", "torch"):
        loss = DUOLoss(to_onehot_y=to_onehot_y, backend=backend, reduction="none", **kw)
        per = loss(z, n, y)
        gz, gn = torch.autograd.grad(per.sum(), (z, n), allow_unused=True)
        out.append((per, gz, gn))
    return out


@FEW
@given(duo_problems(), st.booleans(), st.booleans(), st.sampled_from(["paper", "official"]))
def test_fused_equals_torch_float64(problem, to_onehot_y, include_background, preset):
    shape, seed = problem
    (p1, gz1, gn1), (p2, gz2, gn2) = both_backends(shape, seed, torch.float64, to_onehot_y,
                                                   include_background=include_background, variant=preset)
    assert p1.shape == (shape[0], shape[1] - (not include_background))
    assert torch.allclose(p1, p2, rtol=1e-10, atol=1e-10)
    # the logits' gradient goes through dS/dz, i.e. through eigenvectors (analytic C++ backward vs eigh autograd):
    # their error grows like eps / (eigenvalue gap), so close eigenvalues cost digits (seen: 1.25e-10, official)
    assert torch.allclose(gz1, gz2, rtol=1e-8, atol=1e-9)
    if preset == "paper":
        assert torch.allclose(gn1, gn2, rtol=1e-10, atol=1e-10)
    else:  # the snippet detaches ỹ: no gradient reaches the noise logits on either path
        assert gn1 is None and gn2 is None


@FEW
@given(duo_problems(), st.booleans(), st.sampled_from(["paper", "official"]))
def test_fused_equals_torch_float32(problem, to_onehot_y, preset):
    shape, seed = problem
    # The fused kernel itself (S detached: the float32 torch eigensolver is the less accurate side there).
    (p1, gz1, gn1), (p2, gz2, gn2) = both_backends(shape, seed, torch.float32, to_onehot_y, variant=preset,
                                                   detach_scale=True)
    assert torch.allclose(p1, p2, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gz1, gz2, rtol=1e-5, atol=1e-5)
    if preset == "paper":
        assert torch.allclose(gn1, gn2, rtol=1e-5, atol=1e-5)


def test_fused_float32_tiny_noise_logits():
    # Noise logits over many magnitudes, down to 1e-12: the sign of y − τ·tanh(n) decides whether the clamp
    # passes the gradient, so tanh must keep its relative accuracy near 0 (an absolute-error tanh flips the
    # mask there and the noise gradient of such voxels goes wrong).
    g = torch.Generator().manual_seed(4)
    shape = (2, 3, 20, 30, 40)
    z = torch.randn(*shape, generator=g).requires_grad_()
    mag = 10 ** (torch.rand(*shape, generator=g) * 13 - 12)
    n = (mag * torch.randn(*shape, generator=g).sign()).requires_grad_()
    y = torch.randint(0, 3, (2, 1) + shape[2:], generator=g)
    grads = []
    for backend in ("cpp", "torch"):
        loss = DUOLoss(to_onehot_y=True, backend=backend, detach_scale=True)
        grads.append(torch.autograd.grad(loss(z, n, y), (z, n)))
    assert rel(grads[0][0], grads[1][0]) < 1e-5
    assert rel(grads[0][1], grads[1][1]) < 1e-5


def test_fused_float32_with_scale_gradient():
    (p1, gz1, gn1), (p2, gz2, gn2) = both_backends((2, 4, 8, 9, 10), 3, torch.float32, True)
    assert torch.allclose(p1, p2, rtol=1e-5, atol=1e-5)
    assert rel(gz1, gz2) < 1e-4 and rel(gn1, gn2) < 1e-5


def test_loss_gradcheck_float64():
    z, n, y = make_inputs((2, 3, 4, 3, 3), 7, torch.float64, True)
    loss = DUOLoss(to_onehot_y=True, num_threads=1)
    assert torch.autograd.gradcheck(lambda z, n: loss(z, n, y), (z, n))
    # the snippet's ỹ is detached, so only z is differentiated there (n changes the value, not the graph)
    official = DUOLoss(to_onehot_y=True, variant="official", num_threads=1)
    assert torch.autograd.gradcheck(lambda z: official(z, n.detach(), y), (z,))


def test_reduction_classes_and_extras():
    z, n, y = make_inputs((2, 3, 5, 6), 11, torch.float64, False)
    y[1, 2] = 0.0  # class 2 absent from sample 1
    y[1, 0] = 1 - y[1, 1]
    loss = DUOLoss(reduction="none")
    per = loss(z, n, y)
    assert per.shape == (2, 2) and torch.isfinite(per).all()
    assert torch.allclose(DUOLoss()(z, n, y), per.mean(), rtol=1e-14)
    S = semantic_scale(z.detach()[:, 1:])
    assert torch.allclose(loss.last_scales, S, rtol=1e-12)
    assert torch.allclose(loss.last_weights, 1 / (1 + 0.5 * S), rtol=1e-12)
    assert not loss.last_weights.requires_grad
    # include_background adds channel 0; num_classes is checked
    assert DUOLoss(include_background=True, num_classes=3, reduction="none")(z, n, y).shape == (2, 3)
    # detach_scale changes the z gradient (S is a regulariser by default) but not the value
    ga = torch.autograd.grad(DUOLoss()(z, n, y), z)[0]
    gb = torch.autograd.grad(DUOLoss(detach_scale=True)(z, n, y), z)[0]
    assert not torch.allclose(ga, gb)


def test_official_preset_reproduces_snippet_formula():
    # The authors' snippet, written out independently: S from float64 SVD of the uncentred class matrix
    # (energy on σ + 1e-6), ỹ = y − σ(n)·y detached, BCE per (b, c), weighted by 1/(1 + 0.5 S), averaged.
    z, n, y = make_inputs((2, 3, 4, 5, 6), 5, torch.float64, False)
    expect = []
    for b in range(2):
        for c in range(1, 3):
            M = z[b, c].detach().reshape(4, 30).numpy()
            S = svd_reference(M, variant="official")
            yy, zz = y[b, c].numpy(), z[b, c].detach().numpy()
            yt = yy - yy / (1 + np.exp(-n[b, c].detach().numpy()))
            bce = np.mean(np.maximum(zz, 0) - zz * yt + np.log1p(np.exp(-np.abs(zz))))
            expect.append(bce / (1 + 0.5 * S))
    got = DUOLoss(variant="official")(z, n, y)
    assert math.isclose(float(got), float(np.mean(expect)), rel_tol=1e-12)
    gz, gn = torch.autograd.grad(got, (z, n), allow_unused=True)
    assert gn is None and gz.abs().sum() > 0


def test_paper_preset_noise_gradient_flows_from_zero_init():
    # ĝ = 0 puts ỹ = y on the clamp's boundary; the gradient must still reach n (the snippet's bug was a
    # detached ỹ, after which the head never learns).
    z, n, y = make_inputs((1, 2, 6, 6), 0, torch.float64, True)
    n = torch.zeros_like(z, requires_grad=True)
    (gn,) = torch.autograd.grad(DUOLoss(to_onehot_y=True)(z, n, y), n)
    assert gn[:, 1].abs().max() > 0 and gn[:, 0].abs().max() == 0  # background excluded


def test_noise_head_learns_injected_flips():
    # A disc segmented from its intensity by a 1×1 conv (which cannot fit the flips), labels with 15% of the
    # background flipped to foreground, and a NoiseHead on a per-voxel (one-hot position) feature map, i.e.
    # enough capacity to memorise voxels like a decoder's last features. After a short warm-up of the
    # segmenter, ĝ must single out the flipped voxels.
    torch.manual_seed(0)
    H = W = 12
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    truth = ((yy - 5.5) ** 2 + (xx - 5.5) ** 2 < 16).long()
    img = truth.double() + 0.1 * torch.randn(H, W, dtype=torch.float64)
    flip = (truth == 0) & (torch.rand(H, W) < 0.15)
    labels = truth.clone()
    labels[flip] = 1
    x = torch.stack([img, torch.ones_like(img)])[None]
    pos = torch.eye(H * W, dtype=torch.float64).reshape(1, H * W, H, W)
    seg = torch.nn.Conv2d(2, 2, 1).double()
    head = NoiseHead(H * W, 2, spatial_dims=2).double()
    opt_seg = torch.optim.Adam(seg.parameters(), lr=0.05)
    opt_head = torch.optim.Adam(head.parameters(), lr=0.05)
    loss = DUOLoss(to_onehot_y=True, num_threads=1)
    for step in range(300):
        opt_seg.zero_grad()
        opt_head.zero_grad()
        loss(seg(x), head(pos), labels[None, None]).backward()
        opt_seg.step()
        if step >= 100:
            opt_head.step()
    g = torch.tanh(head(pos))[0, 1].detach()
    assert flip.sum() >= 5
    assert g[flip].mean() > g[~flip].mean() + 0.5
    assert (g[flip] > g[~flip].max()).float().mean() >= 0.9
    assert (seg(x).argmax(1)[0] == truth).float().mean() > 0.95  # the segmenter followed the truth


def test_noise_head_module():
    for dims, shape in ((2, (2, 5, 7, 8)), (3, (1, 5, 4, 6, 7))):
        head = NoiseHead(5, 3, spatial_dims=dims)
        out = head(torch.randn(*shape))
        assert out.shape == (shape[0], 3) + shape[2:] and torch.equal(out, torch.zeros_like(out))
        assert sum(p.numel() for p in head.parameters()) == 5 * 3 + 3
    with pytest.raises(ValueError, match="spatial_dims"):
        NoiseHead(5, 3, spatial_dims=4)
    with pytest.raises(ValueError, match="num_classes"):
        NoiseHead(5, 0)


def test_autocast_half_logits():
    z, n, y = make_inputs((2, 3, 6, 7, 8), 9, torch.float32, True)
    ref = DUOLoss(to_onehot_y=True)(z, n, y)
    for dt in (torch.bfloat16, torch.float16):
        zh, nh = z.detach().to(dt).requires_grad_(), n.detach().to(dt).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = DUOLoss(to_onehot_y=True)(zh, nh, y)
        assert out.dtype == torch.float32 and math.isclose(float(out), float(ref), rel_tol=2e-2)
        gz, gn = torch.autograd.grad(out, (zh, nh))
        assert gz.dtype == dt and torch.isfinite(gz.float()).all() and torch.isfinite(gn.float()).all()
    # under autocast the logits may come out of a conv in bf16: the loss still runs in float32
    conv = torch.nn.Conv3d(3, 3, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zc = conv(z.detach())
        assert zc.dtype == torch.bfloat16
        out = DUOLoss(to_onehot_y=True)(zc, n.detach(), y)
    out.backward()
    assert out.dtype == torch.float32 and torch.isfinite(conv.weight.grad).all()


# ---------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_bad_inputs_name_the_argument(backend):
    z, n, y = make_inputs((2, 3, 4, 5, 6), 1, torch.float32, True)
    loss = DUOLoss(to_onehot_y=True, backend=backend)
    with pytest.raises(ValueError, match="noise_logits"):
        loss(z, n[:, :2], y)
    with pytest.raises(ValueError, match="target"):
        loss(z, n, y[..., :3])
    with pytest.raises(TypeError, match="seg_logits"):
        loss(z.detach().long(), n, y)
    with pytest.raises(ValueError, match="seg_logits"):
        loss(z[0, 0], n[0, 0], y[0, 0])
    with pytest.raises(ValueError, match="seg_logits"):
        DUOLoss(num_classes=4, to_onehot_y=True, backend=backend)(z, n, y)
    bad = z.detach().clone()
    bad[1, 2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="seg_logits.*NaN"):
        loss(bad, n, y)
    bad = n.detach().clone()
    bad[0, 1, 1, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="noise_logits.*NaN or Inf"):
        loss(z, bad, y)
    bad = y.clone()
    bad[0, 0, 0, 0, 0] = 3
    with pytest.raises(ValueError, match="target: label value 3 is outside 0..2"):
        loss(z, n, bad)
    with pytest.raises(ValueError, match="target"):
        loss(z, n, y.float() + 0.5)
    onehot = F.one_hot(y[:, 0], 3).movedim(-1, 1).float()
    onehot[0, 1, 0, 0, 0] = 1.5
    with pytest.raises(ValueError, match=r"target: values must lie in \[0, 1\]"):
        DUOLoss(backend=backend)(z, n, onehot)
    with pytest.raises(ValueError, match="target"):
        DUOLoss(backend=backend)(z, n, y)  # class indices without to_onehot_y
    with pytest.raises(TypeError, match="target"):
        loss(z, n, [0, 1])


def test_bad_arguments():
    for kw, name in ((dict(alpha=-1), "alpha"), (dict(tau=float("nan")), "tau"), (dict(preset="x"), "preset"),
                     (dict(reduction="max"), "reduction"), (dict(mode="DHW"), "mode"), (dict(num_classes=0),
                     "num_classes"), (dict(backend="gpu"), "backend"), (dict(beta=True), "beta")):
        with pytest.raises(ValueError, match=name):
            DUOLoss(**kw)
    with pytest.raises(TypeError, match="include_background"):
        DUOLoss(include_background=1)
    z = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="no class"):
        DUOLoss()(z, z, z.clamp(0, 1))


# ---------------------------------------------------------------------------------------------------------
# MONAI's argument conventions


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_monai_smooth_nr_dr_and_sum(backend):
    """smooth_nr/smooth_dr enter the Dice as MONAI's DiceLoss does; "sum" is the sum of the "none" values."""
    z, n, y = make_inputs((2, 3, 5, 6), 5, torch.float64, False)
    n = torch.zeros_like(n)  # ĝ = 0: ỹ = y, the Dice alone is left with α = λ = β = 0
    kw = dict(alpha=0.0, lambda_bce=0.0, beta=0.0, include_background=True, reduction="none", backend=backend)
    s, yt = torch.sigmoid(z), y.to(z.dtype)
    I, P, Y = ((s * yt).flatten(2).sum(-1), s.flatten(2).sum(-1), yt.flatten(2).sum(-1))
    per = DUOLoss(smooth_nr=0.3, smooth_dr=2.0, **kw)(z, n, y)
    assert torch.allclose(per, 1 - (2 * I + 0.3) / (P + Y + 2.0), rtol=1e-12)
    # both default to smooth; smooth_nr = smooth_dr = s is smooth = s
    assert torch.allclose(DUOLoss(smooth=0.7, **kw)(z, n, y), DUOLoss(smooth_nr=0.7, smooth_dr=0.7, **kw)(z, n, y))
    assert torch.allclose(DUOLoss(**kw)(z, n, y), DUOLoss(smooth=1e-5, **kw)(z, n, y))
    z, n, y = make_inputs((2, 3, 5, 6), 6, torch.float64, False)
    none = DUOLoss(reduction="none", backend=backend)(z, n, y)
    total = DUOLoss(reduction="sum", backend=backend)(z, n, y)
    assert total.shape == () and torch.allclose(total, none.sum(), rtol=1e-14)
    g_sum = torch.autograd.grad(total, z)[0]
    g_mean = torch.autograd.grad(DUOLoss(backend=backend)(z, n, y), z)[0]
    assert torch.allclose(g_sum, g_mean * none.numel(), rtol=1e-10)


def test_monai_argument_names_and_refusals():
    z, n, y = make_inputs((1, 3, 4, 5), 7, torch.float64, True)
    ref = DUOLoss(to_onehot_y=True)(z, n, y)
    # MONAI's DiceCELoss(sigmoid=True, to_onehot_y=True, include_background=False, reduction="mean") spelled alike
    same = DUOLoss(to_onehot_y=True, sigmoid=True, softmax=False, include_background=False, reduction="mean",
                   smooth_nr=1e-5, smooth_dr=1e-5)(z, n, y)
    assert torch.equal(ref, same)
    with pytest.raises(ValueError, match="sigmoid"):
        DUOLoss(sigmoid=False)
    with pytest.raises(ValueError, match="softmax"):
        DUOLoss(softmax=True)
    with pytest.raises(ValueError, match="smooth"):
        DUOLoss(smooth=1e-3, smooth_nr=1e-5)
    for kw in (dict(smooth_nr=-1.0), dict(smooth_dr=float("inf"))):
        with pytest.raises(ValueError, match=next(iter(kw))):
            DUOLoss(**kw)
    with pytest.raises(TypeError, match="softmax"):
        DUOLoss(softmax=0)


def test_monai_loss_reduction_enum():
    monai_utils = pytest.importorskip("monai.utils", reason="monai not installed (pip install auvcore[monai])")
    z, n, y = make_inputs((1, 3, 4, 5), 8, torch.float64, True)
    for member, name in ((monai_utils.LossReduction.SUM, "sum"), (monai_utils.LossReduction.NONE, "none")):
        a = DUOLoss(to_onehot_y=True, reduction=member)
        assert a.reduction == name and type(a.reduction) is str
        assert torch.equal(a(z, n, y), DUOLoss(to_onehot_y=True, reduction=name)(z, n, y))


# ---------------------------------------------------------------------------------------------------------
# what a training step computes: no S with alpha = 0, only the forward S with detach_scale


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_alpha_zero_computes_no_scale(monkeypatch, backend, dtype):
    """w = 1 whatever S is, so S (DUO's eigen solve) must not run: any call of the scale fails the test."""
    from auvcore import duo as duo_module
    from auvcore import testing

    z, n, y = make_inputs((2, 3, 4, 5, 6), 3, torch.float64, False)
    want = testing.duo_loss_reference(z, n, y, alpha=0.0).mean()
    gz, gn = torch.autograd.grad(want, (z, n))

    def no_scale(*a, **k):
        raise AssertionError("alpha=0 must not compute S")

    monkeypatch.setattr(duo_module, "semantic_scale", no_scale)
    loss = DUOLoss(alpha=0.0, backend=backend)
    zz, nn_ = z.detach().to(dtype).requires_grad_(), n.detach().to(dtype).requires_grad_()
    val = loss(zz, nn_, y)
    val.backward()
    assert torch.isnan(loss.last_scales).all() and loss.last_scales.shape == (2, 2)
    assert torch.equal(loss.last_weights, torch.ones_like(loss.last_weights))
    if dtype == torch.float64:
        torch.testing.assert_close(val, want, rtol=1e-12, atol=0)
        torch.testing.assert_close(zz.grad, gz, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(nn_.grad, gn, rtol=1e-10, atol=1e-14)
    else:  # half logits: a float32 loss, as with alpha > 0
        assert val.dtype == torch.float32 and torch.isfinite(val) and zz.grad.dtype == dtype
    with pytest.raises(AssertionError, match="alpha=0 must not compute S"):  # the check itself can fire
        DUOLoss(alpha=0.5, backend=backend)(zz, nn_, y)


@pytest.mark.parametrize("detach", [True, False])
def test_detach_scale_computes_only_the_forward_scale(monkeypatch, detach):
    """detach_scale=True: S's forward alone, no eigenvectors kept and no backward of S; the gradient is the
    oracle's with S detached. detach_scale=False (the control) does both."""
    from auvcore import _cpu
    from auvcore import testing

    calls = []
    real_scale, real_backward = _cpu.semantic_scale, _cpu.scale_backward

    def scale(*a, eigenpairs=False, **k):
        calls.append("eigenpairs" if eigenpairs else "forward")
        return real_scale(*a, eigenpairs=eigenpairs, **k)

    def backward(*a, **k):
        calls.append("backward")
        return real_backward(*a, **k)

    monkeypatch.setattr(_cpu, "semantic_scale", scale)
    monkeypatch.setattr(_cpu, "scale_backward", backward)
    z, n, y = make_inputs((2, 3, 4, 5, 6), 4, torch.float64, False)
    val = DUOLoss(detach_scale=detach, backend="cpp")(z, n, y)
    gz, gn = torch.autograd.grad(val, (z, n))
    assert calls == (["forward"] if detach else ["eigenpairs", "backward"])
    want = testing.duo_loss_reference(z, n, y, detach_scale=detach).mean()
    wz, wn = torch.autograd.grad(want, (z, n))
    torch.testing.assert_close(val, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(gz, wz, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(gn, wn, rtol=1e-8, atol=1e-12)


def test_the_default_and_the_papers_setting_by_name():
    """τ = 0.1 by default (the evidence in bench/RESULTS.md, "The DUO default"); DUOLoss.paper() is the paper's
    α, λ, τ, σ0, β, and any argument overrides it."""
    d, p = DUOLoss(), DUOLoss.paper()
    assert (d.alpha, d.lambda_bce, d.tau, d.sigma0, d.beta) == (0.5, 1.0, 0.1, 0.1, 0.1)
    assert (p.alpha, p.lambda_bce, p.tau, p.sigma0, p.beta) == (0.5, 1.0, 0.5, 0.1, 0.1)
    q = DUOLoss.paper(tau=0.2, to_onehot_y=True)
    assert q.tau == 0.2 and q.to_onehot_y and q.alpha == 0.5
    torch.manual_seed(0)
    z, n = torch.randn(2, 3, 4, 5, 6), torch.randn(2, 3, 4, 5, 6)
    y = (torch.rand(2, 3, 4, 5, 6) > 0.5).double()
    want = auvcore.testing.duo_loss_reference(z.double(), n.double(), y, tau=0.5).mean()
    torch.testing.assert_close(DUOLoss.paper()(z.double(), n.double(), y), want, rtol=1e-10, atol=1e-12)
