"""lightning-tsd: Temporal Saliency Distillation for time-series classifiers, on PyTorch Lightning."""

__version__ = "0.1.0"
