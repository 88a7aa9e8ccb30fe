"""A cost model of a reducing model's forward, measured on this machine: predict a schedule's latency without
running it.

A reduced forward is the embeddings, then per layer `l` the attention residual on the layer's input tokens
`N_{l-1}`, the reduction step (operation `op_l`, removing `N_{l-1} - N_l` tokens) and the MLP residual on its
output tokens `N_l`, then the final norm and head. `measure_latency_model` times each piece on the model's own
modules, at the given batch size, thread count, device and runtime:

- `layer(N)`: one layer inside a forward: the model's whole forward with every layer on the first `N` tokens
  and no reduction step (embeddings, layers, head), timed as a whole in the runtime (compiled or exported as one
  graph), less the embeddings and the head, divided by the number of layers; at every token count of a grid,
  without and with proportional attention's size bias (the bias switches SDPA off its unmasked path). A layer
  timed alone is not a layer in a forward: compiled or exported alone it is its own graph, and timed over and
  over it keeps its weights in the nearest caches (DeiT-Tiny, eager, batch 1: reduced forwards predicted 5-11%
  too fast);
  `mlp(N)`: the MLP residual's share of a layer (measured on four of the model's layers, each on the same input),
  so that a reducing layer costs `layer(N_in) - mlp(N_in) + mlp(N_out)`;
- `step(kind, N)`: one reduction step (importance, plan, gather/merge) per kind of step, i.e. per operation of
  `rapid_hf.reduction.steps` (`prune_redundant`, `merge_important`, `prune_similar`, `merge_similar`,
  `merge_crucial`, `merge_energy`, `fuse_topk`) and, for merges, per merge mode (`+mlerp`), removing
  `r = min(step_r, cap)` tokens. It is measured in context: four layers called with the step, less the same
  layers without it on the same input (`layer(N) - mlp(N) + mlp(N - r)`); a step timed on its own on the same
  tensors took a third to a quarter of that on DeiT-Tiny at batch 1 (warm caches and allocator). Its level is
  then set by an anchor: for every method whose kinds of step were all measured, one whole forward of its
  default settings removing 5% of the input tokens per layer (`anchor_ms`); the method's steps are scaled
  (`step_scale`, at least 0) so that the anchor's predicted steps add up to its measured time less the
  predicted rest. Steps timed beside one layer are off by more than a factor of two in either direction: a
  compiled step costs more inside the whole graph (DeiT-Tiny, batch 1: RAPID r=16's steps 1.07 ms predicted,
  1.41 ms measured; ToMe's 0.36 against 1.10), while through ONNX Runtime at batch 16 the anchors put the steps
  at a quarter of the pieces' time or less (speed-ups 9.7% off without anchors, 1.9% with);
- `embed` and `head(N)` (final norm and classifier on N tokens), and the unreduced model's whole forward (timed
  twice a round: it is the denominator of every speed-up), whose difference from the sum of its pieces is kept
  as `overhead_ms` (the backbone's own Python: settings, output capture, the output object).

Each curve is a least-squares quadratic in the token count through its grid points (`fit="quadratic"`, the
default: attention grows with N^2, the rest with N, and one noisy point on a busy machine moves a fitted curve less
than an interpolated one), or piecewise-linear interpolation (`fit="linear"`). `overhead_ms` is set so that the
unreduced prediction equals the measured unreduced forward (or, when the pieces add up to more than it, `scale`
shrinks them in proportion, so no prediction can go negative).
Every piece is timed in one interleaved loop (each round times every piece once, the order alternating), each
piece repeated enough times per round to take a few milliseconds, with a short fixed reference piece timed between
consecutive pieces: each time is divided by the reference times around it (times their median), so a shared
machine's slow and fast phases, which on the 2-core development machine moved a layer's time by up to 45% within
a minute, do not land on some pieces only; medians over rounds. Then

    predicted_ms(config) = embed + overhead + head(N_L)
                           + sum_l [ layer(N_{l-1}, bias_l) - mlp(N_{l-1}) + mlp(N_l)
                                     + step_scale(method) * step(kind_l, N_{l-1}) ]

where `bias_l` says whether tokens have merged before layer `l` (proportional attention on) and `N_l`, `kind_l`
follow `rapid_hf.reduction.steps.layer_steps` and `rapid_hf.reduction.schedule.token_counts`.
`validate_latency_model` measures whole forwards of given configs (interleaved) beside their predictions.

Runtime (`RUNTIMES`): `"eager"` (PyTorch modules as they are), `"compile"` (each piece compiled by
`torch.compile(fullgraph=True, dynamic=False)`, inductor, before timing) or `"onnx"` (each piece exported to ONNX
with static shapes and run by an ONNX Runtime session with torch's thread count). The compiled and exported
pieces run on a coarser token grid (`COMPILED_GRID_FRACTIONS`: each is compiled or exported once per token
count); whole forwards checked against the model (`validate_latency_model`, `measure_latencies`) run in the same
runtime. A LatencyModel records the runtime it was measured with.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from rapid_hf.evaluation.throughput import TIMERS, interleaved_times, quiet, time_forward
from rapid_hf.models.layers import LayerReduction
from rapid_hf.reduction.config import METHODS, RapidConfig
from rapid_hf.reduction.matching import removal_cap
from rapid_hf.reduction.schedule import token_counts
from rapid_hf.reduction.steps import LayerStep, layer_steps

RUNTIMES: tuple[str, ...] = ("eager", "compile", "onnx")
OPERATIONS: tuple[str, ...] = (
    "prune_redundant", "merge_important", "prune_similar", "merge_similar", "merge_crucial", "merge_energy", "fuse_topk"
)
MERGING_OPERATIONS: frozenset[str] = frozenset({"merge_important", "merge_similar", "merge_crucial", "merge_energy"})
# The operations whose step pieces run on tokens with sizes (proportional attention's bias on), as after a merge.
SIZED_OPERATIONS: frozenset[str] = MERGING_OPERATIONS | {"fuse_topk"}
# The method whose settings a step of each operation is measured with (its knobs at their defaults).
OPERATION_METHODS: dict[str, str] = {
    "prune_redundant": "rapid", "merge_important": "rapid", "prune_similar": "tofu", "merge_similar": "tome",
    "merge_crucial": "crucial", "merge_energy": "pitome", "fuse_topk": "topk",
}
# Token counts of the grid, as fractions of the model's input tokens (197 for a 224 px patch-16 ViT).
GRID_FRACTIONS: tuple[float, ...] = (1.0, 0.8, 0.62, 0.47, 0.35, 0.25, 0.17, 0.11, 0.06)
# Fewer for the compiled and ONNX Runtime pieces: each is compiled or exported once per token count.
COMPILED_GRID_FRACTIONS: tuple[float, ...] = (1.0, 0.75, 0.5, 0.3, 0.15, 0.06)
DEFAULT_STEP_R = 16
# The anchor forward of a method removes this fraction of the input tokens per layer (10 of DeiT's 197).
ANCHOR_FRACTION = 0.05
FITS: tuple[str, ...] = ("quadratic", "linear")
TARGET_BLOCK_S = 0.004  # each piece is repeated within a round until it takes about this long


def step_kind(operation: str, merge_mode: str) -> str:
    """The cost-model key of a step: its operation, with `+mlerp` for merges that use MLERP."""
    return f"{operation}+mlerp" if operation in MERGING_OPERATIONS and merge_mode == "mlerp" else operation


def step_operation(kind: str) -> str:
    """The operation of a cost-model step key (`step_kind`'s inverse, merge mode dropped)."""
    return kind.split("+", 1)[0]


def default_step_kinds() -> tuple[str, ...]:
    """Every operation, plus MLERP variants of the merges that methods run with it (ToFu; RAPID when calibrated)."""
    return (*OPERATIONS, "merge_similar+mlerp", "merge_important+mlerp")


def method_step_kinds(method: str) -> tuple[str, ...]:
    """The step kinds `method` can run (both merge modes of its merges): what a cost model for it must measure."""
    operations = [operation for operation, owner in OPERATION_METHODS.items() if owner == method]
    if method == "tofu":
        operations = ["prune_similar", "merge_similar"]
    kinds = []
    for operation in operations:
        kinds.append(operation)
        if operation in MERGING_OPERATIONS:
            kinds.append(f"{operation}+mlerp")
    return tuple(kinds)


def anchor_methods(kinds: Sequence[str]) -> tuple[str, ...]:
    """The methods every step of whose default settings is among the measured `kinds`: those whose steps an
    anchor forward can scale."""
    measured = {step_operation(kind) for kind in kinds}
    return tuple(method for method in METHODS if method != "none"
                 and {step_operation(kind) for kind in method_step_kinds(method)} <= measured)


def machine_description(runtime: str = "eager", device: str | torch.device = "cpu", threads: int | None = None,
                        batch_size: int = 1) -> dict[str, Any]:
    """Where a latency was measured: platform, CPU (or GPU) name, cores, threads, batch size, runtime, torch."""
    device = torch.device(device)
    processor = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                processor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        processor = torch.cuda.get_device_name(device)
    return {
        "platform": platform.platform(),
        "processor": processor,
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "threads": torch.get_num_threads() if threads is None else threads,
        "batch_size": batch_size,
        "runtime": runtime,
        "torch": torch.__version__,
    }


def _interpolate(tokens: Sequence[int], values: Sequence[float], n: float) -> float:
    """Piecewise-linear in the token count; outside the grid, the line through the two nearest points."""
    xs, ys = np.asarray(tokens, dtype=float), np.asarray(values, dtype=float)
    order = np.argsort(xs)
    xs, ys = xs[order], ys[order]
    if len(xs) == 1:
        return float(ys[0])
    if n < xs[0]:
        slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
        return float(max(0.0, ys[0] + slope * (n - xs[0])))
    if n > xs[-1]:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return float(ys[-1] + slope * (n - xs[-1]))
    return float(np.interp(n, xs, ys))


@dataclass
class LatencyModel:
    """Measured times (ms per forward of the whole batch) of a model's pieces; see the module docstring."""

    machine: dict[str, Any]
    num_tokens: int
    num_layers: int
    num_protected: int
    tokens: list[int]
    layer_ms: list[float]
    layer_bias_ms: list[float]
    mlp_ms: list[float]
    head_ms: list[float]
    step_ms: dict[str, list[float]]
    sets_sizes: dict[str, bool]
    embed_ms: float
    overhead_ms: float
    stock_ms: float
    step_r: int = DEFAULT_STEP_R
    rounds: int = 0
    timer: str = "wall"
    spread: dict[str, float] = field(default_factory=dict)
    fit: str = "quadratic"
    reference_ms: float = 0.0
    scale: float = 1.0
    """Factor on the pieces when their unreduced sum exceeds the measured unreduced forward (a busier moment of a
    shared machine): the difference is then taken out in proportion, never as a negative overhead."""
    anchor_ms: dict[str, float] = field(default_factory=dict)
    """Measured whole forward of each anchored method at `anchor_r` (its default settings)."""
    anchor_r: dict[str, int] = field(default_factory=dict)
    step_scale: dict[str, float] = field(default_factory=dict)
    """Per method, the factor that makes the predicted steps of its anchor forward add up to what that forward
    spent on them (its measured time less the predicted rest); 1 for a method without an anchor."""

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise ValueError(f"fit {self.fit!r} is invalid: choose from {', '.join(FITS)}")
        self._fitted: dict[str, np.ndarray] = {}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LatencyModel) and self.to_dict() == other.to_dict()

    def _value(self, name: str, values: Sequence[float], n: float) -> float:
        """A curve at `n` tokens: least-squares quadratic in the token count (smooths the noise of single grid
        points), or piecewise-linear interpolation (`fit="linear"`)."""
        if self.fit == "linear" or len(self.tokens) < 4:
            return _interpolate(self.tokens, values, n)
        if name not in self._fitted:
            self._fitted[name] = np.polyfit(np.asarray(self.tokens, float), np.asarray(values, float), 2)
        return float(max(0.0, np.polyval(self._fitted[name], n)))

    def refit(self, fit: str | None = None) -> LatencyModel:
        """A copy using `fit` (default: this one's) whose `overhead_ms` makes the unreduced prediction equal the
        measured unreduced forward (`stock_ms`)."""
        copy = LatencyModel.from_dict({**self.to_dict(), "fit": fit or self.fit, "overhead_ms": 0.0, "scale": 1.0,
                                       "step_scale": {}})
        pieces = copy.predict_ms(RapidConfig(method="none"))
        if self.stock_ms >= pieces:
            copy.overhead_ms = self.stock_ms - pieces
        elif pieces > 0:
            copy.scale = self.stock_ms / pieces
        for method, measured in self.anchor_ms.items():
            parts = copy.breakdown(RapidConfig(method=method, r=self.anchor_r[method]))
            steps = copy.scale * sum(parts["step_ms"])
            if steps > 0:  # a step costs nothing or more, however noisy the anchor
                copy.step_scale[method] = max((measured - parts["total_ms"] + steps) / steps, 0.0)
        return copy

    # --- pieces ---

    def layer_time(self, n_in: int, n_out: int, bias: bool = False) -> float:
        """One layer: attention on `n_in` tokens (with the size bias or not), MLP on `n_out`; no step."""
        name, curve = ("layer_bias", self.layer_bias_ms) if bias else ("layer", self.layer_ms)
        return (self._value(name, curve, n_in) - self._value("mlp", self.mlp_ms, n_in)
                + self._value("mlp", self.mlp_ms, n_out))

    def step_time(self, kind: str, n: int) -> float:
        """One reduction step of `kind` on `n` input tokens (an unmeasured `+mlerp` kind falls back to its op)."""
        if kind not in self.step_ms:
            base = step_operation(kind)
            if base not in self.step_ms:
                raise KeyError(f"step {kind!r} was not measured; measured: {sorted(self.step_ms)}")
            kind = base
        return self._value(f"step/{kind}", self.step_ms[kind], n)

    # --- schedules ---

    def breakdown(self, config: RapidConfig) -> dict[str, Any]:
        """The predicted time of every piece of a forward running `config` (ms), and the token counts."""
        steps = layer_steps(config, self.num_tokens, self.num_layers, self.num_protected)
        schedule = [step.r if step.operation is not None else 0 for step in steps]
        counts = token_counts(self.num_tokens, schedule, self.num_protected)
        merged = False
        step_scale = self.step_scale.get(config.method, 1.0)
        layers, step_times = [], []
        for step, n_in, n_out in zip(steps, [self.num_tokens, *counts[:-1]], counts, strict=True):
            bias = merged and config.prop_attn
            layers.append(self.layer_time(n_in, n_out, bias))
            removes = n_in > n_out
            kind = step_kind(step.operation, step.merge_mode) if step.operation is not None and removes else None
            step_times.append(0.0 if kind is None else self.step_time(kind, n_in) * step_scale)
            if kind is not None:
                merged = merged or self.sets_sizes.get(step_operation(kind), True)
        head = self._value("head", self.head_ms, counts[-1] if counts else self.num_tokens)
        total = self.scale * (self.embed_ms + head + sum(layers) + sum(step_times)) + self.overhead_ms
        return {"embed_ms": self.embed_ms, "overhead_ms": self.overhead_ms, "head_ms": head, "layer_ms": layers,
                "step_ms": step_times, "token_counts": counts, "total_ms": total}

    def predict_ms(self, config: RapidConfig) -> float:
        """Predicted time of one forward of the whole batch running `config`."""
        return self.breakdown(config)["total_ms"]

    def predicted_speedup(self, config: RapidConfig) -> float:
        """Predicted unreduced time over the predicted time of `config` (same machine, batch and runtime)."""
        return self.predict_ms(RapidConfig(method="none")) / self.predict_ms(config)

    # --- files ---

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # fields only (the fitted curves are recomputed on load)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyModel:
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatencyModel:
        return cls.from_dict(json.loads(Path(path).read_text()))


