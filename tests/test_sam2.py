"""SAM2Encoder against the real ``sam2`` package, with random-weight checkpoints made by the package itself:
the grid order, shapes, fills, a local MedSAM2-style YAML config (512-pixel input), strict checkpoint
loading, both outputs through ``score_case``, and ``auvcore score --encoder sam2`` end to end.

``sam2`` needs a torchvision that imports beside torch, which the CPU torch 2.13.0 of the main install does
not have: these tests skip there (with the reason) and run in the environment that ``bench/run_sam2.sh``
builds (torch 2.14.1 + torchvision 0.29.1 + sam2 1.1.0). Without ``sam2``, only the clear ImportError is
tested. Random weights cannot segment, so quality is tested with LiteMedSAM's real weights
(tests/test_litemedsam.py), not here.
"""
import importlib.util
import json

import numpy as np
import pytest
import torch

from auvcore.data.dataset import Volume
from auvcore.encoders import get_encoder
from auvcore.app.scoring import score_case


def _sam2_importable():
    if importlib.util.find_spec("sam2") is None:
        return "optional sam2 package not installed (bench/run_sam2.sh builds an environment with it)"
    try:
        import sam2.sam2_image_predictor  # noqa: F401  (imports torchvision)
    except Exception as e:  # torchvision built for another torch: 'operator torchvision::nms does not exist'
        return f"sam2 does not import here: {e}"
    return None


WHY = _sam2_importable()
needs_sam2 = pytest.mark.skipif(WHY is not None, reason=WHY or "")
K = 5
CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"


def phantom():
    """Like tests/test_litemedsam.py's, smaller: ``[X, Y, Z] = [40, 32, 4]``; class 1 over slices 0–2, class 2
    in two parts in slice 1–3, class 3 in slice 2 only, class 4 absent."""
    X, Y, Z = 40, 32, 4
    g = np.mgrid[:X, :Y, :Z].astype(np.float32)
    lab = np.zeros((X, Y, Z), np.int64)
    lab[(((g[0] - 12) / 8) ** 2 + ((g[1] - 10) / 6) ** 2 <= 1) & (g[2] <= 2)] = 1
    lab[(((g[0] - 30) / 5) ** 2 + ((g[1] - 24) / 5) ** 2 <= 1) & (g[2] >= 1)] = 2
    lab[(((g[0] - 30) / 3) ** 2 + ((g[1] - 8) / 3) ** 2 <= 1) & (g[2] >= 1)] = 2  # a second part
    lab[(((g[0] - 12) / 3) ** 2 + ((g[1] - 26) / 3) ** 2 <= 1) & (g[2] == 2)] = 3
    rng = np.random.default_rng(0)
    img = np.where(lab > 0, 600.0, -700.0) + rng.normal(0, 25, lab.shape)
    return Volume(img.astype(np.float32), lab, (1.0, 1.2, 2.5), np.eye(4), "phantom", "CT")


def _checkpoint(path, config, image_size=None):
    """A random-weight checkpoint in SAM2's release layout ({"model": state_dict}); with ``image_size``, also
    a local YAML copy of the package's config with that input size (MedSAM2's sam2.1_hiera_t512 is the
    tiny model at 512)."""
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose(config_name=config)
    if image_size is not None:
        cfg.model.image_size = image_size
        config = str(path.with_suffix(".yaml"))
        OmegaConf.save(cfg, config)
    torch.manual_seed(0)
    model = instantiate(cfg.model, _recursive_=True)
    torch.save({"model": model.state_dict()}, path)
    return path, config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    if WHY:
        pytest.skip(WHY)
    return _checkpoint(tmp_path_factory.mktemp("sam2") / "sam2_random.pt", CONFIG)[0]


@pytest.fixture(scope="module")
def enc(ckpt):
    return get_encoder("sam2", checkpoint=ckpt, config=CONFIG)


@pytest.fixture(scope="module")
def case():
    return phantom()


@pytest.mark.skipif(WHY is None, reason="sam2 imports here")
def test_absent_sam2_gives_a_clear_error(tmp_path):
    ck = tmp_path / "medsam2.pt"
    ck.write_bytes(b"")
    with pytest.raises(ImportError, match="sam2"):
        get_encoder("sam2", checkpoint=ck)


