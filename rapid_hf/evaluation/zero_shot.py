"""Zero-shot image classification with a (Rapid) CLIP model, shaped like an image classifier for the harness.

`ZeroShotClassifier` embeds the class names once with the untouched text tower (prompt templates averaged, as in
CLIP's ImageNet protocol) and then classifies images with the reduced vision tower: `logits = logit_scale *
cos(image embedding, class embedding)`. It takes `rapid=` per call and returns `logits` and `token_counts` like the
Rapid image classifiers, and has `config.num_labels`, so `rapid_hf.evaluation.accuracy.predict` evaluates it
(top-1/top-5 against the dataset labels, agreement and KL against the unreduced tower) with no change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rapid_hf.models.modeling_rapid_clip import RapidCLIPModel
from rapid_hf.models.outputs import RapidImageClassifierOutput
from rapid_hf.reduction.config import RapidConfig

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
"""CLIP's basic prompt; pass more templates (e.g. CLIP's 80 ImageNet prompts) to average over them."""


@dataclass
class ZeroShotConfig:
    """What the harness reads from a classifier's config: the classes."""

    num_labels: int
    id2label: dict[int, str] = field(default_factory=dict)


def class_names_from_id2label(id2label: Mapping[int | str, str]) -> list[str]:
    """Class names in index order from a config's `id2label`; ImageNet's "tench, Tinca tinca" becomes "tench"."""
    if not id2label:
        raise ValueError("id2label is empty: give the class names explicitly")
    indices = sorted(int(key) for key in id2label)
    if indices != list(range(len(indices))):
        raise ValueError(f"id2label keys must be 0..{len(indices) - 1}, got {indices[:5]}...")
    lookup = {int(key): value for key, value in id2label.items()}
    return [lookup[index].split(",")[0].strip() for index in indices]


class ZeroShotClassifier(nn.Module):
    """A CLIP model over fixed class names, used like a Rapid image classifier (`model(pixel_values, rapid=...)`)."""

    def __init__(
        self,
        model: RapidCLIPModel,
        tokenizer: Any,
        class_names: Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
    ) -> None:
        super().__init__()
        if not isinstance(model, RapidCLIPModel):
            raise ValueError(
                f"ZeroShotClassifier needs a RapidCLIPModel (e.g. rapid_hf.get_rapid_model(CLIPModel...)), "
                f"got {type(model).__name__}"
            )
        names = list(class_names)
        if len(names) < 2 or any(not isinstance(name, str) or not name.strip() for name in names):
            raise ValueError(f"class_names must be at least 2 non-empty strings, got {names[:5]}")
        if not templates or any("{}" not in template for template in templates):
            raise ValueError(f"every template must contain '{{}}' for the class name, got {list(templates)}")
        self.model = model
        self.config = ZeroShotConfig(num_labels=len(names), id2label=dict(enumerate(names)))
        self.register_buffer("class_embeddings", self._embed_classes(tokenizer, names, templates), persistent=False)

    @torch.no_grad()
    def _embed_classes(self, tokenizer: Any, names: list[str], templates: Sequence[str]) -> Tensor:
        """`(C, D)` unit class embeddings: each class's prompts embedded, normalised, averaged, normalised."""
        prompts = [template.format(name) for name in names for template in templates]
        device = self.model.logit_scale.device
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        tokens = tokens.to(device)
        embeddings = self.model.get_text_features(**tokens).pooler_output
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        embeddings = embeddings.view(len(names), len(templates), -1).mean(dim=1)
        return embeddings / embeddings.norm(dim=-1, keepdim=True)

    def forward(
        self, pixel_values: Tensor, rapid: RapidConfig | Mapping[str, Any] | None = None, **kwargs: Any
    ) -> RapidImageClassifierOutput:
        """Class logits `(B, C)` from the reduced image tower; `rapid` as in every Rapid model's forward."""
        image = self.model.get_image_features(pixel_values=pixel_values, rapid=rapid, **kwargs)
        embeddings = image.pooler_output / image.pooler_output.norm(dim=-1, keepdim=True)
        class_embeddings = self.class_embeddings.to(embeddings.dtype)
        logits = self.model.logit_scale.exp() * embeddings @ class_embeddings.t()
        return RapidImageClassifierOutput(
            logits=logits,
            token_counts=image.token_counts,
            sizes=image.sizes,
            sources=image.sources,
            pruned_at=image.pruned_at,
            layer_sources=image.layer_sources,
            dense_features=image.dense_features,
        )


__all__ = ["DEFAULT_TEMPLATES", "ZeroShotClassifier", "ZeroShotConfig", "class_names_from_id2label"]