# --- measuring ----------------------------------------------------------------------------------------------


def token_grid(num_tokens: int, num_protected: int, fractions: Sequence[float] = GRID_FRACTIONS) -> list[int]:
    """Distinct token counts, from the input's down to a few tokens, largest first."""
    lowest = num_protected + 4
    return sorted({max(lowest, round(num_tokens * fraction)) for fraction in fractions}, reverse=True)


def _repeat(forward: Callable[[], Any], number: int) -> None:
    for _ in range(number):
        forward()


# Every piece returns what it computed: a compiled or exported piece whose results were dropped would be optimised
# away, and an exported one needs outputs.


def _layer_call(layers: Sequence[Any], hidden: torch.Tensor, sizes: torch.Tensor | None, num_protected: int,
                importance_queries: Callable | None, step: LayerStep | None = None) -> tuple[torch.Tensor, ...]:
    """Each layer on the same input, with `step` (or none); returns every output, merged sizes included."""
    outputs = []
    for layer in layers:
        reduction = LayerReduction(step=step, sizes=sizes, num_protected=num_protected, prop_attn=True,
                                   importance_queries=importance_queries)
        outputs.append(layer(hidden, None, reduction=reduction))
        if reduction.sizes_out is not None and reduction.sizes_out is not sizes:
            outputs.append(reduction.sizes_out)
    return tuple(outputs)


