"""Throughput, peak memory and FLOPs of token-reduction variants, all measured in one run.

Protocol (the paper's, on CUDA: AMP fp16, batch 64): synthetic inputs at the model's resolution, warm-up, then
timed repeats. The variants are interleaved (round-robin over repeats, alternating direction, median per variant),
so slow phases of a shared machine hit every variant alike and no variant always runs after the same one (that
alone moved RAPID/ToMe by 4-6% on a busy CPU). The timing loop is a plain clock around `number` forwards (with
CUDA synchronisation): `torch.utils.benchmark.Timer.timeit` would add two warm-up runs to every round and pin the
thread count. On a busy CPU machine, `timer="process"` counts this
process's CPU time instead of wall time (use it with one thread: it sums the CPU time of all threads).

Record fields (stable): label, method, r, output_tokens, token_counts, rapid (as in `accuracy`), model,
batch_size, device, precision, num_threads, timer, repeats, throughput (images/s), time_ms (median per batch),
time_ms_iqr ([q25, q75]), speedup (throughput / unreduced throughput in this run), gflops (per image, analytic
from the token counts), gflops_counted (`torch.utils.flop_counter` on a real forward), flop_ratio (unreduced
GFLOPs / these), speedup_over_flop_ratio, peak_memory_mb (tensors allocated during one forward beyond weights
and input; CUDA allocator or CPU profiler; None with `measure_memory=False`), reduction_share (CPU only,
else None: the fraction of one profiled forward's wall time spent in the reduction steps, i.e. the method's
own overhead). `latency_grid` runs `benchmark` at every (thread count, batch size) of a grid.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rapid_hf.evaluation.flops import counted_flops, model_flops
from rapid_hf.evaluation.loading import autocast_for
from rapid_hf.evaluation.variants import REFERENCE, Variant
from rapid_hf.models.layers import REDUCTION_RANGE
from rapid_hf.reduction.config import RapidConfig

TIMERS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(forward: Callable[[], Any], number: int, clock: Callable[[], float], device: torch.device) -> float:
    """Seconds per call of `forward`, averaged over `number` back-to-back calls."""
    _synchronize(device)
    start = clock()
    for _ in range(number):
        forward()
    _synchronize(device)
    return (clock() - start) / number


@dataclass(frozen=True)
class ForwardProfile:
    """One profiled forward: peak bytes allocated beyond what was allocated before it, and (CPU only) the
    milliseconds spent inside the layers' reduction steps (profiler range `REDUCTION_RANGE`) and in the forward."""

    peak_bytes: int
    reduction_ms: float | None = None
    forward_ms: float | None = None


@contextlib.contextmanager
def quiet_file_descriptors() -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to the null device for the block.

    `torch.profiler` on CPU prints lines such as `USDT ... profiler_start` from C++ straight to the descriptors,
    past `sys.stdout`; a benchmark's output must hold only its results.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for descriptor in (*saved, null):
            os.close(descriptor)


