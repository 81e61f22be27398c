#!/usr/bin/env python3
"""Longer reference trajectories for the frontier optimizers agr builds in.

Writes, next to this script, golden files (format `agr-golden/1`, see the
shared golden README) with other shapes, seeds, hyperparameters and lengths
than the shared `frontier/` files:

- adopt_long.json: pytorch_optimizer.ADOPT (per-parameter path,
  weight_decouple=True, clip step^0.25), 150 steps, five tensors from 1 to
  33x17 elements.
- adopt_lerp_high.json: beta1 = 0.3, so torch's lerp takes its other branch
  (weight >= 0.5); eps = 1e-3, so the clamp of sqrt(v) is active; some
  gradient elements exactly zero; no weight decay; 60 steps.
- cadamw_agr_long.json: Cautious AdamW on Psi(g) (Psi(0) = 0), 150 steps, one
  tensor's gradient all zero every 11th step.
- cadamw_agr_betas.json: beta1 = 0.5, beta2 = 0.95, eps = 1e-6, 80 steps.

References: ADOPT is pytorch_optimizer's own code. Cautious AdamW-AGR follows
the shared golden README: p *= 1 - lr*wd; Adam moments of gr = Psi(g)
(torch.optim.AdamW's single-tensor arithmetic: lerp, addcmul, bias
corrections); u = mhat / (sqrt(vhat) + eps); mask = [u*gr > 0];
mask *= numel / (sum(mask) + 1) per tensor; p -= lr * u * mask.

Each case also runs in float64; the tolerance is 10x the float32 run's largest
distance from it (atol) plus rtol = 1e-5, as in the shared golden files.

Usage: python3 tests/golden/frontier/generate.py
(needs torch 2.15.0 and pytorch_optimizer 4.1.0)
"""
import math
from importlib.metadata import version
import os
import sys

import torch
import pytorch_optimizer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from generate_psi_exact import psi, write  # noqa: E402

SHAPES = [("scalar", [1]), ("w", [6, 4]), ("b", [5]), ("conv", [2, 3, 4]), ("big", [33, 17])]


def make_grads(seed, steps, scale, zero_every=0, sparse=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(1, steps + 1):
        gs = []
        for name, shape in SHAPES:
            g = scale * torch.randn(shape, generator=gen, dtype=torch.float32)
            if sparse:
                g = g * (torch.rand(shape, generator=gen) > 0.2).to(torch.float32)
            if zero_every and name == "w" and t % zero_every == 0:
                g = torch.zeros(shape, dtype=torch.float32)
            gs.append(g)
        out.append(gs)
    return out


def run_adopt(init, grads, hyper, dtype):
    ps = [torch.nn.Parameter(x.clone().to(dtype)) for x in init]
    opt = pytorch_optimizer.ADOPT(ps, lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]),
                                  eps=hyper["eps"], weight_decay=hyper["weight_decay"],
                                  weight_decouple=True, foreach=False)
    traj = []
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.to(dtype).clone()
        opt.step()
        traj.append([p.detach().clone() for p in ps])
    return traj


def run_cadamw_agr(init, grads, hyper, dtype):
    lr, b1, b2, eps, wd = (hyper[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay"))
    ps = [x.clone().to(dtype) for x in init]
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    traj = []
    for t, gs in enumerate(grads, start=1):
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        for i, p in enumerate(ps):
            gr = psi(gs[i].to(dtype))
            p.mul_(1 - lr * wd)
            m[i].lerp_(gr, 1 - b1)
            v[i].mul_(b2).addcmul_(gr, gr, value=1 - b2)
            denom = (v[i].sqrt() / math.sqrt(bc2)).add_(eps)
            u = (m[i] / bc1) / denom
            mask = (u * gr > 0).to(dtype)
            mask.mul_(mask.numel() / (mask.sum() + 1))
            p.add_(u * mask, alpha=-lr)
        traj.append([p.clone() for p in ps])
    return traj


def main():
    adopt_ref = (f"pytorch_optimizer {version('pytorch_optimizer')} ADOPT (per-parameter path, "
                 "weight_decouple=True, clip step^0.25)")
    cautious_ref = ("Psi (guarded) on the gradient, then AdamW (torch single-tensor arithmetic) "
                    "with the Cautious mask numel/(sum(mask)+1); tests/golden/frontier/generate.py")
    gen = torch.Generator().manual_seed(31)
    init = [torch.randn(s, generator=gen, dtype=torch.float32) for _, s in SHAPES]

    write("adopt_long.json", "adopt", adopt_ref, "150 steps, five tensors",
          {"lr": 1e-3, "beta1": 0.9, "beta2": 0.9999, "eps": 1e-6, "weight_decay": 0.01},
          SHAPES, init, make_grads(41, 150, 0.3), run_adopt, folder=HERE)
    write("adopt_lerp_high.json", "adopt", adopt_ref,
          "beta1 = 0.3: torch's lerp takes its weight >= 0.5 branch; eps = 1e-3 clamps sqrt(v); "
          "about a fifth of the gradient elements are exactly zero",
          {"lr": 1e-2, "beta1": 0.3, "beta2": 0.99, "eps": 1e-3, "weight_decay": 0.0},
          SHAPES, init, make_grads(43, 60, 0.05, sparse=True), run_adopt, folder=HERE)
    write("cadamw_agr_long.json", "cadamw_agr", cautious_ref,
          "150 steps; w's gradient is all zero every 11th step (Psi(0) = 0)",
          {"lr": 2e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.05},
          SHAPES, init, make_grads(47, 150, 0.2, zero_every=11), run_cadamw_agr, folder=HERE)
    write("cadamw_agr_betas.json", "cadamw_agr", cautious_ref,
          "beta1 = 0.5, beta2 = 0.95, eps = 1e-6",
          {"lr": 1e-3, "beta1": 0.5, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.01},
          SHAPES, init, make_grads(53, 80, 0.5), run_cadamw_agr, folder=HERE)


if __name__ == "__main__":
    main()
