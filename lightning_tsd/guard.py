"""The bad-batch guard: one host read per training step decides whether a step may reach the optimizer.

A training step can go wrong in ways that only the data shows: NaN/Inf in ``x``, labels outside
``[0, K)``, a mask row with no real step, a loss that came out non-finite, BatchNorm running statistics
that overflowed, or a complete teacher cache that missed a sample. :class:`BadBatchGuard` checks all of
them in one reduction read back once (:meth:`inspect`), then acts: with ``policy="raise"`` it restores the
student's buffers and raises an error that names the problem; with ``policy="skip"`` the step is skipped on
every process (one all-reduce decides), nothing changes (parameters, optimizer state, BatchNorm
statistics), and the count is kept in :meth:`state_dict`.

It follows Lightning's ``EarlyStopping`` split: a pure decision (:meth:`inspect`) and a thin driver in the
module. Plain torch: the all-rank reduction is passed in as a callable.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_tsd._batch import Batch, InvalidBatchError, NonFiniteLossError, explain_values, value_flags

BAD_BATCH_POLICIES = ("raise", "skip")
Snapshot = list[tuple[Tensor, Tensor]]


class Verdict(NamedTuple):
    """What :meth:`BadBatchGuard.inspect` found: ``error`` (None when the step is good), whether a complete
    teacher cache missed a sample (``cache_missed``: ask the teacher again), and whether ``policy="skip"`` may
    skip the step (non-finite values may be skipped; bad labels or masks always raise)."""

    error: InvalidBatchError | None
    cache_missed: bool = False
    skippable: bool = True


class BadBatchGuard:
    """Decide, restore, count: what happens to a training step with bad values.

    Args:
        policy: ``"raise"`` (an :class:`InvalidBatchError` / :class:`NonFiniteLossError` before the
            optimizer step) or ``"skip"`` (the step is skipped on every process).

    Example:
        >>> guard = BadBatchGuard("skip")
        >>> model = torch.nn.BatchNorm1d(1)
        >>> snapshot = guard.snapshot(model)
        >>> _ = model(torch.randn(4, 1, 3) * 1e3)  # a forward moves the running statistics
        >>> guard.restore(snapshot)
        >>> model.running_var.tolist()
        [1.0]
    """

    def __init__(self, policy: str = "raise") -> None:
        if policy not in BAD_BATCH_POLICIES:
            raise ValueError(f"on_bad_batch must be one of {list(BAD_BATCH_POLICIES)}, got {policy!r}")
        self.policy = policy
        self.skipped = 0  # training batches skipped (every rank agrees)
        self._good_since_step = 0

    # ------------------------------------------------------------------ buffers
    @staticmethod
    def snapshot(model: nn.Module) -> Snapshot | None:
        """Copies of the model's buffers (BatchNorm running statistics) when a forward may change them."""
        if not model.training:
            return None
        buffers = [t for t in model.buffers() if t is not None]
        return [(t, t.clone()) for t in buffers] if buffers else None

    @staticmethod
    def restore(snapshot: Snapshot | None) -> None:
        """Put the buffers back as they were when ``snapshot`` was taken."""
        if snapshot:
            with torch.no_grad():
                for tensor, saved in snapshot:
                    tensor.copy_(saved)

    # ------------------------------------------------------------------ decide
    def inspect(
        self,
        b: Batch,
        num_classes: int | None,
        loss: Tensor,
        parts: dict[str, Tensor],
        snapshot: Snapshot | None,
        all_cached: Tensor | None = None,
    ) -> Verdict:
        """Check the batch's values, the loss and the buffers in one reduction, read back once.

        Returns the error to raise or skip on (None for a good step), naming the first problem found.
        """
        flags = value_flags(b, num_classes)
        flags["loss"] = torch.isfinite(loss.detach()).all()
        buffers = [t.flatten() for t, _ in snapshot or () if t.is_floating_point()]
        if buffers:  # one check over all of them (cat promotes mixed float dtypes, which keeps finiteness)
            flags["buffers"] = torch.isfinite(torch.cat(buffers)).all()
        if all_cached is not None:
            flags["cache"] = all_cached
        ok = dict(zip(flags, torch.stack(list(flags.values())).tolist(), strict=True))  # the one host read
        if not ok.pop("cache", True):
            return Verdict(None, cache_missed=True)
        if all(ok.values()):
            return Verdict(None)
        structural = {k: ok.get(k, True) for k in ("y", "mask")}
        if not all(structural.values()):  # bad labels or masks are never skipped
            return Verdict(explain_values(b, num_classes, structural), skippable=False)
        if not ok["x"]:
            return Verdict(explain_values(b, num_classes, {"x": False}))
        if not ok["loss"]:
            detail = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
            return Verdict(NonFiniteLossError(f"the loss is not finite: {detail}"))
        return Verdict(
            NonFiniteLossError("the student's running statistics (BatchNorm buffers) overflowed to NaN/Inf")
        )

    # ------------------------------------------------------------------ act
    def skip_loss(self, model: nn.Module) -> Tensor | None:
        """A zero loss that reaches every trainable parameter (DDP's all-reduce runs as usual, nobody waits);
        :meth:`drop_gradients` then makes the optimizer change nothing."""
        self.skipped += 1
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            return None
        return torch.stack([p.sum() for p in params]).sum() * 0.0

    def good_step(self) -> None:
        """Record a batch that reaches the optimizer."""
        self._good_since_step += 1

    def drop_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Before an optimizer step: if every batch since the last step was skipped, drop the (zero)
        gradients, so the optimizer skips every parameter (no update, no weight decay, no moment change)."""
        if self.policy == "skip" and self._good_since_step == 0:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        self._good_since_step = 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))


def locate(error: InvalidBatchError, where: str) -> InvalidBatchError:
    """The error as raised to the user: where in the fit it happened, and (for a non-finite loss) what to do."""
    if isinstance(error, NonFiniteLossError):
        return NonFiniteLossError(
            f"non-finite loss at {where} ({error}), before the optimizer step: the inputs may be too large for the "
            "models' precision, or the student diverged. Pass on_bad_batch='skip' to skip such batches"
        )
    return InvalidBatchError(f"bad {where}: {error}")
