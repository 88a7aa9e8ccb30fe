"""Hub sharing: remote code generated from the package, model cards from measured results, push errors.

The loading checks run in fresh subprocesses where rapid_hf cannot be imported, with HF_HUB_OFFLINE=1 and a
temporary HF_HOME; nothing here reaches the network (uploads are tested against a patched HfApi).
"""

from __future__ import annotations

import ast
import json
import keyword
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from hypothesis import given, settings
from hypothesis import strategies as st
from remote_user import hub_env, run_as_remote_user
from transformers import (
    AutoImageProcessor,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    pipeline,
)

from rapid_hf import RapidConfig, RapidViTForImageClassification, cli
from rapid_hf.hub import push
from rapid_hf.hub.model_card import CardInfo, build_model_card, card_metrics
from rapid_hf.hub.push import HubAccessError, build_repo_folder, check_repo_id, require_login, upload_folder
from rapid_hf.hub.remote_code import collect_modules, rewrite_imports, write_remote_code
from rapid_hf.hub.results import MeasuredResults, load_results, read_results_file, same_model

REPO_ROOT = Path(__file__).resolve().parents[1]
RAPID16 = RapidConfig(method="rapid", r=16)
BASE = "facebook/deit-tiny-patch16-224"

REMOTE_SCRIPT = r'''
import torch
from transformers import AutoModelForImageClassification, pipeline

for case in spec["cases"]:
    folder, result = case["folder"], {}
    for name, load in (("model", lambda: AutoModelForImageClassification.from_pretrained(folder)),
                       ("pipeline", lambda: pipeline("image-classification", model=folder))):
        try:
            load()
            result["refused_" + name] = None
        except ValueError as error:
            result["refused_" + name] = str(error)
    model, info = AutoModelForImageClassification.from_pretrained(
        folder, trust_remote_code=True, output_loading_info=True)
    result["class"] = type(model).__module__ + "." + type(model).__name__
    result["loading_info"] = {key: sorted(map(str, value)) for key, value in info.items()}
    expected = torch.load(case["expected"])
    with torch.no_grad():
        output = model.eval()(pixel_values=expected["pixel_values"])
    result["max_logit_diff"] = (output.logits - expected["logits"]).abs().max().item()
    result["token_counts"] = list(output.token_counts)
    if case["images"]:
        classifier = pipeline("image-classification", model=folder, trust_remote_code=True)
        result["pipeline"] = classifier(case["images"], top_k=5)
    report[case["name"]] = result
json.dump(report, open(spec["report"], "w"))
'''


# --------------------------------------------------------------------------------------------- helpers


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def eval_record(model, method="rapid", r=16, **extra):
    record = {"method": method, "r": r, "top1": 0.7425, "top5": 0.9125, "agreement": 0.93, "kl": 0.041,
              "n_samples": 400, "output_tokens": 11, "model": str(model), "label": f"{method} r={r}"}
    if "rapid" not in extra:
        record["rapid"] = RapidConfig(method=method, r=r).to_dict()
    return {**record, **extra}


def bench_record(model, method="rapid", r=16, **extra):
    record = {"method": method, "r": r, "throughput": 812.5, "speedup": 1.73, "gflops": 0.61,
              "flop_ratio": 0.48, "speedup_over_flop_ratio": 0.83, "peak_memory_mb": 55.0, "model": str(model)}
    return {**record, **extra}


def push_main(argv: list[str]) -> int:
    """`rapid-hf push ARGV` in this process; returns the exit status (usage errors exit with 2)."""
    try:
        return cli.main(["push", *argv])
    except SystemExit as exit_:
        return int(exit_.code)


def push_args(argv: list[str]):
    return cli.parse_args(["push", *argv])


def http_error(status: int) -> HfHubHTTPError:
    response = mock.Mock(status_code=status, headers={}, request=None)
    return HfHubHTTPError(f"{status} error", response=response)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    """A random-weight `vit` checkpoint (64 px, patch 8, 4 layers, width 64) with its image processor."""
    folder = tmp_path_factory.mktemp("tiny_vit")
    torch.manual_seed(0)
    config = ViTConfig(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=128, num_labels=10)
    ViTForImageClassification(config).eval().save_pretrained(folder)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_deit_teacher(tmp_path_factory) -> Path:
    """A random-weight distilled `deit` checkpoint (CLS + distillation heads)."""
    folder = tmp_path_factory.mktemp("tiny_deit")
    torch.manual_seed(1)
    config = DeiTConfig(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=128, num_labels=10)
    DeiTForImageClassificationWithTeacher(config).eval().save_pretrained(folder)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------ remote code