@needs_sam2
def test_decoded_maps_on_the_volume_grid(enc, case):
    x = enc.preprocess(case.image)
    m = enc(x, case.label, num_classes=K)
    # the label's axis order [X, Y, Z] (the adapter once returned [Z, X, Y] and encode_case refused it)
    assert m.shape == (1, K, 40, 32, 4) and m.dtype == torch.float32 and torch.isfinite(m).all()
    lab = case.label
    for c in range(1, K):
        absent = [z for z in range(4) if not (lab[:, :, z] == c).any()]
        assert (m[0, c][..., absent] == enc.fill).all(), c
        present = [z for z in range(4) if (lab[:, :, z] == c).any()]
        assert all((m[0, c][..., z] != enc.fill).any() for z in present), c
    assert torch.equal(m[0, 0], -m[0, 1:].max(dim=0).values)
    z = enc.decoded_maps(x, lab, num_classes=K)
    assert z.shape == (1, K, 4, 40, 32) and torch.equal(z.permute(0, 1, 3, 4, 2), m)


@needs_sam2
def test_score_case_both_outputs(enc, case):
    r = score_case(enc, case, K, mode="decoded")
    assert np.isnan(r["S"][4]) and all(0.0 <= r["S"][c] <= 1.0 for c in (1, 2, 3))
    e = enc.with_output("embedding")
    assert e.model is enc.model and not e.needs_label
    feats, lab = e.encode(case, num_classes=K)
    # 1024-pixel input / 16 = 64 cells per side, pooled to the 40 × 32 slice
    assert feats.shape == (1, 256, 40, 32, 4) and lab.shape == (1, 40, 32, 4)
    r = score_case(enc, case, K, mode="masked")
    assert np.isfinite(r["S"][[1, 2]]).all() and np.isnan(r["S"][4])


@needs_sam2
def test_medsam2_style_local_config_and_strict_checkpoint(tmp_path, case):
    ck, yaml = _checkpoint(tmp_path / "medsam2_t512.pt", CONFIG, image_size=512)
    enc = get_encoder("sam2", checkpoint=ck, config=yaml)
    assert enc.model.image_size == 512
    e = enc.with_output("embedding")
    sub = Volume(case.image[:, :, 1:3], case.label[:, :, 1:3], case.spacing, np.eye(4), "sub", "CT")
    feats, _ = e.encode(sub, num_classes=K)
    assert feats.shape == (1, 256, 32, 32, 2)  # 512 / 16 = 32 cells, pooled along X only to ≤ 40
    # a checkpoint that does not fit its config is refused, naming the keys
    sd = torch.load(ck, weights_only=True)["model"]
    sd.pop(next(iter(sd)))
    torch.save(sd, tmp_path / "damaged.pt")  # also the plain state-dict layout
    with pytest.raises(ValueError, match="does not fit config.*1 missing keys"):
        get_encoder("sam2", checkpoint=tmp_path / "damaged.pt", config=yaml)
    with pytest.raises(ValueError, match="config: 'configs/nope.yaml' is neither"):
        get_encoder("sam2", checkpoint=ck, config="configs/nope.yaml")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        get_encoder("sam2", checkpoint=tmp_path / "missing.pt")


@needs_sam2
def test_score_command_end_to_end(ckpt, case, tmp_path):
    import nibabel as nib

    from auvcore.app.cli import main

    ds = tmp_path / "ds"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    for i in range(3):
        img = case.image + np.random.default_rng(i).normal(0, 10, case.image.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(img, np.diag([*case.spacing, 1.0])), ds / "imagesTr" / f"c{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(case.label.astype(np.uint8), np.diag([*case.spacing, 1.0])),
                 ds / "labelsTr" / f"c{i}.nii.gz")
    labels = {"background": 0, "a": 1, "b": 2, "c": 3, "d": 4}
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                 "numTraining": 3, "file_ending": ".nii.gz"}))
    for mode in ("decoded", "masked"):
        rc = main(["score", str(ds), "--encoder", "sam2", "--checkpoint", str(ckpt), "--mode", mode,
                   "--out", str(tmp_path / mode), "--no-progress"])
        assert rc == 0, mode
        import pandas as pd

        t = pd.read_parquet(tmp_path / mode / "scores.parquet")
        assert len(t) == 3 and t["auv"].notna().all(), mode
