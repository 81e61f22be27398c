#!/usr/bin/env python3
"""Reference trajectories for the built-in `nadam`, whose momentum schedule's
running product mu_t (NAdam's `mu_product`) is a per-tensor state: one number
per tensor, carried from step to step.

The reference is torch.optim.NAdam itself (torch 2.15.0, foreach=False,
decoupled_weight_decay=False): mu_t = beta1 * (1 - 0.5 * 0.96^(t * psi)),
mu_product *= mu_t, and the two addcdiv_ steps with -lr*(1 - mu_t)/(1 - mu_product)
and -lr*mu_{t+1}/(1 - mu_product*mu_{t+1}).

- nadam_long.json: 150 steps, defaults (lr = 2e-3, betas (0.9, 0.999),
  eps = 1e-8, momentum_decay = 4e-3, no weight decay), seven tensors from a
  scalar to 2x2x3x5.
- nadam_decay.json: beta1 = 0.8, beta2 = 0.99, momentum_decay = 0.05 (mu_t
  moves over the run), weight_decay = 0.01 (L2, added to the gradient), 100 steps.

Each case also runs in float64; the tolerance is 10x the float32 run's largest
distance from it (atol) plus rtol = 1e-5, as in the shared golden files.

Usage: python3 tests/golden/frontier/generate_nadam.py   (needs torch 2.15.0)
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from generate_adafactor import SHAPES  # noqa: E402
from generate_psi_exact import write  # noqa: E402
from torch_runs import make_grads, run_torch  # noqa: E402


def run_nadam(init, grads, hyper, dtype):
    return run_torch(
        lambda ps: torch.optim.NAdam(ps, lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]),
                                     eps=hyper["eps"], weight_decay=hyper["weight_decay"],
                                     momentum_decay=hyper["momentum_decay"], foreach=False),
        init, grads, dtype)


def main():
    gen = torch.Generator().manual_seed(107)
    init = [torch.randn(s, generator=gen, dtype=torch.float32) for _, s in SHAPES]
    ref = "torch.optim.NAdam (foreach=False)"
    write("nadam_long.json", "nadam", ref, "150 steps, seven tensors from a scalar to 2x2x3x5",
          {"lr": 2e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
           "momentum_decay": 4e-3},
          SHAPES, init, make_grads(109, 150, 0.3, SHAPES), run_nadam, folder=HERE)
    write("nadam_decay.json", "nadam", ref,
          "momentum_decay = 0.05, L2 weight decay 0.01, beta1 = 0.8",
          {"lr": 1e-2, "beta1": 0.8, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.01,
           "momentum_decay": 0.05},
          SHAPES, init, make_grads(113, 100, 0.5, SHAPES), run_nadam, folder=HERE)


if __name__ == "__main__":
    main()
