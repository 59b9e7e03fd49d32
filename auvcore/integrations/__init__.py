"""auvcore in training frameworks. Nothing here is imported by ``import auvcore``; each module needs its
framework installed:

* ``auvcore.integrations.nnunet``: ``nnUNetTrainerDUO`` for nnU-Net v2 (``-tr nnUNetTrainerDUO``), and
  ``python -m auvcore.integrations.nnunet`` (``trainer-dir``, ``splits``).
* MONAI needs no adapter: ``examples/monai_duo.py`` trains a MONAI network with ``DUOLoss`` + ``NoiseHead``.
"""
