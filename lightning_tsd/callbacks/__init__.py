"""Lightning callbacks that watch how closely a student's temporal saliency follows its teacher's, one per file.

Protocol: the callbacks work with any ``LightningModule`` that has two ``nn.Module`` attributes,
``teacher`` and ``student``, each mapping ``x`` ``(B, C, T)`` (and, if its ``forward`` accepts it, a
``mask=`` keyword) to logits ``(B, K)``. They never import the distiller, and they unpack batches with
:func:`lightning_tsd._batch.unpack_batch` (``(x, y)``, ``(x, y, index)`` or a dict with ``x``, ``y``,
``mask``, ``index``).

Saliency here is :func:`lightning_tsd.attribution.temporal_attribution`: a captum attribution
(``integrated_gradients``, ``gradient``, ``input_x_gradient``, ``occlusion`` or ``feature_ablation``, with
the options of the training estimators: ``steps``, ``window``, ``stride``) for the target class (the
teacher's prediction, or the label), with padded steps set to 0. Both models run in eval mode (their
``training`` flags are restored afterwards), with gradients enabled and out of inference mode, so it runs
inside Lightning's validation and test loops.

Each callback is a pure decision (``_should_measure``, ``_should_draw``, ``_evaluate``: what to do, no side
effect) and a thin driver (the hooks: the effect).

Example:
    >>> from lightning.pytorch import Trainer
    >>> callbacks = [SaliencyAlignmentMonitor(method="gradient"), SaliencyMapLogger(num_samples=2)]
    >>> trainer = Trainer(callbacks=callbacks, logger=False, enable_progress_bar=False)
"""

from lightning_tsd.callbacks._common import teacher_student
from lightning_tsd.callbacks.reduce_tsd_weight_on_agreement_drop import ReduceTSDWeightOnAgreementDrop
from lightning_tsd.callbacks.saliency_alignment_monitor import SaliencyAlignmentMonitor
from lightning_tsd.callbacks.saliency_map_logger import SaliencyMapLogger

__all__ = [
    "SaliencyAlignmentMonitor",
    "SaliencyMapLogger",
    "ReduceTSDWeightOnAgreementDrop",
    "teacher_student",
]
