"""References for agr's precision modes (see agr-runtime/src/precision.rs).

    python tests/golden/precision/generate_precision.py   # writes the JSON files beside it

Each file is an `agr-golden/1` trajectory with a `precision` field saying how
the reference stored its parameters and states; parameter values and
gradients are exactly representable in that storage.

- adamw_bf16_fused.json, adamw_bf16_foreach.json: torch 2.15's
  `torch.optim.AdamW` on bf16 parameters, `fused=True` and `foreach=True`
  (CPU). torch keeps the moments in the parameters' dtype, so both are bf16,
  and there is no master copy: agr's `bf16` parameters and `bf16` states,
  rounded to nearest. The fused path computes in f32 (with FMA and lerp) and
  rounds each stored value once; the foreach path rounds every intermediate
  op to bf16, so it sits further from any f32-arithmetic implementation.
- adamw_bf16_master.json: the usual mixed-precision setup, computed
  independently: torch's f32 `AdamW` (`foreach=False`) steps an f32 master
  copy with the bf16 model's gradients widened to f32; the parameters
  recorded are the master copy rounded to bf16 (nearest even). lr is small
  enough that most updates are below half a bf16 ulp, so stepping the bf16
  parameters without a master copy cannot follow it.
- adamw_q8.json: 8-bit block-quantised moments, an independent numpy
  reference of the quantiser with its exact rounding (torchao's: blocks of
  256, scale = max(absmax, 1e-12), nearest entry of the dynamic-tree map by
  torchao's search and tie rule; `m` signed map, `v` unsigned). The AdamW
  arithmetic is agr's `adamw` spec in f32 operation by operation (scalars
  formed in f64, then f32), the update using the moments before they are
  quantised (as torchao does), parameters f32.
"""
import json
import os

import numpy as np
import torch

from generate_qmap import create_dynamic_map

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = [("w", [8, 40]), ("b", [300]), ("s", [3]), ("c", [2, 3, 5])]


def grads(seed, steps, dtype):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        out.append([(0.1 * torch.randn(s, generator=gen)).to(dtype) for _, s in SHAPES])
    return out


def inits(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype) for _, s in SHAPES]


def flat(t):
    return [float(x) for x in t.detach().to(torch.float32).reshape(-1).tolist()]


