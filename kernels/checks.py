"""Input checks of the Triton launchers: the contracts the compiled ops check in
C++ (csrc/neuron.h, csrc/spike_conv.h, csrc/cpu/*.cpp), so that a direct call of a
``torch.ops.spikingir.*_triton`` op with mismatched tensors raises a
RuntimeError instead of reading or writing out of bounds. The public wrappers
(``spikingir.ops``) check their arguments before any op; these checks are about
shapes, dtypes and layouts only (no values: no GPU synchronisation)."""
import torch

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
F32 = (torch.float32,)
#: Programs a CUDA launch takes along grid axes 1 and 2 (axis 0: 2^31 - 1).
MAX_GRID_YZ = 65535


def require(cond, op, message):
    if not cond:
        raise RuntimeError(f"spikingir::{op}: {message}")


def tensor(op, name, t, dtypes, like, shape=None, numel=None, dim=None):
    """``t`` is a contiguous tensor of one of ``dtypes`` on ``like``'s device, of
    ``shape`` / ``numel`` / ``dim`` when given."""
    ok = (isinstance(t, torch.Tensor) and t.dtype in dtypes and t.device == like.device
          and t.is_contiguous() and (shape is None or tuple(t.shape) == tuple(shape))
          and (numel is None or t.numel() == numel) and (dim is None or t.dim() == dim))
    if not ok:
        want = " ".join(filter(None, (
            "contiguous", "/".join(str(d).replace("torch.", "") for d in dtypes),
            f"shape {tuple(shape)}" if shape is not None else "",
            f"with {numel} elements" if numel is not None else "",
            f"{dim}-d" if dim is not None else "", f"on {like.device}")))
        got = (f"{t.dtype} {tuple(t.shape)} on {t.device}"
               f"{'' if t.is_contiguous() else ' (not contiguous)'}"
               if isinstance(t, torch.Tensor) else type(t).__name__)
        require(False, op, f"{name} must be {want}, got {got}")


def neuron_params(op, x, theta, beta, alpha, inner, surrogate, reuse_step):
    """x [T, M] (T >= 1, T >= 2 with the reuse step), theta / beta / alpha float32
    [C], C >= 1, M a multiple of C x inner. Returns (T, M, C)."""
    tensor(op, "x", x, FLOATS, x)
    require(x.dim() >= 1 and x.shape[0] >= 1 + bool(reuse_step), op,
            f"x must be [T, ...] with T >= {1 + bool(reuse_step)}, got {tuple(x.shape)}")
    for name, t in (("theta", theta), ("beta", beta), ("alpha", alpha)):
        tensor(op, name, t, F32, x, dim=1)
    T, C = x.shape[0], theta.numel()
    M = x.numel() // T
    require(C >= 1 and beta.numel() == C and alpha.numel() == C, op,
            f"theta, beta and alpha must have one length C >= 1, got {theta.numel()}, "
            f"{beta.numel()}, {alpha.numel()}")
    require(inner >= 1 and M % (C * inner) == 0, op,
            f"the size of one step, {M}, must be a multiple of C x inner = {C} x {inner}")
    # imported here: spikingir.ops imports the kernels when it registers the ops
    from spikingir.ops.surrogate import SURROGATES
    require(int(surrogate) in SURROGATES.values(), op, f"unknown surrogate id {surrogate}")
    return T, M, C


def conv_geometry(op, N, H, W, weight, cin, bias, stride, padding, like):
    """weight float32 [Cout, cin, kh, kw] on ``like``'s device (the spikes'), bias
    None or float32 [Cout], stride 1 or 2, 0 <= padding, the kernel within the
    padded input. Returns (Ho, Wo)."""
    tensor(op, "weight", weight, F32, like, dim=4)
    require(weight.shape[1] == cin, op,
            f"weight has {weight.shape[1]} input channels, the spikes {cin}")
    if bias is not None:
        tensor(op, "bias", bias, F32, weight, numel=weight.shape[0])
    kh, kw = weight.shape[2:]
    require(stride in (1, 2) and 0 <= padding <= 1 << 30, op,
            f"stride must be 1 or 2 and padding in [0, 2^30], got {stride}, {padding}")
    require(H + 2 * padding >= kh and W + 2 * padding >= kw, op,
            f"kernel {kh}x{kw} larger than the padded input {H + 2 * padding}x{W + 2 * padding}")
    return (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1


def masks(op, bits, channels, like):
    """Channel bit masks int64 [N, H, W, ceil(channels / 64)]."""
    require(isinstance(channels, int) and channels >= 0, op,
            f"channels must be an int >= 0, got {channels!r}")
    tensor(op, "masks", bits, (torch.int64,), like, dim=4)
    require(bits.shape[3] == (channels + 63) // 64, op,
            f"masks hold {bits.shape[3]} words per pixel, {channels} channels need "
            f"{(channels + 63) // 64}")
