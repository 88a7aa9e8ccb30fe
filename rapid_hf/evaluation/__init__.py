"""Evaluation harness: accuracy, fidelity, throughput, memory, FLOPs, Pareto picture.

Modules: `data` (datasets -> batches), `variants` (table rows), `accuracy` (top-1/top-5, agreement, KL, paired
bootstrap vs ToMe; record fields documented there), `throughput` (speed, memory; record fields documented there),
`flops` (analytic FLOPs from token counts, cross-checked with torch's flop counter), `report` (JSON/Markdown),
`pareto` (the picture), `metrics/` (shipped `evaluate` modules), `fidelity`,
`splits` (calibration/report rows).
"""
