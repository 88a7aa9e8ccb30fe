"""`rapid-hf benchmark --runtime eager,compile,onnx`: rows of every runtime in one interleaved loop, both speed-ups,
compiled and ONNX Runtime rows agreeing with eager, failures reported as rows. Timing numbers are never asserted."""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import ViTConfig

from rapid_hf import RapidViTForImageClassification, cli
from rapid_hf.cli import benchmark as benchmark_command
from rapid_hf.evaluation import throughput
from rapid_hf.evaluation.report import markdown_table
from rapid_hf.evaluation.throughput import benchmark, normalize_runtimes, one_line
from rapid_hf.evaluation.variants import grid_variants

# Two layers: inductor compiles it in seconds, and a ToMe step still runs (65 tokens, r=2).
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "image_size": 64, "patch_size": 8, "num_labels": 10}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return RapidViTForImageClassification(ViTConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def runtime_run(tiny_model, tmp_path_factory):
    """One CLI run over every runtime (inductor, ONNX Runtime): records, table, printed output."""
    folder = tmp_path_factory.mktemp("runtimes")
    tiny_model.save_pretrained(folder / "model")
    output = folder / "bench.json"
    status = cli.main(["benchmark", "--model", str(folder / "model"), "--methods", "none,tome", "--r", "2",
                       "--batch-size", "2", "--threads", "1", "--repeats", "2", "--warmup", "0", "--no-memory",
                       "--runtime", "eager,onnx", "--compile", "--device", "cpu", "--output", str(output)])
    assert status == 0
    return json.loads(output.read_text()), output.with_suffix(".md").read_text()


def test_every_runtime_gives_a_row_with_both_speedups(runtime_run):
    records, _ = runtime_run
    assert [(r["label"], r["runtime"]) for r in records] == [
        (label, runtime) for label in ("none", "tome") for runtime in ("eager", "compile", "onnx")
    ]
    by_key = {(r["label"], r["runtime"]): r for r in records}
    eager_stock = by_key["none", "eager"]
    for record in records:
        assert record["error"] is None
        stock = by_key["none", record["runtime"]]
        assert record["speedup"] == pytest.approx(stock["time_ms"] / record["time_ms"])
        assert record["speedup_vs_eager_stock"] == pytest.approx(eager_stock["time_ms"] / record["time_ms"])
        assert record["speedup_spread"] >= 0 and record["num_threads"] == 1
        assert record["flop_ratio"] == by_key[record["label"], "eager"]["flop_ratio"]
        if record["runtime"] == "eager":
            assert record["compile_s"] is None and record["export_s"] is None
            assert record["max_abs_diff_vs_eager"] is None
        else:
            assert record["compile_s"] > 0 and record["peak_memory_mb"] is None
    assert all(by_key["none", runtime]["speedup"] == 1.0 for runtime in ("eager", "compile", "onnx"))
    assert by_key["tome", "onnx"]["export_s"] > 0 and by_key["tome", "compile"]["export_s"] is None
    assert by_key["tome", "eager"]["output_tokens"] < by_key["none", "eager"]["output_tokens"]


def test_compiled_and_onnx_runtime_rows_agree_with_eager_logits(runtime_run):
    records, _ = runtime_run
    for record in records:
        if record["runtime"] != "eager":
            assert record["max_abs_diff_vs_eager"] < 1e-4, record


def test_table_puts_compiled_and_onnx_stock_beside_eager_stock(runtime_run):
    _, table = runtime_run
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:3] == ["method", "setting", "runtime"]
    assert {"vs eager stock", "compile s", "spread"} <= set(header)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]
    assert [(row[0], row[2]) for row in rows[:3]] == [("none", "eager"), ("none", "compile"), ("none", "onnx")]


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("this backend compiles nothing\nsecond line of the message")


def test_a_row_that_fails_to_compile_is_a_record_with_its_error(tiny_model):
    records = benchmark(tiny_model, grid_variants(["tome"], [2]), batch_size=1, warmup=0, repeats=1,
                        measure_memory=False, progress=False, runtimes="compile,eager",
                        compile_backend=failing_backend)
    assert [(r["label"], r["runtime"]) for r in records] == [
        ("none", "eager"), ("none", "compile"), ("tome", "eager"), ("tome", "compile")]
    for record in records:
        if record["runtime"] == "compile":
            assert "this backend compiles nothing" in record["error"] and "\n" not in record["error"]
            assert record["time_ms"] is None and record["speedup"] is None and record["compile_s"] > 0
        else:
            assert record["error"] is None and record["time_ms"] > 0
    args = cli.build_parser().parse_args(["benchmark", "--model", "m", "--runtime", "eager,compile"])
    table = markdown_table(records, benchmark_command.columns(args))  # failed rows print as "-"
    assert "this backend compiles nothing" in table and "| - |" in table


def test_a_compile_past_its_time_limit_is_a_failed_row(tiny_model):
    def slow_backend(graph_module, example_inputs):
        time.sleep(5)
        return graph_module.forward

    started = time.perf_counter()
    records = benchmark(tiny_model, [], batch_size=1, warmup=0, repeats=1, measure_memory=False, progress=False,
                        runtimes=["compile"], compile_backend=slow_backend, compile_timeout_s=0.5)
    assert time.perf_counter() - started < 4
    compiled = next(r for r in records if r["runtime"] == "compile")
    assert "did not finish within 0.5 s" in compiled["error"]
    eager = next(r for r in records if r["runtime"] == "eager")  # always measured: the eager stock baseline
    assert eager["error"] is None and eager["speedup_vs_eager_stock"] == 1.0


def test_runtime_flags(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "model")
    model = str(tmp_path / "model")
    model_flags = ["--model", model, "--r", "2"]
    assert cli.parse_args(["benchmark", *model_flags]).runtime == ["eager"]
    assert cli.parse_args(["benchmark", *model_flags, "--compile"]).runtime == ["eager", "compile"]
    assert cli.parse_args(["benchmark", *model_flags, "--runtime", "onnx,compile"]).runtime == ["compile", "onnx"]
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["benchmark", *model_flags, "--runtime", "eager,tensorrt"])
    assert exit_info.value.code == 2


def test_runtime_names_are_the_harness_names():
    assert benchmark_command.RUNTIMES == throughput.RUNTIMES
    assert normalize_runtimes("onnx,eager") == ["eager", "onnx"]
    with pytest.raises(ValueError, match="runtimes"):
        normalize_runtimes(["jit"])


def test_one_line_errors():
    assert one_line(ValueError("first\nsecond")) == "ValueError: first"
    assert one_line(RuntimeError("backend raised:\n  Boom: detail")) == "RuntimeError: backend raised: Boom: detail"
    assert len(one_line(ValueError("x" * 1000))) == 240
