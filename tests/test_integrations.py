"""DUO in training frameworks: the MONAI example trains, nnU-Net v2 finds and runs nnUNetTrainerDUO.

Each test skips, with the reason, when its framework is not installed (extras ``monai`` and ``nnunet``; the
README's "Training frameworks" says how to install nnU-Net next to a CPU-only torch)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import auvcore

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "monai_duo.py"

needs_native = pytest.mark.skipif(not auvcore.has_native(), reason="native module not built")
needs_monai = pytest.mark.skipif(importlib.util.find_spec("monai") is None,
                                 reason="monai not installed (pip install 'auvcore[monai]')")
needs_nnunet = pytest.mark.skipif(importlib.util.find_spec("nnunetv2") is None,
                                  reason="nnunetv2 not installed (README, 'Training frameworks')")


def test_import_auvcore_imports_no_framework(tmp_path):
    code = ("import sys, auvcore, auvcore.integrations; "
            "print(sorted(m for m in ('monai', 'nnunetv2', 'dynamic_network_architectures') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------
# MONAI


@pytest.mark.slow
@needs_monai
@needs_native
def test_monai_example_trains_and_the_loss_decreases():
    spec = importlib.util.spec_from_file_location("monai_duo_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.train(steps=16, seed=0, verbose=False)
    losses = out["losses"]
    assert len(losses) == 16 and all(map(lambda v: v == v and v < 10, losses))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.02, losses
    head = out["model"].noise_head.conv
    assert head.weight.abs().max() > 0  # the zero-initialised head has learned something
    assert 0.0 <= out["val_dice"] <= 1.0


# ---------------------------------------------------------------------------------------------------------
# nnU-Net v2: the pieces


def _tiny_unet(deep_supervision=True, num_classes=3):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(1, 3, [4, 8, 16], torch.nn.Conv3d, 3, [1, 2, 2], 1, num_classes, 1, conv_bias=True,
                         norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"affine": True},
                         nonlin=torch.nn.LeakyReLU, deep_supervision=deep_supervision)


@needs_nnunet
@needs_native
def test_nnunet_loss_is_duo_per_output_with_the_noise_head():
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    from auvcore.integrations.nnunet import DUODeepSupervisionLoss, HEAD, attach_noise_head

    torch.manual_seed(0)
    net = attach_noise_head(_tiny_unet(), 3)
    head = getattr(net, HEAD)
    assert head.head.conv.weight.abs().max() == 0 and head.head.conv.bias.abs().max() == 0  # zero-initialised
    assert any(k.startswith(HEAD + ".") for k in net.state_dict())  # in checkpoints and in the optimiser
    x = torch.randn(2, 1, 8, 16, 16)
    labels = torch.randint(0, 3, (2, 1, 8, 16, 16)).float()
    out = net(x)
    assert isinstance(out, (list, tuple)) and len(out) == 2
    targets = [labels] + [F.interpolate(labels, size=o.shape[2:], mode="nearest") for o in out[1:]]
    weights = (2 / 3, 1 / 3)
    duo = auvcore.DUOLoss(num_classes=3, include_background=True, to_onehot_y=True)
    loss = DUODeepSupervisionLoss(duo, weights, head.noise_logits)(out, targets)
    # by hand: DUOLoss at each output, noise logits (here 0) area-averaged to its size
    expect = sum(w * duo(o, torch.zeros_like(o), t) for w, o, t in zip(weights, out, targets))
    assert torch.allclose(loss, expect, rtol=1e-6)
    loss.backward()
    assert head.head.conv.weight.grad.abs().max() > 0  # the head learns from DUO's noise term
    with pytest.raises(RuntimeError, match="forward"):
        head.noise_logits()  # the features were handed over once
    # one output without deep supervision; the noise logits at a lower scale are the area mean of the full ones
    net1 = attach_noise_head(_tiny_unet(deep_supervision=False), 3)
    with torch.no_grad():
        getattr(net1, HEAD).head.conv.bias.copy_(torch.tensor([0.5, -0.2, 0.1]))
    out1 = net1(x)
    assert torch.is_tensor(out1)
    assert torch.isfinite(DUODeepSupervisionLoss(duo, None, getattr(net1, HEAD).noise_logits)(out1, labels))
    seen = []
    full = torch.randn(2, 3, 8, 16, 16)

    def spy(o, n, t):
        seen.append(n)
        return o.sum() * 0

    probe = DUODeepSupervisionLoss(duo, (0.5, 0.5), lambda: full)
    probe.ds = DeepSupervisionWrapper(spy, (0.5, 0.5))
    probe([torch.zeros(2, 3, 8, 16, 16), torch.zeros(2, 3, 8, 8, 8)], [labels, labels[:, :, :, ::2, ::2]])
    assert seen[0] is full
    assert torch.allclose(seen[1], full.reshape(2, 3, 8, 8, 2, 8, 2).mean((4, 6)), atol=1e-6)


@needs_nnunet
def test_nnunet_finds_the_trainer_in_the_external_folder():
    """The folder that `trainer-dir` prints, searched as nnU-Net searches each nnUNet_extTrainer folder."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    from auvcore.integrations import nnunet as integ

    out = subprocess.run([sys.executable, "-m", "auvcore.integrations.nnunet", "trainer-dir"], capture_output=True,
                         text=True, check=True, cwd=ROOT.parent)
    folder = out.stdout.strip()
    assert Path(folder) == integ.TRAINER_DIR and Path(folder).is_dir()
    for name in ("nnUNetTrainerDUO", "nnUNetTrainerDUO_smoke"):
        cls = recursive_find_python_class(folder, name, None, base_folder=folder, cleanup_imports_from_base_folder=True)
        assert cls is getattr(integ, name) and issubclass(cls, nnUNetTrainer)


