"""nnU-Net v2 with the DUO loss: ``nnUNetTrainerDUO``.

Usage (nnU-Net 2.8 looks trainers up by class name in its own folder, then in the folders of the
``nnUNet_extTrainer`` environment variable; this module names the folder that holds auvcore's)::

    export nnUNet_extTrainer=$(python -m auvcore.integrations.nnunet trainer-dir)
    nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerDUO

``nnUNetv2_predict ... -tr nnUNetTrainerDUO`` finds it the same way. nnU-Net searches its own folder
first and imports every module there, its Primus trainers too, which need timm and so torchvision; where those
cannot be installed (a CPU-only torch: PyPI's torchvision is a CUDA build), or to skip the variable,
``python -m auvcore.integrations.nnunet install`` writes a one-line module into nnU-Net's trainer folder that
imports these trainers, and nnU-Net finds them before it reaches Primus (``uninstall`` removes it).

``nnUNetTrainerDUO_smoke`` is the same trainer for one epoch of a few iterations: it checks a set-up end to
end in a few minutes on a CPU (``-device cpu``). To train on the cases that auvcore's
filter kept, put its ``splits_final.json`` where nnU-Net reads the split, after preprocessing and before
the first training of the data set (it checks the case ids)::

    python -m auvcore.integrations.nnunet splits RUN DATASET

The trainer is nnU-Net's own, with three changes:

* the network gets DUO's noise head (``auvcore.NoiseHead``, a zero-initialised 1×1×1 convolution) on the
  decoder's last feature map, i.e. the input of the full-resolution segmentation layer; it is a submodule
  ``duo_noise_head`` of the network, so nnU-Net's optimiser, checkpoints and inference carry it;
* the loss is ``DUOLoss`` (class indices compared on the fly, all channels including the background, whose
  logit the argmax at inference needs) at every deep-supervision output, weighted by nnU-Net's own
  deep-supervision weights; the noise logits of a lower-resolution output are the full-resolution ones
  averaged over each output voxel (``interpolate(mode="area")``), as the labels are that same map
  downsampled;
* region-based training and ignore labels are refused: DUO's formula has no place for them.

Change DUO's hyperparameters in a subclass: ``duo_kwargs = {**nnUNetTrainerDUO.duo_kwargs, "alpha": 1.0}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..duo import DUOLoss, NoiseHead

try:
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
except ImportError as e:  # pragma: no cover - exercised only without nnunetv2
    raise ImportError(
        "auvcore.integrations.nnunet needs nnU-Net v2 (nnunetv2). Install it without letting pip replace "
        "torch, e.g. `pip install --no-deps nnunetv2==2.8.1 dynamic-network-architectures==0.4.4` plus its "
        f"other dependencies (see the README, \"Training frameworks\"): {e}") from e

TRAINER_DIR = Path(__file__).resolve().parent / "nnunet_trainers"
HEAD = "duo_noise_head"


class DecoderNoiseHead(nn.Module):
    """DUO's noise head on the input of a network's last segmentation layer.

    A forward pre-hook on that layer keeps a reference to the feature map entering it (no copy);
    ``noise_logits()`` applies the head to it and lets it go.
    """

    def __init__(self, last_layer: nn.Module, num_classes: int):
        super().__init__()
        if not isinstance(last_layer, (nn.Conv2d, nn.Conv3d)):
            raise TypeError(f"the last segmentation layer is a {type(last_layer).__name__}, not a 2-D/3-D convolution")
        self.head = NoiseHead(last_layer.in_channels, num_classes, spatial_dims=last_layer.weight.dim() - 2)
        self._features = None
        last_layer.register_forward_pre_hook(self._keep)

    def _keep(self, module, args):
        self._features = args[0]

    def noise_logits(self) -> torch.Tensor:
        if self._features is None:
            raise RuntimeError("no decoder features: run the network forward before asking for the noise logits")
        features, self._features = self._features, None
        return self.head(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


def attach_noise_head(network: nn.Module, num_classes: int) -> nn.Module:
    """Add ``network.duo_noise_head`` (a ``DecoderNoiseHead``) on ``network.decoder.seg_layers[-1]``, the
    full-resolution output layer of nnU-Net's U-Nets (dynamic_network_architectures). Returns ``network``."""
    layers = getattr(getattr(network, "decoder", None), "seg_layers", None)
    if not layers:
        raise TypeError(f"nnUNetTrainerDUO: {type(network).__name__} has no decoder.seg_layers (the layout of "
                        "nnU-Net's U-Nets); put the noise head on its decoder's last features in a subclass")
    network.add_module(HEAD, DecoderNoiseHead(layers[-1], num_classes))
    return network


