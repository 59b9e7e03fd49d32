"""How the main job runs: on which device, with how many loader processes, on how many ranks.

* :func:`resolve_device` turns ``--device auto|cpu|cuda|cuda:N`` into a ``torch.device`` or a ValueError that
  says why not (checked before anything is written).
* :class:`Ranks` is the scale-out under ``torchrun``: it reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the
  environment and, when ``WORLD_SIZE > 1``, joins a ``torch.distributed`` group. The group only coordinates
  (barriers and a few small Python objects; no tensor ever travels between ranks), so it always uses the
  gloo backend, on GPU machines too: NCCL would add nothing but its own device binding and a watchdog
  whose timeout a rank waiting for a slower one's last cases could hit.
* :func:`loaded_cases` reads and checks the cases (``load_case`` + ``case_errors``) in order, in the main
  process (``workers=0``) or in worker processes of a torch ``DataLoader``; a case that cannot be read comes
  back as its exception, to be recorded exactly as one read in the main process.

Device and dtype are how a run is computed, not what it computes: they are not part of the run's settings or
of the cases' fingerprints, so a run begun on one machine may be finished on another (on the CPU, ``--device
cpu`` is the default and changes nothing; a GPU or bfloat16 gives results equal to rounding, not bit for bit).
"""
from __future__ import annotations

import os
import pickle
import sys
import time
import traceback
from datetime import timedelta

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---- device -------------------------------------------------------------------------------------------

def resolve_device(spec: str = "auto", local_rank: int = 0, world_size: int = 1) -> torch.device:
    """``auto``: this rank's GPU when ``torch.cuda.is_available()``, else the CPU; ``cpu``; ``cuda``: this
    rank's GPU (``cuda:LOCAL_RANK`` under torchrun, else ``cuda:0``... the current device); ``cuda:N``: that one.
    A device that is not there is a ValueError naming it."""
    spec = str(spec).strip().lower()
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        spec = "cuda"
    if spec != "cuda" and not (spec.startswith("cuda:") and spec[5:].isdigit()):
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {spec!r}")
    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA" if torch.version.cuda is None
               else "no CUDA GPU is usable here (no device or no driver)")
        raise ValueError(f"--device {spec}: {why}; use --device cpu (or auto)")
    n = torch.cuda.device_count()
    if spec == "cuda":
        index = local_rank if world_size > 1 else torch.cuda.current_device()
        if index >= n:
            raise ValueError(f"--device cuda: rank with LOCAL_RANK={local_rank} needs cuda:{local_rank}, but this "
                             f"machine has {n} CUDA device(s); start at most {n} processes per node")
    else:
        index = int(spec[5:])
        if index >= n:
            raise ValueError(f"--device {spec}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    return torch.device("cuda", index)


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"--dtype: expected one of {tuple(DTYPES)}, got {name!r}")
    return DTYPES[name]


# ---- ranks ------------------------------------------------------------------------------------------

def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment: {name}={v!r} is not an integer")


class Ranks:
    """This process's place among the ranks of a torchrun job (one rank without torchrun).

    ``start()`` joins the process group when ``WORLD_SIZE > 1`` (and none is up yet), ``close()`` leaves the
    one it joined. ``barrier()``, ``agree()`` and ``broadcast()`` do nothing with a single rank."""

    TIMEOUT = timedelta(days=7)  # a rank waits at the final barrier for the slowest rank's last cases

    def __init__(self):
        self.world = _env_int("WORLD_SIZE", 1)
        self.rank = _env_int("RANK", 0)
        self.local_rank = _env_int("LOCAL_RANK", self.rank)
        self.local_world = _env_int("LOCAL_WORLD_SIZE", self.world)  # ranks on this node (torchrun sets it)
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"environment: RANK={self.rank} and WORLD_SIZE={self.world} do not fit together")
        self._owned = False

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self) -> "Ranks":
        if self.distributed:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=self.TIMEOUT)
                self._owned = True
        return self

    def close(self) -> None:
        if self._owned:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owned = False

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, error: BaseException | None) -> None:
        """Every rank says whether it may go on; if one may not, every rank raises (the failing rank its own
        error, the others a ValueError naming it), so no rank waits at a barrier for one that left."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        mine = None if error is None else f"{error}"
        errs = [None] * self.world
        dist.all_gather_object(errs, mine)
        if error is not None:
            raise error
        for r, e in enumerate(errs):
            if e is not None:
                raise ValueError(f"rank {r} cannot start: {e}")


# ---- loading ----------------------------------------------------------------------------------------

def load_checked(case, spacing, modality: str, ds, device=None, resample: bool = True):
    """``load_case`` + ``case_errors`` of one case: ``(volume, None, seconds)`` or ``(None, error, seconds)``.
    ``device``: where the resampling runs (``load_case``). ``resample=False``: read only (``read_case``), for a
    loader process whose scoring process resamples on its GPU (:func:`finish_load`)."""
    from ..data.dataset import read_case

    t0 = time.perf_counter()
    try:
        if not resample:
            return read_case(case, modality), None, time.perf_counter() - t0
        vol, err, _ = finish_load(case, read_case(case, modality), spacing, ds, device)
        return vol, err, time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - handed to the caller, recorded per case
        return None, e, time.perf_counter() - t0


def finish_load(case, raw, spacing, ds, device=None):
    """Resample a read case (``read_case``) on ``device`` and check its labels (``case_errors``, on the counts
    that the resampling took): ``(volume, None, seconds)`` or ``(None, error, seconds)``."""
    from ..data.dataset import resample_volume
    from .check import case_errors

    t0 = time.perf_counter()
    try:
        vol = resample_volume(raw, spacing, device)
        errors = case_errors(case, vol.label, ds, vol.label_counts)
        if errors:
            raise ValueError("; ".join(errors))
        return vol, None, time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - handed to the caller, recorded per case
        return None, e, time.perf_counter() - t0


class _Loads(torch.utils.data.Dataset):
    def __init__(self, cases, spacing, modality, ds, resample):
        self.cases, self.spacing, self.modality, self.ds, self.resample = cases, spacing, modality, ds, resample

    def __len__(self):
        return len(self.cases)

    def __getitem__(self, i):
        vol, err, dt = load_checked(self.cases[i], self.spacing, self.modality, self.ds, resample=self.resample)
        return vol, None if err is None else portable_error(err), dt


def _as_is(item):
    return item


def portable_error(e: BaseException) -> BaseException:
    """``e`` ready to travel between processes, with its traceback as text (``auvcore_traceback``, which
    :func:`auvcore.app.run.record_failure` writes to run.log). An exception that does not survive pickling
    travels as a look-alike: a class of the same name deriving from the same built-in exception, with the same
    message, so its record (``Name: message``, expected or a bug) is the original's."""
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    try:
        out = pickle.loads(pickle.dumps(e))
        if type(out) is not type(e) or str(out) != str(e):
            raise TypeError("changed by pickling")
    except Exception:  # noqa: BLE001 - any pickling failure: send a look-alike
        base = next(b for b in type(e).__mro__ if b.__module__ == "builtins")
        out = _look_alike_type(type(e).__name__, base)(str(e))
    out.auvcore_traceback = tb
    return out


