"""Networks: the segmenter M (any MONAI network or a preset) and the QC autoencoder R."""

from fedqc.models.qc_autoencoder import QCAutoencoder, build_qc_autoencoder
from fedqc.models.segmenter import (
                                    PRESETS,
                                    build_segmenter,
                                    count_parameters,
                                    main_output,
                                    predict_probabilities,
)

__all__ = ["PRESETS", "QCAutoencoder", "build_qc_autoencoder", "build_segmenter", "count_parameters",
           "main_output", "predict_probabilities"]
