"""What the 2-D promptable encoders (LiteMedSAM, SAM2/MedSAM2) share: slices, box prompts from the label,
the decoded class maps and the slice embeddings on the volume's grid.

A promptable model sees one axial slice (Z) at a time, in radiological display orientation (rows anterior →
posterior, columns patient right → left, as the NIfTI/DICOM-derived training slices were). For every class
present in a slice, the bounding box of each 2-D connected part (``prompts="components"``; or of the whole
class, ``"class"``), grown by ``box_margin`` pixels of the model's input, is a box prompt; the mask logits
of a class in a slice are the maximum over its parts' masks. Slices in which a class is absent get the
constant ``fill`` (a confidently-negative logit); the background map (class 0) is ``−max`` over the
foreground maps. Slices without any foreground are not encoded.

A subclass says how big a slice is in the model's input (``_slice_size``), embeds a batch of slices
(``_embed``), decodes boxes against those embeddings (``_decode``) and cuts the part of the embedding grid
that covers the slice (``_grid_embeddings``). Everything else is here, once.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F


def check_spacing(spacing):
    if spacing is None:
        return None
    try:
        sp = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing: expected 3 positive voxel sizes (mm) along X, Y, Z, got {spacing!r}") from None
    if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing: expected 3 positive voxel sizes (mm) along X, Y, Z, got {spacing!r}")
    return sp


def to_display(a):
    """``[..., X, Y]`` (RAS) → ``[..., Y, X]`` in radiological display orientation (anterior up, patient
    right on the left)."""
    return a.flip(-1).flip(-2).transpose(-1, -2)


def from_display(a):
    return a.transpose(-1, -2).flip(-1).flip(-2)


class SlicePromptEncoder:
    """Base of :class:`LiteMedSAMEncoder` and :class:`SAM2Encoder` (see the module doc).

    ``output``: ``"decoded"`` (class-wise mask logits, ``[1, K, X, Y, Z]`` from ``__call__``) or
    ``"embedding"`` (the slices' image embeddings ``[1, C, gx, gy, Z]`` for masked mode)."""

    spacing = None  # the case's own grid: the model resizes every slice itself
    max_shape = None
    OUTPUTS = ("decoded", "embedding")
    decodes_with_prompts = True  # score_case: the model gives its own decoded maps (no prototype maps)
    embedding_channels = 256
    _decode_all = False  # True: _decode gets all boxes of a slice batch at once (else prompt_batch at a time)
    prompt_batch = None  # box prompts per _decode call (None: batch_size)

    def _init_options(self, device, output, window, box_margin, prompts, min_pixels, fill, batch_size):
        if output not in self.OUTPUTS:
            raise ValueError(f"output: expected one of {self.OUTPUTS}, got {output!r}")
        lo, hi = (float(v) for v in window)
        if not lo < hi:
            raise ValueError(f"window: expected (lo, hi) with lo < hi, got {window!r}")
        if isinstance(box_margin, bool) or int(box_margin) != box_margin or box_margin < 0:
            raise ValueError(f"box_margin: expected pixels >= 0, got {box_margin!r}")
        if prompts not in ("class", "components"):
            raise ValueError(f"prompts: expected 'class' or 'components', got {prompts!r}")
        if isinstance(min_pixels, bool) or int(min_pixels) != min_pixels or min_pixels < 1:
            raise ValueError(f"min_pixels: expected an int >= 1, got {min_pixels!r}")
        if not np.isfinite(fill):
            raise ValueError(f"fill: expected a finite logit, got {fill!r}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size!r}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.output, self.window = output, (lo, hi)
        self.box_margin, self.fill, self.batch_size = int(box_margin), float(fill), int(batch_size)
        self.prompts, self.min_pixels = prompts, int(min_pixels)

    # -- what a subclass provides -------------------------------------------------------------------
    def _slice_size(self, X: int, Y: int, spacing) -> tuple[int, int]:
        """(rows, cols) of a display slice (rows = Y, cols = X) in the model's input; boxes are given there."""
        raise NotImplementedError

    def _embed(self, vol: torch.Tensor, zs, size):
        """Embed slices ``zs`` of ``vol [X, Y, Z]`` (0..1); whatever ``_decode`` needs."""
        raise NotImplementedError

    def _decode(self, emb, idx: list, boxes: torch.Tensor, size, shape) -> torch.Tensor:
        """Mask logits ``[n, R, C]`` (float32, CPU) on the display slice of ``shape = (R, C) = (Y, X)`` for box
        ``boxes[i]`` (in ``size`` coordinates, x0 y0 x1 y1) against the embedding of slice ``idx[i]``."""
        raise NotImplementedError

    def _grid_embeddings(self, emb) -> torch.Tensor:
        """``[b, C, r, c]`` display-oriented embeddings of the part of the grid that covers the slices."""
        raise NotImplementedError

    # -- interface ----------------------------------------------------------------------------------
    @property
    def needs_label(self) -> bool:
        return self.output == "decoded"

    @property
    def stride(self):
        """(1, 1, 1) for the decoded maps (on the volume's grid); None for the embeddings (their grid
        follows each volume's in-plane size)."""
        return (1, 1, 1) if self.output == "decoded" else None

    @property
    def channels(self) -> int | None:
        return self.embedding_channels if self.output == "embedding" else None

    def with_output(self, output: str):
        """The same network (shared, not copied) with another ``output``."""
        if output not in self.OUTPUTS:
            raise ValueError(f"output: expected one of {self.OUTPUTS}, got {output!r}")
        if output == self.output:
            return self
        other = copy.copy(self)
        other.output = output
        return other

    # -- preprocessing ------------------------------------------------------------------------------
    def preprocess(self, volume, normalized: bool = False, modality: str = "CT") -> torch.Tensor:
        """``[X, Y, Z]`` → ``[1, 1, X, Y, Z]`` float32 in 0..1: CT through :attr:`window`; MR by
        0.5–99.5 % percentile scaling; ``normalized=True``: the annotation-normalized x̂ (−5..5) mapped
        linearly. (:func:`auvcore.encoders.encode_case` does not pass the modality: it hands MR over as
        pseudo-HU −1000..1000, which the soft-tissue window would clip. Score MR with :meth:`encode`, as
        ``score_case`` does, or give the encoder ``window=(-1000, 1000)``, which maps that back.)"""
        from ..data.preprocess import scale_percentile

        v = np.asarray(volume, dtype=np.float32)
        if v.ndim != 3:
            raise ValueError(f"volume: expected [X, Y, Z], got shape {v.shape}")
        if not np.isfinite(v).all():
            raise ValueError("volume: contains NaN or Inf")
        if normalized:
            g = (np.clip(v, -5.0, 5.0) + 5.0) / 10.0
        elif modality == "MR":
            g = scale_percentile(v)
        elif modality == "CT":
            lo, hi = self.window
            g = np.clip((v - lo) / (hi - lo), 0.0, 1.0)
        else:
            raise ValueError(f"modality: expected 'CT' or 'MR', got {modality!r}")
        return torch.from_numpy(np.ascontiguousarray(g, dtype=np.float32))[None, None]

    def _check_x(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor [1, 1, X, Y, Z], got {type(x).__name__}")
        if x.dim() != 5 or tuple(x.shape[:2]) != (1, 1) or min(x.shape[2:]) < 1:
            raise ValueError(f"x: expected [1, 1, X, Y, Z] (one volume), got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("x: contains NaN or Inf")
        return x[0, 0].float()

    def _check_label(self, label, shape, num_classes, classes):
        if label is None:
            raise ValueError(f"label: {type(self).__name__}'s decoded maps need the label map (its boxes are the "
                             "prompts); pass encoder(x, label) or use encode_case / encoder.encode(volume)")
        lab = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
        if lab.ndim == 4 and lab.shape[0] == 1:
            lab = lab[0]
        if tuple(lab.shape) != tuple(shape):
            raise ValueError(f"label: shape {tuple(lab.shape)} differs from the volume's {tuple(shape)}")
        if lab.dtype == bool:
            lab = lab.astype(np.int64)
        if np.issubdtype(lab.dtype, np.floating):
            if not np.isfinite(lab).all() or not np.array_equal(lab, np.round(lab)):
                raise ValueError("label: expected integer class indices, got non-integer values")
        elif not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"label: expected integer class indices, got dtype {lab.dtype}")
        lab = lab.astype(np.int64)
        if lab.size and lab.min() < 0:
            raise ValueError(f"label: negative class index {lab.min()}")
        top = int(lab.max(initial=0))
        if num_classes is None:
            K = top + 1
        else:
            if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
                raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
            K = int(num_classes)
            if top >= K:
                raise ValueError(f"label: value {top} >= num_classes {K}")
        present = sorted(int(c) for c in np.unique(lab) if c > 0)
        if classes is None:
            chosen = present
        else:
            chosen = sorted({int(c) for c in classes})
            bad = [c for c in chosen if not 1 <= c < K]
            if bad:
                raise ValueError(f"classes: {bad} are not foreground classes 1..{K - 1}")
            empty = [c for c in chosen if c not in present]
            if empty:
                raise ValueError(f"classes: class {empty[0]} has no voxel in the label: there is nothing to prompt "
                                 "a box for")
        return lab, K, chosen

    def _box_prompts(self, labd: np.ndarray, chosen, size) -> dict[int, list]:
        """``{slice: [(class, box), ...]}`` from the display-oriented label ``[Z, R, C]``; boxes (x0, y0, x1, y1)
        in the pixel coordinates of a ``size`` = (rows, cols) slice."""
        if self.prompts == "components":
            try:
                from scipy import ndimage
            except ImportError as e:
                raise ImportError("per-part box prompts need scipy (pip install 'auvcore[data]'), or use "
                                  "prompts='class'") from e
        R, C = labd.shape[1:]
        fr, fc = size[0] / R, size[1] / C
        m = self.box_margin
        prompts: dict[int, list] = {}

        def add(z, c, mask):
            rows = np.nonzero(mask.any(axis=1))[0]
            cols = np.nonzero(mask.any(axis=0))[0]
            box = [max(0.0, cols[0] * fc - m), max(0.0, rows[0] * fr - m),
                   min(size[1] - 1.0, (cols[-1] + 1) * fc - 1 + m), min(size[0] - 1.0, (rows[-1] + 1) * fr - 1 + m)]
            prompts.setdefault(int(z), []).append((c, box))

        for c in chosen:
            for z in np.nonzero((labd == c).any(axis=(1, 2)))[0]:
                mask = labd[z] == c
                if self.prompts == "class":
                    add(z, c, mask)
                    continue
                comps, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
                sizes = np.bincount(comps.ravel(), minlength=n + 1)[1:]
                keep = [i + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] >= self.min_pixels]
                for i in keep or [int(np.argmax(sizes)) + 1]:  # at least the largest part
                    add(z, c, comps == i)
        return prompts

    # -- running ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def embeddings(self, x: torch.Tensor, spacing=None) -> torch.Tensor:
        """Image embeddings of every slice: ``[1, C, gx, gy, Z]`` float32 on the CPU, in the volume's (X, Y)
        orientation; a grid finer than the slice (a small slice upsampled by the model) is pooled to its size."""
        vol = self._check_x(x)
        sp = check_spacing(spacing)
        X, Y, Z = vol.shape
        size = self._slice_size(X, Y, sp)
        out = None
        for z0 in range(0, Z, self.batch_size):
            zs = list(range(z0, min(Z, z0 + self.batch_size)))
            e = from_display(self._grid_embeddings(self._embed(vol, zs, size)).float())  # [b, C, gx, gy]
            if out is None:
                out = torch.empty((e.shape[1], e.shape[2], e.shape[3], Z), dtype=torch.float32)
            out[..., z0:z0 + len(zs)] = e.permute(1, 2, 3, 0).cpu()
        tgt = (min(out.shape[1], X), min(out.shape[2], Y))
        if tgt != tuple(out.shape[1:3]):
            out = F.adaptive_avg_pool2d(out.permute(3, 0, 1, 2), tgt).permute(1, 2, 3, 0).contiguous()
        return out[None]

    @torch.inference_mode()
    def decoded_maps(self, x: torch.Tensor, label, spacing=None, num_classes: int | None = None,
                     classes=None) -> torch.Tensor:
        """The class-wise decoded maps ``Z [1, K, D, H, W]`` = ``[1, K, Z, X, Y]`` float32 (CPU) for
        ``semantic_scale(Z, layout="D_HW")``.

        ``x``: ``[1, 1, X, Y, Z]`` in 0..1 (:meth:`preprocess`); ``label``: ``[X, Y, Z]`` (or ``[1, X, Y,
        Z]``) class indices; ``spacing``: voxel sizes (mm), for encoders that keep the physical aspect ratio;
        ``num_classes``: K (default: the label's largest class + 1); ``classes``: the foreground classes to
        decode (default: those present; one that is absent is an error). Each (slice, class) with the class
        present gets the mask logits of its boxes; the rest is ``fill``; class 0 is ``−max`` over the
        foreground maps (all ``fill`` when K = 1)."""
        vol = self._check_x(x)
        sp = check_spacing(spacing)
        X, Y, Z = vol.shape
        lab, K, chosen = self._check_label(label, (X, Y, Z), num_classes, classes)
        size = self._slice_size(X, Y, sp)
        out = torch.full((K, Z, X, Y), self.fill, dtype=torch.float32)
        done = np.zeros((K, Z), bool)
        labd = to_display(torch.from_numpy(lab).permute(2, 0, 1)).numpy()  # [Z, R=Y, C=X]
        prompts = self._box_prompts(labd, chosen, size)
        zs_all = sorted(prompts)
        for i in range(0, len(zs_all), self.batch_size):
            zs = zs_all[i:i + self.batch_size]
            emb = self._embed(vol, zs, size)
            items = [(j, z, c, box) for j, z in enumerate(zs) for c, box in prompts[z]]
            chunk = len(items) if self._decode_all else (self.prompt_batch or self.batch_size)
            for k in range(0, len(items), chunk):
                part = items[k:k + chunk]
                boxes = torch.tensor([p[3] for p in part], dtype=torch.float32)
                logits = from_display(self._decode(emb, [p[0] for p in part], boxes, size, (Y, X)))  # [n, X, Y]
                # one copy per chunk to the output's device and dtype (the decoder may run on a GPU, in bf16)
                logits = logits.to(out.device, out.dtype)
                for (j, z, c, _), lg in zip(part, logits):
                    # several boxes of one class in a slice (its parts): a pixel takes its best part's logit
                    out[c, z] = lg if not done[c, z] else torch.maximum(out[c, z], lg)
                    done[c, z] = True
        if K > 1:
            out[0] = -out[1:].max(dim=0).values
        return out[None]

    def __call__(self, x: torch.Tensor, label=None, spacing=None, num_classes: int | None = None) -> torch.Tensor:
        """``output="decoded"``: the decoded maps on the volume's grid in its axis order, ``[1, K, X, Y, Z]``
        (needs ``label``); ``"embedding"``: ``[1, C, gx, gy, Z]``. See :meth:`decoded_maps`."""
        if self.output == "embedding":
            return self.embeddings(x, spacing)
        return self.decoded_maps(x, label, spacing, num_classes).permute(0, 1, 3, 4, 2).contiguous()

    def encode(self, volume, input: str = "raw", num_classes: int | None = None):
        """:func:`auvcore.encoders.encode_case` for a promptable encoder, aware of the case's modality (MR:
        percentile scaling) and voxel spacing. Returns ``(features [1, C, *grid] float32, labels [1, *grid]
        int64)``: the decoded maps ``[1, K, X, Y, Z]`` with the label itself, or the embeddings with the label
        brought onto their grid (majority)."""
        from ..data.preprocess import normalized_image
        from .common import labels_to_grid

        if input not in ("raw", "normalized"):
            raise ValueError(f"input: expected 'raw' or 'normalized', got {input!r}")
        image, label = volume.image, volume.label
        cid = getattr(volume, "case_id", "")
        if label is None:
            raise ValueError(f"case {cid!r}: {type(self).__name__} needs a label map (its boxes are the prompts)")
        if image.shape != label.shape:
            raise ValueError(f"case {cid!r}: image {image.shape} and label {label.shape} differ")
        spacing = check_spacing(getattr(volume, "spacing", None))
        modality = getattr(volume, "modality", "CT")
        if input == "normalized":
            x = self.preprocess(normalized_image(image, label), normalized=True)
        else:
            x = self.preprocess(image, modality=modality)
        if self.output == "decoded":
            maps = self(x, label, spacing=spacing, num_classes=num_classes)
            return maps, torch.from_numpy(np.asarray(label, dtype=np.int64))[None]
        feats = self.embeddings(x, spacing)
        lab = labels_to_grid(label, feats.shape[2:], num_classes, "majority")
        return feats, torch.from_numpy(lab)[None]
