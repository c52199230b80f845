"""Losses and training loops: supervised (Eq. 1), QC autoencoder, semi-supervised refinement (Eq. 2).

Import from the modules themselves (``fedqc.train.supervised``, ``fedqc.train.refine``, ...); this package
re-exports nothing so that :mod:`fedqc.models` can use :mod:`fedqc.core.device` without an import cycle.

- ``device``: device choice, bf16 autocast, seeding, CPU threads.
- ``losses``: generalised Dice (Sudre), Eq. 1, deep supervision, L^R, Eq. 2's weighted term, alpha.
- ``augment``: batched on-device augmentation.
- ``checkpoints``: top-m checkpoint keeping.
- ``supervised``: optimiser/schedules, ``train_one_epoch``, validation Dice, ``train_segmenter``.
- ``autoencoder``: ``train_qc_autoencoder``, ``reconstruct``.
- ``refine``: ``refine_epoch``.
"""