def test_shipped_modules_are_the_import_closure_of_config_and_modeling():
    modules = collect_modules()
    names = {module.filename for module in modules}
    assert {"configuration_rapid.py", "modeling_rapid.py", "encoder.py", "config.py", "steps.py"} <= names
    for module in modules:
        tree = ast.parse(rewrite_imports(module.source.read_text(encoding="utf-8")))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                assert f"{node.module}.py" in names, f"{module.filename} imports .{node.module}, which is not shipped"
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] != "rapid_hf"
            if isinstance(node, ast.Import):
                assert all(alias.name.split(".")[0] != "rapid_hf" for alias in node.names)


def test_shipped_code_is_the_package_source_with_only_imports_rewritten(tmp_path):
    written = write_remote_code(tmp_path)
    for module in collect_modules():
        assert module.filename in written
        shipped = (tmp_path / module.filename).read_text(encoding="utf-8").splitlines()
        source = module.source.read_text(encoding="utf-8").splitlines()
        assert shipped[0].startswith("# Generated by rapid_hf.hub.remote_code from " + module.module.replace(".", "/"))
        body = [line for line in shipped if not line.startswith("# Generated") and not line.startswith("# Do not")]
        assert len(body) == len(source)
        for shipped_line, source_line in zip(body, source, strict=True):
            if shipped_line != source_line:
                assert re.match(r"\s*from rapid_hf(\.\w+)+ import", source_line), source_line
                assert re.match(r"\s*from \.\w+ import", shipped_line), shipped_line


def test_rewrite_imports_handles_indented_and_multiline_imports():
    source = (
        "from rapid_hf.reduction.config import RapidConfig\n"
        "from rapid_hf.models.modeling_rapid import (\n    A,\n    B,\n)\n"
        "def f():\n    from rapid_hf.reduction.schedule import expand_schedule\n    return expand_schedule\n"
        "x = 'from rapid_hf.a.b import c is only text here'\n"
    )
    rewritten = rewrite_imports(source)
    assert "from .config import RapidConfig" in rewritten
    assert "from .modeling_rapid import (\n    A,\n    B,\n)" in rewritten
    assert "    from .schedule import expand_schedule" in rewritten
    assert rewritten.endswith("x = 'from rapid_hf.a.b import c is only text here'\n")


def identifiers(pattern: str) -> st.SearchStrategy[str]:
    """Python identifiers matching `pattern`, keywords excluded (`from .x import in` is not Python)."""
    return st.from_regex(pattern, fullmatch=True).filter(lambda name: not keyword.iskeyword(name))


@settings(max_examples=30, deadline=None)
@given(
    indent=st.sampled_from(["", "    ", "\t"]),
    path=st.lists(identifiers(r"[a-z_][a-z0-9_]{0,8}"), min_size=1, max_size=3),
    names=st.lists(identifiers(r"[A-Za-z_][A-Za-z0-9_]{0,8}"), min_size=1, max_size=3),
)
def test_rewrite_imports_property(indent, path, names):
    line = f"{indent}from rapid_hf.{'.'.join(path)} import {', '.join(names)}"
    source = f"if True:\n{line}\n" if indent else f"{line}\n"
    expected = f"{indent}from .{path[-1]} import {', '.join(names)}"
    assert expected in rewrite_imports(source).splitlines()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("import fakepkg.helpers\n", "`import fakepkg...` cannot be shipped"),
        ("from fakepkg import helpers\n", "not a module file"),
        ("from . import helpers\n", "relative imports are not supported"),
        ("from fakepkg.a.util import x\nfrom fakepkg.b.util import y\n", "both become util.py"),
    ],
)
def test_collect_modules_refuses_imports_it_cannot_ship(tmp_path, body, message):
    root = tmp_path / "fakepkg"
    for sub in ("a", "b"):
        (root / sub).mkdir(parents=True)
        (root / sub / "util.py").write_text("x = y = 1\n")
    (root / "helpers.py").write_text("")
    (root / "entry.py").write_text(body)
    with pytest.raises(ValueError, match=re.escape(message)):
        collect_modules(("fakepkg.entry",), package_root=root)


