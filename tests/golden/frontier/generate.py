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
- muon_long.json: torch.optim.Muon, 120 steps, lr = 0.02, weight_decay = 0.1,
  momentum = 0.95, nesterov, eps = 1e-7, ns_steps = 5, six 2-D tensors:
  6x4, 3x8 (rows < cols), 16x16, 40x12 (rows > cols: transposed for
  Newton-Schulz, lr scaled by sqrt(40/12)), 1x7 and 9x1 (lr scaled by 3).
- muon_plain.json: nesterov = false (the direction is the momentum buffer),
  momentum = 0.9, ns_steps = 3, lr = 0.01, no weight decay, 60 steps.
- muon_agr_long.json: Muon on Psi(g) (Psi(0) = 0), 120 steps; w's gradient is
  all zero on step 1 (so the momentum buffer and the Newton-Schulz input are
  exactly zero: X / max(||X||, eps) = 0, no NaN) and every 11th step.

References: ADOPT is pytorch_optimizer's own code. Cautious AdamW-AGR follows
the shared golden README: p *= 1 - lr*wd; Adam moments of gr = Psi(g)
(torch.optim.AdamW's single-tensor arithmetic: lerp, addcmul, bias
corrections); u = mhat / (sqrt(vhat) + eps); mask = [u*gr > 0];
mask *= numel / (sum(mask) + 1) per tensor; p -= lr * u * mask.
Muon is torch.optim.Muon itself (single-tensor path, adjust_lr_fn = None:
lr * sqrt(max(1, rows/cols))), with torch.optim._muon._zeropower_via_newtonschulz
replaced, only while Muon runs, by a copy of torch's function that keeps the
input's dtype instead of casting to bfloat16 (so float32 Newton-Schulz in the
float32 run, float64 in the float64 run). The copy is checked against torch's
own on bfloat16 inputs (bit-exact), and the script replays the shared
frontier/muon_basic.json when it is present (beside the repository, or under
$AGR_SHARED_GOLDEN) and checks that the float32 trajectory reproduces it bit for
bit. Muon-AGR sets p.grad = Psi(g) first.

Each case also runs in float64; the tolerance is 10x the float32 run's largest
distance from it (atol) plus rtol = 1e-5, as in the shared golden files.

Usage: python3 tests/golden/frontier/generate.py
(needs torch 2.15.0 and pytorch_optimizer 4.1.0)
"""
import contextlib
import json
import math
from importlib.metadata import version
import os
import sys

import torch
import torch.optim._muon as torch_muon
import pytorch_optimizer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from generate_psi_exact import check_reproduces, psi, write  # noqa: E402
from torch_runs import make_grads, run_torch  # noqa: E402

SHAPES = [("scalar", [1]), ("w", [6, 4]), ("b", [5]), ("conv", [2, 3, 4]), ("big", [33, 17])]
# Muon takes 2-D parameters only: rows < cols, rows > cols, square, 1xN, Nx1.
MUON_SHAPES = [("w", [6, 4]), ("wide", [3, 8]), ("square", [16, 16]), ("tall", [40, 12]),
               ("row", [1, 7]), ("col", [9, 1])]
# The shared golden files (read-only, beside the repository); AGR_SHARED_GOLDEN overrides.
SHARED_GOLDEN = os.environ.get("AGR_SHARED_GOLDEN",
                               os.path.join(HERE, "..", "..", "..", "..", "shared", "golden"))


def run_adopt(init, grads, hyper, dtype):
    return run_torch(
        lambda ps: pytorch_optimizer.ADOPT(ps, lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]),
                                           eps=hyper["eps"], weight_decay=hyper["weight_decay"],
                                           weight_decouple=True, foreach=False),
        init, grads, dtype)


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


def _zeropower_via_newtonschulz_same_dtype(grad, ns_coefficients, ns_steps, eps):
    """torch.optim._muon._zeropower_via_newtonschulz (torch 2.15.0), line for line,
    except that the copy keeps grad's dtype instead of casting to bfloat16."""
    if ns_steps >= 100:
        raise ValueError(
            "Number of steps must be less than 100 for computational efficiency"
        )
    if len(grad.shape) != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = ns_coefficients
    ortho_grad = grad.to(dtype=grad.dtype, copy=True)
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    # Ensure spectral norm is at most 1
    ortho_grad.div_(ortho_grad.norm().clamp(min=eps))
    # Perform the NS iterations
    for _ in range(ns_steps):
        gram_matrix = ortho_grad @ ortho_grad.T
        gram_update = torch.addmm(
            gram_matrix, gram_matrix, gram_matrix, beta=b, alpha=c
        )
        ortho_grad = torch.addmm(ortho_grad, gram_update, ortho_grad, beta=a)

    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    return ortho_grad


def check_ns_copy():
    """On bfloat16 inputs torch's function and the copy must agree bit for bit."""
    coeffs = (torch_muon.DEFAULT_A, torch_muon.DEFAULT_B, torch_muon.DEFAULT_C)
    gen = torch.Generator().manual_seed(5)
    for _, shape in MUON_SHAPES + [("zero", [4, 3])]:
        x = torch.randn(shape, generator=gen).to(torch.bfloat16)
        if shape == [4, 3]:
            x.zero_()
        for steps in (3, 5):
            ref = torch_muon._zeropower_via_newtonschulz(x, coeffs, steps, 1e-7)
            ours = _zeropower_via_newtonschulz_same_dtype(x, coeffs, steps, 1e-7)
            assert ref.dtype == ours.dtype and torch.equal(ref, ours), shape


