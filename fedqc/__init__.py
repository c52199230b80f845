"""fedqc: federated, quality-control-driven adaptation of cardiac MRI segmentation."""

__version__ = "0.1.0"
