"""The `rapid-hf` command: subcommands, shared flags, usage errors, the model's own settings, portable outputs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from rapid_hf import RapidConfig, RapidViTForImageClassification, cli

REPO_ROOT = Path(__file__).resolve().parents[1]
MACHINE_PATH_PREFIXES = tuple("/" + name + "/" for name in ("work", "tmp", "root", "home"))


def run_cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m rapid_hf.cli ARGV` in a fresh process (what the installed `rapid-hf` runs)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "rapid_hf.cli", *argv], cwd=cwd or REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    """A random 4-layer ViT (64 px, patch 8: 65 tokens) with its image processor."""
    folder = tmp_path_factory.mktemp("tiny_vit")
    torch.manual_seed(0)
    config = ViTConfig(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=128, num_labels=10)
    ViTForImageClassification(config).eval().save_pretrained(folder)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved_tiny_vit(tiny_vit, tmp_path_factory) -> tuple[Path, RapidConfig]:
    """The tiny ViT saved with its own (calibrated-looking) RAPID settings in config.json."""
    folder = tmp_path_factory.mktemp("saved_tiny_vit")
    settings = RapidConfig(method="rapid", r=6, switch_layer=1, prune_threshold=0.5, importance_weight=25.0)
    RapidViTForImageClassification.from_pretrained(tiny_vit, rapid=settings).save_pretrained(folder)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder, settings


# --- the installed command ----------------------------------------------------------------------------------


def test_pyproject_installs_the_rapid_hf_command():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert '[project.scripts]\nrapid-hf = "rapid_hf.cli:main"\n' in pyproject
    assert (REPO_ROOT / "LICENSE").read_text().startswith("\n                                 Apache License")


def test_help_lists_every_subcommand_and_each_shows_its_defaults():
    completed = run_cli("--help")
    assert completed.returncode == 0, completed.stderr
    listed = re.findall(r"^    (\w+)", completed.stdout, re.M)
    assert listed == list(cli.COMMANDS)
    assert {"evaluate", "benchmark", "sweep", "calibrate", "visualize", "push", "demo"} <= set(listed)
    for name in cli.COMMANDS:
        text = cli.build_parser()._subparsers._group_actions[0].choices[name].format_help()
        assert "(default:" in text, name
        assert "--model" in text, name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["evaluate", "--model", "m", "--data-dir", "no/such/dir"], "--data-dir 'no/such/dir' is not a directory"),
        (["evaluate", "--model", "m"], "one of the arguments --dataset --data-dir is required"),
        (["benchmark", "--model", "m", "--r", "8,x"], "argument --r: expected a comma-separated list of integers"),
        (["benchmark", "--model", "m", "--r", "8", "--batch-size", "0"], "expected an integer >= 1, got '0'"),
        (["push", "--model", "m", "--repo-id", "a/b", "--method", "magic"], "argument --method: invalid choice"),
        (["calibrate", "--model", "m", "--dataset", "d", "--r", "4"], "the following arguments are required: --output"),
        (["visualize", "--model", "m", "--image", "no.png", "--output", "x.png"], "--image 'no.png' is not a file"),
        (["nonsense"], "invalid choice: 'nonsense'"),
    ],
)
def test_bad_input_is_a_usage_error_naming_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_rows_are_usage_errors(tiny_vit, capsys):
    base = ["benchmark", "--model", str(tiny_vit)]
    for argv, message in [
        ([*base, "--methods", "rapid,magic", "--r", "4"], "unknown method(s) ['magic']"),
        ([*base, "--methods", "rapid"], "need an r value or output-token target"),
        ([*base, "--r", "4", "--rapid-config", '{"switch_layr": 3}'], "switch_layr"),
        (["evaluate", "--model", str(tiny_vit), "--dataset", "d", "--r", "4", "--device", "cuda"]
         if not torch.cuda.is_available() else [*base, "--r", "4", "--device", "tpu"], "--device"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_scripts_regenerate_results_and_wrap_no_subcommand():
    """scripts/ holds what the CLI does not give (regenerating the shipped results), never wrappers of the
    subcommands: `python -m rapid_hf.cli COMMAND` runs those from a checkout, and the README points there."""
    assert sorted(path.name for path in (REPO_ROOT / "scripts").iterdir()) == ["regenerate_results.py"]
    readme = (REPO_ROOT / "README.md").read_text()
    assert "python -m rapid_hf.cli" in readme and "scripts/regenerate_results.py" in readme
    completed = run_cli("evaluate", "--help")
    assert completed.returncode == 0 and "usage: rapid-hf evaluate" in completed.stdout
    script = [sys.executable, str(REPO_ROOT / "scripts" / "regenerate_results.py")]
    listed = subprocess.run([*script, "--list"], capture_output=True, text=True, check=True).stdout
    assert "model_cards:" in listed and "rapid-hf push" in listed and "best_baseline:" in listed
    dry = subprocess.run([*script, "--all", "--dry-run"], capture_output=True, text=True, check=True).stdout
    for command in re.findall(r"python (\S+\.py)", dry):  # every recorded study script exists
        assert (REPO_ROOT / command).is_file(), command
    bad = subprocess.run([*script, "no_such_entry"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "unknown entries ['no_such_entry']" in bad.stderr


# --- the model's own settings --------------------------------------------------------------------------------


def test_a_saved_model_runs_its_own_settings_and_records_say_so(saved_tiny_vit, tmp_path, monkeypatch):
    folder, settings = saved_tiny_vit
    monkeypatch.chdir(tmp_path)
    common = ["benchmark", "--model", str(folder), "--methods", "none,tome,rapid", "--batch-size", "2",
              "--repeats", "1", "--warmup", "0", "--device", "cpu"]
    assert cli.main(common) == 0  # no --r: the model's saved amount; default output in the current directory
    records = {record["label"]: record for record in json.loads((tmp_path / "bench.json").read_text())}
    assert records["rapid"]["rapid"] == settings.to_dict()
    assert (records["rapid"]["settings_source"], records["rapid"]["overrides"]) == ("model", {})
    assert records["tome"]["rapid"] == RapidConfig(method="tome", r=6).to_dict()
    assert records["tome"]["settings_source"] == "defaults"

    assert cli.main([*common, "--r", "4", "--rapid-config", '{"prune_threshold": 0.9}', "--output", "o.json"]) == 0
    rapid = next(r for r in json.loads((tmp_path / "o.json").read_text()) if r["label"] == "rapid")
    assert rapid["rapid"] == settings.replace(r=4, prune_threshold=0.9).to_dict()
    assert rapid["overrides"] == {"r": 4, "prune_threshold": 0.9} and rapid["settings_source"] == "model"


def test_calibrate_then_evaluate_runs_the_calibrated_settings(deit_tiny_path, dev_images_path, tmp_path):
    """The natural workflow on the real DeiT-Tiny: the evaluated RAPID row is the calibrated one, and says so."""
    calibrated = tmp_path / "calibrated"
    assert cli.main(["calibrate", "--model", str(deit_tiny_path), "--data-dir", str(dev_images_path), "--r", "16",
                     "--num-images", "5", "--search", "switch_layer,merge_mode", "--max-rounds", "1",
                     "--output", str(calibrated)]) == 0
    saved = json.loads((calibrated / "config.json").read_text())["rapid"]
    output = tmp_path / "eval.json"
    assert cli.main(["evaluate", "--model", str(calibrated), "--data-dir", str(dev_images_path), "--subset", "report",
                     "--max-samples", "8", "--methods", "none,rapid", "--batch-size", "8", "--num-workers", "0",
                     "--output", str(output)]) == 0
    none, rapid = json.loads(output.read_text())
    assert rapid["rapid"] == saved and isinstance(saved["switch_layer"], int)
    assert (rapid["settings_source"], rapid["overrides"]) == ("model", {})
    assert none["settings_source"] == "defaults" and rapid["data_source"] == "imagefolder"
    assert rapid["model"] == str(calibrated) and rapid["n_samples"] == 8


# --- portable records and cards ------------------------------------------------------------------------------


def test_no_committed_file_holds_a_machine_path():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    offenders = []
    for name in listed.stdout.split("\0"):
        path = REPO_ROOT / name
        if not name or name == ".gitignore" or not path.is_file() or path.suffix in (".png", ".safetensors"):
            continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        offenders += [f"{name}: {prefix}" for prefix in MACHINE_PATH_PREFIXES if prefix in text]
    assert not offenders, offenders


def test_shipped_model_cards_regenerate_byte_for_byte_on_a_fresh_clone(deit_tiny_path, tmp_path):
    """Run model_cards/COMMANDS.md in a fresh copy of the repository placed beside the shared assets, as a new
    user's clone would be, and compare every generated file with the shipped one."""
    clone = tmp_path / "rapid_hf"
    shutil.copytree(REPO_ROOT / "results", clone / "results")
    study = Path("experiments", "pooled_comparison")
    (clone / study).mkdir(parents=True)
    shutil.copy(REPO_ROOT / study / "records.json", clone / study)
    (clone / "model_cards").mkdir()
    shutil.copy(REPO_ROOT / "model_cards" / "COMMANDS.md", clone / "model_cards")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "assets").symlink_to(deit_tiny_path.parent, target_is_directory=True)
    commands = re.search(r"```bash\n(.*?)```", (REPO_ROOT / "model_cards" / "COMMANDS.md").read_text(), re.S)
    script = f'rapid-hf() {{ "{sys.executable}" -m rapid_hf.cli "$@"; }}\nset -e\n' + commands.group(1)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    shipped = sorted(p.relative_to(REPO_ROOT / "model_cards") for p in (REPO_ROOT / "model_cards").glob("*/*"))
    generated = sorted(p.relative_to(clone / "model_cards") for p in (clone / "model_cards").glob("*/*"))
    assert generated == shipped and len(shipped) == 4
    for name in shipped:
        assert (clone / "model_cards" / name).read_bytes() == (REPO_ROOT / "model_cards" / name).read_bytes(), name


