"""What the frontier generator scripts share: the gradients they feed a
reference, and the loop that steps a torch optimizer over them."""
import torch


def make_grads(seed, steps, scale, shapes, zero_every=0, zero_first=False, sparse=False,
               zero_row=False):
    """Gradients per step for `shapes` ((name, shape) pairs), float32 normal
    values times `scale`. With `sparse`, about a fifth of the elements are
    zero; the tensor named `w` has its first row zero (`zero_row`), and is all
    zero every `zero_every`-th step and on step 1 (`zero_first`)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(1, steps + 1):
        gs = []
        for name, shape in shapes:
            g = scale * torch.randn(shape, generator=gen, dtype=torch.float32)
            if sparse:
                g = g * (torch.rand(shape, generator=gen) > 0.2).to(torch.float32)
            if name == "w" and zero_row:
                g[0].zero_()
            if name == "w" and ((zero_every and t % zero_every == 0) or (zero_first and t == 1)):
                g = torch.zeros(shape, dtype=torch.float32)
            gs.append(g)
        out.append(gs)
    return out


def run_torch(make_opt, init, grads, dtype, transform=lambda g: g, finite=None):
    """The parameters after each step of the torch optimizer `make_opt(params)`,
    each gradient passed through `transform` first. With `finite` (the
    optimizer's name), every parameter must stay finite."""
    ps = [torch.nn.Parameter(x.clone().to(dtype)) for x in init]
    opt = make_opt(ps)
    traj = []
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = transform(g.to(dtype).clone())
        opt.step()
        traj.append([p.detach().clone() for p in ps])
    if finite:
        for step in traj:
            for p in step:
                assert torch.isfinite(p).all(), f"{finite} produced a non-finite value"
    return traj
