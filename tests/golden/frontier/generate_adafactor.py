#!/usr/bin/env python3
"""Reference trajectories for the built-in `adafactor`, beyond the shared
frontier/adafactor_basic.json: other shapes (a scalar, vectors, matrices,
3-D and 4-D tensors, whose last two dimensions are factored per leading
index), lengths and hyperparameters.

The reference is torch.optim.Adafactor itself (torch 2.15.0, foreach=False),
with eps1 passed explicitly (torch's default, None, would mean the dtype's
machine epsilon, so the float64 run would use another value).

- adafactor_long.json: 150 steps, defaults (lr = 1e-2, beta2_decay = -0.8,
  eps1 = float32 epsilon, eps2 = 1e-3, d = 1, no weight decay), seven tensors
  from a scalar to 2x2x3x5.
- adafactor_clamps.json: lr = 0.3 (rho_t = min(lr, 1/sqrt(t)) switches to
  1/sqrt(t) from step 12), beta2_decay = -0.5, eps1 = 1e-3 (the clamps of the
  row-variance mean and of the variance estimate are active: with gradients
  of scale 0.02 the estimate is held down, so the update's RMS passes d = 1
  and its clip is active), weight_decay = 0.05; about a fifth of the
  gradient elements and w's first row exactly zero; 80 steps.
- adafactor_zero.json: w's gradient is all zero on step 1 (row and column
  variances exactly zero: the estimate is clamped to eps1^2 and the update
  is 0, not NaN) and every 11th step; 60 steps.

Each case also runs in float64; the tolerance is 10x the float32 run's largest
distance from it (atol) plus rtol = 1e-5, as in the shared golden files.

The script replays the shared frontier/adafactor_basic.json when it is
present (beside the repository, or under $AGR_SHARED_GOLDEN) and checks that
the float32 run reproduces it bit for bit.

Usage: python3 tests/golden/frontier/generate_adafactor.py   (needs torch 2.15.0)
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from generate_psi_exact import check_reproduces, write  # noqa: E402
from torch_runs import make_grads, run_torch  # noqa: E402

SHAPES = [("scale", []), ("scalar", [1]), ("w", [6, 4]), ("b", [5]), ("conv", [2, 3, 4]),
          ("big", [33, 17]), ("k4", [2, 2, 3, 5])]
SHARED_GOLDEN = os.environ.get("AGR_SHARED_GOLDEN",
                               os.path.join(HERE, "..", "..", "..", "..", "shared", "golden"))
F32_EPS = float(torch.finfo(torch.float32).eps)


def run_adafactor(init, grads, hyper, dtype):
    return run_torch(
        lambda ps: torch.optim.Adafactor(ps, lr=hyper["lr"], beta2_decay=hyper["beta2_decay"],
                                         eps=(hyper["eps1"], hyper["eps2"]), d=hyper["d"],
                                         weight_decay=hyper["weight_decay"], foreach=False),
        init, grads, dtype, finite="Adafactor")


def check_shared_basic():
    check_reproduces(os.path.join(SHARED_GOLDEN, "frontier", "adafactor_basic.json"), run_adafactor)


def main():
    check_shared_basic()
    ref = "torch.optim.Adafactor (foreach=False), eps1 given explicitly"
    gen = torch.Generator().manual_seed(83)
    init = [torch.randn(s, generator=gen, dtype=torch.float32) for _, s in SHAPES]
    defaults = {"lr": 1e-2, "beta2_decay": -0.8, "eps1": F32_EPS, "eps2": 1e-3, "d": 1.0,
                "weight_decay": 0.0}
    write("adafactor_long.json", "adafactor", ref,
          "150 steps; a scalar, vectors, matrices, 3-D and 4-D tensors (factored over their last "
          "two dimensions per leading index)",
          defaults, SHAPES, init, make_grads(89, 150, 0.3, SHAPES), run_adafactor, folder=HERE)
    write("adafactor_clamps.json", "adafactor", ref,
          "lr = 0.3 (rho_t = 1/sqrt(t) from step 12), beta2_decay = -0.5, eps1 = 1e-3 (clamps "
          "active, and with them the RMS clip d = 1), weight_decay = 0.05; a fifth of the gradient "
          "elements and w's first row exactly zero",
          {"lr": 0.3, "beta2_decay": -0.5, "eps1": 1e-3, "eps2": 1e-3, "d": 1.0,
           "weight_decay": 0.05},
          SHAPES, init, make_grads(97, 80, 0.02, SHAPES, sparse=True, zero_row=True), run_adafactor,
          folder=HERE)
    write("adafactor_zero.json", "adafactor", ref,
          "w's gradient is all zero on step 1 (variances exactly zero: the update is 0, not NaN) "
          "and every 11th step",
          defaults, SHAPES, init, make_grads(101, 60, 0.2, SHAPES, zero_every=11, zero_first=True),
          run_adafactor, folder=HERE)


if __name__ == "__main__":
    main()