@needs_nnunet
def test_nnunet_full_lookup_through_nnUNet_extTrainer(monkeypatch):
    """nnU-Net's whole lookup: its own folder first (importing every module there), then nnUNet_extTrainer."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("nnU-Net's own trainer folder imports its Primus trainers, which need timm (and torchvision: "
                    "PyPI's build needs a CUDA torch); `auvcore.integrations.nnunet install` is the way there")
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from auvcore.integrations import nnunet as integ

    monkeypatch.setenv("nnUNet_extTrainer", str(integ.TRAINER_DIR))  # nnunetv2.paths reads it when asked
    assert recursive_find_trainer_class_by_name("nnUNetTrainerDUO") is integ.nnUNetTrainerDUO


# ---------------------------------------------------------------------------------------------------------
# nnU-Net v2: a real run on the demo data set, with the filter's splits


def _run(cmd, env, log: Path, timeout=600):
    with open(log, "w") as f:
        r = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{log.read_text()[-4000:]}"
    return log.read_text()


@pytest.mark.slow
@needs_nnunet
@needs_native
def test_nnunet_plan_preprocess_train_predict_with_duo_and_the_filter_splits(tmp_path):
    """auvcore score + filter on the demo set, then nnU-Net as a user runs it: plan and preprocess, the filter's
    splits, `nnUNetv2_train -tr nnUNetTrainerDUO_smoke -device cpu` (one epoch of 4 iterations, validation
    included) and `nnUNetv2_predict` with the trained checkpoint (which holds the noise head)."""
    from auvcore.app.cli import main as auvcore_main
    from auvcore.data.demo import build_demo
    from auvcore.integrations import nnunet as integ

    raw, pre, res = (tmp_path / d for d in ("raw", "pre", "res"))
    demo = build_demo(tmp_path / "demo", n_cases=8, corrupt_fraction=0.25, seed=3, size_mm=(64.0, 64.0, 40.0))
    run = tmp_path / "run"
    assert auvcore_main(["score", str(demo), "--encoder", "random3d", "--out", str(run), "--no-progress"]) == 0
    assert auvcore_main(["filter", str(run), "--quantile", "0.75"]) == 0
    splits = json.loads((run / "filter" / "splits_final.json").read_text())
    dropped = set((run / "filter" / "dropped.txt").read_text().split())
    assert dropped and not dropped & set(splits[0]["train"])
    shutil.copytree(demo, raw / "Dataset998_AuvDemo")

    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(res),
           "nnUNet_compile": "f", "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1", "OMP_NUM_THREADS": "2"}
    bindir = Path(sys.executable).parent
    _run([bindir / "nnUNetv2_plan_and_preprocess", "-d", "998", "-c", "3d_fullres", "-np", "1"], env,
         tmp_path / "plan.log")
    cli = [sys.executable, "-m", "auvcore.integrations.nnunet"]
    _run(cli + ["splits", str(run), "998"], env, tmp_path / "splits.log")
    assert json.loads((pre / "Dataset998_AuvDemo" / "splits_final.json").read_text()) == splits

    shim = integ.nnunet_trainer_folder() / integ.SHIM_NAME
    ours = not shim.exists()
    try:
        _run(cli + ["install"], env, tmp_path / "install.log")
        env["nnUNet_n_proc_DA"] = "0"  # augmentation in the main process
        log = _run([bindir / "nnUNetv2_train", "998", "3d_fullres", "0", "-tr", "nnUNetTrainerDUO_smoke",
                    "-device", "cpu"], env, tmp_path / "train.log")
        out = res / "Dataset998_AuvDemo" / "nnUNetTrainerDUO_smoke__nnUNetPlans__3d_fullres" / "fold_0"
        (tmp_path / "in").mkdir()
        case = splits[0]["val"][0]
        shutil.copy(raw / "Dataset998_AuvDemo" / "imagesTr" / f"{case}_0000.nii.gz", tmp_path / "in")
        _run([bindir / "nnUNetv2_predict", "-i", tmp_path / "in", "-o", tmp_path / "pred", "-d", "998", "-c",
              "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerDUO_smoke", "-chk", "checkpoint_final.pth", "-device",
              "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env, tmp_path / "predict.log")
    finally:
        if ours:
            integ.uninstall_shim()
    assert "Using splits from existing split file" in log
    assert f"This split has {len(splits[0]['train'])} training and {len(splits[0]['val'])} validation cases" in log
    losses = [float(line.split()[-1]) for line in log.splitlines() if "train_loss" in line or "val_loss" in line]
    assert len(losses) == 2 and all(0 < v < 10 for v in losses), log[-3000:]
    ck = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["trainer_name"] == "nnUNetTrainerDUO_smoke"
    head = {k: v for k, v in ck["network_weights"].items() if k.startswith(integ.HEAD + ".")}
    assert head and max(float(v.abs().max()) for v in head.values()) > 0  # trained away from its zero start
    assert json.loads((out / "validation" / "summary.json").read_text())["foreground_mean"]
    assert (tmp_path / "pred" / f"{case}.nii.gz").is_file()


# ---------------------------------------------------------------------------------------------------------
# On a GPU: the frameworks' steps run DUO's CUDA kernels (skip without a GPU)

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and auvcore.has_cuda_kernels()),
                               reason="needs a CUDA GPU, a CUDA torch and auvcore built with CUDA")


def _spy_cuda_duo(monkeypatch):
    """Count the calls of DUO's CUDA kernels, so a test can tell that a training step took the CUDA path."""
    from auvcore import _cuda

    calls = {"duo_sums": 0, "duo_backward": 0}
    for name in calls:
        real = getattr(_cuda, name)

        def spy(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(_cuda, name, spy)
    return calls


@needs_gpu
@needs_monai
def test_monai_example_trains_on_the_gpu_with_the_cuda_kernels(monkeypatch):
    calls = _spy_cuda_duo(monkeypatch)
    spec = importlib.util.spec_from_file_location("monai_duo_example_gpu", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.train(steps=8, seed=0, device="cuda", verbose=False)
    assert len(out["losses"]) == 8 and all(v == v for v in out["losses"])
    assert calls["duo_sums"] >= 8 and calls["duo_backward"] >= 8, calls
    assert next(out["model"].parameters()).is_cuda


@needs_gpu
@needs_nnunet
def test_nnunet_loss_on_the_gpu_uses_the_cuda_kernels_and_matches_the_cpu(monkeypatch):
    from auvcore.integrations.nnunet import HEAD, DUODeepSupervisionLoss, attach_noise_head

    calls = _spy_cuda_duo(monkeypatch)
    torch.manual_seed(0)
    net = attach_noise_head(_tiny_unet(), 3)
    x = torch.randn(2, 1, 8, 16, 16)
    labels = torch.randint(0, 3, (2, 1, 8, 16, 16)).float()
    weights = (2 / 3, 1 / 3)
    duo = auvcore.DUOLoss(num_classes=3, include_background=True, to_onehot_y=True)
    losses, grads = [], []
    for dev in ("cpu", "cuda"):
        net = net.to(dev)
        net.zero_grad()
        out = net(x.to(dev))
        targets = [labels.to(dev)] + [F.interpolate(labels.to(dev), size=o.shape[2:], mode="nearest") for o in out[1:]]
        loss = DUODeepSupervisionLoss(duo, weights, getattr(net, HEAD).noise_logits)(out, targets)
        loss.backward()
        losses.append(loss.item())
        grads.append(getattr(net, HEAD).head.conv.weight.grad.detach().cpu().clone())
    assert calls["duo_sums"] == 2 and calls["duo_backward"] == 2, calls  # one per deep-supervision output
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-6)