def test_cards_name_the_tested_transformers_range_not_the_installed_version():
    """A card built with any transformers in the tested range reads the same, so the shipped cards regenerate byte
    for byte whatever version `.[test]` resolves to; the range is the one pyproject.toml pins and CI tests."""
    import transformers
    from packaging.specifiers import SpecifierSet

    from rapid_hf.hub.model_card import TESTED_TRANSFORMERS

    pins = re.findall(r'^ *"transformers([^"]*)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M)
    assert pins == [TESTED_TRANSFORMERS]
    assert transformers.__version__ in SpecifierSet(TESTED_TRANSFORMERS)
    for card in sorted((REPO_ROOT / "model_cards").glob("*/README.md")):
        text = card.read_text()
        assert f"tested with\ntransformers {TESTED_TRANSFORMERS}" in text, card
        assert not re.search(r"transformers\s+5\.\d+\.\d+", text), card


def test_ci_runs_the_readme_test_command_and_the_adapter_tests_at_the_lowest_version():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    assert "\npython3 -m pytest -q tests\n" in ci and "\npython -m pytest -q tests\n" in readme
    assert '--target "$LOWEST_DIR" "transformers==${LOWEST}.*"' in ci
    assert "tests/test_adapters.py tests/test_dinov2.py tests/test_clip.py" in ci


def test_cards_name_the_local_photos_as_a_local_imagefolder():
    for card in sorted((REPO_ROOT / "model_cards").glob("*/README.md")):
        text = card.read_text()
        assert "ILSVRC" not in text and "datasets:" not in text, card
        assert "type: imagefolder" in text and "local imagefolder" in text, card
        assert "../shared" not in text and not any(prefix in text for prefix in MACHINE_PATH_PREFIXES), card


@pytest.fixture(scope="module")
def tiny_photos(tmp_path_factory) -> Path:
    """An imagefolder of 6 random 64 px photos with labels in metadata.csv."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("tiny_photos")
    rng = np.random.default_rng(0)
    rows = ["file_name,label"]
    for index in range(6):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{index}.png")
        rows.append(f"{index}.png,{index % 10}")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_sweep_writes_its_tables_and_picture_into_the_output_folder(tiny_vit, tiny_photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sweep", "--model", str(tiny_vit), "--data-dir", str(tiny_photos), "--name", "tiny",
                     "--methods", "none,tome,rapid", "--r", "4,8", "--batch-size", "3", "--num-workers", "0",
                     "--repeats", "1", "--warmup", "0", "--device", "cpu", "--output", "out"]) == 0
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert written == ["pareto_tiny.png", "tiny_cpu_bench.json", "tiny_cpu_bench.md", "tiny_dev.json", "tiny_dev.md"]
    accuracy = json.loads((tmp_path / "out" / "tiny_dev.json").read_text())
    assert [record["label"] for record in accuracy] == ["none", "tome", "rapid", "tome", "rapid"]
    assert all(record["data_source"] == "imagefolder" and record["dataset"] == str(tiny_photos) for record in accuracy)
    markdown = (tmp_path / "out" / "tiny_dev.md").read_text()
    assert markdown.startswith("Produced by:\n\n```\nrapid-hf sweep --model ")
    with pytest.raises(SystemExit) as exit_:  # nothing to reuse in a new folder
        cli.main(["sweep", "--model", str(tiny_vit), "--data-dir", str(tiny_photos), "--r", "4", "--device", "cpu",
                  "--skip-evaluation", "--output", "empty"])
    assert exit_.value.code == 2


def test_demo_prints_every_method_with_the_models_own_settings(saved_tiny_vit, tiny_photos, capsys):
    folder, _ = saved_tiny_vit
    assert cli.main(["demo", "--model", str(folder), "--image", str(tiny_photos / "0.png"), "--methods", "tome,rapid",
                     "--batch-size", "2", "--repeats", "1", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["none", "tome", "rapid"]
    assert "r=6" in lines[3] and "speed-up over none" in lines[4]
