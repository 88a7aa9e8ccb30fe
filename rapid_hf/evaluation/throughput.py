"""Throughput, peak memory and FLOPs of token-reduction variants, all measured in one run, eager, compiled or
through ONNX Runtime.

Protocol (the paper's, on CUDA: AMP fp16, batch 64): synthetic inputs at the model's resolution, warm-up, then
timed repeats. The rows are interleaved (round-robin over repeats, alternating direction, median per row), so
slow phases of a shared machine hit every row alike and no row always runs after the same one (that alone moved
RAPID/ToMe by 4-6% on a busy CPU). The timing loop is a plain clock around `number` forwards (with CUDA
synchronisation): `torch.utils.benchmark.Timer.timeit` would add two warm-up runs to every round and pin the
thread count. On a busy CPU machine, `timer="process"` counts this process's CPU time instead of wall time (use it
with one thread: it sums the CPU time of all threads).

Runtimes (`runtimes=`, any of `RUNTIMES`; every row of every runtime is timed in the same interleaved loop):
- "eager": the PyTorch model, each variant as per-call settings (`model(pixel_values, rapid=...)`).
- "compile": `torch.compile(model, backend=compile_backend, dynamic=False)` called with each variant's settings;
  the first call of each variant compiles it (timed as `compile_s`, after a throw-away compile that absorbs the
  compiler's own start-up; the on-disk inductor cache is used as found). `dynamic=False`: each setting gets the
  static graph a deployment with that one setting would get, instead of dynamo turning to dynamic shapes once it
  has seen several token counts. Dynamo's caches are reset at the start of each `benchmark` call.
- "onnx": each variant exported with `rapid_hf.export.export_onnx` (settings and batch size baked in) to a
  temporary folder and run by an onnxruntime `InferenceSession` (intra-op threads = torch's thread count,
  `session.intra_op.allow_spinning=0`, one inter-op thread); float32 only.
The unreduced eager model is always measured: every row's `speedup_vs_eager_stock` is against it. A row whose
compile or export fails is a record with `error` (one line) and no times; it never stops the run.

Record fields (stable): label, method, r, output_tokens, token_counts, rapid (as in `accuracy`), model,
runtime, batch_size, device, precision, num_threads, timer, repeats, throughput (images/s), time_ms (median per
batch), time_ms_iqr ([q25, q75]), speedup (throughput / the same runtime's unreduced throughput in this run),
speedup_vs_eager_stock (throughput / the unreduced eager model's), speedup_spread (IQR / median of the
per-round ratios behind `speedup`: how far the rounds disagree; above `SPREAD_LIMIT` the ratio is not to be
trusted), gflops (per image, analytic from the token counts), gflops_counted (`torch.utils.flop_counter` on a
real forward), flop_ratio (unreduced GFLOPs / these), speedup_over_flop_ratio, peak_memory_mb (eager rows:
tensors allocated during one forward beyond weights and input; CUDA allocator or CPU profiler; None with
`measure_memory=False` and for the other runtimes), reduction_share (eager rows on CPU, else None: the fraction of
one profiled forward's wall time spent in the reduction steps, i.e. the method's own overhead), compile_s
(seconds to make the row runnable: first compiled call, or ONNX export plus session creation; None for eager),
export_s (ONNX rows: the export alone), max_abs_diff_vs_eager (largest |output - eager output| of the same
variant on the timed batch; None for eager rows), error (None, or why the row could not run).
`latency_grid` runs `benchmark` at every (thread count, batch size) of a grid; `default_threads` picks a thread
count that does not oversubscribe a busy machine.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
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
RUNTIMES: tuple[str, ...] = ("eager", "compile", "onnx")
# IQR / median of the per-round speed-up ratios above which a speed-up is flagged as not to be trusted.
SPREAD_LIMIT = 0.10


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


def interleaved_times(
    forwards: Sequence[Callable[[], Any]],
    repeats: int,
    number: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    device: str | torch.device = "cpu",
    progress: bool = False,
    description: str = "timing",
) -> list[list[float]]:
    """Seconds per call of each forward in each round: every round times every forward once (`number` calls),
    the order alternating between rounds so that no forward always runs after the same one."""
    device = torch.device(device)
    times: list[list[float]] = [[] for _ in forwards]
    order = list(enumerate(forwards))
    for repeat in tqdm(range(repeats), desc=description, disable=not progress):
        for position, forward in order if repeat % 2 == 0 else order[::-1]:
            times[position].append(time_forward(forward, number, clock, device))
    return times


def paired_ratios(reference: Sequence[float], times: Sequence[float]) -> np.ndarray:
    """Per-round speed-ups: the reference's time over the row's time in the same round."""
    return np.asarray(reference, dtype=float) / np.asarray(times, dtype=float)


def ratio_spread(reference: Sequence[float], times: Sequence[float]) -> float:
    """IQR / median of the per-round speed-ups (0 with fewer than two rounds): how much the rounds disagree."""
    ratios = paired_ratios(reference, times)
    if len(ratios) < 2:
        return 0.0
    low, median, high = np.percentile(ratios, [25, 50, 75])
    return float((high - low) / median)


def rounds_for_budget(round_seconds: float, budget_seconds: float, minimum: int = 5, maximum: int = 30) -> int:
    """Timed rounds that fit in `budget_seconds` when one round takes `round_seconds`, within [minimum, maximum]."""
    fitting = int(budget_seconds / round_seconds) if round_seconds > 0 else maximum
    return max(minimum, min(maximum, fitting))


# --- thread count -------------------------------------------------------------------------------------------


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask, capped by a cgroup (v2) CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError, IndexError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    return max(1, cores)


def load_average() -> float | None:
    """The 1-minute load average (runnable threads, whole machine), None where the system has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def choose_threads(cores: int, torch_threads: int, cpu_count: int, load: float | None) -> int:
    """min(usable cores, torch's default (its physical-core count, or OMP_NUM_THREADS), the machine's idle
    cores (CPUs minus the load average, rounded)), at least 1: several threads on a core that another process
    is using wait for each other at every operation."""
    count = min(cores, torch_threads)
    if load is not None:
        count = min(count, int(cpu_count - load + 0.5))
    return max(1, count)