# ------------------------------------------------------------------------------------------- results


def test_results_missing_invalid_or_malformed_files_are_refused(tmp_path, tiny_vit):
    with pytest.raises(FileNotFoundError, match=r"results file .*nope\.json does not exist"):
        load_results([tmp_path / "nope.json"], str(tiny_vit), RAPID16)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_results([tmp_path / "bad.json"], str(tiny_vit), RAPID16)
    write_json(tmp_path / "dict.json", {"top1": 0.5})
    with pytest.raises(ValueError, match="must hold a JSON list of result records"):
        load_results([tmp_path / "dict.json"], str(tiny_vit), RAPID16)
    write_json(tmp_path / "nomodel.json", [{"method": "rapid", "r": 16, "top1": 0.5}])
    with pytest.raises(ValueError, match=r"record 0 lacks \['model'\]"):
        load_results([tmp_path / "nomodel.json"], str(tiny_vit), RAPID16)


def test_results_without_a_matching_record_name_the_setting_and_file(tmp_path, tiny_vit):
    path = write_json(tmp_path / "eval.json", [eval_record(tiny_vit, r=8), eval_record(tiny_vit, method="tome")])
    with pytest.raises(ValueError, match=re.escape(f"no measured results for method=rapid r=16 in {path}")):
        load_results([path], str(tiny_vit), RAPID16)


def test_results_for_another_model_are_refused(tmp_path, tiny_vit):
    path = write_json(tmp_path / "eval.json", [eval_record("google/vit-base-patch16-224")])
    with pytest.raises(ValueError, match=r"holds results for model google/vit-base-patch16-224, not for --model"):
        load_results([path], str(tiny_vit), RAPID16)


def test_results_for_other_settings_or_ambiguous_records_are_refused(tmp_path, tiny_vit):
    other = eval_record(tiny_vit, rapid=RAPID16.replace(switch_layer=2).to_dict())
    path = write_json(tmp_path / "eval.json", [other])
    with pytest.raises(ValueError, match=r"only for other settings: switch_layer=2 \(pushing None\)"):
        load_results([path], str(tiny_vit), RAPID16)
    path = write_json(tmp_path / "twice.json", [eval_record(tiny_vit), eval_record(tiny_vit, label="again")])
    with pytest.raises(ValueError, match="has 2 evaluation records for method=rapid r=16"):
        load_results([path], str(tiny_vit), RAPID16)
    path = write_json(tmp_path / "short.json", [eval_record(tiny_vit, output_tokens=None)])
    with pytest.raises(ValueError, match=r"evaluation record lacks \['output_tokens'\]"):
        load_results([path], str(tiny_vit), RAPID16)


def test_results_select_evaluation_benchmark_and_reference(tmp_path, tiny_vit):
    evaluation = write_json(tmp_path / "eval.json", [eval_record(tiny_vit, method="none", r=0, top1=0.8),
                                                      eval_record(tiny_vit), eval_record(tiny_vit, method="tome")])
    (tmp_path / "eval.md").write_text("Produced by:\n\n```\npython scripts/evaluate.py --r 16\n```\n\n| table |")
    benchmark = write_json(tmp_path / "bench.json", {"command": "python scripts/benchmark.py --model X", "records": [
        bench_record(tiny_vit, method="none", r=0, speedup=1.0, flop_ratio=1.0), bench_record(tiny_vit),
        bench_record(tiny_vit, r=8)]})
    results = load_results([evaluation, benchmark], str(tiny_vit), RAPID16)
    assert results.evaluation == eval_record(tiny_vit)
    assert results.benchmark == bench_record(tiny_vit)
    assert results.reference["top1"] == 0.8 and results.reference["flop_ratio"] == 1.0
    assert [source.command for source in results.sources] == ["python scripts/evaluate.py --r 16",
                                                               "python scripts/benchmark.py --model X"]


