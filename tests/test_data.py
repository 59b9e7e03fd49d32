"""auvcore.data: IO round trips, RAS reorientation, resampling, layouts, x̂, bad inputs."""
import json

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("scipy")
import auvcore.data as D
from auvcore.data.io import read_image, resample, to_ras, write_image
from auvcore.encoders import labels_to_grid
from auvcore.testing import resample_reference


def _lps_affine(spacing=(0.8, 0.9, 2.5), origin=(10.0, -20.0, 30.0)):
    a = np.eye(4)
    a[:3, :3] = np.diag([-spacing[0], -spacing[1], spacing[2]])  # L, P, S voxel axes
    a[:3, 3] = origin
    return a


def _oblique_permuted_affine():
    # voxel axes point (S, L, A) with a small rotation: exercises permutation + flip + rotation
    th = np.deg2rad(5)
    R = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    M = np.array([[0, -1.2, 0], [0, 0, 0.7], [3.0, 0, 0]])
    a = np.eye(4)
    a[:3, :3] = R @ M
    a[:3, 3] = (5.0, 6.0, -7.0)
    return a


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_write_read_round_trip_keeps_array_and_affine(tmp_path, suffix):
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 1000, size=(7, 6, 5)).astype(np.int16)
    aff = _oblique_permuted_affine()
    p = write_image(tmp_path / f"x{suffix}", arr, aff)
    back, baff = read_image(p)
    np.testing.assert_array_equal(back, arr)
    np.testing.assert_allclose(baff, aff, atol=1e-5)
    assert not list(tmp_path.glob(".tmp_*")), "temporary file left behind"


def test_nrrd_lps_header_becomes_ras_affine(tmp_path):
    import nrrd

    arr = np.zeros((4, 5, 6), np.int16)
    hdr = {"space": "left-posterior-superior", "space directions": np.diag([2.0, 3.0, 4.0]),
           "space origin": np.array([1.0, 2.0, 3.0]), "kinds": ["domain"] * 3}
    nrrd.write(str(tmp_path / "a.nrrd"), arr, hdr)
    _, aff = read_image(tmp_path / "a.nrrd")
    # LPS (x, y) = -RAS (x, y)
    np.testing.assert_allclose(aff[:3, :3], np.diag([-2.0, -3.0, 4.0]))
    np.testing.assert_allclose(aff[:3, 3], [-1.0, -2.0, 3.0])


def test_to_ras_moves_axes_and_keeps_world_positions():
    arr = np.zeros((5, 6, 7), np.float32)
    arr[1, 4, 2] = 1
    aff = _oblique_permuted_affine()
    world = aff @ np.array([1, 4, 2, 1.0])
    out, oaff = to_ras(arr, aff)
    assert nib.aff2axcodes(oaff) == ("R", "A", "S")
    j = np.argwhere(out == 1)[0]
    np.testing.assert_allclose(oaff @ np.r_[j, 1.0], world, atol=1e-9)
    assert sorted(out.shape) == sorted(arr.shape)


def test_resample_shape_extent_and_no_invented_labels():
    aff = np.diag([0.75, 0.75, 1.5, 1.0])
    lab = np.zeros((40, 40, 20), np.int16)
    lab[5:20, 5:30, 3:10] = 3
    lab[22:35, 10:20, 10:18] = 7
    out, oaff = resample(lab, aff, (1.5, 1.5, 3.0), order=0)
    assert out.shape == (20, 20, 10)
    assert set(np.unique(out)) <= {0, 3, 7}
    np.testing.assert_allclose(np.diag(oaff)[:3], (1.5, 1.5, 3.0))
    # the blob's world centroid stays within one output voxel
    c_in = aff[:3, :3] @ np.argwhere(lab == 7).mean(0) + aff[:3, 3]
    c_out = oaff[:3, :3] @ np.argwhere(out == 7).mean(0) + oaff[:3, 3]
    assert np.all(np.abs(c_in - c_out) <= np.array([1.5, 1.5, 3.0]))


