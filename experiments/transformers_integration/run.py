"""Measure, on the real DeiT-Tiny, what the issue "Inside transformers, not beside it" asks to report.

- hook counts: forward hooks and pre-hooks on every layer and attention module, one forward with reduction on;
- saved activations for backward (bytes of the distinct tensors autograd saves) with and without gradient
  checkpointing, for the stock `ViTForImageClassification` and the Rapid class (RAPID r=16);
- LoRA round trip: train LoRA on q_proj/v_proj for a few steps with reduction on, save the adapter, load it onto a
  fresh Rapid model, compare logits;
- threads: two threads running different per-call settings on one model, compared with their serial results.

Writes results.json and results.md beside this file. Run from the repository root:
    python experiments/transformers_integration/run.py --model ../shared/assets/deit-tiny-imagenet
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from pathlib import Path

import torch
from transformers import ViTForImageClassification

from rapid_hf import RapidConfig, RapidViTForImageClassification
from rapid_hf.evaluation.report import command_line, run_info, write_json, write_markdown

HERE = Path(__file__).parent
SETTINGS = RapidConfig(method="rapid", r=16)


def hook_counts(model, pixel_values) -> dict[str, list[int]]:
    counts = {"layer_pre": [], "layer": [], "attention_pre": [], "attention": []}
    fired: dict[tuple[str, int], int] = {}

    def counter(kind, index):
        def hook(*_):
            fired[(kind, index)] = fired.get((kind, index), 0) + 1

        return hook

    handles = []
    for index, layer in enumerate(model.vit.layers):
        handles += [
            layer.register_forward_pre_hook(counter("layer_pre", index)),
            layer.register_forward_hook(counter("layer", index)),
            layer.attention.register_forward_pre_hook(counter("attention_pre", index)),
            layer.attention.register_forward_hook(counter("attention", index)),
        ]
    with torch.no_grad():
        model(pixel_values=pixel_values, rapid=SETTINGS)
    for handle in handles:
        handle.remove()
    for kind in counts:
        counts[kind] = [fired.get((kind, index), 0) for index in range(len(model.vit.layers))]
    return counts


def saved_mib(model, pixel_values, labels, checkpointing: bool) -> float:
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    if checkpointing:
        model.activation_checkpointing_enable()
    else:
        model.activation_checkpointing_disable()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    model.zero_grad()
    model.activation_checkpointing_disable()
    model.eval()
    return sum(storages.values()) / 2**20


def lora_round_trip(model_path: str, pixel_values, labels) -> float:
    import peft

    model = RapidViTForImageClassification.from_pretrained(model_path, rapid=SETTINGS)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_alpha=16))
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-3)
    lora.train()
    for _ in range(3):
        lora(pixel_values=pixel_values, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    lora.eval()
    with torch.no_grad():
        trained = lora(pixel_values=pixel_values).logits
    with tempfile.TemporaryDirectory() as folder:
        lora.save_pretrained(folder)
        fresh = RapidViTForImageClassification.from_pretrained(model_path, rapid=SETTINGS)
        reloaded = peft.PeftModel.from_pretrained(fresh, folder).eval()
        with torch.no_grad():
            return float((reloaded(pixel_values=pixel_values).logits - trained).abs().max())


def thread_mismatches(model, pixel_values, repeats: int = 20) -> dict[str, int]:
    settings = [SETTINGS, RapidConfig(method="tome", r=8)]
    inputs = [pixel_values[:4], pixel_values[4:]]

    def run(index):
        with torch.no_grad():
            return model(pixel_values=inputs[index], rapid=settings[index]).logits

    serial = [run(0), run(1)]
    mismatches = [0, 0]
    barrier = threading.Barrier(2)

    def target(index):
        barrier.wait()
        for _ in range(repeats):
            mismatches[index] += int(not torch.equal(run(index), serial[index]))

    threads = [threading.Thread(target=target, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"forwards_per_thread": repeats, "mismatches_rapid_r16": mismatches[0], "mismatches_tome_r8": mismatches[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="../shared/assets/deit-tiny-imagenet")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    pixel_values = torch.randn(args.batch_size, 3, 224, 224)
    labels = torch.arange(args.batch_size)
    model = RapidViTForImageClassification.from_pretrained(args.model).eval()
    stock = ViTForImageClassification.from_pretrained(args.model).eval()
    model.set_rapid(SETTINGS)
    record = {
        "model": args.model,
        "batch_size": args.batch_size,
        "rapid": SETTINGS.to_dict(),
        "hook_counts": hook_counts(model, pixel_values[:2]),
        "saved_activations_mib": {
            "stock": saved_mib(stock, pixel_values, labels, checkpointing=False),
            "stock_checkpointed": saved_mib(stock, pixel_values, labels, checkpointing=True),
            "rapid": saved_mib(model, pixel_values, labels, checkpointing=False),
            "rapid_checkpointed": saved_mib(model, pixel_values, labels, checkpointing=True),
        },
        "lora_round_trip_max_abs_logit_diff": lora_round_trip(args.model, pixel_values, labels),
        "threads": thread_mismatches(model, pixel_values),
        **run_info(),
    }
    write_json([record], HERE / "results.json")
    memory = record["saved_activations_mib"]
    lines = [
        f"DeiT-Tiny, batch {args.batch_size}, RAPID r=16 (settings {SETTINGS.to_dict()}).",
        "",
        "| what | value |",
        "|---|---|",
        *(f"| hook calls per forward, {kind} (per layer) | {calls} |" for kind, calls in record["hook_counts"].items()),
        f"| saved activations, stock, no checkpointing | {memory['stock']:.1f} MiB |",
        f"| saved activations, stock, checkpointing | {memory['stock_checkpointed']:.1f} MiB |",
        f"| saved activations, Rapid r=16, no checkpointing | {memory['rapid']:.1f} MiB |",
        f"| saved activations, Rapid r=16, checkpointing | {memory['rapid_checkpointed']:.1f} MiB |",
        f"| LoRA adapter round trip, max abs logit diff | {record['lora_round_trip_max_abs_logit_diff']:.3g} |",
        f"| two threads x {record['threads']['forwards_per_thread']} forwards, per-call settings, results different "
        f"from serial | {record['threads']['mismatches_rapid_r16']} + {record['threads']['mismatches_tome_r8']} |",
    ]
    print(write_markdown("\n".join(lines) + "\n", HERE / "results.md", command_line()))


if __name__ == "__main__":
    main()
