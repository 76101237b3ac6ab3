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
from lightning_tsd.adapters import ModelAdapter, adapt_model, auto_adapt
from lightning_tsd.attribution import saliency_pair, temporal_attribution
from lightning_tsd.behaviour import (
    Behaviour,
    deletion_curve,
    measure_behaviour,
    perturb,
    perturbed_agreement,
    random_ranking,
    teacher_ranking,
)
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
from lightning_tsd.ensemble import TeacherEnsemble
from lightning_tsd.export import export_onnx
from lightning_tsd.features import FeatureDistillation, fitnets_loss
from lightning_tsd.losses import (
    TemporalSaliencyLoss,
    TSDOutput,
    dkd_loss,
    kd_loss,
    saliency_alignment_loss,
    smooth_saliency,
)
from lightning_tsd.metrics import SaliencyAlignment, TeacherAgreement, TeacherStudentDivergence
from lightning_tsd.module import TemporalSaliencyDistiller
from lightning_tsd.plugins import AtomicCheckpointIO
from lightning_tsd.recombination import recombine
from lightning_tsd.report import (
    SubstitutionReport,
    SubstitutionReportCallback,
    SubstitutionThresholds,
    substitution_report,
)
from lightning_tsd.saliency import ESTIMATORS, check_saliency_options, temporal_saliency
from lightning_tsd.teacher import TeacherOutputs, TeacherSource

__version__ = "0.1.0"

__all__ = [
    "ESTIMATORS",
    "adapt_model",
    "AtomicCheckpointIO",
    "auto_adapt",
    "Behaviour",
    "check_saliency_options",
    "CorruptCheckpointError",
    "deletion_curve",
    "dkd_loss",
    "export_onnx",
    "FeatureDistillation",
    "fitnets_loss",
    "IndexedDataset",
    "InvalidBatchError",
    "kd_loss",
    "load_teacher",
    "measure_behaviour",
    "ModelAdapter",
    "NonFiniteLossError",
    "perturb",
    "perturbed_agreement",
    "random_ranking",
    "recombine",
    "ReduceTSDWeightOnAgreementDrop",
    "saliency_alignment_loss",
    "saliency_pair",
    "SaliencyAlignment",
    "SaliencyAlignmentMonitor",
    "SaliencyMapLogger",
    "save_teacher",
    "smooth_saliency",
    "substitution_report",
    "SubstitutionReport",
    "SubstitutionReportCallback",
    "SubstitutionThresholds",
    "TeacherAgreement",
    "TeacherCache",
    "TeacherCacheError",
    "TeacherEnsemble",
    "teacher_ranking",
    "TeacherOutputs",
    "TeacherSource",
    "TeacherStudentDivergence",
    "temporal_attribution",
    "temporal_saliency",
    "TemporalSaliencyDistiller",
    "TemporalSaliencyLoss",
    "TimeSeriesClassifier",
    "TimeSeriesDataset",
    "TSDOutput",
    "UCRDataModule",
    "UnsafeCheckpointError",
]
