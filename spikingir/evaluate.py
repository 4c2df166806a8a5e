"""Evaluation of converted SNNs against their ANN (DESIGN.md section 5, step 5).

Per T: PSNR and SSIM of ANN and SNN (DnCNN protocol: output clipped to [0, 1]
and rounded to uint8), PSNR loss, conversion rate (SNN / ANN x 100; dehazing:
mean of the PSNR and SSIM rates), mean firing rate and energy (the paper's
model, averaged over images).
"""
import contextlib
import json
import math
import numbers
import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from spikingir.atomic import atomic_paths, write_atomic
from spikingir.energy import counted_conv_macs, kept_modes, mac_energy_mj
from spikingir.metrics import psnr, ssim, to_uint8


@dataclass
class Sample:
    """One evaluation image: network input [1, C, H, W], or [C, 1, H, W] for an
    image whose C channels a grayscale network restores each on its own
    (``denoise_samples(colour="per-channel")``), and clean target (H x W [x C])."""
    name: str
    inputs: torch.Tensor
    clean: np.ndarray


def _to_image(t):
    """A network's output as an image: [1, C, H, W] -> H x W (C = 1) or H x W x C;
    [C, 1, H, W] (C > 1: an image's channels restored as a batch of gray images)
    -> H x W x C."""
    a = t.detach().float().cpu().numpy()
    a = a[:, 0] if a.shape[0] > 1 else a[0]  # [C, H, W]
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)


def bf16_inference(net):
    """Makes ``net`` ready for bf16 mixed-precision inference (run it under
    :func:`amp_context`), in place, and returns it: channels-last weights (tensor cores /
    oneDNN's fast bf16 layout) and, in a spiking net, the hidden convolutions back
    on ``F.conv2d`` of ``theta * s``: ``spike_conv2d`` computes in exact float32,
    which autocast does not change. Not exact: weights and currents are rounded
    to bf16 (spikes are exact). On an H100 the DnCNN SNN (321x481, T=10) took
    16.4 ms instead of 47.1 ms for the exact default at the same PSNR on that
    image (benchmarks/RESULTS.md); on CPUs without AVX512-BF16/AMX it is slower."""
    if hasattr(net, "use_spike_conv"):
        net.use_spike_conv(False)
    return net.to(memory_format=torch.channels_last)


@contextlib.contextmanager
def bf16_inference_scope(net, enabled=True):
    """:func:`bf16_inference` of ``net`` for the ``with`` block (a no-op when not
    ``enabled``); on exit the spike-conv setting and the weights' memory format
    are what they were, so an exact run afterwards is the same as before."""
    if not enabled:
        yield net
        return
    was_cl = {p: p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
              for p in net.parameters() if p.dim() == 4}
    keep = net.kept_spike_conv() if hasattr(net, "kept_spike_conv") else contextlib.nullcontext()
    with keep:
        try:
            yield bf16_inference(net)
        finally:
            with torch.no_grad():
                for p, cl in was_cl.items():
                    if not cl:
                        p.data = p.data.contiguous()