def test_a_benchmark_of_several_batch_sizes_and_threads_gives_the_chosen_cell(tmp_path, tiny_vit, capsys):
    """`rapid-hf benchmark --batch-size 1,4 --threads 1,2` (what the README recommends) writes one record per cell:
    push names the cells and the flags choosing one, and the card quotes the chosen cell with its own baseline."""
    cells = [(threads, batch) for threads in (1, 2) for batch in (1, 4)]
    records = []
    for threads, batch in cells:
        records.append(bench_record(tiny_vit, method="none", r=0, speedup=1.0, flop_ratio=1.0, batch_size=batch,
                                    num_threads=threads, throughput=100.0 * batch))
        records.append(bench_record(tiny_vit, speedup=1.0 + batch / 10 + threads / 100, batch_size=batch,
                                    num_threads=threads))
    bench = write_json(tmp_path / "latency.json", records)
    with pytest.raises(ValueError, match=r"at batch_size 1 and 4; num_threads 1 and 2: pass --benchmark-batch-size "
                                         r"and --benchmark-threads to choose the one the card quotes"):
        load_results([bench], str(tiny_vit), RAPID16)
    chosen = load_results([bench], str(tiny_vit), RAPID16, {"batch_size": 4, "num_threads": 2})
    assert chosen.benchmark["speedup"] == pytest.approx(1.42) and chosen.reference["throughput"] == 400.0
    with pytest.raises(ValueError, match="no benchmark record for method=rapid r=16 at batch_size=8"):
        load_results([bench], str(tiny_vit), RAPID16, {"batch_size": 8})
    base = ["--model", str(tiny_vit), "--base-model", BASE, "--repo-id", "me/tiny", "--results", str(bench)]
    assert push_main([*base, "--dry-run", str(tmp_path / "card"), "--card-only"]) == 2
    assert "--benchmark-batch-size and --benchmark-threads" in capsys.readouterr().err
    assert not (tmp_path / "card").exists()
    assert push_main([*base, "--benchmark-batch-size", "4", "--benchmark-threads", "1", "--dry-run",
                      str(tmp_path / "card"), "--card-only"]) == 0
    card = (tmp_path / "card" / "README.md").read_text()
    assert "batch_size=4" in card and "num_threads=1" in card and "| 1.41 |" in card


def test_same_model_compares_resolved_paths_and_hub_ids(tiny_vit, monkeypatch):
    monkeypatch.chdir(tiny_vit.parent)
    assert same_model(tiny_vit.name, str(tiny_vit))
    assert same_model(str(tiny_vit) + "/", str(tiny_vit))
    assert same_model("facebook/deit-tiny-patch16-224", "facebook/deit-tiny-patch16-224")
    assert not same_model("facebook/deit-small-patch16-224", "facebook/deit-tiny-patch16-224")
    assert not same_model(str(tiny_vit), "facebook/deit-tiny-patch16-224")


# ---------------------------------------------------------------------------------------------- cards


def test_card_metadata_and_model_index_come_from_the_records(tiny_vit):
    results = MeasuredResults(evaluation=eval_record(tiny_vit, dataset="ILSVRC/imagenet-1k", split="validation"),
                              benchmark=bench_record(tiny_vit, speedup=1.73004),
                              reference=eval_record(tiny_vit, method="none", r=0, top1=0.8, output_tokens=65))
    info = CardInfo(repo_id="me/tiny-rapid", base_model=BASE, rapid=RAPID16, dataset_name="ImageNet-1k")
    card = build_model_card(info, results)
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0"
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-classification"
    assert data["base_model"] == BASE
    assert data["datasets"] == ["ILSVRC/imagenet-1k"]
    assert {"rapid", "token-reduction", "custom_code"} <= set(data["tags"])
    assert card_metrics(card) == {"accuracy": 0.7425, "top_5_accuracy": 0.9125, "output_tokens": 11,
                                  "throughput_ratio": 1.73}
    reloaded = ModelCard(str(card))  # the YAML header round-trips through huggingface_hub's parser
    assert card_metrics(reloaded) == card_metrics(card)
    accuracy, speed = data["model-index"][0]["results"]
    assert accuracy["dataset"] == {"name": "ImageNet-1k", "type": "ILSVRC/imagenet-1k", "split": "validation"}
    assert speed["dataset"]["type"] == "synthetic"  # benchmark.py times synthetic batches, not the dataset
    text = card.text
    assert 'pipeline("image-classification", model="me/tiny-rapid", trust_remote_code=True)' in text
    table_cells = {cell.strip() for row in re.findall(r"^\|(?!---)(.*)\|$", text, re.M)[1:]
                   for cell in row.split("|")[1:]}
    measured = {"0.8", "0.9125", "0.93", "0.041", "65", "0.7425", "11", "1.73", "0.48", ""}
    assert table_cells <= measured, table_cells - measured