@contextlib.contextmanager
def muon_ns_same_dtype():
    saved = torch_muon._zeropower_via_newtonschulz
    torch_muon._zeropower_via_newtonschulz = _zeropower_via_newtonschulz_same_dtype
    try:
        yield
    finally:
        torch_muon._zeropower_via_newtonschulz = saved


def _run_muon(init, grads, hyper, dtype, transform):
    with muon_ns_same_dtype():
        return run_torch(
            lambda ps: torch.optim.Muon(ps, lr=hyper["lr"], weight_decay=hyper["weight_decay"],
                                        momentum=hyper["momentum"], nesterov=hyper["nesterov"],
                                        eps=hyper["eps"], ns_steps=hyper["ns_steps"]),
            init, grads, dtype, transform, finite="Muon")


def run_muon(init, grads, hyper, dtype):
    return _run_muon(init, grads, hyper, dtype, lambda g: g)


def run_muon_agr(init, grads, hyper, dtype):
    return _run_muon(init, grads, hyper, dtype, psi)


def check_shared_muon_basic():
    """Replays the shared frontier/muon_basic.json (when present): the float32 run must
    reproduce its recorded parameters bit for bit."""
    check_reproduces(os.path.join(SHARED_GOLDEN, "frontier", "muon_basic.json"), run_muon)


def main():
    adopt_ref = (f"pytorch_optimizer {version('pytorch_optimizer')} ADOPT (per-parameter path, "
                 "weight_decouple=True, clip step^0.25)")
    cautious_ref = ("Psi (guarded) on the gradient, then AdamW (torch single-tensor arithmetic) "
                    "with the Cautious mask numel/(sum(mask)+1); tests/golden/frontier/generate.py")
    gen = torch.Generator().manual_seed(31)
    init = [torch.randn(s, generator=gen, dtype=torch.float32) for _, s in SHAPES]

    write("adopt_long.json", "adopt", adopt_ref, "150 steps, five tensors",
          {"lr": 1e-3, "beta1": 0.9, "beta2": 0.9999, "eps": 1e-6, "weight_decay": 0.01},
          SHAPES, init, make_grads(41, 150, 0.3, SHAPES), run_adopt, folder=HERE)
    write("adopt_lerp_high.json", "adopt", adopt_ref,
          "beta1 = 0.3: torch's lerp takes its weight >= 0.5 branch; eps = 1e-3 clamps sqrt(v); "
          "about a fifth of the gradient elements are exactly zero",
          {"lr": 1e-2, "beta1": 0.3, "beta2": 0.99, "eps": 1e-3, "weight_decay": 0.0},
          SHAPES, init, make_grads(43, 60, 0.05, SHAPES, sparse=True), run_adopt, folder=HERE)
    write("cadamw_agr_long.json", "cadamw_agr", cautious_ref,
          "150 steps; w's gradient is all zero every 11th step (Psi(0) = 0)",
          {"lr": 2e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.05},
          SHAPES, init, make_grads(47, 150, 0.2, SHAPES, zero_every=11), run_cadamw_agr, folder=HERE)
    write("cadamw_agr_betas.json", "cadamw_agr", cautious_ref,
          "beta1 = 0.5, beta2 = 0.95, eps = 1e-6",
          {"lr": 1e-3, "beta1": 0.5, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.01},
          SHAPES, init, make_grads(53, 80, 0.5, SHAPES), run_cadamw_agr, folder=HERE)

    check_ns_copy()
    check_shared_muon_basic()
    muon_ref = ("torch.optim.Muon (single-tensor path) with its Newton-Schulz iteration in "
                "float32 (not bfloat16): torch's _zeropower_via_newtonschulz without the cast")
    muon_agr_ref = ("Psi (guarded) on p.grad, then torch.optim.Muon with float32 Newton-Schulz "
                    "(torch's _zeropower_via_newtonschulz without the bfloat16 cast)")
    gen = torch.Generator().manual_seed(61)
    muon_init = [torch.randn(s, generator=gen, dtype=torch.float32) for _, s in MUON_SHAPES]
    write("muon_long.json", "muon", muon_ref,
          "120 steps; 2-D tensors with rows < cols, rows > cols (transposed for Newton-Schulz), "
          "square, 1x7 and 9x1",
          {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True, "eps": 1e-7,
           "ns_steps": 5},
          MUON_SHAPES, muon_init, make_grads(67, 120, 0.1, MUON_SHAPES), run_muon,
          folder=HERE)
    write("muon_plain.json", "muon", muon_ref,
          "nesterov = false: the direction is the momentum buffer; ns_steps = 3; no weight decay",
          {"lr": 0.01, "weight_decay": 0.0, "momentum": 0.9, "nesterov": False, "eps": 1e-7,
           "ns_steps": 3},
          MUON_SHAPES, muon_init, make_grads(71, 60, 0.1, MUON_SHAPES), run_muon,
          folder=HERE)
    write("muon_agr_long.json", "muon_agr", muon_agr_ref,
          "120 steps; w's gradient is all zero on step 1 (momentum buffer and Newton-Schulz input "
          "exactly zero: X / max(||X||, eps) = 0, the step only decays w) and every 11th step "
          "(Psi(0) = 0)",
          {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True, "eps": 1e-7,
           "ns_steps": 5},
          MUON_SHAPES, muon_init,
          make_grads(73, 120, 0.1, MUON_SHAPES, zero_every=11, zero_first=True),
          run_muon_agr, folder=HERE)


if __name__ == "__main__":
    main()
