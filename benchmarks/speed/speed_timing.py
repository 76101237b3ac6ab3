"""Timing and peak memory of step closures: interleaved rounds, process CPU time, allocator peaks."""

from __future__ import annotations

import gc
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int, budget_s: float
) -> dict[str, dict[str, float]]:
    """Round-robin over ``steps``: ``warmup`` untimed rounds, then up to ``repeats`` timed rounds (fewer,
    but at least 3, once ``budget_s`` seconds have gone), so that load on a shared machine slows every
    variant alike. Per step: wall-clock and process CPU time, median and minimum, in ms, and the count."""
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    sync(device)
    start = time.perf_counter()
    for r in range(repeats):
        for name, fn in steps.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            wall[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {
        name: {
            "wall": statistics.median(wall[name]),
            "wall_min": min(wall[name]),
            "cpu": statistics.median(cpu[name]),
            "cpu_min": min(cpu[name]),
            "n": len(wall[name]),
        }
        for name in steps
    }


def peak_memory_mb(steps: dict[str, Callable[[], None]], device: torch.device) -> dict[str, float]:
    """Per step: peak MB allocated during one call and live at the same time (tensors allocated before
    the call, such as the models, optimizer state, a teacher cache or the batch, do not count).

    CUDA: the allocator's peak above the memory in use before the call. CPU: every step runs once inside
    one ``torch.profiler.profile(profile_memory=True)`` session, each in its own ``record_function``
    range, and the CPU allocator's ``[memory]`` events (signed ``Bytes``) inside a step's range are
    replayed in time order: the peak is the maximum of the running sum. (``prof.events()`` is not enough:
    torch 2.x folds allocations made inside an op into that op.) Frees of blocks allocated before a step
    are counted only if the profiler saw the allocation, i.e. never before the session.
    """
    gc.collect()
    if device.type == "cuda":
        out = {}
        for name, fn in steps.items():
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            fn()
            sync(device)
            out[name] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        return out
    return {name: b / 2**20 for name, b in _cpu_peak_bytes(steps).items()}


def _cpu_peak_bytes(steps: dict[str, Callable[[], None]]) -> dict[str, int]:
    from torch.profiler import ProfilerActivity, profile, record_function

    with tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for name, fn in steps.items():
                with record_function(f"peak::{name}"):
                    fn()
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        data = json.loads(trace.read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    mem = [e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    mem.sort(key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    ranges = {
        e["name"][6:]: (e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name", "").startswith("peak::")
    }
    out = {}
    for name in steps:
        lo, hi = ranges[name]
        live = peak = 0
        for e in mem:
            if lo <= e["ts"] <= hi:
                live += int(e["args"]["Bytes"])
                peak = max(peak, live)
        if peak <= 0:
            raise RuntimeError(
                f"peak-memory measurement of {name} saw no allocation: profiler events missing"
            )
        out[name] = peak
    return out