def test_card_leaves_out_what_was_not_measured(tiny_vit):
    local_rows = eval_record(tiny_vit, top5=None, kl=None, dataset="/data/imagefolder", split="train")
    only_accuracy = build_model_card(CardInfo(repo_id="me/tiny", base_model=BASE, rapid=RAPID16),
                                     MeasuredResults(evaluation=local_rows))
    # a local imagefolder is named as such: no Hub dataset in the metadata, no split, no local path on the card
    data = only_accuracy.data.to_dict()
    assert data["model-index"][0]["results"][0]["dataset"] == {"name": "local imagefolder", "type": "imagefolder"}
    assert "datasets" not in data and "imagenet" not in str(only_accuracy).lower()
    assert "/data/imagefolder" not in str(only_accuracy)
    named = build_model_card(CardInfo(repo_id="me/tiny", base_model=BASE, rapid=RAPID16, dataset_name="my photos"),
                             MeasuredResults(evaluation=local_rows))
    assert named.data.to_dict()["model-index"][0]["results"][0]["dataset"]["name"] == "my photos"
    assert set(card_metrics(only_accuracy)) == {"accuracy", "output_tokens"}  # top5=None: the harness had < 5 classes
    assert "throughput ratio" not in only_accuracy.text
    assert "top-5" not in only_accuracy.text and "KL(" not in only_accuracy.text
    assert "Speed was not measured" in only_accuracy.text
    nothing = build_model_card(CardInfo(repo_id="me/tiny", base_model=BASE, rapid=RAPID16), MeasuredResults())
    assert "model-index" not in nothing.data.to_dict()
    assert "makes no accuracy or speed claim" in nothing.text


# ------------------------------------------------------------------------------------ push and errors


@pytest.mark.parametrize("repo_id", ["no-slash", "a/b/c", "me/bad name", "me/na--me", "/name", "me/" + "x" * 100])
def test_malformed_repo_ids_are_refused(repo_id):
    with pytest.raises(ValueError, match=r"is malformed"):
        check_repo_id(repo_id)


def test_cli_reports_input_errors_before_loading_weights(tmp_path, tiny_vit, capsys):
    base = ["--model", str(tiny_vit), "--base-model", BASE, "--dry-run", str(tmp_path / "out")]
    assert push_main(["--repo-id", "not a repo", *base]) == 2
    assert "repo id 'not a repo' is malformed" in capsys.readouterr().err
    assert push_main(["--repo-id", "me/tiny", "--model", str(tiny_vit), "--dry-run", str(tmp_path / "o")]) == 2
    assert "is a local folder: pass --base-model" in capsys.readouterr().err
    assert push_main(["--repo-id", "me/tiny", "--results", str(tmp_path / "missing.json"), *base]) == 2
    assert "missing.json'] do not exist" in capsys.readouterr().err
    other = write_json(tmp_path / "other.json", [eval_record("google/vit-base-patch16-224")])
    assert push_main(["--repo-id", "me/tiny", "--results", str(other), *base]) == 2
    assert "not for --model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old.py").write_text("")
    assert push_main(["--repo-id", "me/tiny", "--model", str(tiny_vit), "--base-model", BASE,
                      "--dry-run", str(tmp_path / "used")]) == 2
    assert "already holds ['old.py']" in capsys.readouterr().err
    model = ["--model", str(tiny_vit)]
    with pytest.raises(SystemExit):
        push_args([*model, "--repo-id", "me/tiny", "--card-only"])
    assert "--card-only needs --dry-run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        push_args([*model, "--repo-id", "me/tiny", "--rapid-config", '{"r": 8}'])
    assert "give ['r'] with --method / --r / --output-tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        push_args([*model, "--repo-id", "me/tiny", "--rapid-config", '{"switch_layr": 3}'])
    assert "unknown RapidConfig field(s) ['switch_layr']" in capsys.readouterr().err


def test_push_crucial_builds_a_card(tmp_path, tiny_vit):
    """Every method has card text: `push --method crucial` builds its card (it used to die with a KeyError)."""
    results = write_json(tmp_path / "eval.json", [eval_record(tiny_vit, method="crucial")])
    assert push_main(["--model", str(tiny_vit), "--base-model", BASE, "--repo-id", "me/tiny-crucial",
                      "--method", "crucial", "--results", str(results), "--dry-run", str(tmp_path / "card"),
                      "--card-only"]) == 0
    assert "crucial-token merging" in (tmp_path / "card" / "README.md").read_text()


