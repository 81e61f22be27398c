#!/usr/bin/env python3
"""Compares two runs of the main job (their curves.csv): the same optimizers
and epochs, and every train loss, test loss and test accuracy within a
relative difference. Prints the worst difference; exits 1 above the bound.

    python3 scripts/compare_curves.py A/curves.csv B/curves.csv BOUND LABEL
"""
import csv
import sys

a_path, b_path, bound, label = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
a, b = (list(csv.DictReader(open(p))) for p in (a_path, b_path))
if not (len(a) == len(b) > 0):
    sys.exit(f"{label}: {len(a)} and {len(b)} curve points")
worst, where = 0.0, None
for x, y in zip(a, b):
    if (x["optimizer"], x["epoch"]) != (y["optimizer"], y["epoch"]):
        sys.exit(f"{label}: the runs differ in their rows: {x} vs {y}")
    for k in ("train_loss", "test_loss", "test_acc"):
        u, v = float(x[k]), float(y[k])
        d = abs(u - v) / (1e-6 + abs(u))
        if d > worst:
            worst, where = d, f'{x["optimizer"]} epoch {x["epoch"]} {k}: {u} vs {v}'
print(f"{label}: {len(a)} curve points, worst relative difference {worst:.1e} ({where})")
if worst >= bound:
    sys.exit(f"{label}: above the bound {bound:.0e}")
