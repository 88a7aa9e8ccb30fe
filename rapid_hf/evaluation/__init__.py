"""Evaluation helpers: fidelity to the unreduced model, data splits, accuracy, throughput, FLOPs."""