def profile_forward(forward: Callable[[], Any], device: torch.device) -> ForwardProfile:
    """Run `forward()` once under the CUDA allocator's peak counter or, on CPU, under `torch.profiler` (its
    console lines silenced)."""
    if device.type == "cuda":
        _synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        forward()
        _synchronize(device)
        return ForwardProfile(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with quiet_file_descriptors(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        start = time.perf_counter()
        forward()
        forward_ms = (time.perf_counter() - start) * 1e3
    raw = profiler.profiler.kineto_results.events()
    live = peak = 0
    for event in sorted((e for e in raw if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    reduction_ns = sum(e.duration_ns() for e in raw if e.name() == REDUCTION_RANGE)
    return ForwardProfile(peak, reduction_ns / 1e6, forward_ms)


def _with_reference(variants: Sequence[Variant]) -> list[Variant]:
    """The unreduced row first (the speedup baseline), added if missing."""
    rows = [v for v in variants if v.rapid.method != "none"]
    reference = next((v for v in variants if v.rapid.method == "none"), Variant("none", REFERENCE))
    return [reference, *rows]


@torch.inference_mode()
def benchmark(
    model: Any,
    variants: Sequence[Variant],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    warmup: int = 2,
    repeats: int = 10,
    number: int = 1,
    timer: str = "wall",
    seed: int = 0,
    measure_memory: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Measure every variant (plus the unreduced baseline) on one synthetic batch; one record each.

    Each repeat times `number` forwards of every variant in turn; a variant's time is the median over repeats.
    `measure_memory=False` skips the profiled forward (peak_memory_mb and reduction_share are then None).
    Every variant runs as per-call settings: the model's own settings are never touched.
    """
    if timer not in TIMERS:
        raise ValueError(f"timer {timer!r} is invalid: choose from {', '.join(TIMERS)}")
    for name, value in (("batch_size", batch_size), ("repeats", repeats), ("number", number)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    device = torch.device(device)
    model.to(device).eval()
    config = getattr(model.config, "encoder_config", model.config)  # CLIPModel: its vision config
    generator = torch.Generator().manual_seed(seed)
    height, width = (config.image_size,) * 2 if isinstance(config.image_size, int) else config.image_size
    shape = (batch_size, config.num_channels, height, width)
    pixel_values = torch.randn(shape, generator=generator).to(device)
    rows = _with_reference(variants)

    def forward(rapid: RapidConfig) -> Any:
        with autocast_for(device, precision):
            return model(pixel_values=pixel_values, rapid=rapid)

    measured: dict[int, dict[str, Any]] = {}
    times: list[list[float]] = [[] for _ in rows]
    for position, variant in enumerate(rows):  # per-call settings: the model's own settings are never touched
        for _ in range(warmup):
            forward(variant.rapid)
        counted, token_counts = counted_flops(model, pixel_values[:2], variant.rapid)
        profiled = profile_forward(functools.partial(forward, variant.rapid), device) if measure_memory else None
        measured[position] = {
            "token_counts": token_counts,
            "gflops": model_flops(model, token_counts, variant.rapid).total / 1e9,
            "gflops_counted": counted / 1e9,
            "peak_memory_mb": None if profiled is None else profiled.peak_bytes / 2**20,
            "reduction_share": None if profiled is None or profiled.forward_ms is None
            else profiled.reduction_ms / profiled.forward_ms,
        }
    for repeat in tqdm(range(repeats), desc=f"benchmark batch {batch_size}", disable=not progress):
        order = list(enumerate(rows))
        for position, variant in order if repeat % 2 == 0 else order[::-1]:  # alternate: no variant always last
            timed = functools.partial(forward, variant.rapid)
            times[position].append(time_forward(timed, number, TIMERS[timer], device))

    baseline_time = float(np.median(times[0]))
    baseline_gflops = measured[0]["gflops"]
    records = []
    for position, variant in enumerate(rows):
        median = float(np.median(times[position]))
        speedup = baseline_time / median
        flop_ratio = baseline_gflops / measured[position]["gflops"]
        records.append(
            {
                "label": variant.label,
                "method": variant.rapid.method,
                "r": variant.requested_r,
                "output_tokens": measured[position]["token_counts"][-1],
                "token_counts": list(measured[position]["token_counts"]),
                "rapid": variant.rapid.to_dict(),
                "batch_size": batch_size,
                "device": str(device),
                "precision": precision,
                "num_threads": torch.get_num_threads(),
                "timer": timer,
                "repeats": repeats,
                "throughput": batch_size / median,
                "time_ms": median * 1e3,
                "time_ms_iqr": [float(q) * 1e3 for q in np.percentile(times[position], [25, 75])],
                "speedup": speedup,
                "gflops": measured[position]["gflops"],
                "gflops_counted": measured[position]["gflops_counted"],
                "flop_ratio": flop_ratio,
                "speedup_over_flop_ratio": speedup / flop_ratio,
                "peak_memory_mb": measured[position]["peak_memory_mb"],
                "reduction_share": measured[position]["reduction_share"],
            }
        )
    return records


def latency_grid(
    model: Any,
    variants: Sequence[Variant],
    batch_sizes: Sequence[int] = (1, 4, 16, 64),
    threads: Sequence[int] | None = (1, 2),
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    warmup: int = 2,
    repeats: int = 10,
    number: int = 1,
    timer: str = "wall",
    seed: int = 0,
    measure_memory: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """`benchmark` at every (thread count, batch size): one record per variant and cell, thread-major.

    Within a cell the variants are interleaved as in `benchmark`, so each record's `speedup` (over the unreduced
    model in the same cell) sits beside its `flop_ratio`, and `speedup_over_flop_ratio` says how much of the FLOP
    saving became time at that batch size. `threads=None` keeps torch's thread count; the count in force before
    the call is restored afterwards.
    """
    batch_sizes, thread_counts = list(batch_sizes), None if threads is None else list(threads)
    if not batch_sizes:
        raise ValueError("batch_sizes is empty: give at least one batch size")
    if thread_counts is not None and not thread_counts:
        raise ValueError("threads is empty: give at least one thread count, or None for torch's")
    for name, values in (("batch_sizes", batch_sizes), ("threads", thread_counts or [])):
        bad = [value for value in values if isinstance(value, bool) or not isinstance(value, int) or value < 1]
        if bad:
            raise ValueError(f"{name} must hold integers >= 1, got {bad}")
    original_threads = torch.get_num_threads()
    records: list[dict[str, Any]] = []
    try:
        for thread_count in thread_counts or [original_threads]:
            torch.set_num_threads(thread_count)
            for batch_size in batch_sizes:
                records += benchmark(
                    model, variants, batch_size=batch_size, device=device, precision=precision, warmup=warmup,
                    repeats=repeats, number=number, timer=timer, seed=seed, measure_memory=measure_memory,
                    progress=progress,
                )
    finally:
        torch.set_num_threads(original_threads)
    return records
