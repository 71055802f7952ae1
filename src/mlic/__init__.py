"""mlic: a reproducible DVC + MLflow + Keras pipeline for multi-label image classification."""

__version__ = "0.1.0"
