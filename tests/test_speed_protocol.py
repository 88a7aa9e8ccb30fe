"""Speed figures a busy machine cannot fool: the thread count chosen, interleaved rounds, the per-round spread and
its warning, what was measured on (demo and benchmark), and the demo's image-processor message. The timing clock
is faked where the figures matter; timing numbers are never asserted."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTImageProcessor

from rapid_hf import RapidViTForImageClassification, cli
from rapid_hf.cli import demo as demo_command
from rapid_hf.evaluation import throughput
from rapid_hf.evaluation.throughput import (
    choose_threads,
    default_threads,
    describe_run,
    interleaved_times,
    ratio_spread,
    rounds_for_budget,
    spread_warning,
)

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "image_size": 64, "patch_size": 8, "num_labels": 10}


# --- the thread count ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cores", "torch_threads", "cpu_count", "load", "expected"),
    [
        (2, 2, 2, 0.2, 2),  # a quiet 2-core machine: both cores
        (2, 2, 2, 1.1, 1),  # one core busy with other work: one thread
        (2, 2, 2, 3.7, 1),  # overloaded: still one
        (4, 2, 4, 0.0, 2),  # never more than torch's own count (its physical cores, or OMP_NUM_THREADS)
        (2, 8, 64, 10.0, 2),  # a container on a big host: its own cores
        (8, 8, 8, None, 8),  # no load average on this system: the cores
    ],
)
def test_thread_count_never_oversubscribes(cores, torch_threads, cpu_count, load, expected):
    assert choose_threads(cores, torch_threads, cpu_count, load) == expected


def test_default_threads_reads_this_machine(monkeypatch):
    monkeypatch.setattr(throughput, "usable_cores", lambda: 2)
    monkeypatch.setattr(throughput, "load_average", lambda: 1.4)
    monkeypatch.setattr(throughput.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(throughput.torch, "get_num_threads", lambda: 2)
    choice = default_threads()
    assert choice.count == 1 and "load 1.4" in choice.reason and "2 usable cores" in choice.reason


def test_usable_cores_are_at_most_the_machines():
    assert 1 <= throughput.usable_cores() <= (throughput.os.cpu_count() or 1)


# --- rounds, spread, warning ---------------------------------------------------------------------------------


def test_rounds_interleave_in_alternating_order():
    calls = []
    forwards = [lambda name=name: calls.append(name) for name in "abc"]
    times = interleaved_times(forwards, 3, clock=itertools.count().__next__)
    assert calls == list("abccbaabc")
    assert [len(row) for row in times] == [3, 3, 3]


def test_spread_is_the_iqr_of_the_per_round_ratios_over_their_median():
    reference = [1.0, 2.0, 1.0, 2.0]  # the machine's load doubles every other round: each pair still says 2x
    assert ratio_spread(reference, [0.5, 1.0, 0.5, 1.0]) == 0.0
    assert ratio_spread(reference, [1.0, 1.0, 1.0, 1.0]) == pytest.approx((2.0 - 1.0) / 1.5)
    assert ratio_spread([1.0], [0.5]) == 0.0
    assert rounds_for_budget(2.0, 8.0) == 5 and rounds_for_budget(0.1, 8.0) == 30 and rounds_for_budget(1.0, 12) == 12


def test_spread_warning_names_the_widest_row():
    base = {"label": "rapid", "r": 16, "runtime": "eager", "num_threads": 2, "batch_size": 1, "device": "cpu",
            "repeats": 10, "timer": "wall"}
    calm = [{**base, "label": "none", "speedup_spread": 0.0}, {**base, "speedup_spread": 0.03}]
    assert spread_warning(calm) is None
    noisy = [*calm, {**base, "label": "tome", "speedup_spread": 0.4}]
    warning = spread_warning(noisy)
    assert warning.startswith("warning: ") and "40%" in warning and "tome" in warning and "--threads 1" in warning
    assert "\n" not in warning
    line = describe_run(noisy, "auto: 2 usable cores, load 0.3 on 2 CPUs")
    assert line.startswith("measured on cpu, threads 2 (auto") and "batch 1" in line and "10 interleaved rounds" in line
    assert "up to 40%" in line


def test_benchmark_without_threads_chooses_them_and_says_what_it_measured_on(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    RapidViTForImageClassification(ViTConfig(**TINY)).save_pretrained(tmp_path / "model")
    monkeypatch.setattr(throughput, "default_threads", lambda: throughput.ThreadChoice(1, "auto: test"))
    assert cli.main(["benchmark", "--model", str(tmp_path / "model"), "--methods", "none,tome", "--r", "2",
                     "--batch-size", "1", "--repeats", "2", "--warmup", "0", "--no-memory", "--device", "cpu",
                     "--output", str(tmp_path / "bench.json")]) == 0
    out = capsys.readouterr().out
    assert "measured on cpu, threads 1 (auto: test), batch 1, 2 interleaved rounds, wall clock, runtimes eager" in out


def test_benchmark_help_reads_the_right_way_round():
    text = cli.build_parser()._subparsers._group_actions[0].choices["benchmark"].format_help()
    flat = " ".join(text.split())
    assert "reduction's share of the time (default: measured)" in flat and "(default: True)" not in flat
    assert "--runtime" in flat and "--compile" in flat


@pytest.mark.parametrize("command", ["benchmark", "demo"])
def test_help_examples_use_paths_a_user_has(command):
    text = cli.build_parser()._subparsers._group_actions[0].choices[command].format_help()
    assert "shared/assets" not in text and "../" not in text


# --- the demo ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model with its image processor, the same model saved alone, a 64 px photo)."""
    folder = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    model = RapidViTForImageClassification(ViTConfig(**TINY)).eval()
    model.save_pretrained(folder / "with_processor")
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder / "with_processor")
    model.save_pretrained(folder / "alone")
    picture = folder / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(picture)
    return folder / "with_processor", folder / "alone", picture