def test_resample_rejects_bad_spacing():
    with pytest.raises(ValueError, match="spacing"):
        resample(np.zeros((4, 4, 4)), np.eye(4), (1.0, -1.0, 1.0))


def _same_as_scipy(array, aff, spacing, order):
    out, oaff = resample(array, aff, spacing, order=order)
    ref = resample_reference(array, aff, spacing, order)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_array_equal(out, ref)  # bit for bit: the scores table does not move
    return out


@pytest.mark.parametrize("seed", range(6))
def test_resample_is_scipys_bit_for_bit_on_random_volumes(seed):
    """Up- and downsampling, anisotropic, 1-voxel axes, and ratios of 2, 1/2 and 3 (half-way samples: the
    float32 ties that a plain separable float64 sum rounds the other way about one time in a thousand)."""
    rng = np.random.default_rng(seed)
    for trial in range(8):
        shape = tuple(int(n) for n in rng.integers(1, 24, 3))
        sp = rng.uniform(0.4, 4.0, 3)
        aff = np.diag([*sp, 1.0])
        aff[:3, 3] = rng.normal(0, 50, 3)
        new = tuple(sp * np.array([2.0, 0.5, 3.0])) if trial % 2 else tuple(rng.uniform(0.4, 4.0, 3))
        img = (rng.normal(0, 300, shape) * (rng.random(shape) < 0.9)).astype(np.float32)
        img.flat[0] = -3071.5  # a large value sets the tolerance of the tie search
        _same_as_scipy(img, aff, new, 1)
        _same_as_scipy(rng.integers(-1000, 3000, shape).astype(np.int16), aff, new, 1)  # int image
        lab = rng.integers(0, 9, shape)
        for dt in (np.int16, np.uint8, np.int64):
            _same_as_scipy(lab.astype(dt), aff, new, 0)
        _same_as_scipy(lab.astype(np.float32), aff, new, 0)  # float labels: nearest, as float32


def test_resample_is_scipys_bit_for_bit_on_the_real_chest_ct():
    slicerio = pytest.importorskip("slicerio")
    import importlib.resources as ir

    img, aff = read_image(ir.files("slicerio") / "data" / "CTChest4.nrrd")
    img, aff = to_ras(img.astype(np.float32), aff)
    lab = np.digitize(img, [-900, -400, 0, 200, 700]).astype(np.int16)  # tissue classes by HU
    for spacing in ((1.5, 1.5, 3.0), (2.2, 4.1, 7.3), (6.094, 6.094, 20.0)):  # Merlin's; odd; exactly 2x
        out = _same_as_scipy(img, aff, spacing, 1)
        assert np.isfinite(out).all()
        _same_as_scipy(lab, aff, spacing, 0)
    del slicerio


def test_resample_takes_tensors_and_keeps_them_on_their_device():
    import torch

    rng = np.random.default_rng(0)
    aff = np.diag([0.8, 0.9, 2.5, 1.0])
    img = rng.normal(0, 100, (9, 8, 7)).astype(np.float32)
    lab = rng.integers(0, 4, (9, 8, 7)).astype(np.int16)
    t, taff = resample(torch.from_numpy(img), aff, (1.5, 1.5, 3.0), order=1)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_array_equal(t.numpy(), resample(img, aff, (1.5, 1.5, 3.0))[0])
    tl, _ = resample(torch.from_numpy(lab), aff, (1.5, 1.5, 3.0), order=0, device="cpu")
    assert tl.dtype == torch.int16
    np.testing.assert_array_equal(tl.numpy(), resample_reference(lab, aff, (1.5, 1.5, 3.0), 0))
    with pytest.raises(ValueError, match="order"):
        resample(img, aff, (1.5, 1.5, 3.0), order=3)


