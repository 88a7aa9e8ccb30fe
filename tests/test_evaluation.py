"""The accuracy harness: metric module, rows, data selection, fidelity, bootstrap, multi-process gathering."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoImageProcessor, ViTConfig, ViTForImageClassification, ViTImageProcessorPil

from rapid_hf import RapidConfig, cli
from rapid_hf.evaluation.accuracy import paired_bootstrap_ci, predict, summarize
from rapid_hf.evaluation.data import DataSpec, load_rows, make_dataloader
from rapid_hf.evaluation.fidelity import kl_divergence
from rapid_hf.evaluation.loading import load_rapid_model
from rapid_hf.evaluation.metrics import load_metric
from rapid_hf.evaluation.splits import calibration_indices, in_subset, report_indices, subset_indices
from rapid_hf.evaluation.variants import Variant, grid_variants, parse_named_variant, parse_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES = 19  # with batch 4: 5 batches, so 2 processes get an uneven last round that accelerate pads


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random 4-layer ViT (64 px, patch 8: 65 tokens, 10 classes) saved with its image processor."""
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=64,
        patch_size=8, num_labels=10, initializer_range=0.5,  # large weights: confident, reduction-sensitive logits
    )
    path = tmp_path_factory.mktemp("tiny_vit")
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_images_dir(tmp_path_factory) -> Path:
    """An imagefolder of random photos of different sizes with labels 0..9 in metadata.csv."""
    path = tmp_path_factory.mktemp("tiny_images")
    rng = np.random.default_rng(0)
    lines = ["file_name,label"]
    for i in range(NUM_IMAGES):
        pixels = rng.integers(0, 255, (40 + 3 * i, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path / f"{i:03d}.png")
        lines.append(f"{i:03d}.png,{(7 * i) % 10}")
    (path / "metadata.csv").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return load_rapid_model(str(tiny_model_dir))


def loader_for(model_dir: Path, spec: DataSpec, batch_size: int = 4):
    processor = AutoImageProcessor.from_pretrained(model_dir)
    return make_dataloader(load_rows(spec), processor, batch_size, num_workers=0)


# --- metric module -----------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.integers(2, 8), st.integers(0, 2**31 - 1))
def test_top_k_metric_matches_a_direct_count(num_examples, num_classes, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(num_examples, num_classes))
    labels = rng.integers(0, num_classes, num_examples)
    ranks = np.argsort(-logits, axis=1)
    result = load_metric("top_k_accuracy").compute(predictions=ranks.tolist(), references=labels.tolist(), k=[1, 2])
    assert result["top1"] == pytest.approx(np.mean(ranks[:, 0] == labels))
    assert result["top2"] == pytest.approx(np.mean((ranks[:, :2] == labels[:, None]).any(axis=1)))


def test_top_k_metric_refuses_k_beyond_the_ranks_given():
    with pytest.raises(ValueError, match="k=5 is invalid"):
        load_metric("top_k_accuracy").compute(predictions=[[0, 1]], references=[1], k=[5])


def test_unknown_metric_names_the_shipped_ones():
    with pytest.raises(ValueError, match="top_k_accuracy"):
        load_metric("accuracy")


# --- rows and settings -------------------------------------------------------------------------------------


def test_grid_has_one_unreduced_row_then_every_method_at_every_r_then_named_variants():
    rows = grid_variants(["none", "tome", "rapid"], [4, 8], named=[("cal", {"switch_layer": 2})])
    assert [(v.label, v.requested_r) for v in rows] == [
        ("none", 0), ("tome", 4), ("rapid", 4), ("tome", 8), ("rapid", 8), ("cal", 4), ("cal", 8),
    ]
    assert rows[-1].rapid == RapidConfig(method="rapid", r=8, switch_layer=2)


def test_rapid_settings_change_only_the_rapid_rows_and_fixed_variants_run_once():
    rows = grid_variants(
        ["tofu", "rapid"], output_tokens=[29], rapid_settings={"switch_layer": 3},
        named=[("k2", {"switch_layer": 2, "r": 5})],
    )
    assert rows[0].rapid == RapidConfig(method="tofu", output_tokens=29)
    assert rows[1].rapid == RapidConfig(method="rapid", output_tokens=29, switch_layer=3)
    assert rows[1].requested_r is None and rows[1].setting != rows[2].setting
    assert [v.label for v in rows] == ["tofu", "rapid", "k2"]


def test_an_amount_given_for_a_few_point_model_replaces_where_it_reduces_too():
    """A saved model reducing at every 3rd layer, run at `--r 8`: r=8 on every layer, and the change is reported."""
    saved = RapidConfig(method="rapid", r=24, reduce_every=3)
    rows = grid_variants(["rapid"], [8], saved=saved)
    assert rows[0].rapid == RapidConfig(method="rapid", r=8)
    assert rows[0].overrides == {"r": 8, "reduce_every": 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"methods": ["tome", "fast"], "r_values": [4]}, "unknown method"),
        ({"methods": ["tome", "tome"], "r_values": [4]}, "repeat"),
        ({"methods": ["tome"]}, "need an r value"),
        ({"methods": ["tome"], "r_values": [4], "output_tokens": [9]}, "not both"),
        ({"methods": ["tome"], "r_values": [4], "named": [("tome", {})]}, "is a method name"),
        ({"methods": ["tome"], "r_values": [4, 4]}, "appears twice"),
    ],
)
def test_bad_grids_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        grid_variants(**kwargs)