class FakeClock:
    """A clock for `time_forward` (read twice per timed call) whose timed calls last the given durations; it
    notes torch's thread count at every reading."""

    def __init__(self, durations):
        self.durations = iter(durations)
        self.now, self.readings, self.threads = 0.0, 0, []

    def __call__(self) -> float:
        self.threads.append(torch.get_num_threads())
        self.readings += 1
        if self.readings % 2 == 0:
            self.now += next(self.durations)
        return self.now


def run_demo(files, monkeypatch, clock, *flags):
    model, _, picture = files
    monkeypatch.setattr(demo_command, "CLOCK", clock)
    return cli.main(["demo", "--model", str(model), "--image", str(picture), "--methods", "tome,rapid", "--r", "4",
                     "--batch-size", "2", "--device", "cpu", *flags])


def test_demo_times_on_one_thread_by_default_and_says_what_it_measured_on(demo_files, monkeypatch, capsys):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        clock = FakeClock(itertools.repeat(1.0))
        assert run_demo(demo_files, monkeypatch, clock) == 0
        assert set(clock.threads) == {1} and torch.get_num_threads() == 2  # restored afterwards
    finally:
        torch.set_num_threads(before)
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["none", "tome", "rapid"]
    assert lines[4].startswith("  speed-up over none (same run, batch 2): none 1.00x, tome 1.00x, rapid 1.00x")
    # three rows of 1 s a round: 8 s of budget fit 2 rounds, and the demo takes at least 5
    assert lines[5] == ("  measured on cpu, 1 thread, batch 2, 5 interleaved rounds, median of the per-round "
                        "speed-ups; spread 0% (IQR/median, widest row)")
    assert "warning" not in captured.err


def test_demo_threads_and_repeats_flags(demo_files, monkeypatch, capsys):
    before = torch.get_num_threads()
    clock = FakeClock(itertools.repeat(1.0))
    assert run_demo(demo_files, monkeypatch, clock, "--threads", "2", "--repeats", "3") == 0
    assert set(clock.threads) == {2} and torch.get_num_threads() == before
    assert "cpu, 2 threads, batch 2, 3 interleaved rounds" in capsys.readouterr().out


def test_demo_warns_when_the_rounds_disagree(demo_files, monkeypatch, capsys):
    rng = random.Random(0)
    clock = FakeClock(rng.uniform(0.2, 2.0) for _ in itertools.count())
    assert run_demo(demo_files, monkeypatch, clock) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "too wide to trust" in warnings[0] and "--repeats 30" in warnings[0]


def test_demo_of_a_model_saved_without_its_processor_says_how_to_fix_it(demo_files, monkeypatch, capsys):
    _, alone, picture = demo_files
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--model", str(alone), "--image", str(picture), "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if "error:" in line]
    assert len(message) == 1
    assert "has no image processor" in message[0] and "--processor ID_OR_PATH" in message[0]
    assert "save it beside the model" in message[0] and "Traceback" not in err
    with_processor, _, _ = demo_files
    clock = FakeClock(itertools.repeat(1.0))
    monkeypatch.setattr(demo_command, "CLOCK", clock)
    assert cli.main(["demo", "--model", str(alone), "--processor", str(with_processor), "--image", str(picture),
                     "--methods", "tome", "--r", "4", "--batch-size", "1", "--repeats", "1", "--device", "cpu"]) == 0
    assert "speed-up over none" in capsys.readouterr().out