def _write_case(root, cid, img, lab, aff, lab_aff=None, layout="nnunet"):
    if layout == "nnunet":
        write_image(root / "imagesTr" / f"{cid}_0000.nii.gz", img, aff)
        if lab is not None:
            write_image(root / "labelsTr" / f"{cid}.nii.gz", lab, aff if lab_aff is None else lab_aff)
    else:
        write_image(root / "imagesTr" / f"{cid}.nii.gz", img, aff)
        if lab is not None:
            write_image(root / "labelsTr" / f"{cid}.nii.gz", lab, aff if lab_aff is None else lab_aff)


def _toy(seed=0, shape=(12, 10, 6)):
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 100, shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[2:6, 2:6, 1:4] = 1
    lab[7:10, 3:8, 2:5] = 2
    return img, lab


def _nnunet(tmp_path, n=3):
    root = tmp_path / "Dataset001_Toy"
    aff = _lps_affine()
    for i in range(n):
        img, lab = _toy(i)
        _write_case(root, f"toy_{i:03d}", img, lab, aff)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": n, "file_ending": ".nii.gz"}))
    return root


def test_discover_nnunet(tmp_path):
    root = _nnunet(tmp_path)
    (root / "corruption.json").write_text(json.dumps({"toy_001": {"corrupted": True, "kind": "erode"}}))
    ds = D.discover(root)
    assert ds.layout == "nnunet" and ds.modality == "CT"
    assert [c.case_id for c in ds.cases] == ["toy_000", "toy_001", "toy_002"]
    assert ds.class_names == {0: "background", 1: "liver", 2: "tumour"}
    assert ds.cases[0].image.name == "toy_000_0000.nii.gz" and ds.cases[0].label.name == "toy_000.nii.gz"
    assert ds.corruption["toy_001"]["kind"] == "erode"
    assert ds.root == root and ds.num_classes == 3


def test_discover_msd(tmp_path):
    root = tmp_path / "Task09_Spleen"
    aff = _lps_affine()
    for cid in ("spleen_2", "spleen_10"):
        img, lab = _toy()
        _write_case(root, cid, img, lab, aff, layout="msd")
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
        "training": [{"image": "./imagesTr/spleen_2.nii.gz", "label": "./labelsTr/spleen_2.nii.gz"},
                     {"image": "./imagesTr/spleen_10.nii.gz", "label": "./labelsTr/spleen_10.nii.gz"}]}))
    ds = D.discover(root)
    assert ds.layout == "msd" and ds.class_names == {0: "background", 1: "spleen"}
    assert sorted(c.case_id for c in ds.cases) == ["spleen_10", "spleen_2"]
    assert all(c.label is not None and c.label.is_file() for c in ds.cases)
    assert ds.corruption is None


def test_discover_csv_relative_paths_and_empty_label(tmp_path):
    aff = _lps_affine()
    img, lab = _toy()
    write_image(tmp_path / "d" / "a_img.nrrd", img, aff)
    write_image(tmp_path / "d" / "a_lab.nrrd", lab, aff)
    write_image(tmp_path / "d" / "b_img.nii.gz", img, aff)
    (tmp_path / "d" / "cases.csv").write_text("case,image,label\na,a_img.nrrd,a_lab.nrrd\nb,b_img.nii.gz,\n")
    for target in (tmp_path / "d", tmp_path / "d" / "cases.csv"):
        ds = D.discover(target)
        assert ds.layout == "csv"
        assert ds.cases[0].image == tmp_path / "d" / "a_img.nrrd"
        assert ds.cases[1].label is None
    with pytest.raises(FileNotFoundError, match="'b'.*label"):
        D.load_case(ds.cases[1])
    v = D.load_case(ds.cases[1], require_label=False)
    assert v.label is None


