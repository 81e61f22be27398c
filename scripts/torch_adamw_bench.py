"""PyTorch's fused AdamW on the GPU benchmark's workloads, for comparison
with `agr-runtime/examples/gpu_bench.rs` (run by scripts/gpu-check.sh run).
Prints `bench torch_fused_adamw <workload> median_ms=<x>` lines."""
import statistics
import sys

try:
    import torch
except ImportError:
    print("skipped: torch is not installed")
    sys.exit(0)

if not torch.cuda.is_available():
    print("skipped: no GPU for torch")
    sys.exit(0)


def workloads():
    gpt = [(3072, 768)]
    for _ in range(2):
        gpt += [(768, 768)] * 4 + [(768, 3072), (3072, 768)]
    gpt += [(3072,)] * 68 + [(768,)] * 69
    return [("one_2^24", [(1 << 24,)]), ("gpt_150", gpt)]


for name, shapes in workloads():
    params = [torch.full(s, 0.5, device="cuda", requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    times = []
    for i in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        opt.step()
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    print(f"bench torch_fused_adamw {name} median_ms={statistics.median(times):.3f}")
