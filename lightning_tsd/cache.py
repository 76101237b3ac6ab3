"""Per-sample teacher cache: the frozen teacher's logits and saliency, kept by dataset ``index``.

A frozen teacher in eval mode gives the same outputs for the same input every epoch, so after the
first epoch its cost can vanish. The cache is only valid for inputs that do not change between
epochs: each entry keeps a fingerprint of its input (two float64 sums), and a sample that comes back
different (random augmentation, a shuffled dataset without stable indices) raises
:class:`TeacherCacheError` instead of silently distilling stale targets. Each entry is compared on its
first hit after being stored, so the check costs nothing from the third epoch on.

Memory: ``N * (4 * (K + T) + 18)`` bytes on ``device`` (CPU by default) for ``N`` rows, ``K`` classes and
series length ``T`` (float32 logits and saliency, a 16-byte fingerprint, two flags); ``N * (4 * K + 18)``
when saliency is not cached. ``nbytes`` says what is held. Storage grows by doubling up to ``max_bytes``; past it, new samples are served live and a
warning says so once. Storage is indexed by sample index, so its size follows the largest index seen:
an index whose row would not fit in ``max_bytes`` is never allocated (it is served live). Rows whose
teacher logits or saliency are not finite are never stored.

On disk: :meth:`TeacherCache.save` writes the rows with the cache's :attr:`~TeacherCache.key` (what they were
computed with: a fingerprint of the teacher's weights, the saliency estimator, its options and target; see
:func:`cache_key`) as tensors and plain data; :meth:`TeacherCache.load` reads them back with
``torch.load(weights_only=True)``. :meth:`TeacherCache.check_key` refuses a cache made with another teacher or
other options, and each row's input fingerprint refuses other data on the row's first hit, so a sweep of
students can share one cache file (``lightning-tsd cache-teacher``) without distilling stale targets.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_tsd.checkpoint import atomic_torch_save, safe_torch_load

CACHE_FORMAT = "lightning-tsd-teacher-cache/1"
REBUILD = (
    "rebuild the cache file with this teacher and these options (`lightning-tsd cache-teacher --config ... "
    "--output PATH`, or TeacherCache.save after a fit with teacher_cache=True), or pass teacher_cache=True "
    "to fill a fresh cache during the fit"
)


class TeacherCacheError(ValueError):
    """The cache cannot serve a batch correctly (changed inputs, bad indices, inconsistent shapes)."""


def input_fingerprint(x: Tensor) -> Tensor:
    """Two float64 sums per sample (``sum x`` and ``sum |x|``) that change when a sample's values do."""
    flat = x.detach().flatten(1).double()
    return torch.stack([flat.sum(1), flat.abs().sum(1)], dim=1)


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of ``model``'s state dict (names, dtypes, shapes and values of its parameters and buffers).

    Example:
        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> weights_fingerprint(a) == weights_fingerprint(a), weights_fingerprint(a) == weights_fingerprint(b)
        (True, False)
    """
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def cache_key(
    teacher: nn.Module, saliency: str, options: Mapping[str, Any] | None, saliency_target: str
) -> dict[str, str]:
    """What a cache's rows depend on besides the data: the teacher's weights (:func:`weights_fingerprint`),
    the saliency estimator, its options (as sorted JSON) and the saliency target.

    Example:
        >>> key = cache_key(torch.nn.Linear(2, 2), "integrated_gradients", {"steps": 8}, "teacher")
        >>> sorted(key), key["saliency_options"]
        (['saliency', 'saliency_options', 'saliency_target', 'teacher'], '{"steps": 8}')
    """
    return {
        "teacher": weights_fingerprint(teacher),
        "saliency": str(saliency),
        "saliency_options": json.dumps(dict(options or {}), sort_keys=True, default=repr),
        "saliency_target": str(saliency_target),
    }


class TeacherCache:
    """Teacher logits (and saliency maps) stored per sample index.

    Args:
        max_bytes: upper bound on the memory the cache may hold (default 2 GiB).
        device: where entries live; CPU keeps accelerator memory free.
        check_inputs: compare each hit's input fingerprint with the stored one.

    ``key`` (:func:`cache_key`) says what the rows were computed with; the distiller sets it on a cache that
    has none and checks it on one that has. ``origin`` is the file a loaded cache came from.

    Example:
        >>> cache = TeacherCache()
        >>> x = torch.randn(2, 1, 8)
        >>> cache.put(torch.tensor([3, 5]), torch.randn(2, 4), torch.rand(2, 8), x)
        >>> hit, logits, saliency = cache.get(torch.tensor([5, 1]), torch.cat([x[1:], x[:1]]))
        >>> hit.tolist(), len(cache)
        ([True, False], 2)
    """

    def __init__(
        self, max_bytes: int = 2 * 1024**3, device: str | torch.device = "cpu", check_inputs: bool = True
    ):
        self.max_bytes = int(max_bytes)
        self.device = torch.device(device)
        self.check_inputs = check_inputs
        self.logits: Tensor | None = None
        self.saliency: Tensor | None = None
        self.fingerprint: Tensor | None = None
        self.filled: Tensor | None = None
        self.verified: Tensor | None = None  # entries whose input was compared once since being stored
        self._pending: list[Tensor] = []  # indices added since the last sync across processes
        self._warned_full = False
        self.key: dict[str, str] | None = None
        self.origin: str | None = None

    def __len__(self) -> int:
        return 0 if self.filled is None else int(self.filled.sum())

    @property
    def capacity(self) -> int:
        return 0 if self.filled is None else self.filled.numel()

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's storage."""
        tensors = (self.logits, self.saliency, self.fingerprint, self.filled, self.verified)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def _row_bytes(self, num_classes: int, length: int | None) -> int:
        return 4 * num_classes + (0 if length is None else 4 * length) + 16 + 2

    def _reserve(self, needed: int, num_classes: int, length: int | None) -> bool:
        """Grow storage to hold indices ``< needed``; False when that would exceed ``max_bytes``."""
        if needed <= self.capacity and (length is None or self.saliency is not None):
            return True
        new_capacity = max(needed, 2 * self.capacity, 64) if needed > self.capacity else self.capacity
        row = self._row_bytes(num_classes, length)
        if new_capacity * row > self.max_bytes:
            new_capacity = needed
            if needed * row > self.max_bytes:
                if not self._warned_full:
                    warnings.warn(
                        f"teacher cache is full ({self.max_bytes} bytes, max_bytes): samples with index >= "
                        f"{self.capacity} are computed live every step; raise max_bytes to cache them",
                        stacklevel=3,
                    )
                    self._warned_full = True
                return False

        def grow(old: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
            new = torch.zeros(shape, dtype=dtype, device=self.device)
            if old is not None:
                new[: old.shape[0]] = old
            return new

        self.logits = grow(self.logits, (new_capacity, num_classes), torch.float32)
        if length is not None:
            self.saliency = grow(self.saliency, (new_capacity, length), torch.float32)
        self.fingerprint = grow(self.fingerprint, (new_capacity, 2), torch.float64)
        self.filled = grow(self.filled, (new_capacity,), torch.bool)
        self.verified = grow(self.verified, (new_capacity,), torch.bool)
        return True

    def _check_index(self, index: Tensor) -> Tensor:
        index = index.detach().to(self.device, torch.long).flatten()
        if index.numel() and int(index.min()) < 0:
            raise TeacherCacheError(f"sample indices must be >= 0, got {int(index.min())}")
        if index.unique().numel() != index.numel():
            raise TeacherCacheError(
                "a batch holds the same sample index twice; the teacher cache needs one index per sample "
                "(wrap the dataset in lightning_tsd.data.IndexedDataset)"
            )
        return index

    def get(self, index: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Look a batch up.

        Returns:
            ``(hit, logits, saliency)``: ``hit`` is a ``(B,)`` bool tensor on ``x``'s device; logits and
            saliency are the stored rows for the whole batch on ``x``'s device (rows of misses are
            meaningless), or None when nothing was hit.

        Raises:
            TeacherCacheError: a hit whose input differs from the one cached (augmented data).
        """
        # No index checks here (they cost a host sync per step): a negative or unseen index is a miss,
        # and put() refuses bad indices when the miss is stored.
        index = index.detach().to(self.device, torch.long).flatten()
        if self.filled is None:
            return torch.zeros(index.numel(), dtype=torch.bool, device=x.device), None, None
        assert self.logits is not None and self.fingerprint is not None and self.verified is not None
        in_range = (index >= 0) & (index < self.capacity)
        safe = index.clamp(0, self.capacity - 1)
        hit = self.filled[safe] & in_range
        if not bool(hit.any()):
            return hit.to(x.device), None, None
        # Each entry's input is compared once, on its first hit: random augmentation shows there, and
        # later epochs pay nothing for the check.
        unverified = hit & ~self.verified[safe] if self.check_inputs else torch.zeros_like(hit)
        if bool(unverified.any()):
            stored = self.fingerprint[safe[unverified]]
            seen = input_fingerprint(x[unverified.to(x.device)]).to(self.device)
            same = torch.isclose(seen, stored, rtol=1e-5, atol=1e-6).all(1)
            if not bool(same.all()):
                bad = index[unverified][~same].tolist()
                fix = (
                    "The cache is only valid when a sample is the same every epoch: turn off random "
                    "augmentation, or set teacher_cache=False"
                    if self.origin is None
                    else f"The cache file {self.origin} was filled from other data (another dataset, split, "
                    f"order or preprocessing): {REBUILD}"
                )
                raise TeacherCacheError(
                    f"sample(s) with index {bad[:5]} changed since the teacher cache stored them. {fix}"
                )
            self.verified[safe[unverified]] = True
        logits = self.logits[safe].to(x.device)
        saliency = None if self.saliency is None else self.saliency[safe].to(x.device)
        return hit.to(x.device), logits, saliency

    def lookup(self, index: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Gather a batch's rows without reading anything back from the device (no input check).

        For a cache known to hold every sample: returns ``(hit, logits, saliency)`` for the whole batch,
        where ``hit`` is a ``(B,)`` bool tensor the caller checks together with its other flags (rows of
        misses are meaningless). Each entry's input was already compared once by :meth:`get`. With the
        cache on the batch's device (``TeacherCache(device="cuda")``) no copy between devices is made.
        """
        if self.filled is None or self.logits is None:
            raise TeacherCacheError("lookup() needs a filled cache; use get() while the cache is filling")
        index = index.detach().to(self.device, torch.long).flatten()
        in_range = (index >= 0) & (index < self.capacity)
        safe = index.clamp(0, self.capacity - 1)
        hit = (self.filled[safe] & in_range).to(x.device)
        logits = self.logits[safe].to(x.device)
        saliency = None if self.saliency is None else self.saliency[safe].to(x.device)
        return hit, logits, saliency

    def put(self, index: Tensor, logits: Tensor, saliency: Tensor | None, x: Tensor) -> None:
        """Store the teacher's outputs for a batch of samples."""
        index = self._check_index(index)
        finite = torch.isfinite(logits.detach()).all(1)
        if saliency is not None:
            finite &= torch.isfinite(saliency.detach()).all(1)
        if not bool(finite.all()):
            # A NaN/Inf teacher output (inputs beyond the teacher's precision) is never cached: it is
            # recomputed, and refused or skipped, every time the sample comes back.
            keep = finite.to(index.device)
            index, logits, x = index[keep], logits[finite], x[finite.to(x.device)]
            saliency = None if saliency is None else saliency[finite.to(saliency.device)]
        if index.numel() == 0:
            return
        length = None if saliency is None else saliency.shape[1]
        if self.logits is not None and logits.shape[1] != self.logits.shape[1]:
            raise TeacherCacheError(
                f"cached logits have {self.logits.shape[1]} classes, got {logits.shape[1]}"
            )
        if self.saliency is not None and length is not None and length != self.saliency.shape[1]:
            raise TeacherCacheError(
                f"cached saliency maps have T={self.saliency.shape[1]}, got T={length}: the teacher cache "
                "needs one series length (pad the series and pass a mask)"
            )
        if self.saliency is not None and saliency is None:
            raise TeacherCacheError(
                "this cache holds teacher saliency maps: store rows with their saliency (a row without one "
                "would later be served with an all-zero map)"
            )
        if not self._reserve(int(index.max()) + 1, logits.shape[1], length):
            keep = index < self.capacity
            if not bool(keep.any()):
                return
            index, logits, x = index[keep], logits[keep.to(logits.device)], x[keep.to(x.device)]
            saliency = None if saliency is None else saliency[keep.to(saliency.device)]
        if saliency is not None and self.saliency is None:
            return  # a full cache that holds rows without maps cannot grow map storage: served live
        # _reserve allocated these (a full cache returned above when it holds none of the batch's indices)
        assert self.logits is not None and self.fingerprint is not None
        assert self.filled is not None and self.verified is not None
        self.logits[index] = logits.detach().float().to(self.device)
        if saliency is not None:
            assert self.saliency is not None
            self.saliency[index] = saliency.detach().float().to(self.device)
        self.fingerprint[index] = input_fingerprint(x).to(self.device)
        self.filled[index] = True
        self.verified[index] = False
        self._pending.append(index)

    def discard(self, index: Tensor) -> None:
        """Forget entries (e.g. those stored by a training step that was then refused): they are computed
        again when their samples come back, and are not shared by the next :meth:`sync`."""
        index = index.detach().to(self.device, torch.long).flatten()
        if self.filled is None or index.numel() == 0:
            return
        index = index[(index >= 0) & (index < self.capacity)]
        assert self.verified is not None  # allocated with filled
        self.filled[index] = False
        self.verified[index] = False
        self._pending = [p[~torch.isin(p, index)] for p in self._pending]

    def mark_synced(self) -> None:
        """Forget the entries added since the last :meth:`sync` (every process already has them, e.g.
        after each one precomputed the whole cache)."""
        self._pending = []

    def sync(self) -> None:
        """Share entries added since the last call with every process of the default process group.

        Under DDP each rank sees a different shard every epoch; after a sync every rank can serve every
        sample any rank has seen. A collective: every rank must call it. No-op without a process group.
        """
        pending = torch.cat(self._pending) if self._pending else torch.zeros(0, dtype=torch.long)
        self._pending = []
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        mine: dict[str, Tensor | None] = {"index": pending.cpu()}
        if pending.numel():
            assert self.logits is not None and self.fingerprint is not None  # pending rows were stored
            mine.update(
                logits=self.logits[pending].cpu(),
                saliency=None if self.saliency is None else self.saliency[pending].cpu(),
                fingerprint=self.fingerprint[pending].cpu(),
            )
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        for rank, entry in enumerate(gathered):
            if rank == dist.get_rank() or entry["index"].numel() == 0:
                continue
            self._store_rows(entry)

    def _store_rows(self, entry: dict[str, Any]) -> None:
        index, saliency = entry["index"].to(self.device), entry["saliency"]
        length = None if saliency is None else saliency.shape[1]
        if not self._reserve(int(index.max()) + 1, entry["logits"].shape[1], length):
            keep = index < self.capacity
            index = index[keep]
            entry = {k: (v[keep.cpu()] if isinstance(v, Tensor) else v) for k, v in entry.items()}
            saliency = entry["saliency"]
        if index.numel() == 0 or self.logits is None or (saliency is not None and self.saliency is None):
            return  # nothing fits in max_bytes: these samples are served live
        assert self.fingerprint is not None and self.filled is not None and self.verified is not None
        self.logits[index] = entry["logits"].to(self.device)
        if saliency is not None:
            assert self.saliency is not None
            self.saliency[index] = saliency.to(self.device)
        self.fingerprint[index] = entry["fingerprint"].to(self.device)
        self.filled[index] = True
        self.verified[index] = False

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors only (checkpoint-safe with ``torch.load(weights_only=True)``)."""
        if self.filled is None:
            return {"index": torch.zeros(0, dtype=torch.long)}
        index = torch.nonzero(self.filled).flatten()
        assert self.logits is not None and self.fingerprint is not None  # allocated with filled
        return {
            "index": index.cpu(),
            "logits": self.logits[index].cpu(),
            "saliency": None if self.saliency is None else self.saliency[index].cpu(),
            "fingerprint": self.fingerprint[index].cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the cache's contents with ``state`` (from :meth:`state_dict`)."""
        self.logits = self.saliency = self.fingerprint = self.filled = self.verified = None
        self._pending = []
        if state["index"].numel():
            self._store_rows(state)

    # ------------------------------------------------------------------ on disk
    def check_key(self, expected: Mapping[str, str]) -> None:
        """Adopt ``expected`` (:func:`cache_key`) as this cache's key if it has none; otherwise raise
        :class:`TeacherCacheError` naming every field that differs.

        Example:
            >>> cache = TeacherCache()
            >>> cache.check_key({"saliency": "gradient"})
            >>> cache.check_key({"saliency": "occlusion"})  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            lightning_tsd.cache.TeacherCacheError: the teacher cache was made with another saliency estimator (cache: 'gradient', now: 'occlusion'): ...
        """
        if self.key is None:
            self.key = dict(expected)
            return
        names = {
            "teacher": "another teacher (its weights differ)",
            "saliency": "another saliency estimator",
            "saliency_options": "other saliency options",
            "saliency_target": "another saliency_target",
        }
        differ = [
            names.get(field, f"another {field}")
            + (
                ""
                if field == "teacher"
                else f" (cache: {self.key.get(field)!r}, now: {expected.get(field)!r})"
            )
            for field in sorted(set(self.key) | set(expected))
            if self.key.get(field) != expected.get(field)
        ]
        if differ:
            where = f" in {self.origin}" if self.origin else ""
            raise TeacherCacheError(
                f"the teacher cache{where} was made with {', '.join(differ)}: its rows are not this teacher's "
                f"outputs. Use the teacher and options it was made with, or {REBUILD}"
            )

    def save(self, path: str | os.PathLike) -> None:
        """Write the cache's rows and :attr:`key` to ``path`` (tensors and plain data, atomically).

        Raises:
            TeacherCacheError: the cache has no ``key`` (it could not be checked when loaded).

        Example:
            >>> import os, tempfile
            >>> teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 3))
            >>> cache = TeacherCache()
            >>> cache.check_key(cache_key(teacher, "gradient", {}, "teacher"))
            >>> x = torch.randn(2, 1, 8)
            >>> cache.put(torch.tensor([0, 1]), teacher(x), torch.rand(2, 8), x)
            >>> path = os.path.join(tempfile.mkdtemp(), "cache.pt")
            >>> cache.save(path)
            >>> loaded = TeacherCache.load(path)
            >>> len(loaded), torch.equal(loaded.logits[:2], cache.logits[:2])
            (2, True)
        """
        if self.key is None:
            raise TeacherCacheError(
                "this teacher cache has no key (what its rows were computed with), so it could not be checked "
                "when loaded: call cache.check_key(lightning_tsd.cache.cache_key(teacher, saliency, options, "
                "saliency_target)) first (the distiller does it in setup)"
            )
        atomic_torch_save({"format": CACHE_FORMAT, "key": dict(self.key), **self.state_dict()}, path)

    @classmethod
    def load(
        cls, path: str | os.PathLike, max_bytes: int = 2 * 1024**3, device: str | torch.device = "cpu"
    ) -> TeacherCache:
        """Read a cache written by :meth:`save` with ``torch.load(weights_only=True)``.

        Raises:
            FileNotFoundError: no file at ``path``.
            lightning_tsd.UnsafeCheckpointError: the file needs unpickling beyond tensors and plain data.
            TeacherCacheError: the file is not a teacher cache.
        """
        payload = safe_torch_load(path)
        if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
            raise TeacherCacheError(
                f"{path} is not a lightning-tsd teacher cache (expected format {CACHE_FORMAT!r}); write one with "
                "`lightning-tsd cache-teacher` or TeacherCache.save"
            )
        cache = cls(max_bytes=max_bytes, device=device)
        cache.load_state_dict(payload)
        cache.key, cache.origin = dict(payload["key"]), str(path)
        return cache
