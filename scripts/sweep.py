"""Evaluate and benchmark a grid of token-reduction settings; write the results tables and the Pareto picture.

    python scripts/sweep.py --model /path/to/deit-tiny --data-dir /path/to/photos --name deit_tiny \
        --methods none,tome,tofu,rapid --r 4,8,12,16 --threads 1 --timer process

writes results/NAME_dev.{json,md} (accuracy, fidelity, speed tables), results/NAME_<device>_bench.{json,md} and
results/pareto_NAME.png (top-1 vs throughput and vs GFLOPs, one curve per method).
"""

from rapid_hf.evaluation.cli import sweep_main

if __name__ == "__main__":
    sweep_main(description=__doc__)
