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