def _mlp_call(layers: Sequence[Any], hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(layer.mlp_residual(hidden) for layer in layers)


def _layer_chain(layers: Sequence[Any], hidden: torch.Tensor, sizes: torch.Tensor | None, num_protected: int,
                 importance_queries: Callable | None) -> torch.Tensor:
    for layer in layers:  # each layer on the previous one's output, as in a forward
        reduction = LayerReduction(step=None, sizes=sizes, num_protected=num_protected, prop_attn=True,
                                   importance_queries=importance_queries)
        hidden = layer(hidden, None, reduction=reduction)
    return hidden


def _free_forward(model: Any, pixel_values: torch.Tensor, tokens: int, bias: bool) -> Any:
    """The model's embeddings, every layer on the first `tokens` tokens (with proportional attention's size bias
    or not) and the head, with no reduction step: what a layer costs inside a forward of the runtime."""
    backbone = model.rapid_backbone
    hidden = backbone.embed(pixel_values, None, False)[:, :tokens]
    ones = hidden.new_ones(*hidden.shape[:2], 1, dtype=torch.float32)
    hidden = _layer_chain(backbone.reducing_layers, hidden, ones if bias else None, backbone.num_protected_tokens,
                          backbone.importance_queries)
    return _head_call(model, backbone, hidden, ones)


def _head_call(model: Any, backbone: Any, hidden: torch.Tensor, sizes: torch.Tensor) -> Any:
    last, _ = backbone.finish(hidden, sizes)
    classifier = getattr(model, "classifier", None)
    return classifier(last[:, 0]) if isinstance(classifier, torch.nn.Module) else last


def _whole_call(model: Any, pixel_values: torch.Tensor, rapid: RapidConfig) -> torch.Tensor:
    return model(pixel_values=pixel_values, rapid=rapid)[0]


def _check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is invalid: choose from {', '.join(RUNTIMES)}")


class _Piece(nn.Module):
    """A timed piece, `function(*arguments)`, as a module whose inputs are the tensor arguments, so that it can
    be compiled or exported; `owner` (the model) registers every weight the piece reads."""

    def __init__(self, owner: nn.Module, piece: functools.partial) -> None:
        super().__init__()
        self.owner = owner
        self.function = piece.func
        self.arguments = list(piece.args)
        self.keywords = dict(piece.keywords)
        self.slots = [index for index, value in enumerate(piece.args) if isinstance(value, torch.Tensor)]

    def inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.arguments[index] for index in self.slots)

    def forward(self, *tensors: torch.Tensor) -> Any:
        arguments = list(self.arguments)
        for index, tensor in zip(self.slots, tensors, strict=True):
            arguments[index] = tensor
        return self.function(*arguments, **self.keywords)