def test_settings_come_inline_from_a_file_or_from_a_config_json_rapid_entry(tmp_path):
    assert parse_settings('{"switch_layer": 3}') == {"switch_layer": 3}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "rapid_vit", "rapid": {"prune_threshold": 0.6}}))
    assert parse_settings(str(tmp_path / "config.json")) == {"prune_threshold": 0.6}
    assert parse_named_variant('cal={"importance_weight": 10}') == ("cal", {"importance_weight": 10})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"switch_layr": 3}', "unknown RapidConfig field"),
        ('{"prune_threshold": 3}', "prune_threshold"),
        ("{not json", "not valid JSON"),
        ("no/such/file.json", "neither inline JSON"),
        ("[1, 2]", "neither inline JSON"),
    ],
)
def test_bad_settings_are_refused_naming_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        parse_settings(text)


def test_named_variant_needs_name_equals_settings():
    with pytest.raises(ValueError, match="NAME=JSON"):
        parse_named_variant('{"switch_layer": 3}')


def test_cli_reports_bad_combinations_as_usage_errors(tiny_model_dir, capsys):
    common = ["evaluate", "--model", str(tiny_model_dir), "--dataset", "imagenet-1k"]
    with pytest.raises(SystemExit):
        cli.parse_args([*common, "--r", "4", "--output-tokens", "9"])
    with pytest.raises(SystemExit):
        cli.parse_args([*common, "--r", "4", "--rapid-config", '{"switch_layr": 3}'])
    assert "switch_layr" in capsys.readouterr().err
    args = cli.parse_args([*common, "--r", "4,8", "--methods", "none,rapid", "--variant", 'k3={"switch_layer": 3}'])
    assert args.output == "eval.json"  # the current directory, never the repository's results/
    assert [v.label for v in args.variant_rows] == ["none", "rapid", "rapid", "k3", "k3"]
    assert [v.settings_source for v in args.variant_rows] == ["defaults", "defaults", "defaults", "variant", "variant"]


# --- data selection ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_rows", [0, 1, 7, 500])
def test_subsets_partition_the_rows_like_the_split_functions(num_rows):
    assert subset_indices(num_rows, "calibration") == calibration_indices(num_rows)
    assert subset_indices(num_rows, "report") == report_indices(num_rows)
    assert subset_indices(num_rows, "all") == list(range(num_rows))
    assert all(in_subset(i, "calibration") != in_subset(i, "report") for i in range(num_rows))
    with pytest.raises(ValueError, match="subset"):
        in_subset(0, "test")


def test_report_subset_with_max_samples_keeps_the_first_report_rows(tiny_images_dir):
    rows = load_rows(DataSpec(data_dir=str(tiny_images_dir), subset="report", max_samples=6))
    assert [rows[i]["index"] for i in range(len(rows))] == [1, 2, 3, 4, 6, 7]
    assert rows[4]["label"] == (7 * 6) % 10


