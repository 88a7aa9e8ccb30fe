"""ONNX export of a Rapid image classifier with its reduction settings baked in, for ONNX Runtime.

    from rapid_hf.export import export_onnx
    export_onnx(model, "deit-rapid-r16.onnx", rapid=RapidConfig(method="rapid", r=16))

The ONNX graph maps `pixel_values` (batch, channels, height, width; float32) to `logits` for one fixed input size
and batch size: token reduction removes a fixed number of tokens per layer, so every shape in the graph is static
and the ranking, gathering and merging become ordinary ONNX ops (TopK, GatherElements, ScatterND, ...). The file
runs under `onnxruntime` alone (no rapid_hf, no PyTorch). Needs the optional extra: `pip install "rapid_hf[onnx]"`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rapid_hf.models.configuration_rapid import as_pair, as_rapid_config
from rapid_hf.reduction.config import RapidConfig

DEFAULT_OPSET = 18
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
METADATA_KEY = "rapid_hf"


class LogitsForward(nn.Module):
    """`model(pixel_values, rapid=settings).logits` as a module with one tensor in and one out (what exporters
    trace). `interpolate_pos_encoding` is set when the input size is not the model's own."""

    def __init__(self, model: nn.Module, rapid: RapidConfig, interpolate_pos_encoding: bool = False) -> None:
        super().__init__()
        self.model = model
        self.rapid = rapid
        self.interpolate_pos_encoding = interpolate_pos_encoding

    def forward(self, pixel_values: Tensor) -> Tensor:
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate_pos_encoding else {}
        return self.model(pixel_values=pixel_values, rapid=self.rapid, **kwargs).logits


def _image_size(encoder: Any, image_size: int | tuple[int, int] | None) -> tuple[tuple[int, int], bool]:
    """(height, width) of the exported input, and whether it differs from the encoder config's own size."""
    own = as_pair(encoder.image_size)
    if image_size is None:
        return own, False
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(side, int) and side > 0 for side in size):
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    patch = as_pair(encoder.patch_size)
    if size[0] % patch[0] or size[1] % patch[1]:
        raise ValueError(f"image_size {size} must be a multiple of the patch size {patch[0]}")
    return size, size != own


def export_onnx(
    model: nn.Module,
    path: str | Path,
    image_size: int | tuple[int, int] | None = None,
    rapid: RapidConfig | Mapping[str, Any] | None = None,
    batch_size: int = 1,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write an ONNX model of `model` running `rapid` (default: the model's own `model.rapid`) on float32
    inputs of shape (batch_size, channels, *image_size); returns the path.

    `image_size` defaults to the model's own; another size interpolates the position embeddings. Input
    `pixel_values`, output `logits`; the settings, input shape and package version are stored in the model's
    metadata under "rapid_hf" (JSON). Raises ValueError for a model that is not a Rapid image classifier, bad
    settings for it, or a bad size/batch/opset.
    """
    import rapid_hf

    if not hasattr(model, "rapid") or not hasattr(model, "set_rapid"):
        raise ValueError(f"model must be a Rapid model (rapid_hf.*For*), got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < DEFAULT_OPSET:
        raise ValueError(f"opset must be an int >= {DEFAULT_OPSET}, got {opset!r}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"path must end in .onnx, got {str(path)!r}")
    encoder = getattr(getattr(model, "config", None), "encoder_config", None)
    if encoder is None or not hasattr(encoder, "image_size"):
        raise ValueError("model has no config.image_size: export_onnx needs a Rapid image classifier")
    settings = model.rapid if rapid is None else as_rapid_config(rapid)
    (height, width), interpolate = _image_size(encoder, image_size)
    patch = as_pair(encoder.patch_size)
    num_protected = model.config.num_protected_tokens
    num_channels = encoder.num_channels
    settings.validate_for_model(
        num_layers=encoder.num_hidden_layers,
        num_tokens=(height // patch[0]) * (width // patch[1]) + num_protected,
        num_protected=num_protected,
    )
    was_training = model.training
    model.eval()
    wrapper = LogitsForward(model, settings, interpolate).eval()
    example = torch.zeros(batch_size, num_channels, height, width, device=next(model.parameters()).device)
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # torch's exporter trips its own deprecation (nothing a caller can act on)
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            _check_runs_with_logits(model, wrapper, example)
            path.parent.mkdir(parents=True, exist_ok=True)
            program = torch.onnx.export(
                wrapper, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], external_data=False, verbose=False, optimize=True,
            )
    finally:
        model.train(was_training)
    metadata = {
        "rapid": settings.to_dict(),
        "input_shape": [batch_size, num_channels, height, width],
        "model_type": getattr(model.config, "model_type", None),
        "rapid_hf_version": rapid_hf.__version__,
    }
    program.model.metadata_props[METADATA_KEY] = json.dumps(metadata)
    program.save(str(path), external_data=False)
    return path


def _check_runs_with_logits(model: nn.Module, wrapper: LogitsForward, example: Tensor) -> None:
    """One eager forward before the (much slower) trace: a model without logits, or one that cannot run these
    settings at this size, is refused with its own message before anything is traced or written."""
    try:
        wrapper(example[:1])
    except AttributeError as error:
        if "logits" not in str(error):
            raise
        raise ValueError(
            f"{type(model).__name__} returns no logits: export_onnx exports image classifiers (a Rapid "
            "...ForImageClassification class), not backbones or other heads"
        ) from None


def onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The "rapid_hf" metadata `export_onnx` stored in an ONNX file (settings, input shape, version)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    raise ValueError(f"{str(path)!r} has no {METADATA_KEY!r} metadata: not written by rapid_hf.export_onnx")


__all__ = ["DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME", "LogitsForward", "export_onnx", "onnx_metadata"]
