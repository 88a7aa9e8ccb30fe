"""Calibration: the switch_layer="auto" rule, the coordinate search, saving, and the calibrate.py command."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DeiTConfig, ViTConfig, ViTImageProcessor

from rapid_hf import RapidConfig, RapidDeiTForImageClassification, RapidViTForImageClassification
from rapid_hf.calibration import (
    CALIBRATION_LOG,
    SEARCHED,
    auto_switch_layer,
    calibrate,
    default_searched,
    layer_statistics,
    predict_logits,
    resolve_auto_switch_layer,
    save_calibrated,
)
from rapid_hf.calibration.statistics import redundant_fraction
from rapid_hf.evaluation.fidelity import kl_divergence, top1_nll
from rapid_hf.reduction.matching import bipartite_similarity

REPO_ROOT = Path(__file__).resolve().parents[1]


TINY = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128,
        "image_size": 64, "patch_size": 8, "num_labels": 10}
GRID = {"switch_layer": [0, 2, 4], "prune_threshold": [0.5, 0.9], "importance_weight": [0.0, 50.0],
        "merge_mode": ["mean", "mlerp"]}


@pytest.fixture(scope="module")
def tiny_model() -> RapidViTForImageClassification:
    torch.manual_seed(0)
    return RapidViTForImageClassification(ViTConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def test_auto_is_a_valid_setting_that_must_be_resolved_before_running(tiny_model, images):
    config = RapidConfig(r=4, switch_layer="auto")
    assert RapidConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="switch_layer"):
        RapidConfig(switch_layer="later")
    tiny_model.set_rapid(config)
    with pytest.raises(ValueError, match=r"not resolved yet.*calibrate"):
        tiny_model(pixel_values=images[:1])


def test_auto_resolution_is_deterministic(tiny_model, images):
    tiny_model.set_rapid(RapidConfig(r=4, switch_layer="auto"))
    first = resolve_auto_switch_layer(tiny_model, images, batch_size=4)
    assert tiny_model.rapid == first and isinstance(first.switch_layer, int)
    tiny_model.set_rapid(RapidConfig(r=4, switch_layer="auto"))
    second = resolve_auto_switch_layer(tiny_model, images, batch_size=6)
    assert first == second
    statistics = layer_statistics(tiny_model, images)
    assert first.switch_layer == auto_switch_layer(statistics.redundant_fraction)
    assert len(statistics.redundant_fraction) == len(statistics.cls_entropy) == 4
    assert all(0.0 <= value <= 1.0 for value in statistics.cls_entropy)
    tiny_model(pixel_values=images[:2])  # resolved: runs


def test_auto_switch_layer_rule():
    assert auto_switch_layer([0.5, 0.8, 0.9]) == 1
    assert auto_switch_layer([0.9, 0.1]) == 0
    assert auto_switch_layer([0.1, 0.2, 0.3]) == 3  # never redundant enough: prune everywhere
    assert auto_switch_layer([0.1, 0.35], min_redundant_fraction=0.3) == 1
    with pytest.raises(ValueError, match="min_redundant_fraction"):
        auto_switch_layer([0.5], min_redundant_fraction=0.0)


def test_redundant_fraction_counts_sources_with_a_near_duplicate():
    # Tokens 0..6 (CLS + 6 patches); sources are 0, 2, 4, 6 (CLS excluded), destinations 1, 3, 5.
    metric = torch.tensor([[1, 0], [0, 1], [0, 1], [1, 0], [0.6, 0.8], [0.6, 0.8], [-1, 0]], dtype=torch.float32)
    scores = bipartite_similarity(metric[None], num_protected=1)
    assert redundant_fraction(scores, 0.7).tolist() == [pytest.approx(2 / 3)]  # 2 and 4 do, 6 does not
    assert redundant_fraction(scores, 0.99).tolist() == [pytest.approx(2 / 3)]
    assert redundant_fraction(scores, -1.0).tolist() == [pytest.approx(1.0)]


def test_statistics_on_a_distilled_deit(images):
    torch.manual_seed(0)
    model = RapidDeiTForImageClassification(DeiTConfig(**TINY)).eval()
    statistics = layer_statistics(model, images[:2], prune_threshold=0.5)
    assert len(statistics.redundant_fraction_per_image) == 2
    assert len(statistics.redundant_fraction_per_image[0]) == 4


def test_rapid_with_k0_and_lambda0_is_exactly_tome(tiny_model, images):
    # Why the calibrated RAPID can never be worse than ToMe on the calibration images: ToMe is in its grid.
    tome = predict_logits(tiny_model, images, RapidConfig(method="tome", r=6))
    rapid = predict_logits(tiny_model, images, RapidConfig(r=6, switch_layer=0, importance_weight=0.0))
    assert torch.equal(tome, rapid)


def test_calibration_picks_grid_values_and_saves_them(tiny_model, images, tmp_path):
    tiny_model.set_rapid(RapidConfig(method="tome", r=2))
    start = RapidConfig(r=6, switch_layer="auto")
    result = calibrate(tiny_model, images, start, grid=GRID, batch_size=4, progress=False, objective="kl")
    assert tiny_model.rapid == RapidConfig(method="tome", r=2)  # the model's own setting is untouched
    chosen = result.rapid
    assert chosen.r == 6 and chosen.method == "rapid"
    for name, values in GRID.items():
        assert getattr(chosen, name) in values or getattr(chosen, name) == getattr(result.start, name)
    assert result.auto_switch_layer == result.start.switch_layer
    assert result.fidelity.kl <= result.start_fidelity.kl
    tome = predict_logits(tiny_model, images, RapidConfig(method="tome", r=6))
    assert result.fidelity.kl <= kl_divergence(predict_logits(tiny_model, images, RapidConfig(method="none")),
                                               tome).mean().item()
    assert min(t.kl for t in result.trials) == pytest.approx(result.fidelity.kl)
    assert len({json.dumps(t.settings, sort_keys=True) for t in result.trials}) == len(result.trials)

    save_calibrated(tiny_model, result, tmp_path, context={"rows": [0, 5]})
    reloaded = RapidViTForImageClassification.from_pretrained(tmp_path)
    assert reloaded.rapid == chosen
    log = json.loads((tmp_path / CALIBRATION_LOG).read_text())
    assert log["rows"] == [0, 5] and log["rapid"] == chosen.to_dict() and log["num_trials"] == len(result.trials)


def test_agreement_objective_picks_the_trial_with_the_highest_agreement(tiny_model, images):
    start = RapidConfig(r=6, switch_layer=2)
    result = calibrate(tiny_model, images, start, grid=GRID, batch_size=6, max_rounds=1, progress=False,
                       objective="agreement")
    assert result.objective == "agreement" and result.to_dict()["objective"] == "agreement"
    best = max(result.trials, key=lambda t: (t.agreement, -t.kl))
    assert result.fidelity.agreement == best.agreement and result.fidelity.kl == pytest.approx(best.kl)
    # the KL search over the same grid may land elsewhere, but never on a lower KL than its own choice
    by_kl = calibrate(tiny_model, images, start, grid=GRID, batch_size=6, max_rounds=1, progress=False,
                      objective="kl")
    assert by_kl.fidelity.kl == pytest.approx(min(t.kl for t in by_kl.trials))


def test_top1_nll_objective_picks_the_trial_with_the_lowest_top1_nll(tiny_model, images):
    start = RapidConfig(r=6, switch_layer=2)
    result = calibrate(tiny_model, images, start, grid=GRID, batch_size=6, max_rounds=1, progress=False,
                       objective="top1_nll")
    assert result.objective == "top1_nll" and result.to_dict()["trials"][0].keys() >= {"kl", "top1_nll"}
    assert result.fidelity.top1_nll == pytest.approx(min(t.top1_nll for t in result.trials))
    reference = predict_logits(tiny_model, images, RapidConfig(method="none"))
    logits = predict_logits(tiny_model, images, result.rapid)
    assert result.fidelity.top1_nll == pytest.approx(top1_nll(reference, logits).mean().item(), rel=1e-5)


def test_top1_nll_is_the_cross_entropy_against_the_unreduced_top1_class():
    reference = torch.tensor([[1.0, 3.0, 0.0], [5.0, 0.0, 0.0]])
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    expected = torch.tensor([math.log(3.0), math.log(2.0 + math.exp(2.0))])
    assert torch.allclose(top1_nll(reference, logits), expected)
    assert torch.allclose(top1_nll(reference, reference), -torch.log_softmax(reference, -1).max(-1).values)


def test_fidelity_order_depends_on_the_objective():
    from rapid_hf.calibration import Fidelity

    sharp = Fidelity(kl=0.10, agreement=0.90, top1_nll=0.20)
    faithful = Fidelity(kl=0.05, agreement=0.85, top1_nll=0.30)
    assert faithful.better_than(sharp) and not sharp.better_than(faithful)
    assert sharp.better_than(faithful, "agreement") and not faithful.better_than(sharp, "agreement")
    assert sharp.better_than(faithful, "top1_nll") and not faithful.better_than(sharp, "top1_nll")
    tie = Fidelity(kl=0.04, agreement=0.90, top1_nll=0.50)
    assert tie.better_than(sharp, "agreement")  # equal agreement: the lower KL wins
    assert Fidelity(kl=0.2, agreement=0.95, top1_nll=0.20).better_than(sharp, "top1_nll")  # tie: agreement


def test_calibrate_command_offers_every_objective():
    from rapid_hf.calibration.search import OBJECTIVES
    from rapid_hf.cli import calibrate as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    choices = next(action.choices for action in parser._actions if action.dest == "objective")
    assert tuple(choices) == OBJECTIVES


def test_calibration_searches_only_the_methods_knobs(tiny_model, images):
    result = calibrate(tiny_model, images, RapidConfig(method="crucial", r=4), progress=False)
    assert {name for trial in result.trials for name in trial.settings} == {"importance_ratio", "merge_mode"}


def test_switch_layer_sweep_changes_nothing_else(tiny_model, images):
    # What experiments/switch_layer/switch_layer_study.py relies on: one trial per K, every other knob as given.
    result = calibrate(tiny_model, images, RapidConfig(r=6, switch_layer=2), searched=["switch_layer"], max_rounds=1,
                       progress=False)
    assert sorted(t.settings["switch_layer"] for t in result.trials) == [0, 1, 2, 3, 4]
    assert result.rapid.replace(switch_layer=2) == RapidConfig(r=6, switch_layer=2)


def test_rapid_importance_ratio_does_not_change_the_plan(tiny_model, images):
    # Why the search skips RAPID's rho: theta shifts every source of an image by the same lambda * theta.
    low = predict_logits(tiny_model, images, RapidConfig(r=6, switch_layer=1, importance_ratio=0.05))
    high = predict_logits(tiny_model, images, RapidConfig(r=6, switch_layer=1, importance_ratio=0.9))
    torch.testing.assert_close(low, high, rtol=0, atol=0)


def test_protect_mode_searches_rho_and_keeps_it_relevant(tiny_model, images):
    start = RapidConfig(r=6, switch_layer=2, importance_mode="protect")
    assert default_searched(start) == (*SEARCHED["rapid"], "importance_ratio")
    grid = {**GRID, "importance_ratio": [0.1, 0.5]}
    result = calibrate(tiny_model, images, start, grid=grid, batch_size=6, max_rounds=1, progress=False)
    assert {trial.settings["importance_ratio"] for trial in result.trials} == {0.1, 0.2, 0.5}
    assert result.rapid.importance_mode == "protect"
    # rho matters in this reading: the model's logits depend on it
    low = predict_logits(tiny_model, images, start.replace(importance_ratio=0.05, importance_weight=0.0))
    high = predict_logits(tiny_model, images, start.replace(importance_ratio=0.9, importance_weight=0.0))
    assert not torch.equal(low, high)


def test_importance_mode_can_be_searched_and_is_skipped_without_merging_layers(tiny_model, images):
    searched = ["importance_mode", "importance_ratio"]
    result = calibrate(tiny_model, images, RapidConfig(r=6, switch_layer=2), searched=searched,
                       grid={"importance_ratio": [0.1, 0.5]}, batch_size=6, max_rounds=1, progress=False)
    assert {trial.settings["importance_mode"] for trial in result.trials} == {"shift", "protect"}
    pruning_only = calibrate(tiny_model, images, RapidConfig(r=6, switch_layer=4), searched=searched,
                             batch_size=6, progress=False)
    assert len(pruning_only.trials) == 1  # K = L: no merging layer, so neither knob can matter


def test_importance_source_can_be_searched_and_is_skipped_without_merging_layers(tiny_model, images):
    result = calibrate(tiny_model, images, RapidConfig(r=6, switch_layer=2), searched=["importance_source"],
                       batch_size=6, max_rounds=1, progress=False)
    assert {trial.settings["importance_source"] for trial in result.trials} == {"attention", "per_patch"}
    pruning_only = calibrate(tiny_model, images, RapidConfig(r=6, switch_layer=4), searched=["importance_source"],
                             batch_size=6, progress=False)
    assert len(pruning_only.trials) == 1


@pytest.mark.parametrize(
    ("rapid", "kwargs", "match"),
    [
        (RapidConfig(method="tome", r=4), {}, "no knobs to calibrate"),
        (RapidConfig(r=0), {}, "removes no tokens"),
        (RapidConfig(r=4), {"searched": ["importance_ratio"]}, "cannot search importance_ratio"),
        (RapidConfig(r=4), {"searched": ["size"]}, r"cannot search \['size'\]"),
        (RapidConfig(method="tofu", r=4), {"searched": ["importance_mode"]}, "cannot search"),
        (RapidConfig(r=4), {"grid": {"prune_threshold": [1.5]}}, "prune_threshold"),
        (RapidConfig(r=4), {"grid": {"switch_layer": [9]}}, r"ints in \[0, 4\]"),
        (RapidConfig(r=4), {"max_rounds": 0}, "max_rounds"),
        (RapidConfig(r=4), {"objective": "top5"}, "objective must be one of"),
    ],
)
def test_calibration_rejects_bad_requests(tiny_model, images, rapid, kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibrate(tiny_model, images, rapid, progress=False, **kwargs)


def test_calibration_refuses_a_training_model(images):
    model = RapidViTForImageClassification(ViTConfig(**TINY))  # train mode
    with pytest.raises(ValueError, match=r"model\.eval"):
        calibrate(model, images, RapidConfig(r=4), progress=False)


def test_calibrate_command_end_to_end(tiny_model, tmp_path, capsys):
    model_dir, data_dir, out_dir = tmp_path / "model", tmp_path / "data", tmp_path / "out"
    tiny_model.set_rapid(RapidConfig())
    tiny_model.save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(model_dir)
    data_dir.mkdir()
    rng = np.random.default_rng(0)
    with open(data_dir / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "label"])
        for index in range(12):  # calibration rows: 0, 5, 10
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data_dir / f"{index}.png")
            writer.writerow([f"{index}.png", index % 10])
    from rapid_hf import cli

    argv = ["calibrate", "--model", str(model_dir), "--data-dir", str(data_dir), "--r", "4", "--max-rounds", "1",
            "--output-dir", str(out_dir), "--objective", "agreement"]
    assert cli.main(argv) == 0
    log = json.loads((out_dir / CALIBRATION_LOG).read_text())
    assert log["calibration_rows"] == [0, 5, 10] and log["objective"] == "agreement"
    reloaded = RapidViTForImageClassification.from_pretrained(out_dir)
    assert reloaded.rapid.to_dict() == log["rapid"] and isinstance(reloaded.rapid.switch_layer, int)
    assert (out_dir / "preprocessor_config.json").exists()

    with pytest.raises(SystemExit):
        cli.parse_args([*argv, "--switch-layer", "soon"])
    assert "expected 'auto' or an int" in capsys.readouterr().err
