"""Surrogate-gradient fine-tuning of a converted SNN (DESIGN.md section 5, step 4).

Thresholds, MPRN spike sizes beta, the pixel mapper and all conv weights are
trained with backpropagation through time over the T (+1) steps, through the
fused neuron ops (their backward is the fused surrogate-gradient kernel), on the
training data of the ANN. Two learning rates (measured on an H100 in DESIGN.md:
Adam, 2e-5 for weights and 1e-3 for thresholds/beta).
"""
import torch

from spikingir.train import (held_out_scenes, _CachedCrops, _loader, _Repeat, default_data_dir,
                             denoise_validator, dehaze_validator, fit, split_held_out)


#: training patch side per task: DnCNN's 40 x 40 patches (what the ANN saw);
#: AOD-Net crops of 160 x 160.
DEFAULT_PATCH = {"denoise": 40, "dehaze": 160}


def finetune_snn(snn, task, *, sigma=None, data=None, val_data=None, steps=200, batch_size=8,
                 patch=None, lr_weights=2e-5, lr_neurons=1e-3, device="cpu", seed=0,
                 checkpoint=None, resume=True, val_crop=64, val_every=None, log_every=10,
                 progress=True, time_limit=None, log=None, train_mapper=True,
                 energy_weight=0.0, amp=False, warmup=0, timesteps=None, ssim_weight=0.0,
                 teacher=None, distill=0.0, energy_target=0.0):
    """Fine-tunes ``snn`` (from :func:`spikingir.convert.to_snn`) in place.

    Denoising: DnCNN patches of ``data`` (default ``../shared/data/train400``;
    in RGB for a colour SNN, 3 input channels), ``patch`` x ``patch`` pixels
    (default 40, the ANN's training patches), with
    fresh Gaussian noise each batch, validated on ``val_data`` (Set12)
    center crops. ``train_mapper=False`` keeps the pixel mapper fixed as it is
    (the ANN's output conv after :func:`~spikingir.convert.to_snn`, unless its
    ``layer_calibration="weights"`` refitted it; ``spikingir finetune
    --freeze-mapper`` restores the ANN's). Dehazing: random crops of the training scenes of
    ``data`` (default ``../shared/data/sots_train``, the scenes of
    :func:`~spikingir.train.held_out_scenes` held out for validation), ``patch`` x ``patch`` pixels
    (default 160). ``energy_weight`` > 0 adds
    ``energy_weight x snn.energy_ratio`` (the differentiable SOP part of the
    SNN/ANN energy ratio, see :meth:`track_energy`) to the MSE: fewer spikes
    for some PSNR. ``energy_target`` > 0 makes that term a budget: only the part
    of the ratio above the target is penalised (``energy_weight x max(0, ratio -
    energy_target)``), so an SNN under budget trains on the MSE alone instead of
    trading more PSNR for spikes it need not save. ``ssim_weight`` > 0 adds ``ssim_weight x (1 - SSIM)``
    (:func:`spikingir.metrics.ssim_tensor`, the evaluation's SSIM on unquantised
    values) of the batch's outputs: the MSE alone trades structure for PSNR, and
    an SNN's rate quantisation costs SSIM first (the AOD-Net SNN). ``amp``: bf16
    autocast and channels-last (convolutions in bf16 on the tensor cores; the
    fused neurons take bf16 currents, keep their potentials and parameter
    gradients in float32). ``warmup``: steps over which
    the learning rates ramp up linearly (continuing a fine-tuned SNN at the full
    rates first knocked it back: benchmarks/RESULTS.md). ``timesteps``: the
    numbers of steps T to train at (default: ``snn.timesteps`` alone); with
    several, each batch runs at one of them drawn at random (from the torch RNG,
    so a resumed run draws the same ones), for one SNN that serves several
    latencies; validation and the returned SNN use the largest. Each validation
    also reports ``energy``, the counted SNN/ANN energy ratio (mean over the
    validation images), beside PSNR and SSIM. ``teacher`` (the ANN) and
    ``distill`` in [0, 1]: train towards ``distill x teacher(input) + (1 -
    distill) x clean`` (knowledge distillation: the ANN's output is a
    deterministic target, without the clean image's irreducible part that no
    network can predict from the degraded input). Returns the FitResult; the
    SNN is left in eval mode at the largest T.
    """
    import torch.nn.functional as F
    from spikingir.data import DehazePairs, DnCNNPatches, _check_sigma, noisy
    from spikingir.metrics import ssim_tensor

    patch = patch or DEFAULT_PATCH.get(task)
    if task == "denoise":
        data = data or default_data_dir("train400")
        val_data = val_data or default_data_dir("set12")
        if data is None or val_data is None:
            raise FileNotFoundError("fine-tuning needs training data: pass --data DIR (Train400) "
                                    "and --val-data DIR (Set12)")
        if sigma is None:
            raise ValueError("sigma: denoising needs the noise level to train at (e.g. sigma=25)")
        s = _check_sigma(sigma)
        # a colour SNN (3 input channels) trains and validates on RGB images
        from spikingir.pipeline import input_channels
        channels = input_channels(snn) or 1
        if channels not in (1, 3):
            raise ValueError(f"finetune: a denoising SNN of {channels} input channels; the "
                             "training images have 1 (gray) or 3 (RGB)")
        dataset = DnCNNPatches(data, patch=patch, channels=channels)

        def make_batch(clean, dev):
            clean = clean.to(dev)
            return noisy(clean, s), clean
        val_fn = denoise_validator(val_data, s, crop=val_crop, device=device, channels=channels)
    elif task == "dehaze":
        data = data or default_data_dir("sots_train")
        if data is None:
            raise FileNotFoundError("fine-tuning needs training data: pass --data DIR (hazy/ + gt/)")
        pairs = DehazePairs(data)
        if val_data is None:
            train_pairs, val_pairs = split_held_out(pairs, held_out_scenes(pairs), data)
        else:
            train_pairs, val_pairs = pairs, DehazePairs(val_data)
        dataset = _CachedCrops(train_pairs, patch)
        if len(dataset) < batch_size:  # each sample is a random crop: pass over the pairs again
            dataset = _Repeat(dataset, -(-batch_size // len(dataset)))

        def make_batch(batch, dev):
            hazy, clean = batch
            return hazy.to(dev), clean.to(dev)
        val_fn = dehaze_validator(val_pairs, device=device)
    else:
        raise ValueError(f"task: expected 'denoise' or 'dehaze', got {task!r}")
    for name, w in (("energy_weight", energy_weight), ("ssim_weight", ssim_weight),
                    ("energy_target", energy_target)):
        if not w >= 0:  # also rejects NaN
            raise ValueError(f"{name}: expected a number >= 0, got {w!r}")
    if energy_target > 0 and energy_weight == 0:  # a budget of no term: silently nothing
        raise ValueError(f"energy_target {energy_target!r} is a budget for the energy term: it "
                         "needs energy_weight > 0 (--energy-weight)")
    if not 0 <= distill <= 1:
        raise ValueError(f"distill: expected a weight in [0, 1], got {distill!r}")
    if distill > 0:
        if teacher is None:
            raise ValueError("distill > 0 needs the teacher ANN")
        make_batch = _distilled(make_batch, teacher.to(device).eval(), distill)
    ts = _timestep_list(snn.timesteps if timesteps is None else timesteps)
    if len(dataset) < batch_size:  # denoise (dehazing repeats its pairs); else fit's
        # "train_loader yields no batch"
        raise ValueError(f"{data}: {len(dataset)} {patch} x {patch} patches, fewer than the batch "
                         f"size {batch_size}; pass more images or a smaller batch size")
    snn.timesteps = max(ts)
    val_fn = _with_energy(snn, val_fn)
    if len(ts) > 1:
        make_batch, val_fn = _draw_timesteps(snn, ts, make_batch, val_fn)
    loader = _loader(dataset, batch_size, True, 0, device=device)
    snn.train()
    config = {"task": task, "sigma": sigma, "timesteps": timesteps_record(ts), "neuron": snn.neuron_kind,
              "lr_weights": lr_weights, "lr_neurons": lr_neurons, "batch_size": batch_size,
              "train_mapper": train_mapper, "energy_weight": energy_weight, "amp": bool(amp),
              "warmup": int(warmup), "ssim_weight": ssim_weight, "recycling": snn.recycling,
              "readout_clamp": snn.readout_clamp,
              "distill": distill, "energy_target": energy_target}
    loss_fn = None
    # Channels-last on the CPU (fit converts model and inputs): oneDNN runs these
    # small-patch convolutions ~2x faster that way, and the fused neurons take
    # channels-last input as it is (no copies): a DnCNN T=10 step of batch 8 took
    # 5.2 -> 3.9 s on 2 cores (benchmarks/RESULTS.md). With amp: channels-last anywhere.
    channels_last = True if torch.device(device).type == "cpu" else None
    if energy_weight > 0 or ssim_weight > 0:
        snn.track_energy(energy_weight > 0)

        def loss_fn(out, target):
            loss = F.mse_loss(out, target)
            if ssim_weight > 0:
                loss = loss + ssim_weight * (1 - ssim_tensor(out, target))
            if energy_weight > 0:  # the energy term of the forward that produced `out`
                loss = loss + energy_weight * (snn.energy_ratio - energy_target).clamp_min(0)
            return loss
    # what fine-tuning changes besides the weights, restored below
    mapper_grad = [(p, p.requires_grad) for p in snn.mapper.parameters()]
    was_tracking = snn._track_energy
    try:
        res = fit(snn, loader, make_batch, val_fn, steps=steps, loss_fn=loss_fn,
                  param_groups=snn.param_groups(lr_weights, lr_neurons, train_mapper),
                  schedule="cosine", checkpoint=checkpoint, resume=resume,
                  val_every=val_every or steps, seed=seed, device=device, log_every=log_every,
                  progress=progress, config=config, time_limit=time_limit, log=log,
                  desc=f"finetune {task} T={','.join(map(str, ts))}", amp=amp, warmup=warmup,
                  channels_last=channels_last)
    finally:
        snn.timesteps = max(ts)
        snn.track_energy(was_tracking)
        for p, flag in mapper_grad:
            p.requires_grad_(flag)
        snn.to(memory_format=torch.contiguous_format)  # saved in the default layout
    snn.eval()
    return res


def _distilled(make_batch, teacher, weight):
    """Wraps the batch maker: targets move ``weight`` of the way from the clean
    images to the teacher's outputs on the inputs (fp32, no gradient)."""
    def make_batch_d(batch, dev):
        inputs, clean = make_batch(batch, dev)
        with torch.no_grad():
            out = teacher(inputs).float()
        return inputs, clean + weight * (out - clean)
    return make_batch_d


def _timestep_list(timesteps):
    """``timesteps`` (an int or a sequence of ints >= 1) as a sorted tuple without repeats."""
    items = (timesteps,) if isinstance(timesteps, int) else tuple(timesteps)
    if not items or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in items):
        raise ValueError(f"timesteps: expected an int >= 1 or a non-empty list of them, got {timesteps!r}")
    return tuple(sorted(set(items)))


def timesteps_record(timesteps):
    """How a run's ``timesteps`` are recorded (checkpoint config, SNN file meta):
    the int T, or the sorted list of the Ts it drew from."""
    ts = _timestep_list(timesteps)
    return ts[0] if len(ts) == 1 else list(ts)


def _with_energy(snn, val_fn):
    """Wraps the validator to add ``energy``: the SNN/ANN energy ratio counted by
    the paper's model (:meth:`energy_mj` of each validation forward over the
    ANN's MAC energy on the same input), the mean over the validation images."""
    from spikingir.energy import mac_energy_mj

    def val_e(model):
        ratios = []

        def hook(m, args, out):
            ratios.append(m.energy_mj() / mac_energy_mj(m._ann_macs(args[0])))
        handle = snn.register_forward_hook(hook)
        recording = snn._record
        snn.record_stats(True)
        try:
            res = val_fn(model)
        finally:
            handle.remove()
            snn.record_stats(recording)
        if ratios:
            res["energy"] = sum(ratios) / len(ratios)
        return res
    return val_e


def _draw_timesteps(snn, ts, make_batch, val_fn):
    """Wraps the batch maker to set ``snn.timesteps`` to a random element of ``ts``
    per batch, and the validator to validate at ``max(ts)``."""
    def make_batch_t(batch, dev):
        snn.timesteps = ts[int(torch.randint(len(ts), ()))]
        return make_batch(batch, dev)

    def val_t(model):
        snn.timesteps = max(ts)
        return val_fn(model)
    return make_batch_t, val_t


@torch.no_grad()
def refit_mapper(snn, noisy, clean, timesteps=None, ridge=1e-4):
    """Sets a restoration SNN's pixel mapper to its least-squares optimum, in place.

    The mapper is linear in the last spiking layer's rates and the output is
    ``noisy - mapper(rate)`` (DnCNN and residual conv chains; ``mapper(rate)``
    for the others), so the mapper that minimises the squared error on a set of
    images is one ridge least-squares solve (normal equations in float64,
    lambda = ``ridge`` x their mean diagonal) of the noise ``noisy - clean``
    (or of ``clean``) from the rates, which the SGD steps of fine-tuning only
    approach. ``noisy``/``clean``: lists of [B, C, H, W] tensors (training
    images, never the evaluation's; ``clean`` of the output's shape);
    ``timesteps``: the T to fit at, each image's rates at every one of them in
    one fit (default ``snn.timesteps``); the SNN keeps its T.
    Measured on the shipped s25 and s15 SNNs (48 Train400 crops at T=5 and 10,
    benchmarks/RESULTS.md): Set12 T=10 +0.06 / +0.13 dB, T=5 +0.24 / +0.37 dB,
    the same energy. Returns ``snn``."""
    from spikingir.convert import _fit_conv
    from spikingir.models.spiking import SpikingChain

    if not isinstance(snn, SpikingChain):
        raise TypeError(f"refit_mapper: expected a SpikingDnCNN or SpikingChain, got "
                        f"{type(snn).__name__}")
    if not noisy or len(noisy) != len(clean):
        raise ValueError(f"refit_mapper: expected as many clean as noisy images (at least one), "
                         f"got {len(noisy)} and {len(clean)}")
    c_in = snn.conv1.in_channels
    for x, c in zip(noisy, clean):
        if (x.dim() != 4 or x.shape[1] != c_in or c.dim() != 4
                or (snn.residual and x.shape != c.shape)):
            raise ValueError(f"refit_mapper: expected pairs of [B, {c_in}, H, W] tensors"
                             f"{' of equal shape' if snn.residual else ''}, got {tuple(x.shape)} "
                             f"and {tuple(c.shape)}")
    ts = _timestep_list(timesteps if timesteps is not None else snn.timesteps)
    keep, device = snn.timesteps, snn.mapper.conv.weight.device
    rates, targets, seen = [], [], {}
    hook = snn.mapper.register_forward_pre_hook(lambda m, a: seen.__setitem__("rate", a[0]))
    try:
        for x, c in zip(noisy, clean):
            x, c = x.to(device, torch.float32), c.to(device, torch.float32)
            for T in ts:
                snn.timesteps = T
                out = snn(x)
                if out.shape != c.shape:
                    raise ValueError(f"refit_mapper: the SNN returns {tuple(out.shape)} for "
                                     f"{tuple(x.shape)}, the clean image is {tuple(c.shape)}")
                rates.append(seen["rate"].float())
                # with the skip, output = x - mapper(rate): the mapper's target is the
                # noise; without it, output = mapper(rate): the clean image
                targets.append(x - c if snn.residual else c)
    finally:
        hook.remove()
        snn.timesteps = keep
    _fit_conv(snn.mapper.conv, rates, targets, ridge)
    return snn