def test_a_saved_model_is_pushed_with_its_own_settings(tmp_path, tiny_vit):
    calibrated = RapidConfig(method="rapid", r=6, switch_layer=1, prune_threshold=0.5)
    model = RapidViTForImageClassification.from_pretrained(tiny_vit, rapid=calibrated)
    model.save_pretrained(tmp_path / "calibrated")
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tmp_path / "calibrated")
    base = ["--model", str(tmp_path / "calibrated"), "--base-model", BASE, "--repo-id", "me/cal"]
    args = push_args(base)
    assert (args.rapid, args.settings_source, args.overrides) == (calibrated, "model", {})
    args = push_args([*base, "--r", "4"])
    assert args.rapid == calibrated.replace(r=4) and args.overrides == {"r": 4}
    args = push_args([*base, "--method", "tome"])
    assert args.rapid == RapidConfig(method="tome", r=16) and args.settings_source == "defaults"
    results = write_json(tmp_path / "eval.json", [
        eval_record(tmp_path / "calibrated", r=4, rapid=calibrated.replace(r=4).to_dict())])
    assert push_main([*base, "--r", "4", "--results", str(results), "--dry-run", str(tmp_path / "card"),
                      "--card-only"]) == 0
    card = (tmp_path / "card" / "README.md").read_text()
    assert "the model's own saved settings (config.json `rapid`), with r=4 set on the command line" in card
    shipped = json.loads((tmp_path / "card" / "eval_results.json").read_text())
    assert shipped["settings_source"] == "model" and shipped["overrides"] == {"r": 4}


def test_cli_settings_select_the_matching_records(tmp_path, tiny_vit):
    calibrated = RAPID16.replace(switch_layer=2)
    by_tokens = RapidConfig(method="tome", output_tokens=29)
    path = write_json(tmp_path / "eval.json", [
        eval_record(tiny_vit), eval_record(tiny_vit, label="rapid-cal", rapid=calibrated.to_dict(), top1=0.75),
        eval_record(tiny_vit, method="tome", r=None, rapid=by_tokens.to_dict(), top1=0.6)])
    common = ["--model", str(tiny_vit), "--base-model", BASE, "--results", str(path)]
    args = push_args([*common, "--repo-id", "me/a", "--rapid-config", '{"switch_layer": 2}'])
    assert load_results(args.results, args.model, args.rapid).evaluation["top1"] == 0.75
    args = push_args([*common, "--repo-id", "me/b", "--method", "tome", "--output-tokens", "29"])
    assert args.rapid == by_tokens
    assert load_results(args.results, args.model, by_tokens).evaluation["top1"] == 0.6


def test_cli_dry_run_writes_the_repository_folder(tmp_path, tiny_vit):
    results = write_json(tmp_path / "eval.json", [eval_record(tiny_vit)])
    out = tmp_path / "repo"
    assert push_main(["--model", str(tiny_vit), "--base-model", BASE, "--repo-id", "me/tiny-rapid-r16",
                      "--results", str(results), "--dry-run", str(out)]) == 0
    files = {path.name for path in out.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "eval_results.json",
            "configuration_rapid.py", "modeling_rapid.py"} <= files
    assert {module.filename for module in collect_modules()} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "rapid_vit"
    assert config["auto_map"] == {"AutoConfig": "modeling_rapid.RapidViTConfig",
                                  "AutoModelForImageClassification": "modeling_rapid.RapidViTForImageClassification"}
    assert config["rapid"] == RAPID16.to_dict()
    shipped = json.loads((out / "eval_results.json").read_text())
    assert shipped["evaluation"] == eval_record(tiny_vit) and shipped["settings_source"] == "defaults"
    assert card_metrics(ModelCard.load(out / "README.md"))["accuracy"] == 0.7425
    # With rapid_hf imported, the folder loads through the registered (installed) classes, no remote code.
    from transformers import AutoModelForImageClassification

    loaded = AutoModelForImageClassification.from_pretrained(out)
    assert type(loaded) is RapidViTForImageClassification and loaded.rapid == RAPID16

    card_dir = tmp_path / "card"
    for _ in range(2):  # --card-only may refresh its own two files in place
        assert push_main(["--model", str(tiny_vit), "--base-model", BASE, "--repo-id", "me/tiny-rapid-r16",
                          "--results", str(results), "--dry-run", str(card_dir), "--card-only"]) == 0
    assert sorted(path.name for path in card_dir.iterdir()) == ["README.md", "eval_results.json"]
    assert (card_dir / "README.md").read_text() == (out / "README.md").read_text()


