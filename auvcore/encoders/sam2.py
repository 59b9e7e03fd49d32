"""SAM2 / MedSAM2 through the ``sam2`` package, from a local checkpoint (never downloaded).

Optional: ``pip install 'auvcore[sam2]'`` (``sam2`` 1.x, which needs ``torchvision``, ``hydra-core`` and
``iopath``; build it with ``SAM2_BUILD_CUDA=0`` on machines without CUDA). PyPI's torchvision imports only
beside the torch build it was made for, so this extra wants a matching pair (tested: torch 2.14.1 +
torchvision 0.29.1), not the CPU torch 2.13.0 of the main install; see the README and
``bench/run_sam2.sh``, which exercises this adapter against the real package.

Per axial slice (Z) and per class present in it, box prompts from the label give SAM2's mask logits
(:mod:`auvcore.encoders.prompted`: display orientation, one box per 2-D connected part, ``fill`` elsewhere,
background = ``−max``). SAM2's own preprocessing: the slice (0..1 after the CT window or MR percentile
scaling, repeated to 3 channels) is resized to the model's square input (1024 for SAM2, 512 for MedSAM2's
``sam2.1_hiera_t512``) without keeping the aspect ratio, and normalised with the ImageNet mean and std; boxes
are given in the slice's pixels and the logits come back at the slice's size.

* ``output="decoded"`` (default): ``[1, K, X, Y, Z]`` from ``__call__``, ``[1, K, Z, X, Y]`` from
  :meth:`~auvcore.encoders.prompted.SlicePromptEncoder.decoded_maps` (layout ``"D_HW"``).
* ``output="embedding"``: the image encoder's embedding of each slice, ``[1, 256, gx, gy, Z]`` (the model's
  input side / 16 per axis, pooled to the slice size when the slice is smaller), for masked mode.

**Config and checkpoint.** ``config`` is either the name of a config inside the ``sam2`` package
(``"configs/sam2.1/sam2.1_hiera_t.yaml"``) or the path of a local YAML file, e.g. MedSAM2's
``sam2.1_hiera_t512.yaml``. The checkpoint is a ``torch.save`` file holding the state dict under ``"model"``
(SAM2's and MedSAM2's release layout) or the state dict itself; it is read with ``weights_only=True`` and
loaded strictly: a missing or unexpected key is an error naming the first ones.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .prompted import SlicePromptEncoder, to_display

# sam2's build_sam2 defaults (apply_postprocessing=True): fall back to multi-mask output when one mask is unstable
POSTPROCESSING = (
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
)


def _require_sam2():
    try:
        import sam2  # noqa: F401  (initialises hydra with sam2's config module)
        from hydra import compose
        from hydra.utils import instantiate
        from omegaconf import OmegaConf
        from sam2.sam2_image_predictor import SAM2ImagePredictor
    except ImportError as e:
        raise ImportError(
            "SAM2Encoder needs the optional 'sam2' package and a torchvision that imports beside your torch "
            f"(pip install 'auvcore[sam2]'; set SAM2_BUILD_CUDA=0 on machines without CUDA): {e}"
        ) from e
    return compose, instantiate, OmegaConf, SAM2ImagePredictor


def build_model(config: str, checkpoint, device="cpu"):
    """The SAM2 model of ``config`` (a sam2 config name or a local YAML file) with the weights of
    ``checkpoint``, loaded strictly, in eval mode on ``device``."""
    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {ckpt} (SAM2Encoder never downloads weights)")
    compose, instantiate, OmegaConf, _ = _require_sam2()
    if Path(config).suffix in (".yaml", ".yml") and Path(config).is_file():
        cfg = OmegaConf.merge(OmegaConf.load(config), OmegaConf.from_dotlist([o.lstrip("+") for o in POSTPROCESSING]))
    else:
        try:
            cfg = compose(config_name=str(config), overrides=list(POSTPROCESSING))
        except Exception as e:  # hydra's MissingConfigException and friends
            raise ValueError(f"config: {config!r} is neither a local YAML file nor a config of the sam2 package "
                             f"(e.g. 'configs/sam2.1/sam2.1_hiera_t.yaml'): {e}") from None
    OmegaConf.resolve(cfg)
    if "model" not in cfg:
        raise ValueError(f"config: {config!r} has no 'model' section (not a SAM2 config)")
    model = instantiate(cfg.model, _recursive_=True)
    sd = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"checkpoint: {ckpt} holds no state dict (expected {{'model': state_dict}} or a state dict)")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint: {ckpt} does not fit config {config!r}: {len(missing)} missing keys "
                         f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")
    return model.to(device).eval()


class SAM2Encoder(SlicePromptEncoder):
    """SAM2 / MedSAM2 decoded maps or slice embeddings (see the module doc).

    Parameters: ``checkpoint`` (local file), ``config`` (sam2 config name or local YAML), ``mode`` /
    ``output`` (``"decoded"`` or ``"embedding"``; ``mode`` is the earlier name), ``device`` (``"auto"``:
    CUDA when available), ``window`` (HU window for CT), ``box_margin`` (pixels of the slice),
    ``prompts``, ``min_pixels``, ``fill``, ``batch_size`` (slices per image-encoder batch), as for
    :class:`~auvcore.encoders.LiteMedSAMEncoder`.
    """

    def __init__(self, checkpoint, config: str = "configs/sam2.1/sam2.1_hiera_t.yaml", output: str | None = None,
                 device="auto", window=(-160.0, 240.0), box_margin: int = 5, prompts: str = "components",
                 min_pixels: int = 4, fill: float = -20.0, batch_size: int = 4, mode: str | None = None):
        if mode is not None and output is not None and mode != output:
            raise ValueError(f"mode: {mode!r} contradicts output={output!r} (mode is the earlier name of output)")
        self._init_options(device, output or mode or "decoded", window, box_margin, prompts, min_pixels, fill,
                           batch_size)
        self.model = build_model(config, checkpoint, self.device)
        *_, Predictor = _require_sam2()
        self.predictor = Predictor(self.model)
        # sam2 1.1's image predictor assumes a 1024-pixel input (its backbone feature sizes are constants); a
        # model with another input size (MedSAM2's 512) needs them from its own image_size
        side = int(self.model.image_size)
        self.predictor._bb_feat_sizes = [(side // 4, side // 4), (side // 8, side // 8), (side // 16, side // 16)]
        self.config, self.checkpoint = str(config), Path(checkpoint)

    @property
    def mode(self) -> str:  # the earlier name of output
        return self.output

    @property
    def name(self) -> str:
        return f"sam2-{self.checkpoint.stem}-{self.output}"

    def __repr__(self):
        return f"SAM2Encoder(checkpoint={str(self.checkpoint)!r}, config={self.config!r}, output={self.output!r})"

    # -- the model-specific steps of SlicePromptEncoder ------------------------------------------------
    def _slice_size(self, X, Y, spacing):
        return (Y, X)  # boxes in the slice's own pixels: the predictor scales them with the image

    def _embed(self, vol, zs, size):
        s = to_display(vol[:, :, list(zs)].permute(2, 0, 1)).clamp(0, 1).numpy()  # [b, R, C]
        self.predictor.set_image_batch([np.repeat(f[..., None], 3, axis=2) for f in s])
        return len(zs)

    def _decode(self, emb, idx, boxes, size, shape):
        # predict_batch takes the boxes of every image of the batch at once: group them by image
        per = [[i for i, j in enumerate(idx) if j == k] for k in range(emb)]
        if any(not p for p in per):
            raise AssertionError("SAM2Encoder: every slice of a batch must have a box")  # _decode_all guarantees it
        masks, _, _ = self.predictor.predict_batch(box_batch=[boxes[p].numpy() for p in per],
                                                   multimask_output=False, return_logits=True)
        out = torch.empty((len(idx),) + tuple(shape), dtype=torch.float32)
        for p, m in zip(per, masks):
            out[p] = torch.as_tensor(np.asarray(m, dtype=np.float32).reshape(len(p), *shape))
        return out

    _decode_all = True  # SlicePromptEncoder: hand _decode all boxes of a slice batch at once

    def _grid_embeddings(self, emb):
        return self.predictor.get_image_embedding()