@pytest.mark.parametrize("make,msg", [
    (lambda p: p / "nope", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no data set layout"),
    (lambda p: ((p / "e" / "imagesTr").mkdir(parents=True), p / "e")[1], "no cases"),
])
def test_discover_errors(tmp_path, make, msg):
    with pytest.raises(ValueError, match=msg):
        D.discover(make(tmp_path))


def test_discover_csv_without_header(tmp_path):
    (tmp_path / "c.csv").write_text("a,img.nii.gz,lab.nii.gz\n")
    with pytest.raises(ValueError, match="header"):
        D.discover(tmp_path / "c.csv")


def test_load_case_reorients_resamples_and_keeps_world(tmp_path):
    root = _nnunet(tmp_path, n=1)
    case = D.discover(root).cases[0]
    img, lab = _toy(0)
    v = D.load_case(case, spacing=(1.6, 1.8, 5.0))
    assert nib.aff2axcodes(v.affine) == ("R", "A", "S")
    assert v.image.dtype == np.float32 and v.label.dtype == np.int64
    assert v.image.shape == v.label.shape == (6, 5, 3)
    np.testing.assert_allclose(v.spacing, (1.6, 1.8, 5.0))
    assert set(np.unique(v.label)) <= {0, 1, 2}
    # the voxels per label value, counted once when the label was resampled
    np.testing.assert_array_equal(v.label_counts, np.bincount(v.label.reshape(-1)))
    aff = _lps_affine()
    for c in (1, 2):
        w_in = aff[:3, :3] @ np.argwhere(lab == c).mean(0) + aff[:3, 3]
        w_out = v.affine[:3, :3] @ np.argwhere(v.label == c).mean(0) + v.affine[:3, 3]
        assert np.all(np.abs(w_in - w_out) <= np.array([1.6, 1.8, 5.0]))
    # native grid: the same voxels, only flipped to RAS
    v0 = D.load_case(case, spacing=None)
    np.testing.assert_array_equal(v0.label, lab[::-1, ::-1, :])
    np.testing.assert_allclose(v0.image, img[::-1, ::-1, :])


def test_load_case_errors_name_the_case(tmp_path):
    root = tmp_path / "ds"
    aff = _lps_affine()
    img, lab = _toy()
    _write_case(root, "shape", img, lab[:-1], aff)
    _write_case(root, "affine", img, lab, aff, lab_aff=_lps_affine(origin=(0, 0, 0)))
    _write_case(root, "nolabel", img, None, aff)
    _write_case(root, "floatlab", img, lab.astype(np.float32) + 0.5, aff)
    (root / "imagesTr" / "broken_0000.nii.gz").write_bytes(b"not a nifti at all")
    _write_case(root, "ok", img, lab, aff)
    (root / "labelsTr" / "broken.nii.gz").write_bytes(b"x")
    (root / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", "labels": {"background": 0, "a": 1, "b": 2}}))
    ds = D.discover(root)
    c = {x.case_id: x for x in ds.cases}
    with pytest.raises(ValueError, match="'shape'.*shape"):
        D.load_case(c["shape"])
    with pytest.raises(ValueError, match="'affine'.*affines differ"):
        D.load_case(c["affine"])
    with pytest.raises(FileNotFoundError, match="'nolabel'.*label"):
        D.load_case(c["nolabel"])
    with pytest.raises(ValueError, match="'floatlab'.*non-integer"):
        D.load_case(c["floatlab"])
    with pytest.raises(ValueError, match="'broken'.*cannot read"):
        D.load_case(c["broken"])
    with pytest.raises(ValueError, match="modality"):
        D.load_case(c["ok"], modality="PET")
    assert D.load_case(c["ok"]).case_id == "ok"


def test_normalized_image_uses_foreground_stats_and_clips():
    rng = np.random.default_rng(1)
    img = rng.normal(0, 1, (20, 20, 10)).astype(np.float32)
    lab = np.zeros(img.shape, np.int64)
    lab[5:15, 5:15, 2:8] = 1
    lab[0:3, 0:3, 0:3] = 2
    img[lab > 0] = img[lab > 0] * 30 + 200  # foreground has its own statistics
    img[0, 19, 9] = 1e6  # outside: clipped
    x = D.normalized_image(img, lab)
    fg = x[lab > 0]
    assert abs(fg.mean()) < 1e-3 and abs(fg.std() - 1) < 2e-2
    assert x.max() <= 5 and x.min() >= -5 and x[0, 19, 9] == 5
    # background around 0 HU is far below the foreground mean of 200 → clipped at −5
    assert np.all(x[lab == 0][:100] < -4)
    # no foreground: whole-image statistics
    x0 = D.normalized_image(img[:3, 10:, :], np.zeros((3, 10, 10)))
    assert np.isfinite(x0).all()
    with pytest.raises(ValueError, match="shapes differ"):
        D.normalized_image(img, lab[:-1])


def test_windows_and_percentile_scaling():
    hu = np.array([-2000, -1000, 0, 1000, 3000], np.float32)
    np.testing.assert_allclose(D.window_ct(hu), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(D.window_named(np.array([40.0]), "soft_tissue"), [0.5])
    mr = np.arange(1, 101, dtype=np.float32)
    s = D.scale_percentile(mr, 0, 100)
    assert s.min() == 0 and s.max() == 1
    with pytest.raises(ValueError, match="lo < hi"):
        D.window_ct(hu, 5, 5)


def test_crop_or_pad_and_foreground():
    a = np.arange(10 * 8 * 6).reshape(10, 8, 6)
    out, start = D.crop_or_pad(a, (4, 12, 6), center=(8, 4, 3), pad_value=-1)
    assert out.shape == (4, 12, 6)
    assert start[0] == 6  # window kept inside the array
    np.testing.assert_array_equal(out[:, 2:10, :], a[6:10])
    assert (out[:, :2] == -1).all()
    lab = np.zeros((10, 8, 6))
    lab[2:4, 3:5, 1:2] = 1
    assert D.foreground_bbox(lab, margin=1) == (slice(1, 5), slice(2, 6), slice(0, 3))
    assert D.foreground_bbox(np.zeros((3, 3, 3))) is None


def test_labels_to_grid_majority_and_nearest():
    lab = np.zeros((8, 8, 4), np.int64)
    lab[0:4, 0:4, 0:2] = 5  # a full block
    lab[4:8, 0:4, 0:2][:3] = 2  # 3/4 of the block → majority 2
    g = labels_to_grid(lab, (2, 2, 2), stride=(4, 4, 2))
    assert g[0, 0, 0] == 5 and g[1, 0, 0] == 2 and g[0, 1, 0] == 0
    assert set(np.unique(g)) <= set(np.unique(lab))
    n = labels_to_grid(lab, (2, 2, 2), mode="nearest", stride=(4, 4, 2))
    assert n[0, 0, 0] == lab[2, 2, 1] and n[1, 0, 0] == lab[6, 2, 1]
    # uneven sizes: still only existing labels
    odd = labels_to_grid(np.random.default_rng(0).integers(0, 3, (9, 7, 5)) * 3, (3, 2, 2))
    assert set(np.unique(odd)) <= {0, 3, 6}
    with pytest.raises(ValueError, match="mode"):
        labels_to_grid(lab, (2, 2, 2), mode="mean")


@pytest.mark.cuda
def test_resample_on_the_gpu_is_scipys():
    """The scoring device's resampling (a GPU run resamples there): the same volume as on the CPU, bit for bit
    (float64 arithmetic and the tie search run the same on either device), labels and counts included."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    rng = np.random.default_rng(3)
    aff = np.diag([0.7, 0.9, 2.5, 1.0])
    img = rng.normal(0, 300, (40, 36, 20)).astype(np.float32)
    lab = rng.integers(0, 6, (40, 36, 20)).astype(np.int16)
    for spacing in ((1.5, 1.5, 3.0), (1.4, 0.45, 7.5)):
        g, _ = resample(torch.from_numpy(img), aff, spacing, order=1, device="cuda")
        assert g.is_cuda
        np.testing.assert_array_equal(g.cpu().numpy(), resample_reference(img, aff, spacing, 1))
        gl, _ = resample(lab, aff, spacing, order=0, device="cuda")  # numpy in: resampled there, host out
        np.testing.assert_array_equal(gl, resample_reference(lab, aff, spacing, 0))
