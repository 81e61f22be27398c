#!/usr/bin/env python3
"""Long reference trajectories for Ψ where it must be exactly 0.

Writes, next to this script, golden files (format `agr-golden/1`, see the
shared golden README) that replay through agr's built-ins:

- adamw_agr_scalar_long.json: one one-element tensor, AdamW-AGR, weight decay 0,
  300 steps. The published code's Ψ of a one-element tensor is g - g*(|g|/|g|)
  = 0 exactly, so the parameter never moves: every step equals the initial value.
- adamw_agr_mixed_long.json: tensors of 1, 1x1, 6 (one non-zero gradient element
  per step), 4x3, 16x8 and 33 elements, 250 steps, with one tensor's gradient
  all zero on some steps.
- adan_agr_clip_long.json: the same tensors through Adan-AGR with the global
  gradient clip active on some steps, 220 steps.
- lion_agr_mixed_long.json: the same tensors through Lion-AGR, 200 steps (sign()
  turns any residue of Ψ into a full step of lr).

References: the AGR authors' published code computes, per tensor,
`coefficient = |g| / sum(|g|)` and `g - g * coefficient` in the tensor's dtype,
then runs the optimizer. AdamW: torch.optim.AdamW (foreach=False, the
single-tensor path). Adan: the Adan authors' single-tensor path as the AGR
authors' Adan_AGR.py runs it (Ψ of the raw gradient, then scaled by the global
clip factor computed from the raw gradients). Lion: lion-pytorch's update.
Ψ(0) = 0 where the published code would divide 0 by 0 (agr's definition).

Each case also runs in float64; the tolerance is 10x the float32 run's largest
distance from it (atol) plus rtol = 1e-5, as in the shared golden files.

Usage: python3 tests/golden/generate_psi_exact.py   (needs torch; 2.15.0 used)
"""
import json
import math
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = [("temperature", [1]), ("gate", [1, 1]), ("sparse", [6]),
          ("w0", [4, 3]), ("w1", [16, 8]), ("b1", [33])]


def psi(g):
    """The published Ψ, with Ψ(0) = 0."""
    s = torch.abs(g).sum(dim=tuple(range(g.dim())), keepdim=True)
    if float(s.reshape(-1)[0]) == 0.0:
        return g.clone()
    return g - torch.mul(g, torch.abs(g) / s)