def amp_context(device, enabled=True):
    """bf16 autocast on ``device``'s type when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(task, ann, snn, samples, timesteps, sigma=None, outputs=None, device=None,
             amp=False):
    """Evaluates ``ann`` and ``snn`` (a converted network whose ``timesteps``
    is set to each T in turn) on ``samples``. Returns the report dict written
    by ``--json``. If ``outputs`` is a dict, restored images are stored in it
    as ``outputs[(name, "ann" | T)]``. ``device``: where both networks run
    (they are moved there; default: where they are). ``amp``: both networks in
    bf16 mixed precision (:func:`bf16_inference`). The networks' train/eval
    modes, weight layouts, the SNN's stats recording and spike-conv setting are
    restored on return."""
    if task not in ("denoise", "dehaze"):
        raise ValueError(f"task: expected 'denoise' or 'dehaze', got {task!r}")
    if not samples:
        raise ValueError("evaluate: no images")
    timesteps = ([timesteps] if isinstance(timesteps, numbers.Integral) or
                 not isinstance(timesteps, Iterable) or isinstance(timesteps, str)
                 else list(timesteps))  # a list, tuple, range, numpy array, ...
    if not timesteps or not all(isinstance(T, numbers.Integral) and not isinstance(T, bool)
                                and T >= 1 for T in timesteps):
        raise ValueError(f"timesteps: expected ints >= 1, got {timesteps!r}")
    from spikingir.metrics import _SSIM_WIN
    for sm in samples:  # before any work: one image each; SSIM needs a whole window
        shape = tuple(getattr(sm.inputs, "shape", ()))
        if len(shape) != 4 or (shape[0] != 1 and shape[1] != 1):
            raise ValueError(f"{sm.name}: inputs: expected [1, C, H, W] (one image) or "
                             f"[C, 1, H, W] (its channels for a grayscale network), got {shape}")
        h, w = sm.clean.shape[:2]
        if min(h, w) < _SSIM_WIN:
            raise ValueError(f"{sm.name}: {h} x {w} is smaller than SSIM's {_SSIM_WIN} x "
                             f"{_SSIM_WIN} window")
    if device is not None:
        ann.to(device)
        snn.to(device)
    dev = next(ann.parameters()).device
    # the networks come back as they came (modes, stats recording, spike convs)
    was_recording = getattr(snn, "_record", False)
    with kept_modes(ann, snn), bf16_inference_scope(ann, amp), bf16_inference_scope(snn, amp):
        ann.eval()
        snn.eval()
        fmt = torch.channels_last if amp else torch.contiguous_format
        try:
            with amp_context(dev, amp):
                return _evaluate(task, ann, snn, samples, timesteps, sigma, outputs,
                                 lambda x: x.to(dev).contiguous(memory_format=fmt))
        finally:
            snn.record_stats(was_recording)


def _evaluate(task, ann, snn, samples, timesteps, sigma, outputs, place):
    ann_rows = []
    for s in samples:
        # the ANN's energy from the MACs of this forward: ann_energy_mj's count for
        # the input's shape, without its meta-device forward (3.4 s the first time:
        # it imports torch._dynamo)
        with counted_conv_macs(ann, "evaluate") as calls:
            out = _to_image(ann(place(s.inputs)))
        if outputs is not None:
            outputs[(s.name, "ann")] = out
        ann_rows.append((psnr(s.clean, out), ssim(s.clean, out),
                         mac_energy_mj(sum(macs for _, _, macs in calls))))
    a_psnr, a_ssim, a_energy = (float(np.mean(c)) for c in zip(*ann_rows))
    report = {"task": task, "sigma": sigma, "images": len(samples),
              "ann": {"psnr": a_psnr, "ssim": a_ssim, "energy_mj": a_energy}, "snn": []}
    saved_t = snn.timesteps
    snn.record_stats(True)
    try:
        for T in timesteps:
            snn.timesteps = int(T)
            rows = []
            for s in samples:
                out = _to_image(snn(place(s.inputs)))
                if outputs is not None:
                    outputs[(s.name, int(T))] = out
                rows.append((psnr(s.clean, out), ssim(s.clean, out), snn.energy_mj(),
                             snn.firing_rate()))
            p, q, e, f = (float(np.mean(c)) for c in zip(*rows))
            rate = 100.0 * p / a_psnr if task == "denoise" else \
                50.0 * (p / a_psnr + q / a_ssim)
            report["snn"].append({"timesteps": int(T), "psnr": p, "ssim": q,
                                  "psnr_loss": a_psnr - p, "conversion_rate": rate,
                                  "energy_mj": e, "firing_rate": f})
    finally:
        snn.timesteps = saved_t
    return report


def markdown_table(report, title=None):
    """The paper-style table of a report."""
    a = report["ann"]
    head = title or (f"{report['task']}" + (f", sigma={report['sigma']:g}"
                                            if report["sigma"] is not None else "")
                     + f", {report['images']} images"
                     + (f" (colour: {report['colour']})" if report.get("colour") else ""))
    lines = [f"**{head}**", "",
             "| Network | T | PSNR (dB) | SSIM | PSNR loss (dB) | Conversion rate (%) | "
             "Energy (mJ) | SNN/ANN energy | Firing rate |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| ANN | - | {a['psnr']:.2f} | {a['ssim']:.4f} | - | 100 | {a['energy_mj']:.3f} | 1 | - |"]
    for r in report["snn"]:
        lines.append(f"| SNN | {r['timesteps']} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                     f"{r['psnr_loss']:.2f} | {r['conversion_rate']:.2f} | {r['energy_mj']:.3f} | "
                     f"{r['energy_mj'] / a['energy_mj']:.3f} | {r['firing_rate']:.4f} |")
    return "\n".join(lines) + "\n"


def report_json(report) -> str:
    """The report as strict JSON text: a non-finite number (PSNR of an output equal
    to its reference is inf) is written as null, which every JSON parser reads
    (Python's default ``Infinity`` is not JSON)."""
    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v
    return json.dumps(finite(report), indent=2, allow_nan=False) + "\n"


def write_json(path, report):
    """:func:`report_json` written to ``path`` atomically."""
    write_atomic(path, report_json(report))


def write_figures(directory, report, samples, outputs, degraded_label="noisy"):
    """Side-by-side PNGs (input, ANN, SNN at each T, clean) and a PSNR-vs-T plot;
    returns their paths. All are rendered before any replaces its file, so a
    failure leaves the folder as it was (and removes it if this call made it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    created = not os.path.exists(directory)
    paths = [os.path.join(directory, f"{s.name}_{degraded_label}_ann_snn_clean.png")
             for s in samples] + [os.path.join(directory, f"psnr_vs_T_{report['task']}.png")]
    try:
        with atomic_paths(*paths) as temps:
            for s, tmp in zip(samples, temps):
                inp = _to_image(s.inputs) if s.inputs.shape[1] in (1, 3) else None
                panels = [inp, outputs[(s.name, "ann")]] + \
                    [outputs[(s.name, r["timesteps"])] for r in report["snn"]] + [s.clean]
                tiles = [to_uint8(p) for p in panels]
                h = max(t.shape[0] for t in tiles)
                tiles = [np.pad(t, ((0, h - t.shape[0]), (0, 4)) + ((0, 0),) * (t.ndim - 2))
                         for t in tiles]
                Image.fromarray(np.concatenate(tiles, 1)).save(tmp, format="PNG")
            fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
            try:
                ts = [r["timesteps"] for r in report["snn"]]
                ax.plot(ts, [r["psnr"] for r in report["snn"]], "o-", label="SNN")
                ax.axhline(report["ann"]["psnr"], color="k", ls="--", label="ANN")
                ax.set_xlabel("timesteps T")
                ax.set_ylabel("PSNR (dB)")
                ax.set_title(report["task"] + (f", sigma={report['sigma']:g}" if report["sigma"]
                                               else ""))
                ax.legend()
                fig.tight_layout()
                fig.savefig(temps[-1], format="png")
            finally:
                plt.close(fig)
    except BaseException:
        if created and os.path.isdir(directory) and not os.listdir(directory):
            os.rmdir(directory)
        raise
    return paths
