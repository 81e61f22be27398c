"""Times PyTorch optimizer steps for `agr bench --against torch`, one step
per request, so the Rust side can alternate them with agr's steps.

Reads JSON lines on stdin, answers one JSON line each:
- {"cmd": "setup", "shapes": [[..], ..], "dtype": "f32"|"bf16",
   "optimizer": "adamw"|"adamw_agr", "threads": N}
  makes the workload agr's benchmark steps (values 0.5, gradients
  ((i % 13) - 6) * 1e-3, lr 1e-4, torch's other defaults: weight decay 0.01)
  and `torch.optim.AdamW(fused=True)`; `adamw_agr` also replaces each
  gradient by the published AGR line `g - g * |g| / sum(|g|)` (a new tensor
  per step, as the authors' code makes it) before the fused step.
  -> {"ok": true, "torch": version}
- {"cmd": "step"} -> {"ms": one step's wall time}
"""
import json
import sys
import time

import torch

params, grads, opt, agr = [], [], None, False


def psi(g):
    s = torch.abs(g).sum()
    return g - torch.mul(g, torch.abs(g) / s)


for line in sys.stdin:
    msg = json.loads(line)
    if msg["cmd"] == "setup":
        torch.set_num_threads(int(msg.get("threads", 2)))
        dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[msg.get("dtype", "f32")]
        params, grads = [], []
        for shape in msg["shapes"]:
            n = 1
            for d in shape:
                n *= d
            p = torch.nn.Parameter(torch.full(shape, 0.5, dtype=dtype))
            g = ((torch.arange(n) % 13).to(torch.float32) - 6.0) * 1e-3
            g = g.reshape(shape).to(dtype)
            p.grad = g.clone()
            params.append(p)
            grads.append(g)
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        agr = msg["optimizer"] == "adamw_agr"
        print(json.dumps({"ok": True, "torch": torch.__version__}), flush=True)
    elif msg["cmd"] == "step":
        start = time.perf_counter()
        if agr:
            for p, g in zip(params, grads):
                p.grad = psi(g)
        opt.step()
        ms = (time.perf_counter() - start) * 1e3
        print(json.dumps({"ms": ms}), flush=True)
    else:
        print(json.dumps({"error": f"unknown command {msg['cmd']}"}), flush=True)
