"""Multi-step spiking neuron modules: thin shells over spikingir.ops."""
import math
import numbers

import torch
from torch import nn

from spikingir import ops
from spikingir.ops.backends import BACKENDS
from spikingir.ops.neuron import check_flags, check_options, check_reuse_alpha, check_values


def _in_backward():
    """True while autograd runs a backward (torch.utils.checkpoint recomputes its
    block there). The id is torch's private hook, which checkpoint itself uses; a
    torch without it is taken as "not in backward"."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class _MultiStepNeuron(nn.Module):
    """Shared parameter handling of IFNeuron / MPRNeuron.

    Args:
        theta: initial threshold (float).
        num_channels: None for one scalar threshold, or C for per-channel
            thresholds on inputs ``[T, B, C, ...]``.
        trainable: thresholds (and beta) are ``nn.Parameter`` (else buffers).
        v_init: initial potential, ``"zero"`` or ``"half"`` (theta / 2).
        surrogate, alpha, detach_reset, scale_output, save_dtype, backend:
            passed to the op (see :func:`spikingir.ops.if_multistep`). ``alpha``
            (a float or a per-channel tensor) is configuration, like
            ``surrogate``: it follows ``.to()`` but is not in the state dict.
        scale_free_surrogate: use ``alpha / theta`` as the surrogate
            sharpness, so the surrogate is a function of (h - theta) / theta
            (DESIGN.md section 3: converted layers have thresholds 0.1 .. 10).
        stateful: start each call from the previous call's ``v_final`` until
            :meth:`reset` (SpikingJelly semantics); default: every call starts
            from ``v_init``. A stateful neuron cannot be recomputed by
            ``torch.utils.checkpoint`` (an error; stateless ones can).

    After each forward, ``self.v_final`` holds the final membrane potential
    (float32, float64 for float64 input; shaped like one step, still in the
    autograd graph), which
    membrane-potential recycling needs. It is the last call's, whichever thread
    made it: code that shares a neuron between threads passes ``v_final_out``
    (a list) to ``forward`` and reads its own call's there.

    Training keeps thresholds positive: the neuron uses
    ``max(theta, theta_floor)`` with ``theta_floor`` = 1% of the initial
    threshold (a buffer), so an optimiser step cannot push a small per-channel
    threshold to zero or below (the op rejects that).
    """

    def __init__(self, theta=1.0, num_channels=None, trainable=True, v_init="zero",
                 surrogate="sigmoid", alpha=4.0, scale_free_surrogate=False, detach_reset=False,
                 scale_output=True, save_dtype=torch.float32, backend="auto", stateful=False):
        super().__init__()
        if v_init not in ("zero", "half"):
            raise ValueError(f"v_init: expected 'zero' or 'half', got {v_init!r}")
        # what the op would refuse at the first forward, refused here (and again there:
        # the attributes may change in between)
        check_options(surrogate, save_dtype, detach_reset, scale_output)
        check_flags(trainable=trainable, scale_free_surrogate=scale_free_surrogate,
                    stateful=stateful)
        if backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend: expected one of {('auto',) + BACKENDS}, got {backend!r}")
        if num_channels is not None and (isinstance(num_channels, bool) or not isinstance(
                num_channels, numbers.Integral) or num_channels < 1):
            raise ValueError(f"num_channels: expected None or an int >= 1, got {num_channels!r}")
        if num_channels is None and isinstance(theta, torch.Tensor) and theta.numel() > 1:
            num_channels = theta.numel()  # a per-channel tensor of thresholds
        self.num_channels = num_channels
        self.trainable = trainable
        self._add_param("theta", theta)
        check_values("theta", self.theta, positive=True)
        self.register_buffer("theta_floor", 0.01 * self.theta.detach().clone())
        self.v_init = v_init
        self.surrogate = surrogate
        self.alpha = alpha
        self.scale_free_surrogate = scale_free_surrogate
        self.detach_reset = detach_reset
        self.scale_output = scale_output
        self.save_dtype = save_dtype
        self.backend = backend
        self.stateful = stateful
        self.v_final = None

    def _add_param(self, name, value):
        shape = () if self.num_channels is None else (self.num_channels,)
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 and tuple(value.shape) != shape:
                raise ValueError(f"{name}: expected a float, a one-element tensor or a tensor "
                                 f"of shape {shape} (num_channels={self.num_channels}), got "
                                 f"shape {tuple(value.shape)}")
            t = value.detach().clone().float().reshape(()).expand(shape).clone() \
                if value.numel() == 1 else value.detach().clone().float()
        else:
            t = torch.full(shape, float(value))
        if self.trainable:
            self.register_parameter(name, nn.Parameter(t))
        else:
            self.register_buffer(name, t)

    def reset(self):
        """Forget the membrane state kept from the last call."""
        self.v_final = None

    def detach_state(self):
        """Keep the membrane state but cut it from the autograd graph: truncated
        BPTT over the chunks a stateful neuron is fed (a second ``backward``
        through the previous chunk's graph would fail). Returns ``self``."""
        if self.v_final is not None:
            self.v_final = self.v_final.detach()
        return self

    def _apply(self, fn, *args, **kwargs):
        # A per-channel tensor alpha is a plain attribute (it may also be a float),
        # so it is moved here with the parameters (.to("cuda"), .double(), ...).
        # fn gives the device and dtype, a conversion the values: fn may be
        # to_empty's empty_like (on this neuron or on a module holding it), which
        # leaves parameters for a load_state_dict to fill, but alpha is not in the
        # state dict. A meta alpha has no values to keep.
        super()._apply(fn, *args, **kwargs)
        if isinstance(self.alpha, torch.Tensor):
            moved = fn(self.alpha)
            self.alpha = moved if self.alpha.is_meta else \
                self.alpha.to(device=moved.device, dtype=moved.dtype)
        return self

    def __getstate__(self):
        # v_final is still in the last forward's autograd graph: copy.deepcopy (and
        # pickle) of a non-leaf tensor fails, and a copy has no use for that graph.
        state = super().__getstate__()
        if isinstance(state.get("v_final"), torch.Tensor):
            state = dict(state, v_final=state["v_final"].detach())
        return state

    def effective_theta(self):
        """The threshold the neuron uses: ``max(theta, theta_floor)``."""
        return torch.maximum(self.theta, self.theta_floor)

    def _step_params(self, x_seq, v0=None):
        """(v0, alpha) for one call on ``x_seq``; a given ``v0`` is the start."""
        if v0 is not None:
            pass  # the caller's start potential: a call that continues an earlier one
        elif self.stateful and self.v_final is not None:
            if not torch.compiler.is_compiling() and _in_backward():
                # Called while autograd runs a backward: torch.utils.checkpoint recomputing
                # the block. The recomputation would start from the state the first run
                # left, not from the one that run started from: wrong gradients.
                raise RuntimeError(
                    "stateful neuron run during backward (torch.utils.checkpoint recomputing "
                    "it?): the recomputation would start from the potential its first run "
                    "left, so its gradients would be wrong; keep stateful neurons outside "
                    "checkpointed blocks, or use stateful=False there")
            v0 = self.v_final
            if v0.shape != x_seq.shape[1:]:
                raise ValueError(
                    f"stateful neuron: the potential kept from the last call has shape "
                    f"{tuple(v0.shape)}, this call's steps have shape {tuple(x_seq.shape[1:])}; "
                    "call reset() before a new batch or image size")
        elif self.v_init == "half":
            th = self.effective_theta()
            if th.dim() == 1:
                th = th.reshape((-1,) + (1,) * (x_seq.dim() - 3))
            v0 = (th / 2).expand(x_seq.shape[1:])
        else:
            v0 = None
        alpha = self.alpha / self.effective_theta().detach() if self.scale_free_surrogate else self.alpha
        return v0, alpha

    def _check_params(self):
        # The ops get tensors derived from the parameters (max(theta, theta_floor),
        # alpha / theta, theta / 2), new every call, so checking them in the op
        # would synchronise a GPU every call; the sources are checked here instead,
        # once per in-place change (ops.neuron.check_values), and the ops are
        # called with validate=False. theta_floor > 0 keeps the thresholds positive.
        if isinstance(self.alpha, torch.Tensor):
            check_values("alpha", self.alpha, positive=True)
        elif torch.compiler.is_compiling():
            pass  # a float alpha changed between calls is symbolic there (see ops.neuron._param)
        elif not (isinstance(self.alpha, numbers.Real) and math.isfinite(self.alpha)
                  and self.alpha > 0):
            raise ValueError(f"alpha: expected a finite positive value, got {self.alpha!r}")
        check_values("theta_floor", self.theta_floor, positive=True)
        check_values("theta", self.theta, positive=False)
        if hasattr(self, "beta"):
            check_values("beta", self.beta, positive=False)

    def _kwargs(self, x_seq, v0=None):
        self._check_params()
        v0, alpha = self._step_params(x_seq, v0)
        return dict(v0=v0, surrogate=self.surrogate, alpha=alpha, detach_reset=self.detach_reset,
                    scale_output=self.scale_output, save_dtype=self.save_dtype,
                    backend=self.backend, validate=False)

    def _keep(self, y, v_final, v_final_out):
        """Sets ``self.v_final`` (and appends it to the list ``v_final_out``); returns
        ``y``. The attribute is shared by every thread that calls this module, the list
        is the caller's own: a spiking net that several threads run at once reads its
        read-out's potential there, not another call's."""
        if v_final_out is not None and not isinstance(v_final_out, list):
            raise TypeError(f"v_final_out: expected None or a list, got "
                            f"{type(v_final_out).__name__}")
        self.v_final = v_final
        if v_final_out is not None:
            v_final_out.append(v_final)
        return y

    def extra_repr(self):
        shape = "scalar" if self.num_channels is None else f"C={self.num_channels}"
        text = (f"theta={shape}, v_init={self.v_init!r}, surrogate={self.surrogate!r}, "
                f"alpha={self.alpha}, scale_free_surrogate={self.scale_free_surrogate}, "
                f"backend={self.backend!r}")
        # the other options where they are not the defaults (spike-conv SNNs turn
        # scale_output off in their hidden neurons)
        for name, default in (("trainable", True), ("detach_reset", False), ("scale_output", True),
                              ("save_dtype", torch.float32), ("stateful", False)):
            if getattr(self, name) != default:
                text += f", {name}={getattr(self, name)}"
        return text


class IFNeuron(_MultiStepNeuron):
    """Integrate-and-fire neuron with soft reset: ``[T, B, ...]`` in, spikes
    (``theta * s``, or ``s`` with ``scale_output=False``) out."""

    def forward(self, x_seq, emit="values", v_final_out=None, v0=None):
        """``emit="masks"``: the spikes as :class:`~spikingir.ops.SpikeMasks`
        (inference only; see :func:`spikingir.ops.if_multistep`). ``v_final_out``:
        None or a list that this call's ``v_final`` is appended to. ``v0``: the
        potential to start from instead of ``v_init`` (or a stateful neuron's kept
        state), e.g. the ``v_final`` of a call on the steps before these: the steps
        in chunks give the same spikes and potentials as all at once (the SNNs'
        ``step_chunk``)."""
        y, v_final = ops.if_multistep(x_seq, self.effective_theta(), emit=emit,
                                      **self._kwargs(x_seq, v0))
        return self._keep(y, v_final, v_final_out)


class MPRNeuron(_MultiStepNeuron):
    """Membrane Potential Reuse Neuron: T IF steps then one reuse step that fires
    a spike of trainable size ``beta`` when the potential left is at least
    ``reuse_alpha * theta``. Input and output have T + 1 steps.

    With ``scale_output=False`` every step emits 0/1, the reuse step too: theta
    and beta then act only through the layer that reads the spikes, which must
    weight the IF steps by theta and the reuse step by beta (DESIGN.md section 3;
    the converted SNNs do this, ``SpikingChain._conv_spikes``), and beta gets no
    gradient here.

    Args:
        beta: initial spike size of the reuse step (default: theta).
        reuse_alpha: reuse threshold fraction in (0.5, 1].
        Others as :class:`IFNeuron`.
    """

    def __init__(self, theta=1.0, beta=None, reuse_alpha=0.75, **kwargs):
        check_reuse_alpha(reuse_alpha)
        super().__init__(theta, **kwargs)
        self._add_param("beta", self.theta.detach() if beta is None else beta)
        self.reuse_alpha = reuse_alpha

    def forward(self, x_seq, emit="values", v_final_out=None, v0=None, reuse_step=True):
        """``emit="masks"``: the spikes as :class:`~spikingir.ops.SpikeMasks`
        (inference only; see :func:`spikingir.ops.mprn_multistep`). ``v_final_out``
        and ``v0``: as :meth:`IFNeuron.forward`. ``reuse_step=False``: ``x_seq``
        holds IF steps only (the T IF steps run in chunks: every chunk but the
        last, which ends with the reuse step)."""
        check_flags(reuse_step=reuse_step)
        if not reuse_step:
            y, v_final = ops.if_multistep(x_seq, self.effective_theta(), emit=emit,
                                          **self._kwargs(x_seq, v0))
            return self._keep(y, v_final, v_final_out)
        y, v_final = ops.mprn_multistep(x_seq, self.effective_theta(), self.beta,
                                        reuse_alpha=self.reuse_alpha, emit=emit,
                                        **self._kwargs(x_seq, v0))
        return self._keep(y, v_final, v_final_out)

    def extra_repr(self):
        return super().extra_repr() + f", reuse_alpha={self.reuse_alpha}"


class SeqToBatch(nn.Module):
    """Runs a stateless layer (Conv2d, BatchNorm2d, ...) on ``[T, B, ...]`` by
    merging T into the batch: ``[T*B, ...]`` in the layer, ``[T, B, ...]`` out."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x_seq):
        if x_seq.dim() < 2:
            raise ValueError(f"SeqToBatch: expected [T, B, ...], got shape {tuple(x_seq.shape)}")
        T, B = x_seq.shape[:2]
        y = self.module(x_seq.flatten(0, 1))
        return y.unflatten(0, (T, B))