def test_streamed_rows_are_numbered_and_selected_like_the_map_style_ones(tiny_images_dir):
    spec = {"data_dir": str(tiny_images_dir), "subset": "calibration", "max_samples": 3}
    streamed = [(row["index"], row["label"]) for row in load_rows(DataSpec(streaming=True, **spec))]
    stored = load_rows(DataSpec(**spec))
    assert streamed == [(stored[i]["index"], stored[i]["label"]) for i in range(len(stored))] == [
        (0, 0), (5, 5), (10, 0),
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of"),
        ({"dataset": "imagenet-1k", "data_dir": "x"}, "exactly one of"),
        ({"data_dir": "/no/such/dir"}, "is not a directory"),
        ({"dataset": "imagenet-1k", "subset": "test"}, "subset"),
        ({"dataset": "imagenet-1k", "max_samples": 0}, "max_samples"),
    ],
)
def test_bad_data_specs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataSpec(**kwargs)


def test_missing_columns_are_named(tiny_images_dir):
    with pytest.raises(ValueError, match=r"no column\(s\) \['img'\]"):
        load_rows(DataSpec(data_dir=str(tiny_images_dir), image_column="img"))


# --- predictions and records -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tiny_model_dir, tiny_images_dir):
    rows = grid_variants(["none", "tome", "tofu", "rapid"], [6, 12])
    loader = loader_for(tiny_model_dir, DataSpec(data_dir=str(tiny_images_dir)))
    calls = []
    hook = tiny_model.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        predictions = predict(tiny_model, loader, rows)
    finally:
        hook.remove()
    batch = next(iter(loader_for(tiny_model_dir, DataSpec(data_dir=str(tiny_images_dir)), batch_size=NUM_IMAGES)))
    return rows, predictions, summarize(predictions, rows, model="tiny"), batch, len(calls)


def test_records_match_a_direct_computation_with_the_model(tiny_model, tiny_run):
    rows, _, records, batch, _ = tiny_run
    labels = batch["labels"]
    with torch.no_grad():
        reference = tiny_model(pixel_values=batch["pixel_values"]).logits
        for variant, record in zip(rows, records, strict=True):
            tiny_model.set_rapid(variant.rapid)
            output = tiny_model(pixel_values=batch["pixel_values"])
            top5 = output.logits.topk(5).indices
            assert record["top1"] == pytest.approx((top5[:, 0] == labels).float().mean().item())
            assert record["top5"] == pytest.approx((top5 == labels[:, None]).any(1).float().mean().item())
            assert record["agreement"] == pytest.approx((top5[:, 0] == reference.argmax(-1)).float().mean().item())
            assert record["kl"] == pytest.approx(kl_divergence(reference, output.logits).mean().item(), rel=1e-4)
            assert record["output_tokens"] == output.token_counts[-1]
            assert record["token_counts"] == list(output.token_counts)
            assert record["rapid"] == variant.rapid.to_dict() and record["n_samples"] == NUM_IMAGES
    tiny_model.set_rapid(RapidConfig())
    none = records[0]
    assert (none["label"], none["agreement"], none["kl"], none["output_tokens"]) == ("none", 1.0, 0.0, 65)
    assert any(r["agreement"] < 1 for r in records), "the reductions should change some tiny-model predictions"