class DUODeepSupervisionLoss(nn.Module):
    """``loss(output, target)`` as nnU-Net calls it: DUOLoss at each output, with the noise logits of the
    network's noise head, under nnU-Net's deep-supervision weights (``weights=None``: one output)."""

    def __init__(self, duo: DUOLoss, weights, noise_logits):
        super().__init__()
        self.duo = duo
        self.ds = DeepSupervisionWrapper(duo, weights) if weights is not None else None
        self._noise_logits = noise_logits  # a callable, not a module: the network is the trainer's

    def forward(self, output, target):
        noise = self._noise_logits()
        if self.ds is None:
            return self.duo(output, noise, target)
        noises = [noise if o.shape[2:] == noise.shape[2:] else F.interpolate(noise, size=o.shape[2:], mode="area")
                  for o in output]
        return self.ds(list(output), noises, list(target))


class nnUNetTrainerDUO(nnUNetTrainer):
    """nnU-Net's trainer with DUO: noise head on the decoder's last features, ``DUOLoss`` per deep-supervision
    output with nnU-Net's weights (see the module doc)."""

    # DUOLoss's defaults (τ = 0.1, README "DUO loss"); the paper's: {**DUOLoss.PAPER, "smooth_nr": ..., ...}
    duo_kwargs = dict(alpha=0.5, lambda_bce=1.0, tau=0.1, sigma0=0.1, beta=0.1, smooth_nr=1e-5, smooth_dr=1e-5)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions:
            raise NotImplementedError("nnUNetTrainerDUO: region-based training (regions in dataset.json) is not "
                                      "supported; DUO weighs one sigmoid map per label")
        if self.label_manager.has_ignore_label:
            raise NotImplementedError("nnUNetTrainerDUO: an ignore label is not supported; DUO's sums run over "
                                      "every voxel")

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        network = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                           num_output_channels, enable_deep_supervision)
        return attach_noise_head(network, num_output_channels)

    def _plain_network(self) -> nn.Module:
        net = self.network.module if self.is_ddp else self.network
        return getattr(net, "_orig_mod", net)  # torch.compile's OptimizedModule

    def _noise_logits(self) -> torch.Tensor:
        return getattr(self._plain_network(), HEAD).noise_logits()

    def _build_loss(self):
        # nnU-Net's own loss is built only to read its deep-supervision weights (1/2^i, the lowest output at 0,
        # normalised; its DDP special case included), so that DUO trains under exactly nnU-Net's weighting.
        default = super()._build_loss()
        weights = default.weight_factors if isinstance(default, DeepSupervisionWrapper) else None
        duo = DUOLoss(num_classes=self.label_manager.num_segmentation_heads, include_background=True,
                      to_onehot_y=True, **self.duo_kwargs)
        return DUODeepSupervisionLoss(duo, weights, self._noise_logits)


