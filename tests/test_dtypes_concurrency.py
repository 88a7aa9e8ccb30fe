"""Every method runs in every float dtype and stays close to float32; threads and torch.compile change nothing.

The bfloat16 agreement on the real DeiT-Tiny is printed (`pytest -rP`) and recorded for more images by
`experiments/dtypes/check_dtypes.py` in experiments/dtypes/robustness_dtypes.json. float16 is exercised on CPU only
here (no GPU).
"""

from __future__ import annotations

import threading

import pytest
import torch

from rapid_hf import RapidConfig, RapidViTConfig, RapidViTForImageClassification
from rapid_hf.evaluation.fidelity import kl_divergence, top1_agreement
from rapid_hf.reduction.config import METHODS

TINY = RapidViTConfig(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=128,
    image_size=64,
    patch_size=8,
    num_labels=10,
)
REDUCING = [m for m in METHODS if m != "none"]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return RapidViTForImageClassification(TINY).eval()


def forward(model, pixel_values, rapid=None):
    if rapid is not None:
        model.set_rapid(rapid)
    with torch.no_grad():
        return model(pixel_values=pixel_values)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_every_method_runs_in_every_dtype_and_matches_float32(tiny_model, dtype):
    other = RapidViTForImageClassification(TINY).eval()
    other.load_state_dict(tiny_model.state_dict())
    other.to(dtype)
    pixel_values = torch.randn(4, 3, 64, 64)
    tolerance = 1e-6 if dtype == torch.float64 else 0.1
    for method in METHODS:
        rapid = RapidConfig(method=method, r=8, switch_layer=2)
        expected, output = forward(tiny_model, pixel_values, rapid), forward(other, pixel_values, rapid)
        assert output.logits.dtype == dtype and output.sizes.dtype == torch.float32
        assert output.token_counts == expected.token_counts
        assert torch.allclose(output.logits.float(), expected.logits, atol=tolerance), method


@pytest.fixture(scope="module")
def bfloat16_pair(deit_tiny_path):
    return (
        RapidViTForImageClassification.from_pretrained(deit_tiny_path).eval(),
        RapidViTForImageClassification.from_pretrained(deit_tiny_path, dtype=torch.bfloat16).eval(),
    )


@pytest.mark.parametrize("r", [8, 16])
def test_bfloat16_deit_tiny_agrees_with_float32(bfloat16_pair, dev_pixel_values, r):
    """Loose bounds a correct implementation passes on the 8 dev photos (measured: see results/robustness.md)."""
    float32, bfloat16 = bfloat16_pair
    agreements = {}
    for method in METHODS:
        rapid = RapidConfig(method=method, r=r)
        expected, output = forward(float32, dev_pixel_values, rapid), forward(bfloat16, dev_pixel_values, rapid)
        assert output.token_counts == expected.token_counts
        logits = output.logits.float()
        assert torch.isfinite(logits).all()
        agreements[method] = top1_agreement(expected.logits, logits).float().mean().item()
        mean_kl = kl_divergence(expected.logits, logits).mean().item()
        print(f"bfloat16 vs float32, {method} r={r}: top-1 agreement {agreements[method]:.3f}, mean KL {mean_kl:.4f}")
        assert agreements[method] >= 5 / 8, method
        assert mean_kl < 0.25, method
    assert sum(agreements.values()) / len(agreements) >= 0.85


def module_state(model: torch.nn.Module) -> dict[str, set[str]]:
    """The attribute names on every module: a forward must not add any (no per-forward state on modules)."""
    return {name: set(vars(module)) for name, module in model.named_modules()}


@pytest.mark.parametrize("method", REDUCING)
def test_two_threads_on_one_model_get_their_serial_results(tiny_model, method):
    tiny_model.set_rapid(RapidConfig(method=method, r=8, switch_layer=2))
    inputs = [torch.randn(3, 3, 64, 64), torch.randn(5, 3, 64, 64)]  # different inputs, different batch sizes
    serial = [forward(tiny_model, x) for x in inputs]
    state = module_state(tiny_model)
    results = run_in_threads(lambda i: forward(tiny_model, inputs[i]), count=2, repeats=10)
    for index, outputs in enumerate(results):
        for output in outputs:
            assert torch.equal(output.logits, serial[index].logits)
            assert torch.equal(output.sizes, serial[index].sizes)
            assert output.token_counts == serial[index].token_counts
    assert module_state(tiny_model) == state


def test_two_threads_with_per_call_settings_share_one_model(tiny_model):
    """`model(..., rapid=...)` runs its settings for that call only: one model serves RAPID and ToMe at once."""
    own = RapidConfig(method="tofu", r=4, switch_layer=1)
    tiny_model.set_rapid(own)
    settings = [RapidConfig(method="rapid", r=8, switch_layer=2), RapidConfig(method="tome", r=6)]
    inputs = [torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)]

    def classify(index: int):
        with torch.no_grad():
            return tiny_model(pixel_values=inputs[index], rapid=settings[index])

    serial = [classify(0), classify(1)]
    for index in range(2):  # the same as making them the model's own settings
        assert torch.equal(serial[index].logits, forward(tiny_model, inputs[index], settings[index]).logits)
    tiny_model.set_rapid(own)
    results = run_in_threads(classify, count=2, repeats=10)
    for index, outputs in enumerate(results):
        for output in outputs:
            assert torch.equal(output.logits, serial[index].logits)
            assert output.token_counts == serial[index].token_counts
    assert serial[0].token_counts != serial[1].token_counts
    assert tiny_model.rapid == own and tiny_model.config.rapid == own.to_dict()


def run_in_threads(work, count: int, repeats: int) -> list[list]:
    """Run `work(i)` `repeats` times in each of `count` threads started together; re-raise any thread's error."""
    barrier = threading.Barrier(count)
    results: list[list] = [[] for _ in range(count)]
    errors: list[BaseException] = []

    def target(index: int) -> None:
        try:
            barrier.wait()
            for _ in range(repeats):
                results[index].append(work(index))
        except BaseException as error:  # surfaced in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=target, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("method", ["rapid", "tofu"])
def test_torch_compile_agrees_with_eager(tiny_model, method):
    """aot_eager backend: inductor compiles the same graph but takes minutes on this CPU (results/robustness.md)."""
    torch._dynamo.reset()
    tiny_model.set_rapid(RapidConfig(method=method, r=8, switch_layer=2))
    compiled = torch.compile(tiny_model, backend="aot_eager")
    pixel_values = torch.randn(4, 3, 64, 64)
    expected, output = forward(tiny_model, pixel_values), forward(compiled, pixel_values)
    assert output.token_counts == expected.token_counts
    assert torch.allclose(output.logits, expected.logits, atol=1e-5, rtol=0)
    assert torch.allclose(output.sizes, expected.sizes)

    # The NaN check is skipped inside the graph: a bad image turns NaN, its batch mates are untouched.
    pixel_values[1, 0, 5, 5] = float("nan")
    output = forward(compiled, pixel_values)
    assert torch.isnan(output.logits[1]).all()
    assert torch.allclose(output.logits[[0, 2, 3]], expected.logits[[0, 2, 3]], atol=1e-5, rtol=0)