@dataclass(frozen=True)
class ThreadChoice:
    """A thread count and why (printed with the results)."""

    count: int
    reason: str


def default_threads() -> ThreadChoice:
    """The thread count for a timing run on this machine now: `choose_threads` of what this process sees."""
    cores, torch_threads, cpu_count, load = usable_cores(), torch.get_num_threads(), os.cpu_count() or 1, load_average()
    count = choose_threads(cores, torch_threads, cpu_count, load)
    load_text = "unknown" if load is None else f"{load:.1f}"
    return ThreadChoice(count, f"auto: {min(cores, torch_threads)} usable cores, load {load_text} on {cpu_count} CPUs")


# --- profiling ----------------------------------------------------------------------------------------------


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


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No output at all from the block: Python's streams, warnings and the file descriptors (exporters and
    compilers print progress lines and warnings the user cannot act on)."""
    with quiet_file_descriptors(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


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


# --- compiled and ONNX Runtime forwards ---------------------------------------------------------------------


class TimeLimitExceeded(Exception):
    """A compile or export ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[list[str]]:
    """Raise `TimeLimitExceeded` in the block after `seconds`, and again every half second until it ends (a
    compiler may swallow the first one). Yields a list that holds the message once the limit has passed (a
    compiler may also re-raise it as its own error type). SIGALRM: main thread of a Unix process only; elsewhere,
    or with None or 0, no limit."""
    expired: list[str] = []
    usable = seconds and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield expired
        return

    def expire(signum: int, frame: Any) -> None:
        message = f"did not finish within {seconds:g} s"
        expired[:] = [f"{TimeLimitExceeded.__name__}: {message}"]
        raise TimeLimitExceeded(message)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.5)
    try:
        yield expired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(error: BaseException, limit: int = 240) -> str:
    """`Type: first line of the message`, cut to `limit` characters (a row's `error` field)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):  # e.g. "backend='inductor' raised:" then the cause
        lines[0] += " " + lines[1]
    text = type(error).__name__ + (f": {lines[0]}" if lines else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_call(forward: Callable[[], Any], device: str | torch.device = "cpu",
               timeout_s: float | None = None) -> tuple[Any, float, str | None]:
    """Run `forward` once, silenced and under `time_limit(timeout_s)` (a compiled callable compiles in its first
    call): (output or None, seconds, None or the error as one line)."""
    device = torch.device(device)
    start = time.perf_counter()
    expired: list[str] = []
    try:
        with quiet(), time_limit(timeout_s) as expired:
            output = forward()
            _synchronize(device)
    except Exception as error:
        return None, time.perf_counter() - start, expired[0] if expired else one_line(error)
    return output, time.perf_counter() - start, None


_WARM_BACKENDS: set[str] = set()


def warm_up_compiler(backend: str | Callable[..., Any] = "inductor") -> None:
    """Compile and run a one-line function once, so that the compiler's own start-up (seconds for inductor)
    is not counted in the first variant's compile time. Once per process and backend."""
    if not isinstance(backend, str) or backend in _WARM_BACKENDS:  # a backend function: the caller's own
        return
    compiled = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2 + 1, backend=backend, dynamic=False)
    first_call(functools.partial(compiled, torch.ones(8)))
    _WARM_BACKENDS.add(backend)


