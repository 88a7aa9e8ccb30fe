"""Sharing reduced models on the Hugging Face Hub: remote code, measured-results model cards, upload."""

from rapid_hf.hub.model_card import CardInfo, build_model_card, card_metrics
from rapid_hf.hub.push import HubAccessError, build_repo_folder, check_repo_id, require_login, upload_folder
from rapid_hf.hub.remote_code import auto_map, collect_modules, rewrite_imports, write_remote_code
from rapid_hf.hub.results import MeasuredResults, load_results, select_results

__all__ = [
    "CardInfo",
    "HubAccessError",
    "MeasuredResults",
    "auto_map",
    "build_model_card",
    "build_repo_folder",
    "card_metrics",
    "check_repo_id",
    "collect_modules",
    "load_results",
    "require_login",
    "rewrite_imports",
    "select_results",
    "upload_folder",
    "write_remote_code",
]
