"""Top-1/top-5 accuracy and fidelity to the unreduced model of token-reduction methods on labelled images.

    python scripts/evaluate.py --model facebook/deit-small-patch16-224 --dataset imagenet-1k --split validation \
        --methods none,tome,tofu,rapid --r 8,13,16 --batch-size 64 --output results/eval.json

    python scripts/evaluate.py --model ./deit-tiny --data-dir ./photos --subset report --output-tokens 65,29 \
        --variant 'rapid-cal={"switch_layer": 3, "prune_threshold": 0.6}'

Runs unchanged under `accelerate launch --num_processes N scripts/evaluate.py ...` (same numbers as one process).
Writes a JSON list of records (fields: `rapid_hf.evaluation.accuracy`) and a Markdown table next to it.
"""

from rapid_hf.evaluation.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main(description=__doc__)