class nnUNetTrainerDUO_smoke(nnUNetTrainerDUO):
    """nnUNetTrainerDUO for one epoch of 4 training and 2 validation iterations: a check of the set-up."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 4, 2


# ---- command line -----------------------------------------------------------------------------------------

SHIM_NAME = "auvcore_duo_trainers.py"
SHIM = ('''"""Written by `python -m auvcore.integrations.nnunet install`: makes auvcore's DUO trainers (nnUNetTrainerDUO,
nnUNetTrainerDUO_smoke) selectable with -tr. `python -m auvcore.integrations.nnunet uninstall` removes it."""
try:
    from auvcore.integrations.nnunet import nnUNetTrainerDUO, nnUNetTrainerDUO_smoke  # noqa: F401
except ImportError:  # auvcore gone: leave nnU-Net's lookup of its other trainers working
    pass
''')


def nnunet_trainer_folder() -> Path:
    import nnunetv2

    return Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"


def install_shim() -> Path:
    """Write the one-line module that imports auvcore's trainers into nnU-Net's trainer folder (top level, which
    nnU-Net's lookup reads before its subfolders). Returns its path."""
    dst = nnunet_trainer_folder() / SHIM_NAME
    tmp = dst.with_suffix(".tmp")
    tmp.write_text(SHIM)
    os.replace(tmp, dst)
    return dst


def uninstall_shim() -> Path | None:
    dst = nnunet_trainer_folder() / SHIM_NAME
    if not dst.exists():
        return None
    dst.unlink()
    return dst


def _dataset_folder(dataset: str) -> Path:
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_preprocessed:
        raise ValueError("nnUNet_preprocessed is not set: export it as for nnUNetv2_plan_and_preprocess")
    return Path(nnUNet_preprocessed) / maybe_convert_to_dataset_name(dataset)


def _case_ids(folder: Path) -> set[str]:
    """The case identifiers of a preprocessed data set (from its gt_segmentations/)."""
    ending = json.loads((folder / "dataset.json").read_text())["file_ending"]
    gt = folder / "gt_segmentations"
    if not gt.is_dir():
        raise ValueError(f"{folder}: no gt_segmentations/; run nnUNetv2_plan_and_preprocess first")
    return {p.name[: -len(ending)] for p in gt.iterdir() if p.name.endswith(ending)}


def install_splits(source, dataset: str, force: bool = False) -> Path:
    """Copy auvcore's ``splits_final.json`` (``source``: the file, ``RUN/filter`` or ``RUN``) into the
    preprocessed data set's folder, where ``nnUNetv2_train`` reads its folds. Every case id of the splits must
    be a case of the data set; an existing, different splits file is replaced only with ``force``."""
    src = Path(source)
    for cand in (src, src / "splits_final.json", src / "filter" / "splits_final.json"):
        if cand.is_file():
            src = cand
            break
    else:
        raise ValueError(f"{source}: no splits_final.json (run `auvcore filter RUN` first)")
    splits = json.loads(src.read_text())
    if not isinstance(splits, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s) for s in splits):
        raise ValueError(f"{src}: expected a list of {{'train': [...], 'val': [...]}} folds")
    folder = _dataset_folder(dataset)
    known = _case_ids(folder)
    listed = {c for s in splits for c in s["train"] + s["val"]}
    unknown = sorted(listed - known)
    if unknown:
        raise ValueError(f"{src}: {len(unknown)} case(s) not in {folder.name}, e.g. {unknown[:5]}")
    dst = folder / "splits_final.json"
    if dst.exists() and not force and json.loads(dst.read_text()) != splits:
        raise ValueError(f"{dst} exists with other folds (nnU-Net wrote its own, or an earlier filter did); "
                         "pass --force to replace it")
    tmp = dst.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(splits, indent=1))
    os.replace(tmp, dst)
    return dst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m auvcore.integrations.nnunet",
                                 description="nnU-Net v2 with auvcore: the DUO trainer's folder and the filter's splits")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("trainer-dir", help="print the folder to put in nnUNet_extTrainer (holds nnUNetTrainerDUO)")
    sub.add_parser("install", help="write a module into nnU-Net's trainer folder that imports auvcore's trainers "
                                   "(instead of nnUNet_extTrainer)")
    sub.add_parser("uninstall", help="remove the module that `install` wrote")
    p = sub.add_parser("splits", help="install auvcore's splits_final.json into nnUNet_preprocessed/DATASET/")
    p.add_argument("run", help="RUN, RUN/filter or the splits_final.json itself")
    p.add_argument("dataset", help="nnU-Net data set name or id (e.g. 998 or Dataset998_Demo)")
    p.add_argument("--force", action="store_true", help="replace an existing, different splits_final.json")
    args = ap.parse_args(argv)
    if args.command == "trainer-dir":
        print(TRAINER_DIR)
        return 0
    if args.command == "install":
        print(f"wrote {install_shim()}")
        return 0
    if args.command == "uninstall":
        gone = uninstall_shim()
        print(f"removed {gone}" if gone else "nothing to remove")
        return 0
    try:
        dst = install_splits(args.run, args.dataset, force=args.force)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
