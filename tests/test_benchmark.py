"""The speed harness: analytic FLOPs vs torch's flop counter, peak memory, the benchmark records, the picture."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import DeiTConfig, ViTConfig

from rapid_hf import (
    RapidConfig,
    RapidDeiTForImageClassificationWithTeacher,
    RapidViTForImageClassification,
    cli,
)
from rapid_hf.evaluation.flops import counted_flops, model_flops, vit_flops
from rapid_hf.evaluation.pareto import pareto_points, plot_pareto
from rapid_hf.evaluation.throughput import (
    benchmark,
    latency_grid,
    profile_forward,
    quiet_file_descriptors,
    time_forward,
)
from rapid_hf.evaluation.variants import grid_variants
from rapid_hf.reduction.steps import LayerStep

TINY = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128,
        "image_size": 64, "patch_size": 8, "num_labels": 10}
SETTINGS = [
    {"method": "none"},
    {"method": "tome", "r": 6},
    {"method": "tofu", "r": 16},  # capped: removes what the bipartite split allows
    {"method": "rapid", "r": 6},
    {"method": "rapid", "output_tokens": 9, "switch_layer": 1},
    {"method": "rapid", "r": [0, 8, 0, 3]},
    {"method": "crucial", "r": 6},
]


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return RapidViTForImageClassification(ViTConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def tiny_deit():
    torch.manual_seed(0)
    return RapidDeiTForImageClassificationWithTeacher(DeiTConfig(**TINY)).eval()


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("family", ["tiny_vit", "tiny_deit"])
def test_analytic_flops_equal_torch_flop_counter(request, family, settings):
    model = request.getfixturevalue(family)
    model.set_rapid(RapidConfig(**settings))
    counted, token_counts = counted_flops(model, torch.randn(2, 3, 64, 64))
    assert model_flops(model, token_counts).total == counted


def test_analytic_flops_equal_flop_counter_on_real_deit_tiny(rapid_model):
    pixel_values = torch.randn(1, 3, 224, 224)
    try:
        for method in ("none", "tome", "tofu", "rapid"):
            rapid_model.set_rapid(RapidConfig(method=method, r=0 if method == "none" else 12))
            counted, token_counts = counted_flops(rapid_model, pixel_values)
            flops = model_flops(rapid_model, token_counts)
            assert flops.total == counted
            if method == "none":  # DeiT-Tiny: 1.25 G multiply-adds, i.e. 2.51 GFLOPs
                assert flops.total == pytest.approx(2.507e9, rel=1e-3) and flops.reduction == 0
            else:
                assert 0 < flops.reduction < 0.01 * flops.total
    finally:
        rapid_model.set_rapid(RapidConfig())


def test_flop_parts_follow_the_token_counts():
    config = ViTConfig(**TINY)
    idle = [LayerStep(None, 0, RapidConfig())] * 4
    full = vit_flops(config, [65] * 4, 65, idle)
    assert full.mlp == 4 * 2 * 2 * 65 * 64 * 128 and full.attention_matmuls == 4 * 2 * 2 * 65 * 65 * 64
    merged = vit_flops(config, [33, 33, 33, 33], 65, [LayerStep("merge_important", 32, RapidConfig()), *idle[1:]])
    assert merged.reduction == 2 * 33 * 32 * 16  # bipartite similarity: 33 sources x 32 destinations x head dim
    assert merged.attention_projections == 2 * 4 * 64 * 64 * (65 + 3 * 33)
    crucial_step = LayerStep("merge_crucial", 8, RapidConfig(importance_ratio=0.25))
    crucial = vit_flops(config, [57, 57, 57, 57], 65, [crucial_step, *idle[1:]])
    assert crucial.reduction == 2 * 48 * 16 * 16  # 64 patches: 16 crucial, 48 non-crucial
    with pytest.raises(ValueError, match="one token count and one step per layer"):
        vit_flops(config, [65] * 3, 65, idle)


def test_peak_memory_counts_what_the_forward_allocates():
    def forward():
        kept = torch.ones(1 << 20, dtype=torch.uint8)
        temporary = torch.ones(1 << 19, dtype=torch.uint8)
        del temporary
        return kept

    assert profile_forward(forward, torch.device("cpu")).peak_bytes == (1 << 20) + (1 << 19)


def test_time_forward_averages_over_the_calls():
    ticks = iter(range(0, 100, 10))
    calls = []
    assert time_forward(lambda: calls.append(1), 4, lambda: next(ticks), torch.device("cpu")) == 10 / 4
    assert len(calls) == 4


@pytest.fixture(scope="module")
def tiny_bench(tiny_vit):
    rows = grid_variants(["tome", "rapid"], [6, 12])  # no "none": the benchmark adds its baseline itself
    tiny_vit.set_rapid(RapidConfig(method="tofu", r=2))
    return benchmark(tiny_vit, rows, batch_size=4, warmup=1, repeats=3)


def test_benchmark_records_are_consistent(tiny_vit, tiny_bench):
    assert [(r["label"], r["r"]) for r in tiny_bench] == [
        ("none", 0), ("tome", 6), ("rapid", 6), ("tome", 12), ("rapid", 12),
    ]
    none = tiny_bench[0]
    assert none["speedup"] == 1.0 and none["flop_ratio"] == 1.0 and none["output_tokens"] == 65
    for record in tiny_bench:
        assert record["throughput"] == pytest.approx(4 / (record["time_ms"] / 1e3))
        assert record["speedup"] == pytest.approx(record["throughput"] / none["throughput"])
        assert record["flop_ratio"] == pytest.approx(none["gflops"] / record["gflops"])
        assert record["speedup_over_flop_ratio"] == pytest.approx(record["speedup"] / record["flop_ratio"])
        assert record["gflops"] == pytest.approx(record["gflops_counted"])
        assert record["peak_memory_mb"] > 0 and record["num_threads"] == 1
        assert none["reduction_share"] <= record["reduction_share"] < 1
        low, high = record["time_ms_iqr"]
        assert low <= record["time_ms"] <= high
    assert tiny_bench[3]["output_tokens"] < tiny_bench[1]["output_tokens"] < 65
    assert tiny_bench[3]["flop_ratio"] > tiny_bench[1]["flop_ratio"] > 1
    assert tiny_vit.rapid == RapidConfig(method="tofu", r=2)  # the model's own setting is restored


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"timer": "cycles"}, "timer"), ({"batch_size": 0}, "batch_size"), ({"repeats": 0}, "repeats")],
)
def test_bad_benchmark_settings_are_refused(tiny_vit, kwargs, message):
    with pytest.raises(ValueError, match=message):
        benchmark(tiny_vit, [], **kwargs)


def test_benchmark_script_writes_records_and_table(tiny_vit, tmp_path):
    tiny_vit.save_pretrained(tmp_path / "model")
    output = tmp_path / "bench.json"
    assert cli.main(["benchmark", "--model", str(tmp_path / "model"), "--methods", "tome,rapid", "--output-tokens",
                     "17", "--batch-size", "2", "--repeats", "2", "--warmup", "0", "--timer", "process",
                     "--device", "cpu", "--output", str(output)]) == 0
    records = json.loads(output.read_text())
    required = {"model", "label", "method", "r", "output_tokens", "rapid", "throughput", "speedup", "gflops",
                "flop_ratio", "speedup_over_flop_ratio", "peak_memory_mb", "num_threads", "date", "timer",
                "settings_source", "overrides"}
    assert all(required <= set(record) for record in records)
    assert [r["output_tokens"] for r in records] == [65, 17, 17] and records[1]["r"] is None
    assert "| rapid | out=17 | 17 |" in output.with_suffix(".md").read_text()


def test_pareto_curves_join_rows_and_start_from_the_unreduced_model(tiny_bench, tmp_path):
    accuracy = [
        {"label": r["label"], "method": r["method"], "r": r["r"], "rapid": r["rapid"], "top1": 0.5 + 0.01 * i}
        for i, r in enumerate(tiny_bench)
    ]
    curves = pareto_points(accuracy, tiny_bench)
    assert sorted(curves) == ["rapid", "tome"]
    for label in ("tome", "rapid"):
        assert [p["setting"] for p in curves[label]] == ["full", "r=6", "r=12"]  # from least to most reduced
        assert curves[label][0]["gflops"] > curves[label][1]["gflops"] > curves[label][2]["gflops"]
    picture = plot_pareto(accuracy, tiny_bench, tmp_path / "pareto.png")
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_pareto(accuracy, [], tmp_path / "empty.png")


def test_latency_grid_measures_every_cell_with_its_own_baseline(tiny_vit):
    before = torch.get_num_threads()
    rows = grid_variants(["tome", "rapid"], [6])
    records = latency_grid(tiny_vit, rows, batch_sizes=[1, 3], threads=[2, 1], warmup=0, repeats=2,
                           measure_memory=False, progress=False)
    assert torch.get_num_threads() == before  # restored
    cells = [(r["num_threads"], r["batch_size"], r["label"]) for r in records]
    assert cells == [(t, b, label) for t in (2, 1) for b in (1, 3) for label in ("none", "tome", "rapid")]
    for start in range(0, len(records), 3):
        none, *reduced = records[start:start + 3]
        assert none["speedup"] == 1.0
        for record in reduced:
            assert record["speedup"] == pytest.approx(none["time_ms"] / record["time_ms"])
            assert record["flop_ratio"] > 1 and record["peak_memory_mb"] is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"batch_sizes": []}, "batch_sizes is empty"), ({"threads": []}, "threads is empty"),
     ({"batch_sizes": [1, 0]}, "batch_sizes must hold"), ({"threads": [0]}, "threads must hold")],
)
def test_bad_latency_grids_are_refused(tiny_vit, kwargs, message):
    with pytest.raises(ValueError, match=message):
        latency_grid(tiny_vit, [], **kwargs)


def test_quiet_file_descriptors_drops_writes_below_python(capfd):
    with quiet_file_descriptors():
        os.write(1, b"from C on stdout\n")
        os.write(2, b"from C on stderr\n")
    os.write(1, b"after\n")
    captured = capfd.readouterr()
    assert captured.out == "after\n" and captured.err == ""


def test_latency_benchmark_command_prints_no_profiler_lines(tiny_vit, tmp_path, capfd):
    tiny_vit.save_pretrained(tmp_path / "model")
    output = tmp_path / "latency.json"
    assert cli.main(["benchmark", "--model", str(tmp_path / "model"), "--methods", "none,tome", "--r", "6",
                     "--batch-size", "1,2", "--threads", "1,2", "--repeats", "1", "--warmup", "0",
                     "--device", "cpu", "--output", str(output)]) == 0
    captured = capfd.readouterr()
    assert "profiler" not in captured.out + captured.err and "USDT" not in captured.out + captured.err
    records = json.loads(output.read_text())
    assert [(r["num_threads"], r["batch_size"]) for r in records] == [(1, 1), (1, 1), (1, 2), (1, 2),
                                                                       (2, 1), (2, 1), (2, 2), (2, 2)]
    assert all(r["peak_memory_mb"] > 0 for r in records)
    assert "| threads | batch | method |" in output.with_suffix(".md").read_text()


def test_benchmark_command_refuses_bad_lists(tiny_vit, tmp_path):
    tiny_vit.save_pretrained(tmp_path / "model")
    for flags in (["--batch-size", "1,0"], ["--threads", "2,x"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["benchmark", "--model", str(tmp_path / "model"), *flags, "--output", str(tmp_path / "b.json")])
        assert exit_info.value.code == 2