class _Runtime(contextlib.AbstractContextManager):
    """Turns each piece into what `runtime` runs: the piece itself (eager), the piece compiled by
    `torch.compile(fullgraph=True, dynamic=False)` with inductor (compiled in its first call, as in
    `rapid_hf.evaluation.throughput`), or the piece exported to ONNX (static shapes) and run by an ONNX Runtime
    session with torch's thread count. Exports live in a temporary folder for the life of the context."""

    def __init__(self, runtime: str, owner: nn.Module, device: torch.device, graphs: int = 64) -> None:
        _check_runtime(runtime)
        self.runtime, self.owner, self.device, self.graphs = runtime, owner, device, graphs
        self.stack = contextlib.ExitStack()
        self.folder: Path | None = None
        self.count = 0

    def __enter__(self) -> _Runtime:
        from rapid_hf.evaluation.throughput import fresh_compiler

        if self.runtime == "compile":
            self.stack.enter_context(fresh_compiler("inductor", graphs=self.graphs))
        elif self.runtime == "onnx":
            self.folder = Path(self.stack.enter_context(tempfile.TemporaryDirectory(prefix="rapid_hf_cost_")))
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def __call__(self, piece: functools.partial) -> Callable[[], Any]:
        if self.runtime == "eager":
            return piece
        module = _Piece(self.owner, piece).eval()
        if self.runtime == "compile":
            forward = functools.partial(torch.compile(module, fullgraph=True, dynamic=False), *module.inputs())
            with quiet():
                forward()  # compiles now, not inside the first timed round
            return forward
        return self._onnx(module)

    def _onnx(self, module: _Piece) -> Callable[[], Any]:
        from rapid_hf.evaluation.throughput import onnx_session

        assert self.folder is not None
        self.count += 1
        path = self.folder / f"piece{self.count}.onnx"
        with torch.inference_mode(False), torch.no_grad(), quiet():  # the exporter's notices are not the user's
            example = tuple(tensor.clone() for tensor in module.inputs())
            program = torch.onnx.export(module, example, dynamo=True, external_data=False, verbose=False,
                                        optimize=True)
        program.save(str(path), external_data=False)
        session = onnx_session(path, torch.get_num_threads(), self.device)
        names = [node.name for node in session.get_inputs()]
        feed = {name: tensor.detach().cpu().numpy() for name, tensor in zip(names, example, strict=True)}
        return functools.partial(session.run, None, feed)