def make_grads(seed, steps, scale, zero_every=0):
    """Gradients per step for SHAPES (float32 values)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(1, steps + 1):
        gs = []
        for k, (name, shape) in enumerate(SHAPES):
            g = scale * torch.randn(shape, generator=gen, dtype=torch.float32)
            if name == "sparse":
                keep = int(torch.randint(0, 6, (1,), generator=gen))
                mask = torch.zeros(shape, dtype=torch.float32)
                mask[keep] = 1.0
                g = g * mask
            if zero_every and name == "w0" and t % zero_every == 0:
                g = torch.zeros(shape, dtype=torch.float32)
            gs.append(g)
        out.append(gs)
    return out


def run_adamw_agr(init, grads, hyper, dtype):
    ps = [torch.nn.Parameter(x.clone().to(dtype)) for x in init]
    opt = torch.optim.AdamW(ps, lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]),
                            eps=hyper["eps"], weight_decay=hyper["weight_decay"],
                            foreach=False)
    traj = []
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = psi(g.to(dtype))
        opt.step()
        traj.append([p.detach().clone() for p in ps])
    return traj


def run_adan_agr(init, grads, hyper, dtype):
    b1, b2, b3 = hyper["beta1"], hyper["beta2"], hyper["beta3"]
    lr, wd, eps = hyper["lr"], hyper["weight_decay"], hyper["eps"]
    ps = [x.clone().to(dtype) for x in init]
    m = [torch.zeros_like(p) for p in ps]
    d = [torch.zeros_like(p) for p in ps]
    n = [torch.zeros_like(p) for p in ps]
    neg_prev = [None for _ in ps]
    traj = []
    for t, gs in enumerate(grads, start=1):
        raw = [g.to(dtype) for g in gs]
        if hyper["max_grad_norm"] > 0:
            total = torch.zeros(1, dtype=dtype)
            for g in raw:
                total.add_(g.pow(2).sum())
            norm = torch.sqrt(total)
            clip = torch.clamp(torch.tensor(hyper["max_grad_norm"], dtype=dtype) / (norm + eps),
                               max=1.0).item()
        else:
            clip = 1.0
        bc1, bc2, bc3 = 1.0 - b1 ** t, 1.0 - b2 ** t, 1.0 - b3 ** t
        for i, p in enumerate(ps):
            grad = psi(raw[i])
            if t == 1:
                neg_prev[i] = grad.clone().mul_(-clip)
            grad.mul_(clip)
            diff = neg_prev[i]
            diff.add_(grad)
            m[i].mul_(b1).add_(grad, alpha=1 - b1)
            d[i].mul_(b2).add_(diff, alpha=1 - b2)
            diff.mul_(b2).add_(grad)
            n[i].mul_(b3).addcmul_(diff, diff, value=1 - b3)
            denom = (n[i].sqrt() / math.sqrt(bc3)).add_(eps)
            p.addcdiv_(m[i], denom, value=-(lr / bc1))
            p.addcdiv_(d[i], denom, value=-(lr * b2 / bc2))
            p.div_(1 + lr * wd)
            diff.zero_().add_(grad, alpha=-1.0)
        traj.append([p.clone() for p in ps])
    return traj


def run_lion_agr(init, grads, hyper, dtype):
    lr, b1, b2, wd = hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["weight_decay"]
    ps = [x.clone().to(dtype) for x in init]
    m = [torch.zeros_like(p) for p in ps]
    traj = []
    for gs in grads:
        for i, p in enumerate(ps):
            g = psi(gs[i].to(dtype))
            p.mul_(1 - lr * wd)
            update = m[i].clone().mul_(b1).add(g, alpha=1 - b1).sign_()
            p.add_(update, alpha=-lr)
            m[i].mul_(b2).add_(g, alpha=1 - b2)
        traj.append([p.clone() for p in ps])
    return traj


def write(name, optimizer, reference, note, hyper, shapes, init, grads, run, folder=HERE):
    t32 = run(init, grads, hyper, torch.float32)
    t64 = run(init, grads, hyper, torch.float64)
    drift = max(float((a.double() - b).abs().max()) for s32, s64 in zip(t32, t64)
                for a, b in zip(s32, s64))
    doc = {
        "format": "agr-golden/1",
        "optimizer": optimizer,
        "reference": reference + f"; torch {torch.__version__}, float32",
        "note": note,
        "hyper": hyper,
        "params": [{"name": n, "shape": s, "init": x.reshape(-1).tolist()}
                   for (n, s), x in zip(shapes, init)],
        "steps": [{"grads": [g.reshape(-1).tolist() for g in gs],
                   "params": [p.reshape(-1).tolist() for p in ps]}
                  for gs, ps in zip(grads, t32)],
        "tolerance": {"atol": 10 * drift, "rtol": 1e-5, "f32_vs_f64_max_abs": drift},
    }
    with open(os.path.join(folder, name), "w") as f:
        json.dump(doc, f)
        f.write("\n")
    print(f"{name}: {len(grads)} steps, f32 vs f64 drift {drift:.3e}")


def check_reproduces(path, run):
    """Replays a golden file through `run` in float32 (when the file is present)
    and checks that every recorded parameter is reproduced bit for bit."""
    path = os.path.normpath(path)
    name = os.path.basename(path)
    if not os.path.exists(path):
        print(f"{path} not found; skipped the {name} replay")
        return
    with open(path) as f:
        doc = json.load(f)
    shapes = [p["shape"] for p in doc["params"]]
    init = [torch.tensor(p["init"], dtype=torch.float32).reshape(p["shape"]) for p in doc["params"]]
    grads = [[torch.tensor(g, dtype=torch.float32).reshape(s) for g, s in zip(st["grads"], shapes)]
             for st in doc["steps"]]
    traj = run(init, grads, doc["hyper"], torch.float32)
    worst = 0.0
    for st, ps in zip(doc["steps"], traj):
        for rec, p in zip(st["params"], ps):
            worst = max(worst, float((torch.tensor(rec, dtype=torch.float64)
                                      - p.reshape(-1).double()).abs().max()))
    assert worst == 0.0, f"{name} not reproduced: max abs difference {worst:.3e}"
    print(f"{name} ({len(traj)} steps) reproduced bit for bit")


def main():
    torch.manual_seed(0)
    adamw = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    published_adamw = ("the AGR authors' AdamW_AGR.py: coefficient = |g|/sum(|g|), "
                       "p.grad = g - g*coefficient, then torch.optim.AdamW(foreach=False)")

    # One one-element tensor, no weight decay: must never move.
    gen = torch.Generator().manual_seed(135)
    init = [torch.tensor([0.731], dtype=torch.float32)]
    grads = [[0.2 * torch.randn([1], generator=gen, dtype=torch.float32)] for _ in range(300)]
    write("adamw_agr_scalar_long.json", "adamw_agr", published_adamw,
          "a one-element tensor: Psi(g) = 0 exactly, so the parameter stays at its initial value",
          dict(adamw, weight_decay=0.0), [("temperature", [1])], init, grads, run_adamw_agr)

    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(s, generator=gen, dtype=torch.float32) for _, s in SHAPES]
    write("adamw_agr_mixed_long.json", "adamw_agr", published_adamw,
          "one-element tensors (Psi = 0), a tensor with one non-zero gradient element per step "
          "(Psi = 0 there), and w0's gradient all zero every 17th step (Psi(0) = 0)",
          dict(adamw, weight_decay=0.01), SHAPES, init,
          make_grads(11, 250, 0.2, zero_every=17), run_adamw_agr)

    write("adan_agr_clip_long.json", "adan_agr",
          "the Adan authors' single-tensor Adan as the AGR authors' Adan_AGR.py runs it: "
          "Psi of the raw gradient, scaled by the global clip factor of the raw gradients",
          "max_grad_norm = 1.5: the clip is active on some steps (gradient scale 0.15); "
          "the same tensors as adamw_agr_mixed_long",
          {"lr": 2e-3, "beta1": 0.98, "beta2": 0.92, "beta3": 0.99, "eps": 1e-8,
           "weight_decay": 0.02, "max_grad_norm": 1.5, "no_prox": False},
          SHAPES, init, make_grads(23, 220, 0.15, zero_every=13), run_adan_agr)

    write("lion_agr_mixed_long.json", "lion_agr",
          "Psi applied to each gradient, then lion-pytorch's update "
          "(p *= 1 - lr*wd; p -= lr*sign(b1*m + (1-b1)*g); m = b2*m + (1-b2)*g)",
          "sign() turns any residue of Psi on the one-element tensors into a full step of lr",
          {"lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1},
          SHAPES, init, make_grads(31, 200, 0.2, zero_every=19), run_lion_agr)


if __name__ == "__main__":
    main()
