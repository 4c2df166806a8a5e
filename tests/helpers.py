"""Comparison helpers shared by the tests."""
import torch


def assert_close(got, expected, atol, rtol, name=""):
    """torch.testing.assert_close that also prints the worst mismatches."""
    got_c, exp_c = got.detach().double().cpu(), expected.detach().double().cpu()
    err = (got_c - exp_c).abs() - (atol + rtol * exp_c.abs())
    if err.numel() and bool((err > 0).any()) or got_c.isnan().ne(exp_c.isnan()).any():
        worst = err.flatten().topk(min(5, err.numel())).indices
        lines = [f"  index {tuple(int(i) for i in torch.unravel_index(w, err.shape))}: "
                 f"got {got_c.flatten()[w].item():.8g}, expected {exp_c.flatten()[w].item():.8g}"
                 for w in worst]
        raise AssertionError(f"{name}: {int((err > 0).sum())} of {err.numel()} values differ "
                             f"(atol={atol}, rtol={rtol}); worst:\n" + "\n".join(lines))


def dyadic(*shape, scale=16, spread=2.0, generator=None, dtype=torch.float32):
    """Random values that are multiples of 1/scale: sums of a few of them are
    exact in float32 (and in fp16/bf16 for small magnitudes), so fused kernels
    and the reference cannot disagree on a spike by rounding."""
    x = torch.randn(*shape, generator=generator) * spread
    return (torch.round(x * scale) / scale).to(dtype)


def ran_ops(fn):
    """Names of the spikingir ops that ran during ``fn()`` (proof of the backend)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("spikingir::")}


def randomise_bn(model, seed=0):
    """``model`` with random (seeded) running statistics and affine parameters in
    every BatchNorm2d, so that folding BN is not the identity; returned."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.1)
    return model


def dyadic_network_(convs, neurons):
    """Weights and biases of ``convs`` on a 1/16 grid, the ``neurons``' thresholds
    powers of two and MPRN's beta = theta / 2, in place: with dyadic inputs every
    potential is exact, so sums in another order (spike_conv2d, split convs,
    chunks) cannot flip a spike."""
    with torch.no_grad():
        for conv in convs:
            conv.weight.copy_((conv.weight * 16).round() / 16)
            if conv.bias is not None:
                conv.bias.copy_((conv.bias * 16).round() / 16)
        for n in neurons:
            n.theta.copy_(2.0 ** torch.round(torch.log2(n.theta)))
            if hasattr(n, "beta"):
                n.beta.copy_(n.theta * 0.5)


def chunked_backward(snn, x, chunks=(None, 1, 3)):
    """For each ``step_chunk`` in ``chunks``: the output, the energy estimate and
    every parameter's gradient of ``(snn(x) ** 2).sum() + snn.energy_ratio``
    (``snn`` tracks energy), as (output, float, {name: grad}) triples."""
    got = []
    for n in chunks:
        snn.step_chunk = n
        snn.zero_grad()
        y = snn(x)
        (y.square().sum() + snn.energy_ratio).backward()
        got.append((y.detach(), float(snn.energy_ratio.detach()),
                    {k: p.grad.clone() for k, p in snn.named_parameters()}))
    return got
