"""SAM2 / MedSAM2 through the ``sam2`` package, from a local checkpoint (never downloaded).

Optional: install the ``auvcore[sam2]`` extra (``sam2`` needs ``torchvision``, ``hydra-core`` and
``iopath``; build it with ``SAM2_BUILD_CUDA=0`` on CPU-only machines). This adapter is written
against the ``sam2`` 1.x API (``build_sam2``, ``SAM2ImagePredictor``) but is not exercised by
auvcore's offline test suite, which has neither the package nor a checkpoint; its tests skip.

The volume's axial slices (Z) are the 2-D frames. Two outputs:

* ``mode="decoded"`` (default): for every class c and every slice that contains c, a box prompt
  (the bounding box of c in that slice, padded by ``box_margin`` pixels) gives SAM2's mask logits
  for that slice; slices without c get ``fill`` (a confidently-negative logit). The result is the
  class-wise decoded map ``Z [K, D, H, W]`` of docs/method.md §1 (D = slices, H×W = the slice), returned
  as ``[1, K, D, H, W]``; background (class 0) is ``−max`` over the foreground maps.
* ``mode="embedding"``: the image encoder's embedding of each slice, ``[1, 256, D, h, w]`` with
  h = w = 64 (the 1024-pixel input / 16), for masked mode.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _require_sam2():
    try:
        from sam2.build_sam import build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor
    except ImportError as e:
        raise ImportError(
            "SAM2Encoder needs the optional 'sam2' package (pip install 'auvcore[sam2]'; "
            "set SAM2_BUILD_CUDA=0 on machines without CUDA)"
        ) from e
    return build_sam2, SAM2ImagePredictor


class SAM2Encoder:
    """SAM2 / MedSAM2 adapter (see the module doc).

    Parameters: ``checkpoint`` (local ``.pt`` file), ``config`` (the sam2 hydra config name,
    e.g. ``"configs/sam2.1/sam2.1_hiera_t.yaml"``), ``mode`` (``"decoded"`` or ``"embedding"``),
    ``device``, ``window`` (HU window mapped to 0..255 grey for CT; ``None`` = percentile
    scaling), ``box_margin``, ``fill``.

    Unlike the 3-D encoders, decoded mode needs the label map (for the box prompts): call
    ``encoder(x, label)`` or use :func:`auvcore.encoders.encode_case`, which passes it.
    """

    spacing = None  # works on the native in-plane grid
    max_shape = None
    needs_label = True

    def __init__(self, checkpoint, config: str = "configs/sam2.1/sam2.1_hiera_t.yaml", mode: str = "decoded",
                 device="cpu", window=(-160.0, 240.0), box_margin: int = 5, fill: float = -20.0):
        if mode not in ("decoded", "embedding"):
            raise ValueError(f"mode: expected 'decoded' or 'embedding', got {mode!r}")
        ckpt = Path(checkpoint)
        if not ckpt.is_file():
            raise FileNotFoundError(f"checkpoint: no such file {ckpt} (SAM2Encoder never downloads weights)")
        build_sam2, Predictor = _require_sam2()
        self.model = build_sam2(config, str(ckpt), device=str(device), mode="eval")
        self.predictor = Predictor(self.model)
        self.mode, self.window, self.box_margin, self.fill = mode, window, int(box_margin), float(fill)
        self.device = torch.device(device)
        self.stride = (1, 1, 1) if mode == "decoded" else None
        self._name = f"sam2-{ckpt.stem}-{mode}"

    @property
    def name(self):
        return self._name

    def preprocess(self, volume, normalized: bool = False) -> torch.Tensor:
        """``[X, Y, Z]`` → ``[1, 1, X, Y, Z]`` grey values 0..255 (float32)."""
        v = np.asarray(volume, dtype=np.float32)
        if v.ndim != 3:
            raise ValueError(f"volume: expected [X, Y, Z], got shape {v.shape}")
        if normalized:
            g = (np.clip(v, -5, 5) + 5) / 10
        elif self.window is not None:
            lo, hi = self.window
            g = np.clip((v - lo) / (hi - lo), 0, 1)
        else:
            lo, hi = np.percentile(v, [0.5, 99.5])
            g = np.clip((v - lo) / max(hi - lo, 1e-6), 0, 1)
        return torch.from_numpy((g * 255).astype(np.float32))[None, None]

    def _frame(self, x2d: np.ndarray) -> np.ndarray:
        g = np.clip(x2d, 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)  # H×W×3 "RGB"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, label=None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[:2] != (1, 1):
            raise ValueError(f"x: expected [1, 1, X, Y, Z], got {getattr(x, 'shape', type(x))}")
        vol = x[0, 0].cpu().numpy()
        X, Y, Z = vol.shape
        if self.mode == "embedding":
            embs = []
            for z in range(Z):
                self.predictor.set_image(self._frame(vol[:, :, z]))
                embs.append(self.predictor.get_image_embedding()[0].float().cpu())  # [256, h, w]
            return torch.stack(embs, dim=1)[None]  # [1, 256, D, h, w]
        if label is None:
            raise ValueError("label: SAM2Encoder in decoded mode needs the label map for its box prompts")
        lab = np.asarray(label)
        if lab.shape != vol.shape:
            raise ValueError(f"label: shape {lab.shape} differs from the volume's {vol.shape}")
        K = int(lab.max()) + 1
        out = torch.full((K, Z, X, Y), self.fill, dtype=torch.float32)
        for z in range(Z):
            sl = lab[:, :, z]
            present = [c for c in np.unique(sl) if c > 0]
            if not present:
                continue
            self.predictor.set_image(self._frame(vol[:, :, z]))
            for c in present:
                ii, jj = np.nonzero(sl == c)
                m = self.box_margin
                # SAM boxes are (x0, y0, x1, y1) in pixel columns/rows of the H×W frame
                box = np.array([max(jj.min() - m, 0), max(ii.min() - m, 0),
                                min(jj.max() + m, Y - 1), min(ii.max() + m, X - 1)], dtype=np.float32)
                logits, _, _ = self.predictor.predict(box=box, multimask_output=False, return_logits=True)
                out[c, z] = torch.as_tensor(np.asarray(logits)[0], dtype=torch.float32)
        if K > 1:
            out[0] = -out[1:].max(dim=0).values
        return out[None]  # [1, K, D, H, W]