def _numbers(forwards: Sequence[Callable[[], Any]], clock: Callable[[], float], device: torch.device) -> list[int]:
    """Calls per round of each forward so that a round's block takes about TARGET_BLOCK_S (after two warm-ups)."""
    numbers = []
    for forward in forwards:
        forward()
        forward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = clock()
        forward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = max(clock() - start, 1e-6)
        numbers.append(max(1, min(50, math.ceil(TARGET_BLOCK_S / seconds))))
    return numbers


def _timed(forwards: Sequence[Callable[[], Any]], rounds: int, clock: Callable[[], float], device: torch.device,
           progress: bool, description: str) -> list[list[float]]:
    """Seconds per call of each forward in each round (interleaved rounds, each forward repeated per round)."""
    numbers = _numbers(forwards, clock, device)
    wrapped = [functools.partial(_repeat, forward, number) for forward, number in zip(forwards, numbers, strict=True)]
    times = interleaved_times(wrapped, rounds, 1, clock, device, progress, description)
    return [[value / number for value in row] for row, number in zip(times, numbers, strict=True)]


def _reference_forward(model: Any, batch_size: int, device: torch.device) -> Callable[[], Any]:
    """A fixed, short piece of work (the first layer's MLP on 32 tokens) that tracks how fast the machine is."""
    backbone = model.rapid_backbone
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(batch_size, 32, backbone.config.hidden_size, generator=generator)
    hidden = hidden.to(device=device, dtype=backbone.embedding_dtype)
    return functools.partial(backbone.reducing_layers[0].mlp_residual, hidden)


