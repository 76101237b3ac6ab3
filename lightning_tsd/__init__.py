"""lightning-tsd: Temporal Saliency Distillation for time-series classifiers, on PyTorch Lightning.

Example:
    >>> import torch
    >>> from lightning_tsd import TemporalSaliencyDistiller, temporal_saliency
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    >>> logits, saliency = temporal_saliency(model, torch.randn(3, 1, 16))
    >>> saliency.shape
    torch.Size([3, 16])
"""

from lightning_tsd._batch import InvalidBatchError, NonFiniteLossError
from lightning_tsd.cache import TeacherCache, TeacherCacheError
from lightning_tsd.callbacks import (
    ReduceTSDWeightOnAgreementDrop,
    SaliencyAlignmentMonitor,
    SaliencyMapLogger,
)
from lightning_tsd.checkpoint import (
    CorruptCheckpointError,
    UnsafeCheckpointError,
    load_teacher,
    save_teacher,
)
from lightning_tsd.classifier import TimeSeriesClassifier
from lightning_tsd.data import IndexedDataset, TimeSeriesDataset, UCRDataModule
from lightning_tsd.losses import TemporalSaliencyLoss, TSDOutput, dkd_loss, kd_loss, saliency_alignment_loss
from lightning_tsd.metrics import SaliencyAlignment, TeacherAgreement, TeacherStudentDivergence
from lightning_tsd.module import TemporalSaliencyDistiller
from lightning_tsd.plugins import AtomicCheckpointIO
from lightning_tsd.report import (
    SubstitutionReport,
    SubstitutionReportCallback,
    SubstitutionThresholds,
    substitution_report,
)
from lightning_tsd.saliency import ESTIMATORS, temporal_saliency

__version__ = "0.1.0"

__all__ = [
    "ESTIMATORS",
    "AtomicCheckpointIO",
    "NonFiniteLossError",
    "ReduceTSDWeightOnAgreementDrop",
    "CorruptCheckpointError",
    "IndexedDataset",
    "InvalidBatchError",
    "SaliencyAlignment",
    "SaliencyAlignmentMonitor",
    "SaliencyMapLogger",
    "SubstitutionReport",
    "SubstitutionReportCallback",
    "SubstitutionThresholds",
    "TeacherAgreement",
    "TeacherStudentDivergence",
    "TimeSeriesClassifier",
    "TimeSeriesDataset",
    "UCRDataModule",
    "substitution_report",
    "TSDOutput",
    "TeacherCache",
    "TeacherCacheError",
    "TemporalSaliencyDistiller",
    "TemporalSaliencyLoss",
    "UnsafeCheckpointError",
    "dkd_loss",
    "kd_loss",
    "load_teacher",
    "save_teacher",
    "saliency_alignment_loss",
    "temporal_saliency",
]
