"""Data layer: NIfTI I/O (:mod:`.nifti`), case discovery, metadata and site filters
(:mod:`.mnms2`), invertible preprocessing (:mod:`.preprocess`), a per-site cache of preprocessed
cases (:mod:`.cache`) and a synthetic multi-centre simulator (:mod:`.simulator`).

Submodules are not imported here, so ``import fedqc.data.simulator`` stays light.
"""