_LOOK_ALIKES: dict = {}


def _look_alike_type(name: str, base: type) -> type:
    if (name, base) not in _LOOK_ALIKES:
        _LOOK_ALIKES[name, base] = type(name, (base,), {"__module__": __name__, "_base": base,
                                                         "__reduce__": _reduce_look_alike})
    return _LOOK_ALIKES[name, base]


def _reduce_look_alike(self):
    return _make_look_alike, (type(self).__name__, self._base, str(self), dict(self.__dict__))


def _make_look_alike(name, base, msg, state):
    e = _look_alike_type(name, base)(msg)
    e.__dict__.update(state)
    return e


def auto_workers(device, cores: int | None = None, ranks_per_node: int = 1) -> int:
    """``--workers auto``: how many loader processes feed one rank.

    * CPU: 0 below 8 cores, else 1. Reading and resampling a case take a few percent of the encoder's time
      there (bench/RESULTS.md), and a loader process takes its core from the encoder, which uses them all: on
      a few cores the two then fight over them (torch's threads wait on each other at every parallel step
      while the loader holds a core), for a gain of at most those few percent. With 8 or more cores one core
      less for the encoder costs less than the reading it hides.
    * GPU: the cores of this rank's share of the machine, less one for the scoring process, at most 4, at least
      1: the scoring process then only resamples on the GPU (``read_case`` in the loaders, the reading and
      decompression being most of a case's host work) while the GPU encodes the case before. Four loaders
      read 4 cases in the time of one, which keeps 20 cases/s fed at up to 200 ms of reading per case."""
    if cores is None:
        cores = os.cpu_count() or 1
    if torch.device(device).type != "cuda":
        return 0 if cores < 8 else 1
    return max(1, min(4, cores // max(1, ranks_per_node) - 1))


def loaded_cases(cases, spacing, modality: str, ds, workers: int = 0, device=None, resample_in_loaders=None):
    """Yield ``(case, volume or None, error or None, load seconds)`` for ``cases`` in order. ``workers=0``
    reads them here; ``workers=N`` in N processes of a torch ``DataLoader`` (two cases ahead per worker), which
    overlap the reading with the encoder. ``device``: the scoring device; on a GPU the resampling and label
    counts run there, in this process (the loaders only read), on the CPU in whichever process reads
    (``resample_in_loaders`` overrides this choice: the tests take the GPU's way on the CPU)."""
    if workers < 0:
        raise ValueError(f"--workers: expected 0 or more, got {workers}")
    gpu = device is not None and torch.device(device).type == "cuda"
    here = gpu if resample_in_loaders is None else not resample_in_loaders  # resampled in this process
    if workers == 0 or not cases:
        for case in cases:
            vol, err, dt = load_checked(case, spacing, modality, ds, device if gpu else None)
            yield case, vol, err, dt
        return
    loader = torch.utils.data.DataLoader(_Loads(list(cases), spacing, modality, ds, not here), batch_size=None,
                                         shuffle=False, num_workers=min(workers, len(cases)), collate_fn=_as_is,
                                         prefetch_factor=2, persistent_workers=False)
    for case, (vol, err, dt) in zip(cases, loader):
        if here and err is None:
            vol, err, dt2 = finish_load(case, vol, spacing, ds, device if gpu else None)
            dt += dt2
        yield case, vol, err, dt


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
