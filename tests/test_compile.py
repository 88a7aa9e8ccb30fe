"""torch.compile and torch.export of reducing models: whole graphs (fullgraph=True) for every method and family,
inductor's results equal eager's, repeated calls never recompile, and a per-call setting compiles once."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
)

from rapid_hf import RapidConfig, get_rapid_model
from rapid_hf.reduction.config import METHODS

SMALL = {"image_size": 32, "patch_size": 4, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 64}
FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "vit": lambda: ViTForImageClassification(ViTConfig(**SMALL, num_labels=3)),
    "deit_distilled": lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**SMALL, num_labels=3)),
    "dinov2": lambda: Dinov2ForImageClassification(Dinov2Config(**SMALL, num_labels=3)),
    "dinov2_registers": lambda: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**SMALL, num_register_tokens=2)),
    "clip_vision": lambda: CLIPVisionModel(CLIPVisionConfig(**SMALL)),
    "siglip_vision": lambda: SiglipVisionModel(SiglipVisionConfig(**SMALL)),
    "dinov3": lambda: DINOv3ViTModel(DINOv3ViTConfig(**SMALL, num_register_tokens=2)),
}


def settings(method: str) -> RapidConfig:
    return RapidConfig(method=method, r=6, switch_layer=1)


def first_output(output) -> torch.Tensor:
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state


class CountingBackend:
    """A dynamo backend that runs the captured graph as it is and counts how often dynamo compiled one."""

    def __init__(self) -> None:
        self.compiles = 0
        self.symbolic_inputs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs):
        self.compiles += 1
        self.symbolic_inputs += sum(isinstance(value, torch.SymInt | torch.SymFloat) for value in example_inputs)
        return graph.forward


def build(family: str) -> nn.Module:
    torch.manual_seed(0)
    return get_rapid_model(FAMILIES[family]().eval())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_whole_graph_for_every_method_and_equal_to_eager(family):
    """Dynamo captures the whole forward (no graph break) for every method; the captured graph runs as eager."""
    model = build(family)
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for method in METHODS:
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=CountingBackend())
        with torch.no_grad():
            expected = model(pixel_values=pixel_values, rapid=settings(method))
            got = compiled(pixel_values=pixel_values, rapid=settings(method))
        assert got.token_counts == expected.token_counts, (family, method)
        torch.testing.assert_close(first_output(got), first_output(expected), atol=1e-5, rtol=0)


def test_repeated_calls_never_recompile_and_each_per_call_setting_compiles_once():
    model = build("vit")
    backend = CountingBackend()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    pixel_values = torch.randn(2, 3, 32, 32)
    tome = settings("tome")
    with torch.no_grad():
        compiled(pixel_values=pixel_values, rapid=tome)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(3):
                compiled(pixel_values=pixel_values, rapid=tome)
                compiled(pixel_values=pixel_values.clone(), rapid=RapidConfig(method="tome", r=6, switch_layer=1))
        assert backend.compiles == 1
        # New settings, r and float knobs among them: one graph each, with static token counts (a number that
        # changed between calls would otherwise become a symbol, see `static_ints`), and the same results as eager
        other_knobs = RapidConfig(method="rapid", r=9, switch_layer=1, prune_threshold=0.3, importance_weight=10.0)
        few_points = RapidConfig(method="rapid", r=12, switch_layer=1, reduce_every=2)
        for call in (settings("rapid"), settings("rapid"), RapidConfig(method="rapid", r=9, switch_layer=1),
                     other_knobs, few_points, tome):
            expected = model(pixel_values=pixel_values, rapid=call)
            got = compiled(pixel_values=pixel_values, rapid=call)
            assert got.token_counts == expected.token_counts
            torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
        assert backend.compiles == 5 and backend.symbolic_inputs == 0
        model.set_rapid(settings("rapid"))  # the model's own settings are guarded the same way
        compiled(pixel_values=pixel_values)
        compiled(pixel_values=pixel_values)
    assert backend.compiles == 6


def test_inductor_agrees_with_eager():
    """The default backend users run (inductor), whole graph, on a small model at batch 1 (RAPID: both stages)."""
    model = build("vit")
    model.set_rapid(settings("rapid"))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    pixel_values = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = model(pixel_values=pixel_values), compiled(pixel_values=pixel_values)
    assert got.token_counts == expected.token_counts
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=0)


def test_torch_export_of_a_reducing_model_runs_like_eager():
    model = build("vit")
    model.set_rapid(settings("rapid"))
    pixel_values = torch.randn(2, 3, 32, 32)

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values=pixel_values).logits

    program = torch.export.export(Logits(), (pixel_values,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(pixel_values), model(pixel_values=pixel_values).logits)
