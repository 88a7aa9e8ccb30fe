"""Cross-check of the DINOv2 adapter on real weights: DeiT-Tiny run as a ViT and, rewritten, as a DINOv2.

A ViT checkpoint is a DINOv2 checkpoint with layer scale 1, no registers and a plain GELU MLP: the same maths.
`vit_as_dinov2` rewrites the real DeiT-Tiny (`model_type: vit`) into a `Dinov2Model` with those settings; the
ViT path (`RapidViTModel`) and the DINOv2 path (`RapidDinov2Model`) then run every method on the same photos and
must keep the same tokens (token counts, sources) and give the same CLS features. No real DINOv2 weights can be
had offline, so this is the check of the adapter on real weights.

Run (from the repository root):
    python experiments/dinov2_crosscheck/crosscheck.py --assets ../shared/assets --images 32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import Dinov2Config, ViTConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from rapid_hf import RapidConfig, RapidDinov2Model, RapidViTModel  # noqa: E402

METHODS = ("none", "tome", "tofu", "rapid", "crucial")
R_VALUES = (8, 16)

_LAYER_KEYS = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.q_proj": "attention.q_proj",
    "attention.k_proj": "attention.k_proj",
    "attention.v_proj": "attention.v_proj",
    "attention.o_proj": "attention.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def dinov2_config_for(vit_config: ViTConfig) -> Dinov2Config:
    """The `Dinov2Config` computing what `vit_config` computes: layer scale 1, no registers, GELU MLP."""
    if vit_config.intermediate_size % vit_config.hidden_size:
        raise ValueError(
            f"intermediate_size {vit_config.intermediate_size} is not a multiple of hidden_size "
            f"{vit_config.hidden_size}: DINOv2 sizes its MLP by an integer mlp_ratio"
        )
    return Dinov2Config(
        hidden_size=vit_config.hidden_size,
        num_hidden_layers=vit_config.num_hidden_layers,
        num_attention_heads=vit_config.num_attention_heads,
        mlp_ratio=vit_config.intermediate_size // vit_config.hidden_size,
        hidden_act=vit_config.hidden_act,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=vit_config.layer_norm_eps,
        image_size=vit_config.image_size,
        patch_size=vit_config.patch_size,
        num_channels=vit_config.num_channels,
        qkv_bias=vit_config.qkv_bias,
        layerscale_value=1.0,
        drop_path_rate=0.0,
        use_swiglu_ffn=False,
    )


def vit_as_dinov2(vit: RapidViTModel) -> RapidDinov2Model:
    """A `RapidDinov2Model` with the weights of a ViT backbone (layer scales 1, mask token 0), in eval mode."""
    dinov2 = RapidDinov2Model(dinov2_config_for(vit.config))
    source = vit.state_dict()
    state = {
        "embeddings.cls_token": source["embeddings.cls_token"],
        "embeddings.mask_token": torch.zeros_like(dinov2.embeddings.mask_token),
        "embeddings.position_embeddings": source["embeddings.position_embeddings"],
        "embeddings.patch_embeddings.projection.weight": source["embeddings.patch_embeddings.projection.weight"],
        "embeddings.patch_embeddings.projection.bias": source["embeddings.patch_embeddings.projection.bias"],
        "layernorm.weight": source["layernorm.weight"],
        "layernorm.bias": source["layernorm.bias"],
    }
    for index in range(vit.config.num_hidden_layers):
        for vit_name, dinov2_name in _LAYER_KEYS.items():
            for kind in ("weight", "bias"):
                state[f"encoder.layer.{index}.{dinov2_name}.{kind}"] = source[f"layers.{index}.{vit_name}.{kind}"]
        for scale in ("layer_scale1", "layer_scale2"):
            state[f"encoder.layer.{index}.{scale}.lambda1"] = torch.ones(vit.config.hidden_size)
    dinov2.load_state_dict(state, strict=True)
    return dinov2.eval()


@torch.no_grad()
def compare(vit: RapidViTModel, dinov2: RapidDinov2Model, pixel_values: torch.Tensor, rapid: RapidConfig) -> dict:
    """Run both paths with `rapid`: whether tokens and sources agree, and the largest CLS feature difference."""
    vit_out = vit(pixel_values, rapid=rapid, output_sources=True)
    dinov2_out = dinov2(pixel_values, rapid=rapid, output_sources=True)
    cls_diff = (vit_out.last_hidden_state[:, 0] - dinov2_out.last_hidden_state[:, 0]).abs().max().item()
    return {
        "token_counts": list(vit_out.token_counts),
        "same_token_counts": vit_out.token_counts == dinov2_out.token_counts,
        "same_sources": bool(torch.equal(vit_out.sources, dinov2_out.sources)),
        "same_sizes": bool(torch.equal(vit_out.sizes, dinov2_out.sizes)),
        "max_abs_cls_diff": cls_diff,
    }


def settings(method: str, r: int) -> RapidConfig:
    return RapidConfig() if method == "none" else RapidConfig(method=method, r=r)


def load_photos(model_path: Path, images_path: Path, count: int) -> torch.Tensor:
    """The first `count` photos (sorted by name) through the checkpoint's own image processor."""
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(model_path)
    files = sorted(images_path.glob("*.jpg"))[:count]
    if len(files) < count:
        raise ValueError(f"{images_path} holds {len(files)} .jpg photos, fewer than the {count} asked for")
    return processor(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=REPO_ROOT.parent / "shared" / "assets")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model_path = args.assets / "deit-tiny-imagenet"
    vit = RapidViTModel.from_pretrained(model_path, add_pooling_layer=False).eval()
    dinov2 = vit_as_dinov2(vit)
    pixel_values = load_photos(model_path, args.assets / "imagenet-sample-dev", args.images)
    rows = []
    for r in R_VALUES:
        for method in METHODS:
            row = {"method": method, "r": r, **compare(vit, dinov2, pixel_values, settings(method, r))}
            rows.append(row)
            print(
                f"r={r:2d} {method:8s} tokens {row['token_counts'][-1]:3d} same counts {row['same_token_counts']} "
                f"sources {row['same_sources']} sizes {row['same_sizes']} max|CLS diff| {row['max_abs_cls_diff']:.3g}"
            )
    summary = {
        "checkpoint": "deit-tiny-imagenet (vit) rewritten as dinov2: layer scale 1, no registers, patch 16, 224 px",
        "images": f"first {args.images} photos of imagenet-sample-dev (sorted by file name)",
        "torch": torch.__version__,
        "rows": rows,
        "all_agree": all(
            row["same_token_counts"] and row["same_sources"] and row["max_abs_cls_diff"] <= 1e-4 for row in rows
        ),
    }
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"all agree within 1e-4: {summary['all_agree']}; written to {args.output.name}")


if __name__ == "__main__":
    main()