def write(name, optimizer, reference, note, hyper, init, gs, traj, tol, precision):
    doc = {
        "format": "agr-golden/1",
        "optimizer": optimizer,
        "reference": reference,
        "note": note,
        "hyper": hyper,
        "precision": precision,
        "params": [
            {"name": n, "shape": s, "init": flat(x)} for (n, s), x in zip(SHAPES, init)
        ],
        "steps": [
            {"grads": [flat(g) for g in step_g], "params": [flat(p) for p in step_p]}
            for step_g, step_p in zip(gs, traj)
        ],
        "tolerance": tol,
    }
    with open(os.path.join(HERE, name), "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(name, len(traj), "steps")


def torch_traj(init, gs, make):
    ps = [torch.nn.Parameter(x.clone()) for x in init]
    opt = make(ps)
    traj = []
    for step_g in gs:
        for p, g in zip(ps, step_g):
            p.grad = g.clone()
        opt.step()
        traj.append([p.detach().clone() for p in ps])
    return traj


HYPER = {"lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
BF16_STATES = {"params": "bf16", "master": False, "states": {"m": "bf16", "v": "bf16"}}
# One bf16 ulp is 2^-7 of the value at most: the master copy's rounding may
# differ by one ulp where the f32 values differ in their last bit.
ONE_ULP = {"atol": 1e-6, "rtol": 2.0**-7}
# torch's fused kernel uses FMA and lerp where agr multiplies and adds: a value
# near a rounding boundary can round the other way, and the moments carry it.
TWO_ULPS = {"atol": 1e-6, "rtol": 2.0**-6}
# foreach rounds every op to bf16 (`v.mul_(0.999)` rounds back to v, for one):
# a different algorithm from any f32-arithmetic step. Kept as a reference for
# the distance, with a tolerance that only catches gross errors.
FOREACH = {"atol": 0.1, "rtol": 2.0**-6}


def bf16_torch(fused):
    steps = 40
    init = inits(1, torch.bfloat16)
    gs = grads(2, steps, torch.bfloat16)
    kw = {"fused": True} if fused else {"foreach": True}
    make = lambda ps: torch.optim.AdamW(  # noqa: E731
        ps, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
        weight_decay=HYPER["weight_decay"], **kw)
    traj = torch_traj(init, gs, make)
    path = "fused=True" if fused else "foreach=True"
    write(
        f"adamw_bf16_{'fused' if fused else 'foreach'}.json", "adamw",
        f"torch.optim.AdamW ({path}) on bfloat16 parameters (moments bfloat16, torch's default), torch {torch.__version__}, CPU",
        "no master copy; parameters and moments stored in bf16, rounded to nearest",
        HYPER, init, gs, traj, TWO_ULPS if fused else FOREACH, BF16_STATES)


def bf16_master():
    steps = 60
    hyper = dict(HYPER, lr=1e-3)
    init = inits(3, torch.bfloat16)
    gs = grads(4, steps, torch.bfloat16)
    master = [torch.nn.Parameter(x.to(torch.float32)) for x in init]
    opt = torch.optim.AdamW(master, lr=hyper["lr"], betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.01, foreach=False)
    traj = []
    for step_g in gs:
        for p, g in zip(master, step_g):
            p.grad = g.to(torch.float32)
        opt.step()
        traj.append([p.detach().to(torch.bfloat16) for p in master])
    write("adamw_bf16_master.json", "adamw",
          f"torch.optim.AdamW (foreach=False), torch {torch.__version__}, on an f32 master copy of bfloat16 parameters; recorded: the master rounded to bfloat16",
          "f32 master copy of bf16 parameters, f32 moments",
          hyper, init, gs, traj, ONE_ULP, {"params": "bf16", "master": True, "states": {}})


def q8_quantise(x, qmap):
    """Blocks of 256 along the flattened tensor: dequantised values."""
    out = np.empty_like(x)
    for b in range(0, x.size, 256):
        v = x[b:b + 256]
        scale = np.maximum(np.max(np.abs(v)), np.float32(1e-12)).astype(np.float32)
        n = (v / scale).astype(np.float32)
        codes = np.where(n >= qmap[128], 128, 0)
        for step in (64, 32, 16, 8, 4, 2, 1):
            codes = codes + np.where(n >= qmap[codes + step], step, 0)
        up = np.minimum(codes + 1, 255)
        lo, hi = qmap[codes], qmap[up]
        codes = np.where((n - lo) >= (hi - lo) * np.float32(0.5), up, codes)
        out[b:b + 256] = qmap[codes] * scale
    return out


def adamw_q8():
    steps = 40
    h = HYPER
    signed = create_dynamic_map(True).numpy()
    unsigned = create_dynamic_map(False).numpy()
    init = inits(5, torch.float32)
    gs = grads(6, steps, torch.float32)
    f = np.float32
    ps = [x.numpy().reshape(-1).astype(np.float32).copy() for x in init]
    ms = [np.zeros_like(p) for p in ps]
    vs = [np.zeros_like(p) for p in ps]
    traj = []
    for t, step_g in enumerate(gs, start=1):
        s10 = f(1.0 - h["lr"] * h["weight_decay"])
        s14, s19 = f(1.0 - h["beta1"]), f(1.0 - h["beta2"])
        ts25 = f(h["lr"] / (1.0 - h["beta1"] ** t))
        ts30 = f(np.sqrt(1.0 - h["beta2"] ** t))
        b1, b2, eps = f(h["beta1"]), f(h["beta2"]), f(h["eps"])
        out = []
        for i, g in enumerate(step_g):
            g = g.numpy().reshape(-1).astype(np.float32)
            p = ps[i] * s10
            m = b1 * ms[i] + s14 * g
            v = b2 * vs[i] + s19 * g * g
            p = p - (ts25 * m) / (np.sqrt(v) / ts30 + eps)
            ps[i] = p.astype(np.float32)
            ms[i] = q8_quantise(m.astype(np.float32), signed)
            vs[i] = q8_quantise(np.maximum(v.astype(np.float32), f(0)), unsigned)
            out.append(torch.from_numpy(ps[i].copy()))
        traj.append(out)
    write("adamw_q8.json", "adamw",
          "numpy float32: agr's adamw spec operation by operation, moments stored as torchao's 8-bit blocks (dynamic-tree maps, 256 values per scale)",
          "m q8 (signed map), v uq8 (unsigned map); parameters f32; the update reads the moments before they are quantised",
          h, init, gs, traj, {"atol": 1e-6, "rtol": 1e-5},
          {"params": "f32", "master": False, "states": {"m": "q8", "v": "uq8"}})


if __name__ == "__main__":
    torch.manual_seed(0)
    bf16_torch(True)
    bf16_torch(False)
    bf16_master()
    adamw_q8()