@contextlib.contextmanager
def fresh_compiler(backend: str | Callable[..., Any] = "inductor", graphs: int = 64) -> Iterator[None]:
    """Dynamo's caches reset, the compiler warmed up, and room for `graphs` compiled graphs per function in the
    block (dynamo's default limit of 8 would fall back to eager after a few settings or token counts)."""
    import torch._dynamo

    torch._dynamo.reset()
    warm_up_compiler(backend)
    config = torch._dynamo.config
    wanted = {"recompile_limit": graphs, "cache_size_limit": graphs, "accumulated_recompile_limit": 4 * graphs,
              "accumulated_cache_size_limit": 4 * graphs}  # the names differ between torch versions
    limits = {name: max(getattr(config, name), value) for name, value in wanted.items() if hasattr(config, name)}
    with config.patch(**limits):
        yield


def onnx_session(path: str | Path, num_threads: int, device: str | torch.device = "cpu") -> Any:
    """An onnxruntime `InferenceSession` for timing: `num_threads` intra-op threads that sleep instead of
    spinning between calls, one inter-op thread, errors-only logging; CUDA provider on `device` "cuda"."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    if torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        providers = ["CUDAExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)


def _first_tensor(output: Any) -> torch.Tensor:
    """Logits (or an ONNX Runtime output, or a model output's first tensor) as a float32 CPU tensor."""
    if isinstance(output, (list, tuple)) and output and not isinstance(output[0], (int, float)):
        output = output[0]
    if isinstance(output, np.ndarray):
        return torch.from_numpy(output).float()
    if not isinstance(output, torch.Tensor):
        logits = getattr(output, "logits", None)
        output = logits if logits is not None else output[0]
    return output.detach().float().cpu()


def _max_abs_diff(output: Any, reference: torch.Tensor) -> float | None:
    tensor = _first_tensor(output)
    return float((tensor - reference).abs().max()) if tensor.shape == reference.shape else None


@dataclass
class _Row:
    """One timed row: a variant (index into the benchmark's rows) in one runtime."""

    position: int
    runtime: str
    forward: Callable[[], Any] | None = None
    compile_s: float | None = None
    export_s: float | None = None
    error: str | None = None
    output: Any = None


def normalize_runtimes(runtimes: str | Sequence[str]) -> list[str]:
    """Runtime names in `RUNTIMES` order, each once; a comma string is split. ValueError for an unknown one."""
    names = [name.strip() for name in runtimes.split(",")] if isinstance(runtimes, str) else list(runtimes)
    unknown = [name for name in names if name not in RUNTIMES]
    if unknown or not names:
        raise ValueError(f"runtimes {names!r} are invalid: choose from {', '.join(RUNTIMES)}")
    return [name for name in RUNTIMES if name in names]


def _with_reference(variants: Sequence[Variant]) -> list[Variant]:
    """The unreduced row first (the speedup baseline), added if missing."""
    rows = [v for v in variants if v.rapid.method != "none"]
    reference = next((v for v in variants if v.rapid.method == "none"), Variant("none", REFERENCE))
    return [reference, *rows]


def _call(model: Any, pixel_values: torch.Tensor, rapid: RapidConfig, device: torch.device, precision: str) -> Any:
    with autocast_for(device, precision):
        return model(pixel_values=pixel_values, rapid=rapid)


def _prepare_compiled(rows: list[_Row], model: Any, pixel_values: torch.Tensor, variants: Sequence[Variant],
                      device: torch.device, precision: str, backend: str | Callable[..., Any],
                      timeout_s: float | None) -> None:
    compiled = torch.compile(model, backend=backend, dynamic=False)
    for row in rows:
        forward = functools.partial(_call, compiled, pixel_values, variants[row.position].rapid, device, precision)
        row.output, row.compile_s, row.error = first_call(forward, device, timeout_s)
        row.forward = None if row.error else forward


def _prepare_onnx(rows: list[_Row], model: Any, pixel_values: torch.Tensor, variants: Sequence[Variant],
                  device: torch.device, precision: str, folder: Path, timeout_s: float | None) -> None:
    from rapid_hf.export import INPUT_NAME, OUTPUT_NAME, export_onnx

    feed = {INPUT_NAME: pixel_values.float().cpu().numpy()}
    for row in rows:
        if precision != "fp32":
            row.error = f"ONNX Runtime rows run the float32 export, not {precision}"
            continue
        path = folder / f"row{row.position}.onnx"
        export = functools.partial(export_onnx, model, path, rapid=variants[row.position].rapid,
                                   batch_size=pixel_values.shape[0])
        _, row.export_s, row.error = first_call(export, "cpu", timeout_s)
        if row.error:
            row.compile_s = row.export_s
            continue
        start = time.perf_counter()
        try:
            session = onnx_session(path, torch.get_num_threads(), device)
        except Exception as error:
            row.error = one_line(error)
            continue
        row.forward = functools.partial(session.run, [OUTPUT_NAME], feed)
        row.compile_s = row.export_s + time.perf_counter() - start
        row.output, _, row.error = first_call(row.forward)
        if row.error:
            row.forward = None


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
    runtimes: str | Sequence[str] = ("eager",),
    compile_backend: str | Callable[..., Any] = "inductor",
    compile_timeout_s: float | None = None,
) -> list[dict[str, Any]]:
    """Measure every variant (plus the unreduced baseline) in every runtime on one synthetic batch; one record
    per (variant, runtime), a variant's runtimes next to each other, the unreduced rows first.

    Each repeat times `number` forwards of every row in turn; a row's time is the median over repeats.
    `measure_memory=False` skips the profiled forward (peak_memory_mb and reduction_share are then None).
    Every variant runs as per-call settings: the model's own settings are never touched. `compile_timeout_s`
    limits each compile and each export (main thread only): a row that runs past it is an error row.
    """
    if timer not in TIMERS:
        raise ValueError(f"timer {timer!r} is invalid: choose from {', '.join(TIMERS)}")
    for name, value in (("batch_size", batch_size), ("repeats", repeats), ("number", number)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    runtimes = normalize_runtimes(runtimes)
    device = torch.device(device)
    model.to(device).eval()
    config = getattr(model.config, "encoder_config", model.config)  # CLIPModel: its vision config
    generator = torch.Generator().manual_seed(seed)
    height, width = (config.image_size,) * 2 if isinstance(config.image_size, int) else config.image_size
    shape = (batch_size, config.num_channels, height, width)
    pixel_values = torch.randn(shape, generator=generator).to(device)
    variants = _with_reference(variants)
    rows = [_Row(position, runtime) for position in range(len(variants)) for runtime in runtimes
            if runtime != "eager"] + [_Row(position, "eager") for position in range(len(variants))
                                      if "eager" in runtimes or position == 0]
    rows.sort(key=lambda row: (row.position, RUNTIMES.index(row.runtime)))

    measured: dict[int, dict[str, Any]] = {}
    for position, variant in enumerate(variants):  # per-call settings: the model's own settings are never touched
        forward = functools.partial(_call, model, pixel_values, variant.rapid, device, precision)
        eager_rows = [row for row in rows if row.position == position and row.runtime == "eager"]
        for _ in range(warmup if eager_rows else 0):
            forward()
        reference = _first_tensor(forward())
        counted, token_counts = counted_flops(model, pixel_values[:2], variant.rapid)
        profiled = profile_forward(forward, device) if measure_memory and eager_rows else None
        for row in eager_rows:
            row.forward = forward
        measured[position] = {
            "reference": reference,
            "token_counts": token_counts,
            "gflops": model_flops(model, token_counts, variant.rapid).total / 1e9,
            "gflops_counted": counted / 1e9,
            "peak_memory_mb": None if profiled is None else profiled.peak_bytes / 2**20,
            "reduction_share": None if profiled is None or profiled.forward_ms is None
            else profiled.reduction_ms / profiled.forward_ms,
        }
    with contextlib.ExitStack() as stack:
        compiled_rows = [row for row in rows if row.runtime == "compile"]
        if compiled_rows:
            stack.enter_context(fresh_compiler(compile_backend, graphs=64 + 16 * len(compiled_rows)))
            _prepare_compiled(compiled_rows, model, pixel_values, variants, device, precision, compile_backend,
                              compile_timeout_s)
        onnx_rows = [row for row in rows if row.runtime == "onnx"]
        if onnx_rows:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rapid_hf_bench_")))
            _prepare_onnx(onnx_rows, model, pixel_values, variants, device, precision, folder, compile_timeout_s)
        for row in rows:
            if row.runtime != "eager" and row.forward is not None:
                for _ in range(warmup):
                    row.forward()
        timed = [row for row in rows if row.forward is not None]
        times = dict(zip(
            map(id, timed),
            interleaved_times([row.forward for row in timed], repeats, number, TIMERS[timer], device, progress,
                              f"benchmark batch {batch_size}"),
            strict=True,
        ))
    return [_record(row, rows, variants, measured, times, batch_size, device, precision, timer, repeats)
            for row in rows]


def _record(row: _Row, rows: list[_Row], variants: list[Variant], measured: dict[int, dict[str, Any]],
            times: dict[int, list[float]], batch_size: int, device: torch.device, precision: str, timer: str,
            repeats: int) -> dict[str, Any]:
    variant, facts = variants[row.position], measured[row.position]
    stock = next((r for r in rows if r.position == 0 and r.runtime == row.runtime), None)
    eager_stock = next(r for r in rows if r.position == 0 and r.runtime == "eager")
    own, base, eager_base = (times.get(id(r)) if r is not None else None for r in (row, stock, eager_stock))
    flop_ratio = measured[0]["gflops"] / facts["gflops"]
    median = None if own is None else float(np.median(own))
    speedup = None if median is None or base is None else float(np.median(base)) / median
    eager = row.runtime == "eager"
    return {
        "label": variant.label,
        "method": variant.rapid.method,
        "r": variant.requested_r,
        "runtime": row.runtime,
        "output_tokens": facts["token_counts"][-1],
        "token_counts": list(facts["token_counts"]),
        "rapid": variant.rapid.to_dict(),
        "batch_size": batch_size,
        "device": str(device),
        "precision": precision,
        "num_threads": torch.get_num_threads(),
        "timer": timer,
        "repeats": repeats,
        "throughput": None if median is None else batch_size / median,
        "time_ms": None if median is None else median * 1e3,
        "time_ms_iqr": None if own is None else [float(q) * 1e3 for q in np.percentile(own, [25, 75])],
        "speedup": speedup,
        "speedup_vs_eager_stock": None if median is None else float(np.median(eager_base)) / median,
        "speedup_spread": None if own is None or base is None else ratio_spread(base, own),
        "gflops": facts["gflops"],
        "gflops_counted": facts["gflops_counted"],
        "flop_ratio": flop_ratio,
        "speedup_over_flop_ratio": None if speedup is None else speedup / flop_ratio,
        "peak_memory_mb": facts["peak_memory_mb"] if eager else None,
        "reduction_share": facts["reduction_share"] if eager else None,
        "compile_s": row.compile_s,
        "export_s": row.export_s,
        "max_abs_diff_vs_eager": None if eager or row.output is None
        else _max_abs_diff(row.output, facts["reference"]),
        "error": row.error,
    }


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
    runtimes: str | Sequence[str] = ("eager",),
    compile_backend: str | Callable[..., Any] = "inductor",
    compile_timeout_s: float | None = None,
) -> list[dict[str, Any]]:
    """`benchmark` at every (thread count, batch size): one record per row and cell, thread-major.

    Within a cell the rows are interleaved as in `benchmark`, so each record's `speedup` (over the unreduced
    model of its runtime in the same cell) sits beside its `flop_ratio`, and `speedup_over_flop_ratio` says how
    much of the FLOP saving became time at that batch size. `threads=None` keeps torch's thread count; the count
    in force before the call is restored afterwards. Compiled rows are compiled, and ONNX rows exported, afresh
    in every cell (a new batch size is a new graph).
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
    runtimes = normalize_runtimes(runtimes)
    original_threads = torch.get_num_threads()
    records: list[dict[str, Any]] = []
    try:
        for thread_count in thread_counts or [original_threads]:
            torch.set_num_threads(thread_count)
            for batch_size in batch_sizes:
                records += benchmark(
                    model, variants, batch_size=batch_size, device=device, precision=precision, warmup=warmup,
                    repeats=repeats, number=number, timer=timer, seed=seed, measure_memory=measure_memory,
                    progress=progress, runtimes=runtimes, compile_backend=compile_backend,
                    compile_timeout_s=compile_timeout_s,
                )
    finally:
        torch.set_num_threads(original_threads)
    return records


# --- what a run measured on, and whether to trust it ---------------------------------------------------------


def describe_run(records: Sequence[dict[str, Any]], threads_reason: str | None = None) -> str:
    """One line: where and how the records were measured (device, threads, batch sizes, rounds, timer, runtimes)
    and the widest spread of their speed-ups."""

    def values(field: str) -> str:
        return ",".join(str(value) for value in dict.fromkeys(record[field] for record in records))

    threads = values("num_threads") + (f" ({threads_reason})" if threads_reason else "")
    spreads = [r["speedup_spread"] for r in records if r.get("speedup_spread") is not None]
    spread = f", speed-up spread up to {max(spreads):.0%} (IQR/median of per-round ratios)" if spreads else ""
    return (f"measured on {values('device')}, threads {threads}, batch {values('batch_size')}, "
            f"{values('repeats')} interleaved rounds, {values('timer')} clock, runtimes {values('runtime')}{spread}")


def spread_warning(records: Sequence[dict[str, Any]], limit: float = SPREAD_LIMIT) -> str | None:
    """A one-line warning naming the row whose speed-up varied most between rounds, if that exceeds `limit`."""
    spread = [r for r in records if r.get("speedup_spread") is not None]
    if not spread:
        return None
    worst = max(spread, key=lambda r: r["speedup_spread"])
    if worst["speedup_spread"] <= limit:
        return None
    advice = "fewer threads (--threads 1), " if worst["num_threads"] > 1 else ""
    return (f"warning: speed-ups varied by up to {worst['speedup_spread']:.0%} between rounds ({worst['label']} "
            f"r={worst['r']}, {worst['runtime']}, threads {worst['num_threads']}, batch {worst['batch_size']}): too "
            f"wide to trust; use {advice}more --repeats, or a quieter machine")


__all__ = [
    "RUNTIMES",
    "SPREAD_LIMIT",
    "TIMERS",
    "ForwardProfile",
    "ThreadChoice",
    "TimeLimitExceeded",
    "benchmark",
    "choose_threads",
    "default_threads",
    "describe_run",
    "first_call",
    "fresh_compiler",
    "interleaved_times",
    "latency_grid",
    "normalize_runtimes",
    "one_line",
    "onnx_session",
    "paired_ratios",
    "profile_forward",
    "quiet",
    "quiet_file_descriptors",
    "ratio_spread",
    "rounds_for_budget",
    "spread_warning",
    "time_forward",
    "time_limit",
    "usable_cores",
    "warm_up_compiler",
]