def _timed_against_reference(forwards: Sequence[Callable[[], Any]], reference: Callable[[], Any], rounds: int,
                             clock: Callable[[], float], device: torch.device, progress: bool,
                             description: str, twice: int | None = None,
                             ) -> tuple[list[list[float]], list[list[float]], float]:
    """Interleaved rounds as `_timed`, with `reference` timed between consecutive forwards. Returns the raw
    seconds per call, the drift-corrected ones (each divided by the mean of the reference times just before and
    after it, times the reference's median over the run: a busy machine's slow phases hit every piece alike) and
    the reference's median seconds. `twice`: the index of a forward timed a second time in the middle of each
    round, its time the mean of the two (the unreduced forward: the denominator of every speed-up, whose noise
    would otherwise enter every row alike)."""
    middle = len(forwards) // 2 + 1
    if twice is not None:
        forwards = [*forwards[:middle], forwards[twice], *forwards[middle:]]
    numbers = _numbers(forwards, clock, device)
    reference_number = _numbers([reference], clock, device)[0]

    def reference_seconds() -> float:
        # one untimed call first: right after a large piece the reference's data is out of the caches, and a
        # cold reference read as a slow machine corrected large pieces ~20% down (DeiT-Tiny, batch 16)
        reference()
        return time_forward(reference, reference_number, clock, device)

    raw: list[list[float]] = [[] for _ in forwards]
    local: list[list[float]] = [[] for _ in forwards]
    references: list[float] = []
    order = list(range(len(forwards)))
    for repeat in tqdm(range(rounds), desc=description, disable=not progress):
        previous = reference_seconds()  # seconds per call
        references.append(previous)
        for position in order if repeat % 2 == 0 else order[::-1]:
            raw[position].append(time_forward(forwards[position], numbers[position], clock, device))
            following = reference_seconds()
            references.append(following)
            local[position].append((previous + following) / 2)
            previous = following
    median_reference = statistics.median(references)
    corrected = [[value / around * median_reference for value, around in zip(row, arounds, strict=True)]
                 for row, arounds in zip(raw, local, strict=True)]
    if twice is not None:
        for rows in (raw, corrected):
            again = rows.pop(middle)
            rows[twice] = [(first + second) / 2 for first, second in zip(rows[twice], again, strict=True)]
    return raw, corrected, median_reference


def _spread(values: Sequence[float]) -> float:
    low, median, high = np.percentile(values, [25, 50, 75])
    return float((high - low) / median) if median > 0 else 0.0


@torch.inference_mode()
def measure_latency_model(
    model: Any,
    batch_size: int = 1,
    threads: int | None = None,
    runtime: str = "eager",
    device: str | torch.device = "cpu",
    rounds: int = 15,
    timer: str = "wall",
    tokens: Sequence[int] | None = None,
    step_kinds: Sequence[str] | None = None,
    step_r: int = DEFAULT_STEP_R,
    seed: int = 0,
    progress: bool = False,
    fit: str = "quadratic",
) -> LatencyModel:
    """Time `model`'s pieces (see the module docstring) and return the cost model. `threads`: torch's thread
    count for the measurement (restored afterwards; None keeps it). `timer`: "wall" or "process" (this process's
    CPU time: steadier on a busy machine, meaningful with one thread)."""
    _check_runtime(runtime)
    if fit not in FITS:
        raise ValueError(f"fit {fit!r} is invalid: choose from {', '.join(FITS)}")
    if timer not in TIMERS:
        raise ValueError(f"timer {timer!r} is invalid: choose from {', '.join(TIMERS)}")
    if batch_size < 1 or rounds < 1 or step_r < 1:
        raise ValueError(f"batch_size, rounds and step_r must be >= 1, got {batch_size}, {rounds}, {step_r}")
    kinds = tuple(default_step_kinds() if step_kinds is None else step_kinds)
    unknown = sorted({step_operation(kind) for kind in kinds} - set(OPERATIONS))
    if unknown:
        raise ValueError(f"unknown step kind(s) {unknown}: choose from {', '.join(OPERATIONS)} (merges with +mlerp)")
    device = torch.device(device)
    original_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure(model.to(device).eval(), batch_size, runtime, device, rounds, timer, tokens, kinds, step_r,
                        seed, progress, fit)
    finally:
        torch.set_num_threads(original_threads)


def _synthetic_pixels(model: Any, batch_size: int, seed: int, device: torch.device) -> torch.Tensor:
    """A seeded random batch at the model's own image size (time does not depend on the pixels)."""
    config = model.rapid_backbone.config
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, config.num_channels, size, size, generator=generator).to(device)


