"""Label-free test-time adaptation peers, each adapted at one site on its own unlabelled pool.

The methods a consortium would try instead of fedqc's QC-driven refinement (docs/RESULTS.md,
"The peers side by side"): AdaBN (:mod:`.norm_stats`), TENT (:mod:`.tent`), Post-DAE
(:mod:`.post_dae`) and DAE-TTA (:mod:`.dae_tta`); :mod:`.peers` runs the ones a config lists.
"""