def test_not_logged_in_is_a_clear_error(tmp_path, tiny_vit):
    env = hub_env(tmp_path)
    env["PYTHONPATH"] = str(REPO_ROOT)
    completed = subprocess.run(
        [sys.executable, "-m", "rapid_hf.cli", "push", "--model", str(tiny_vit),
         "--base-model", BASE, "--repo-id", "me/tiny-rapid-r16"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert completed.returncode == 1, completed.stderr
    assert "not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_rejected_token_offline_mode_and_missing_write_access_are_clear(monkeypatch, tmp_path):
    monkeypatch.setattr(HfApi, "whoami", mock.Mock(side_effect=http_error(401)))
    with pytest.raises(HubAccessError, match=r"token was rejected \(invalid or expired\)"):
        require_login("hf_fake")
    monkeypatch.setattr(HfApi, "whoami", mock.Mock(side_effect=OfflineModeIsEnabled("offline")))
    with pytest.raises(HubAccessError, match="HF_HUB_OFFLINE is set"):
        require_login("hf_fake")
    monkeypatch.setattr(HfApi, "whoami", mock.Mock(side_effect=ConnectionError("no route")))
    with pytest.raises(HubAccessError, match=r"cannot reach the Hugging Face Hub .*no route"):
        require_login("hf_fake")
    monkeypatch.setattr(HfApi, "create_repo", mock.Mock(side_effect=http_error(403)))
    with pytest.raises(HubAccessError, match=r"refused to write to other/repo \(HTTP 403\).*write access to other"):
        upload_folder(tmp_path, "other/repo", "hf_fake")


def test_upload_creates_the_repo_and_uploads_the_built_folder(monkeypatch, tmp_path, tiny_vit, capsys):
    uploaded: dict[str, object] = {}

    def fake_upload(self, *, repo_id, folder_path, commit_message):
        uploaded.update(repo_id=repo_id, files=sorted(p.name for p in Path(folder_path).iterdir()))

    create = mock.Mock(return_value="https://huggingface.co/me/tiny-rapid-r16")
    monkeypatch.setattr(HfApi, "whoami", mock.Mock(return_value={"name": "me"}))
    monkeypatch.setattr(HfApi, "create_repo", create)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload)
    monkeypatch.setattr(push, "get_token", lambda: "hf_fake")
    args = push_args(["--model", str(tiny_vit), "--base-model", BASE, "--repo-id", "me/tiny-rapid-r16", "--private"])
    assert cli.main(["push", *args.argv[1:]]) == 0
    assert "uploaded to https://huggingface.co/me/tiny-rapid-r16 as me" in capsys.readouterr().out
    assert create.call_args.kwargs == {"private": True, "exist_ok": True}
    assert uploaded["repo_id"] == "me/tiny-rapid-r16"
    assert {"model.safetensors", "config.json", "modeling_rapid.py", "README.md"} <= set(uploaded["files"])


# ------------------------------------------------------------- loading without rapid_hf (fresh processes)


@pytest.fixture(scope="module")
def remote_report(tmp_path_factory, deit_tiny_path, dev_images_path, tiny_deit_teacher):
    """Build repositories for the real DeiT-Tiny (RAPID r=16) and a tiny distilled DeiT (ToMe r=4), then load
    them in a fresh process without rapid_hf; returns that process's report and the expected outputs."""
    root = tmp_path_factory.mktemp("remote")
    images = [str(path) for path in sorted(dev_images_path.glob("*.jpg"))[:2]]
    results = write_json(root / "eval.json", [eval_record(deit_tiny_path)])
    cases, expected_pipeline = [], None
    for name, model_id, rapid, base, size in (
        ("deit_tiny", deit_tiny_path, RAPID16, BASE, 224),
        ("tiny_deit_teacher", tiny_deit_teacher, RapidConfig(method="tome", r=4),
         "facebook/deit-tiny-distilled-patch16-224", 64),
    ):
        folder = root / name
        build_repo_folder(folder, model_id, CardInfo(repo_id=f"me/{name}", base_model=base, rapid=rapid),
                          [results] if name == "deit_tiny" else [])
        from transformers import AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(folder).eval()  # rapid_hf's own classes
        torch.manual_seed(0)
        pixel_values = torch.randn(2, 3, size, size)
        with torch.no_grad():
            logits = model(pixel_values=pixel_values).logits
        torch.save({"pixel_values": pixel_values, "logits": logits}, root / f"{name}.pt")
        if name == "deit_tiny":
            classifier = pipeline("image-classification", model=model,
                                  image_processor=AutoImageProcessor.from_pretrained(folder))
            expected_pipeline = classifier(images, top_k=5)
        cases.append({"name": name, "folder": str(folder), "expected": str(root / f"{name}.pt"),
                      "images": images if name == "deit_tiny" else [], "class": type(model).__name__})
    return run_as_remote_user(root, REMOTE_SCRIPT, cases), cases, expected_pipeline


def test_remote_process_cannot_import_rapid_hf(remote_report):
    report, _, _ = remote_report
    assert report["rapid_hf_importable"] is False


def test_remote_code_loads_with_no_missing_keys_and_gives_the_same_logits(remote_report):
    report, cases, _ = remote_report
    for case in cases:
        result = report[case["name"]]
        assert result["class"].startswith("transformers_modules.")
        assert result["class"].endswith("modeling_rapid." + case["class"])
        assert result["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [],
                                          "error_msgs": []}
        assert result["max_logit_diff"] <= 1e-5
    assert report["deit_tiny"]["token_counts"] == [181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]


def test_remote_pipeline_gives_the_rapid_hf_predictions(remote_report):
    report, _, expected = remote_report
    got = report["deit_tiny"]["pipeline"]
    assert [[p["label"] for p in image] for image in got] == [[p["label"] for p in image] for image in expected]
    for got_image, expected_image in zip(got, expected, strict=True):
        for got_p, expected_p in zip(got_image, expected_image, strict=True):
            assert got_p["score"] == pytest.approx(expected_p["score"], abs=1e-5)


def test_remote_code_is_refused_without_trust_remote_code(remote_report):
    report, cases, _ = remote_report
    for case in cases:
        for what in ("refused_model", "refused_pipeline"):
            message = report[case["name"]][what]
            assert message is not None, f"{case['name']} {what}: loaded without trust_remote_code"
            assert "contains custom code" in message and "trust_remote_code=True" in message


def test_shipped_cards_quote_exactly_their_measured_records():
    cards = sorted((REPO_ROOT / "model_cards").glob("*/README.md"))
    if not cards:
        pytest.skip("no generated cards in model_cards/")
    for readme in cards:
        quoted = json.loads((readme.parent / "eval_results.json").read_text())
        evaluation, benchmark = quoted["evaluation"], quoted["benchmark"]
        assert card_metrics(ModelCard.load(readme)) == {
            "accuracy": round(evaluation["top1"], 4), "top_5_accuracy": round(evaluation["top5"], 4),
            "output_tokens": evaluation["output_tokens"], "throughput_ratio": round(benchmark["speedup"], 4)}
        shipped = [REPO_ROOT / source["file"] for source in quoted["sources"]]  # paths as given, from the root
        assert all(path.is_file() for path in shipped), shipped
        records = [record for path in shipped for record in read_results_file(path).records]
        if records:  # the quoted records are, unchanged, records of the shipped results files
            assert evaluation in records and benchmark in records


def test_a_speed_calibrated_model_card_states_target_machine_and_measured_speedup():
    speed = {"speed_target": 1.6, "predicted_speedup": 1.606, "measured_speedup": 1.579,
             "machine": {"processor": "Example CPU", "runtime": "eager", "batch_size": 1, "threads": 1}}
    info = CardInfo(repo_id="me/deit-rapid-fast", base_model="facebook/deit-tiny-patch16-224",
                    rapid=RapidConfig(method="rapid", r=[0, 0, 0, 70, 0, 0, 0, 69, 0, 0, 0, 69]), speed=speed)
    text = str(build_model_card(info, MeasuredResults()))
    assert "Calibrated to a speed-up of 1.6x" in text and "measured 1.579x" in text and "predicted 1.606x" in text
    assert "on Example CPU, runtime eager, batch 1, threads 1" in text
    plain = str(build_model_card(CardInfo(repo_id="me/x", base_model=None, rapid=RapidConfig(r=8)), MeasuredResults()))
    assert "Calibrated to a speed-up" not in plain