def _measure(model: Any, batch_size: int, runtime: str, device: torch.device, rounds: int, timer: str,
             tokens: Sequence[int] | None, kinds: Sequence[str], step_r: int, seed: int,
             progress: bool, fit: str) -> LatencyModel:
    backbone = model.rapid_backbone
    layers = backbone.reducing_layers
    num_layers, num_protected = len(layers), backbone.num_protected_tokens
    pixel_values = _synthetic_pixels(model, batch_size, seed, device).to(backbone.embedding_dtype)
    embedded = backbone.embed(pixel_values, None, False)
    num_tokens = embedded.shape[1]
    hidden_full = embedded
    for layer in list(layers)[: min(2, num_layers)]:  # realistic tokens: after two unreduced layers
        hidden_full = layer(hidden_full)
    fractions = GRID_FRACTIONS if runtime == "eager" else COMPILED_GRID_FRACTIONS
    grid = sorted(set(tokens), reverse=True) if tokens is not None else token_grid(num_tokens, num_protected,
                                                                                    fractions)
    layer = layers[num_layers // 2]
    # every piece runs on several layers in turn, so a layer's weights are not all in the nearest caches, as in a
    # forward (four are enough for that and keep rounds short, so that more rounds fit in the same time)
    cycle = list(layers)[:: max(1, num_layers // 4)]
    queries = backbone.importance_queries

    pieces: dict[str, Callable[[], Any]] = {
        "embed": functools.partial(backbone.embed, pixel_values, None, False),
        "stock": functools.partial(_whole_call, model, pixel_values, RapidConfig(method="none")),
    }
    sets_sizes: dict[str, bool] = {}
    removed: dict[tuple[str, int], int] = {}
    for n in grid:
        hidden = hidden_full[:, :n].contiguous()
        ones = hidden.new_ones(batch_size, n, 1, dtype=torch.float32)
        pieces[f"free/{n}"] = functools.partial(_free_forward, model, pixel_values, n, False)
        pieces[f"free_bias/{n}"] = functools.partial(_free_forward, model, pixel_values, n, True)
        # a few layers on one input each: the MLP's share of a layer, and what the step pieces run on (so that
        # their difference is the step's)
        pieces[f"solo_layer/{n}"] = functools.partial(_layer_call, cycle, hidden, None, num_protected, queries)
        pieces[f"solo_layer_bias/{n}"] = functools.partial(_layer_call, cycle, hidden, ones, num_protected, queries)
        pieces[f"solo_mlp/{n}"] = functools.partial(_mlp_call, cycle, hidden)
        pieces[f"head/{n}"] = functools.partial(_head_call, model, backbone, hidden, ones)
        r = min(step_r, removal_cap(n, num_protected))
        for kind in kinds:
            operation, _, mode = kind.partition("+")
            method = OPERATION_METHODS[operation]
            settings = RapidConfig(method=method, r=r, merge_mode=mode or "mean")
            step = LayerStep(operation=operation, r=r, settings=settings, layer=num_layers // 2, num_layers=num_layers)
            sizes = ones if operation in SIZED_OPERATIONS else None
            if r > 0 and operation not in sets_sizes:
                probe = LayerReduction(step=step, sizes=None, num_protected=num_protected, prop_attn=True,
                                       importance_queries=queries)
                layer(hidden, None, reduction=probe)
                sets_sizes[operation] = probe.sizes_out is not None
            removed[kind, n] = r
            pieces[f"step/{kind}/{n}"] = functools.partial(_layer_call, cycle, hidden, sizes, num_protected, queries,
                                                          step)
    anchors = {method: RapidConfig(method=method, r=max(1, round(ANCHOR_FRACTION * num_tokens)))
               for method in anchor_methods(kinds)}
    for method, rapid in anchors.items():
        pieces[f"anchor/{method}"] = functools.partial(_whole_call, model, pixel_values, rapid)
    names = list(pieces)
    with _Runtime(runtime, model, device, graphs=len(names) + 16) as run:
        forwards = [run(pieces[name]) for name in tqdm(names, desc=f"preparing ({runtime})",
                                                       disable=not progress or runtime == "eager")]
        _, times, reference_s = _timed_against_reference(forwards, _reference_forward(model, batch_size, device),
                                                         rounds, TIMERS[timer], device, progress, "cost model",
                                                         twice=names.index("stock"))
    per_layer = {name: len(cycle) if name.startswith(("step", "solo")) else 1 for name in names}
    median = {name: statistics.median(values) * 1e3 / per_layer[name]
              for name, values in zip(names, times, strict=True)}
    spread = {name: _spread(values) for name, values in zip(names, times, strict=True)}

    def curve(prefix: str) -> list[float]:
        return [median[f"{prefix}/{n}"] for n in grid]

    def step_curve(kind: str) -> list[float]:
        """The layer with the step, less the same layer without it (attention on n, MLP on n - r)."""
        bias = "layer_bias" if step_operation(kind) in SIZED_OPERATIONS else "layer"
        mlp = curve("solo_mlp")
        return [median[f"step/{kind}/{n}"] - median[f"solo_{bias}/{n}"] + median[f"solo_mlp/{n}"]
                - _interpolate(grid, mlp, n - removed[kind, n]) for n in grid]

    def in_forward(prefix: str) -> list[float]:
        """A layer inside a forward: the forward at a constant token count less its embeddings and head, per layer."""
        return [(median[f"{prefix}/{n}"] - median["embed"] - median[f"head/{n}"]) / num_layers for n in grid]

    head_ms = curve("head")
    layer_ms = in_forward("free")
    # the MLP's share of a layer, as measured on the few layers, applied to the layer inside a forward
    mlp_ms = [mlp / solo * layer for mlp, solo, layer in zip(curve("solo_mlp"), curve("solo_layer"), layer_ms,
                                                               strict=True)]
    return LatencyModel(
        machine=machine_description(runtime, device, torch.get_num_threads(), batch_size),
        num_tokens=num_tokens, num_layers=num_layers, num_protected=num_protected, tokens=list(grid),
        layer_ms=layer_ms, layer_bias_ms=in_forward("free_bias"), mlp_ms=mlp_ms, head_ms=head_ms,
        step_ms={kind: step_curve(kind) for kind in kinds}, sets_sizes=sets_sizes,
        embed_ms=median["embed"], overhead_ms=0.0, stock_ms=median["stock"], step_r=step_r, rounds=rounds,
        timer=timer, spread={"largest": max(spread.values()), "stock": spread["stock"]}, fit=fit,
        reference_ms=reference_s * 1e3,
        anchor_ms={method: median[f"anchor/{method}"] for method in anchors},
        anchor_r={method: rapid.r for method, rapid in anchors.items()},
    ).refit()


@torch.inference_mode()
def measure_latencies(model: Any, configs: Sequence[RapidConfig], batch_size: int = 1, threads: int | None = None,
                      device: str | torch.device = "cpu", rounds: int = 10, timer: str = "wall", seed: int = 0,
                      progress: bool = False, runtime: str = "eager") -> list[list[float]]:
    """Seconds per whole forward of each config in each round (interleaved; the configs as per-call settings,
    each compiled or exported first for the compile and onnx runtimes)."""
    if timer not in TIMERS:
        raise ValueError(f"timer {timer!r} is invalid: choose from {', '.join(TIMERS)}")
    _check_runtime(runtime)
    device = torch.device(device)
    model = model.to(device).eval()
    pixel_values = _synthetic_pixels(model, batch_size, seed, device)
    original_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with _Runtime(runtime, model, device, graphs=len(configs) + 16) as run:
            forwards = [run(functools.partial(_whole_call, model, pixel_values, rapid)) for rapid in configs]
            return _timed(forwards, rounds, TIMERS[timer], device, progress, f"latency batch {batch_size}")
    finally:
        torch.set_num_threads(original_threads)


def validate_latency_model(model: Any, latency_model: LatencyModel, configs: Sequence[tuple[str, RapidConfig]],
                           rounds: int = 10, timer: str | None = None, device: str | torch.device = "cpu",
                           progress: bool = False) -> list[dict[str, Any]]:
    """Measured whole-forward latency of each `(label, config)` (interleaved with the unreduced model, at the
    cost model's batch size, threads and runtime) beside its prediction: one record per config with `predicted_ms`,
    `measured_ms`, `error` (predicted / measured - 1), `predicted_speedup`, `measured_speedup` (median of the
    per-round ratios to the unreduced model, which is timed twice a round) and `speedup_error`; and
    `measured_ms_corrected` / `error_corrected`: the measured latency brought to the machine speed of the cost
    model's measurement (the reference piece's median then over its median now, each forward corrected for the
    drift around it), which takes out a shared machine's slowing down or speeding up between the two
    measurements."""
    machine = latency_model.machine
    stock = RapidConfig(method="none")
    batch_size, threads, runtime = machine["batch_size"], machine["threads"], machine.get("runtime", "eager")
    device = torch.device(device)
    model = model.to(device).eval()
    pixel_values = _synthetic_pixels(model, batch_size, 0, device)
    rows = [("none", stock), *configs]
    original_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode(), _Runtime(runtime, model, device, graphs=len(rows) + 16) as run:
            forwards = [run(functools.partial(_whole_call, model, pixel_values, rapid)) for _, rapid in rows]
            times, corrected, reference_s = _timed_against_reference(
                forwards, _reference_forward(model, batch_size, device), rounds,
                TIMERS[timer or latency_model.timer], device, progress, f"latency batch {batch_size}", twice=0)
    finally:
        torch.set_num_threads(original_threads)
    scale = latency_model.reference_ms / (reference_s * 1e3) if latency_model.reference_ms else 1.0
    stock_times = np.asarray(times[0])
    predicted_stock = latency_model.predict_ms(stock)
    records = []
    for (label, rapid), own, own_corrected in zip(rows, times, corrected, strict=True):
        measured = statistics.median(own) * 1e3
        measured_corrected = statistics.median(own_corrected) * 1e3 * scale
        predicted = latency_model.predict_ms(rapid)
        measured_speedup = float(np.median(stock_times / np.asarray(own)))
        predicted_speedup = predicted_stock / predicted
        records.append({
            "label": label, "method": rapid.method, "rapid": rapid.to_dict(),
            "token_counts": latency_model.breakdown(rapid)["token_counts"],
            "predicted_ms": predicted, "measured_ms": measured, "error": predicted / measured - 1,
            "measured_ms_corrected": measured_corrected, "error_corrected": predicted / measured_corrected - 1,
            "predicted_speedup": predicted_speedup, "measured_speedup": measured_speedup,
            "speedup_error": predicted_speedup / measured_speedup - 1, "spread": _spread(own),
            "reference_ms": reference_s * 1e3, "batch_size": batch_size, "threads": threads, "rounds": rounds,
        })
    return records


def median_absolute_error(records: Sequence[dict[str, Any]], key: str = "error") -> float:
    """Median of |record[key]| over the reduced rows (the unreduced row is excluded)."""
    values = [abs(record[key]) for record in records if record["method"] != "none"]
    return float(statistics.median(values)) if values else 0.0


__all__ = [
    "GRID_FRACTIONS",
    "OPERATIONS",
    "RUNTIMES",
    "LatencyModel",
    "default_step_kinds",
    "machine_description",
    "measure_latencies",
    "measure_latency_model",
    "median_absolute_error",
    "method_step_kinds",
    "step_kind",
    "step_operation",
    "token_grid",
    "validate_latency_model",
]
