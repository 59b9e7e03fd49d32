"""The folder of this module is the one to put in ``nnUNet_extTrainer``: nnU-Net's external-trainer lookup
imports the modules here and takes the class named by ``-tr``. The trainers live in
``auvcore.integrations.nnunet``."""
from auvcore.integrations.nnunet import nnUNetTrainerDUO, nnUNetTrainerDUO_smoke  # noqa: F401
