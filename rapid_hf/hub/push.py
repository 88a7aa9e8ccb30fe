"""Build a Hub repository folder for a reduced model and upload it with `huggingface_hub`.

The folder holds everything transformers needs to run the model without rapid_hf installed: the weights
(safetensors), `config.json` with `auto_map` pointing at the shipped modeling code, that code (generated from
this package, `rapid_hf.hub.remote_code`), the image processor config, the measured results the card quotes
(`eval_results.json`) and the model card (`README.md`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id
from transformers import AutoImageProcessor, AutoTokenizer

import rapid_hf
from rapid_hf.evaluation.loading import rapid_class_for
from rapid_hf.hub.model_card import CardInfo, build_model_card
from rapid_hf.hub.remote_code import auto_map, modules_for, write_remote_code
from rapid_hf.hub.results import MeasuredResults, load_results

CARD_FILES = ("README.md", "eval_results.json")
LOGIN_HINT = "run `hf auth login` or set HF_TOKEN to a token with write access (or use --dry-run OUT_DIR to only build)"


class HubAccessError(RuntimeError):
    """The Hub cannot be used as asked: not logged in, bad token, no write access, unreachable."""


def check_repo_id(repo_id: str, what: str = "repo id") -> str:
    """Validate an `owner/name` Hub id with huggingface_hub's own rules; ValueError naming the problem."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"{what} {repo_id!r} is malformed: expected OWNER/NAME, e.g. my-user/deit-tiny-rapid-r16")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{what} {repo_id!r} is malformed: {error}") from error
    return repo_id


def default_base_model(model_id: str | Path) -> str:
    """The `base_model` of the card: `model_id` itself when it is a Hub id (a local folder needs --base-model)."""
    if Path(model_id).exists():
        raise ValueError(f"--model {str(model_id)!r} is a local folder: pass --base-model HUB_ID naming the Hub "
                         "checkpoint it comes from (the card's base_model)")
    return check_repo_id(str(model_id), "model id")


def check_folder(folder: str | Path, card_only: bool = False) -> None:
    """Refuse an output folder that is a file, or that holds files this build would not write (they would be
    uploaded too)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output folder {folder} is a file")
    existing = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    stale = [name for name in existing if not (card_only and name in CARD_FILES)]
    if stale:
        raise ValueError(f"output folder {folder} already holds {stale}: pick a new or empty folder so no stale "
                         "file ends up in the repository")


def _prepare_folder(folder: Path, card_only: bool) -> None:
    """Create `folder` after `check_folder`."""
    check_folder(folder, card_only)
    folder.mkdir(parents=True, exist_ok=True)


def _results_json(results: MeasuredResults, info: CardInfo) -> dict[str, Any]:
    return {
        "rapid": info.rapid.to_dict(),
        "settings_source": info.settings_source,
        "overrides": dict(info.overrides or {}),
        "evaluation": results.evaluation,
        "benchmark": results.benchmark,
        "reference": results.reference,
        "sources": [{"file": source.path.as_posix(), "command": source.command} for source in results.sources],
    }


def build_repo_folder(
    folder: str | Path,
    model_id: str | Path,
    info: CardInfo,
    results_paths: Sequence[str | Path] = (),
    card_only: bool = False,
    image_processor: Any = None,
    benchmark_cell: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write the repository folder of `model_id` reduced with `info.rapid`; returns the file names in it.

    Every input (repo ids, results files, model type) is checked before any weight is loaded. With `card_only`
    only the model card and `eval_results.json` are written (how `model_cards/` is generated). `image_processor`
    is the processor to ship (default: the one saved with `model_id`); `benchmark_cell` picks the benchmark record
    of a file measured at several batch sizes / thread counts (`rapid_hf.hub.results.select_results`).
    """
    check_repo_id(info.repo_id)
    if info.base_model is None:
        raise ValueError("the card needs a base_model (the Hub id of the checkpoint the weights come from)")
    check_repo_id(info.base_model, "base model")
    results = load_results(results_paths, str(model_id), info.rapid, benchmark_cell) if results_paths \
        else MeasuredResults()
    model_class = rapid_class_for(str(model_id))
    card = build_model_card(info, results)
    folder = Path(folder)
    _prepare_folder(folder, card_only)
    if not card_only:
        model = model_class.from_pretrained(str(model_id), rapid=info.rapid)
        model.config.auto_map = auto_map(model_class, type(model.config))
        model.save_pretrained(folder, safe_serialization=True)
        try:
            (image_processor or AutoImageProcessor.from_pretrained(str(model_id))).save_pretrained(folder)
        except (OSError, ValueError) as error:
            raise ValueError(f"model {str(model_id)!r} has no usable image processor config "
                             f"(preprocessor_config.json), which pipeline() needs: save it beside the model or pass "
                             f"--processor ID_OR_PATH ({str(error).strip().splitlines()[0]})") from error
        if "AutoModelForZeroShotImageClassification" in model.config.auto_map:  # CLIP: the pipeline needs text
            AutoTokenizer.from_pretrained(str(model_id)).save_pretrained(folder)
        write_remote_code(folder, modules_for(model_class))
    results_text = json.dumps(_results_json(results, info), indent=2) + "\n"
    (folder / "eval_results.json").write_text(results_text, encoding="utf-8")
    card.save(folder / "README.md")
    return sorted(p.name for p in folder.iterdir())


def require_login(token: str | None = None) -> tuple[str, str]:
    """The token to upload with and its user name; HubAccessError when not logged in or the token is rejected."""
    token = token or get_token()
    if not token:
        raise HubAccessError(f"not logged in to the Hugging Face Hub: {LOGIN_HINT}")
    try:
        user = HfApi(token=token).whoami()
    except OfflineModeIsEnabled as error:
        raise HubAccessError("HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it, or use --dry-run "
                             "OUT_DIR to only build the folder") from error
    except HfHubHTTPError as error:
        if error.response.status_code == 401:
            raise HubAccessError(f"the Hugging Face token was rejected (invalid or expired): {LOGIN_HINT}") from error
        raise HubAccessError(f"the Hugging Face Hub refused the login check: {error}") from error
    except Exception as error:  # transport failures: DNS, proxy, TLS, timeouts
        raise HubAccessError(f"cannot reach the Hugging Face Hub to check the login ({type(error).__name__}: "
                             f"{error}); retry, or use --dry-run OUT_DIR to only build the folder") from error
    return token, str(user.get("name", "?"))


def upload_folder(folder: str | Path, repo_id: str, token: str, private: bool = False) -> str:
    """Create `repo_id` if needed and upload `folder` to it; returns the repository URL."""
    check_repo_id(repo_id)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private or None, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=f"Upload reduced model (rapid_hf {rapid_hf.__version__})",
        )
    except HfHubHTTPError as error:
        if error.response.status_code in (401, 403):
            raise HubAccessError(f"the Hub refused to write to {repo_id} (HTTP {error.response.status_code}): "
                                 f"the token needs write access to {repo_id.split('/')[0]}; {LOGIN_HINT}") from error
        raise HubAccessError(f"upload to {repo_id} failed: {error}") from error
    return str(url)


__all__ = [
    "HubAccessError",
    "build_repo_folder",
    "check_folder",
    "check_repo_id",
    "default_base_model",
    "require_login",
    "upload_folder",
]