def test_unreduced_model_runs_once_per_batch_and_rows_stay_in_order(tiny_run):
    rows, predictions, _, _, forward_calls = tiny_run
    num_batches = -(-NUM_IMAGES // 4)
    assert forward_calls == num_batches * len(rows)  # reference + 6 reduced rows; the "none" row reuses it
    assert predictions.index.tolist() == list(range(NUM_IMAGES))


def test_delta_vs_tome_is_paired_on_the_same_images(tiny_run):
    rows, predictions, records, _, _ = tiny_run
    correct = predictions.ranks[:, 1:, 0] == predictions.labels[:, None]
    by_row = {(v.label, v.requested_r): i for i, v in enumerate(rows)}
    for (label, r), i in by_row.items():
        record = records[i]
        if label in ("none", "tome"):
            assert record["delta_top1_vs_tome"] is None and record["delta_top1_vs_tome_ci95"] is None
            continue
        tome = by_row["tome", r]
        assert record["delta_top1_vs_tome"] == pytest.approx(correct[:, i].mean() - correct[:, tome].mean())
        low, high = record["delta_top1_vs_tome_ci95"]
        assert low <= record["delta_top1_vs_tome"] <= high


def test_model_setting_is_restored_after_predict(tiny_model, tiny_run):
    assert tiny_model.rapid == RapidConfig()


def test_labels_outside_the_model_classes_are_refused(tiny_model, tiny_model_dir, tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("file_name,label\na.png,12\n")
    loader = loader_for(tiny_model_dir, DataSpec(data_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="label 12 is outside the model's 10 classes"):
        predict(tiny_model, loader, [Variant("tome", RapidConfig(method="tome", r=4))])


def test_bootstrap_interval_matches_resampling_images():
    rng = np.random.default_rng(1)
    a, b = rng.random(300) < 0.7, rng.random(300) < 0.6
    mean, low, high = paired_bootstrap_ci(a, b, resamples=20_000)
    draws = rng.integers(0, 300, size=(20_000, 300))
    naive = (a[draws].astype(float) - b[draws]).mean(axis=1)
    assert mean == pytest.approx(a.mean() - b.mean())
    assert (low, high) == pytest.approx(tuple(np.percentile(naive, [2.5, 97.5])), abs=0.01)
    assert paired_bootstrap_ci(a, a) == (0.0, 0.0, 0.0)


# --- command line, real data, several processes ------------------------------------------------------------


def test_evaluate_script_on_real_deit_tiny_matches_transformers(deit_tiny_path, dev_images_path, reference_model,
                                                               dev_pixel_values, tmp_path):
    labels = [int(line.split(",")[1]) for line in (dev_images_path / "metadata.csv").read_text().split()[1:9]]
    output = tmp_path / "eval.json"
    argv = ["--model", str(deit_tiny_path), "--data-dir", str(dev_images_path), "--max-samples", "8",
            "--methods", "none,rapid", "--r", "16", "--batch-size", "8", "--num-workers", "0", "--output", str(output)]
    assert cli.main(["evaluate", *argv]) == 0
    none, rapid = json.loads(output.read_text())
    with torch.no_grad():
        expected = reference_model(pixel_values=dev_pixel_values).logits.argmax(-1)
    assert none["top1"] == pytest.approx((expected == torch.tensor(labels)).float().mean().item())
    assert none["model"] == str(deit_tiny_path) and none["n_samples"] == 8
    assert rapid["output_tokens"] < 197 and rapid["rapid"]["method"] == "rapid"
    markdown = output.with_suffix(".md").read_text()
    assert "--max-samples 8" in markdown and "| rapid | r=16 |" in markdown


def test_two_processes_give_the_numbers_of_one(tiny_model_dir, tiny_images_dir, tmp_path):
    argv = ["--model", str(tiny_model_dir), "--data-dir", str(tiny_images_dir), "--methods", "none,tome,rapid",
            "--r", "6", "--batch-size", "4", "--num-workers", "0"]
    cli.main(["evaluate", *argv, "--output", str(tmp_path / "one.json")])
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = subprocess.run(
        [*launch, "-m", "rapid_hf.cli", "evaluate", *argv, "--output", str(tmp_path / "two.json")],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "evaluate: 100%|██████████| 3/3" in result.stderr  # 5 batches over 2 processes: 3 rounds each
    run_keys = {"date", "num_threads"}  # when and with how many threads: the only fields allowed to differ
    one, two = (
        [{k: v for k, v in record.items() if k not in run_keys} for record in json.loads((tmp_path / name).read_text())]
        for name in ("one.json", "two.json")
    )
    assert one == two and one[0]["n_samples"] == NUM_IMAGES


def test_a_flat_imagefolder_keeps_its_labels_whatever_its_file_names(tmp_path):
    """File names like `..._val_...` must not turn the folder into a "validation" split without its labels."""
    from PIL import Image

    from rapid_hf.evaluation.data import DataSpec, load_rows

    names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(5)]
    for name in names:
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="JPEG")
    (tmp_path / "metadata.csv").write_text("file_name,label\n" + "".join(f"{n},{i}\n" for i, n in enumerate(names)))
    rows = load_rows(DataSpec(data_dir=str(tmp_path)))
    assert sorted(rows[i]["label"] for i in range(len(rows))) == [0, 1, 2, 3, 4]
