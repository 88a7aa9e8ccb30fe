"""Throughput, speedup, GFLOPs and peak memory of token-reduction methods, all measured in one run.

    python scripts/benchmark.py --model facebook/deit-small-patch16-224 --methods none,tome,tofu,rapid --r 8,16 \
        --batch-size 64 --device cuda --precision fp16 --output results/bench.json

Synthetic inputs at the model's resolution; methods are interleaved over the timed repeats, so the speed ratios
are comparable within the run. On a busy shared CPU add `--threads 1 --timer process`. Writes a JSON list of
records (fields: `rapid_hf.evaluation.throughput`) and a Markdown table next to it.
"""

from rapid_hf.evaluation.cli import benchmark_main

if __name__ == "__main__":
    benchmark_main(description=__doc__)
