"""Training of image-restoration networks (DESIGN §5, step 1; reused for SNN fine-tuning).

- :func:`fit` is a generic loop: any ``nn.Module`` mapping a degraded batch to a
  restored batch, a loader, ``make_batch(batch, device) -> (input, target)`` and
  an optional ``val_fn(model) -> float | dict``. It runs a number of steps or
  epochs with an optimizer built from parameter groups, a learning-rate
  schedule computed from the step (so resuming needs no scheduler state),
  optional gradient clipping and bf16 autocast, validation every epoch or every
  N steps, and atomic, resumable checkpoints that load with
  ``torch.load(path, weights_only=True)``.
- :func:`train_denoiser` (DnCNN-S on Train400 patches, validation on Set12) and
  :func:`train_dehazer` (AOD-Net on paired hazy/clean folders, held-out scenes)
  set up the data for ``spikingir train-ann``.

Determinism: at the start of every epoch the torch, numpy and ``random``
generators are seeded from ``(seed, epoch)``, so the shuffle order and the
augmentations of an epoch do not depend on what ran before. A checkpoint holds
the generator states after its step; resuming replays the loader up to that
step (data only, no model work) and then restores those states, so a resumed
run follows the same path as an uninterrupted one (bit-identical on the CPU
with the same thread count). Validation runs under a forked RNG so it does not
shift the training stream.
"""
from __future__ import annotations

import math
import numbers
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from spikingir.atomic import atomic_paths, sync

__all__ = ["fit", "FitResult", "lr_factor", "save_atomic", "load_checkpoint", "get_rng_state",
           "set_rng_state", "save_weights", "train_denoiser", "train_dehazer", "TrainResult", "denoise_validator",
           "dehaze_validator", "recalibrate_batchnorm", "default_data_dir", "DEFAULT_VAL_SCENES",
           "held_out_scenes",
           "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "spikingir.train.fit/1"
SCHEDULES = ("constant", "cosine", "multistep")


# ----------------------------------------------------------------------------- RNG states

def get_rng_state() -> dict:
    """torch (CPU and every CUDA device), numpy legacy and ``random`` states as
    tensors and plain Python values (safe for ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    """Inverse of :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + 17) % 2**63


# ----------------------------------------------------------------------------- checkpoints

def _plain(obj, where="config"):
    """Copy of ``obj`` with only types ``weights_only=True`` accepts (paths -> str)."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, where) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, where) for v in obj]
    raise TypeError(f"{where}: value of type {type(obj).__name__} cannot be stored in a checkpoint")


def save_atomic(obj, path) -> Path:
    """``torch.save(obj, path)`` through a temporary file in the same folder and
    ``os.replace`` (:func:`spikingir.atomic.atomic_paths`): readers see the old file
    or the new one, never a partial one, and nothing is left behind on failure.
    Creates the parent folder."""
    with atomic_paths(path) as (tmp,):
        _save_synced(obj, tmp)
    return Path(path)


def _save_synced(obj, tmp):
    """``torch.save`` to the temporary file ``tmp``, on disk before the rename
    that makes it the file."""
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        sync(f)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a :func:`fit` checkpoint with ``weights_only=True``; ValueError if it is
    not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        from spikingir.pipeline import _first_line  # torch's many lines, in one
        raise ValueError(f"cannot read checkpoint {path}: {type(err).__name__}: "
                         f"{_first_line(err)}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a spikingir training checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


# ----------------------------------------------------------------------------- learning rate

def lr_factor(step: int, total: int, schedule="cosine", *, milestones=(0.5, 0.75), gamma=0.1,
              min_factor=0.01, warmup: int = 0) -> float:
    """Multiplier of the base learning rate for the update number ``step`` (0-based)
    of ``total``.

    - ``"constant"``: 1.
    - ``"cosine"``: from 1 down to ``min_factor`` along a half cosine.
    - ``"multistep"``: times ``gamma`` at each milestone; milestones below 1 are
      fractions of ``total``, others step numbers (as ``MultiStepLR``).
    - a callable ``schedule(step, total) -> factor``.

    ``warmup`` steps ramp linearly up to the schedule's value first.
    """
    if callable(schedule):
        f = float(schedule(step, total))
    elif schedule == "constant":
        f = 1.0
    elif schedule == "cosine":
        t = min(max(step, 0) / max(total - 1, 1), 1.0)
        f = min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
    elif schedule == "multistep":
        ms = [m * total if m < 1 else m for m in milestones]
        f = gamma ** sum(step >= m for m in ms)
    else:
        raise ValueError(f"lr schedule must be one of {SCHEDULES} or a callable, got {schedule!r}")
    if warmup > 0 and step < warmup:
        f *= (step + 1) / warmup
    return f


def _make_optimizer(optimizer, params, lr, weight_decay):
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    groups = list(params)
    if not groups:
        raise ValueError("fit: no parameters to optimise")
    if callable(optimizer):
        return optimizer(groups)
    name = str(optimizer).lower()
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"fit: optimizer must be 'adam', 'adamw', 'sgd', an Optimizer or a factory, got {optimizer!r}")


def _config_changes(old: Mapping, new: Mapping) -> str:
    """``"key old -> new, ..."`` for the settings that differ between a
    checkpoint's run and the run resuming it ("" when none do)."""
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


# ----------------------------------------------------------------------------- progress

class _Progress:
    """tqdm when importable (and enabled), else a line every ``log_every`` steps."""

    def __init__(self, total, initial, enabled, log_every, log, desc):
        self.total, self.log_every, self.log, self.desc = total, log_every, log, desc
        self.bar = None
        self.t0, self.s0 = time.perf_counter(), initial
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def update(self, step, epoch, loss, lr):
        if self.bar is not None:
            self.bar.update(1)
            if step % max(1, min(self.log_every, 10)) == 0:
                self.bar.set_postfix(epoch=epoch, loss=f"{loss:.3g}", lr=f"{lr:.2e}")
            return
        if self.log_every and (step % self.log_every == 0 or step == self.total):
            dt = time.perf_counter() - self.t0
            rate = (step - self.s0) / dt if dt > 0 else 0.0
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            self.log(f"[{self.desc}] step {step}/{self.total} epoch {epoch} loss {loss:.4g} lr {lr:.3g} "
                     f"{rate:.2f} it/s, {dt:.0f} s, eta {_fmt_s(eta)}")

    def write(self, msg):
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            self.log(msg)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _fmt_s(s):
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _default_log(msg):
    print(msg, file=sys.stderr, flush=True)


def cpu_bf16_units():
    """The bf16 matrix units of this CPU that torch's kernels use (``"AMX"`` or
    ``"AVX512-BF16"``), or None when it has neither (bf16 is then emulated)."""
    for probe, name in (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16")):
        try:
            if getattr(torch.cpu, probe)():
                return name
        except (AttributeError, RuntimeError):  # a torch without the probe
            pass
    return None


def amp_hint(device, amp, training=True):
    """A one-line note on bf16 autocast for a run on the CPU, else None.

    - ``amp`` off on a CPU with bf16 matrix units (AMX or AVX512-BF16), training:
      bf16 is several times faster there (an SNN fine-tuning step on an Intel Xeon
      with AMX: 4.35 s fp32, 1.10 s bf16).
    - ``amp`` on, on a CPU without them: bf16 is emulated and much slower (the
      same step on an AVX2-only AMD EPYC: 61.7 s bf16 against 6.8 s fp32; for
      inference it is slower even with AVX512-BF16). benchmarks/RESULTS.md.
    """
    if torch.device(device).type != "cpu":
        return None
    units = cpu_bf16_units()
    if amp and units is None:
        return ("warning: this CPU has neither AMX nor AVX512-BF16, so bf16 autocast (--amp) is "
                "emulated: slower than float32 (an SNN fine-tuning step measured 9x slower on "
                "such a CPU); "
                "drop --amp")
    if training and not amp and units is not None:
        return f"hint: this CPU has {units}: bf16 autocast (--amp) trains several times faster here"
    return None


# ----------------------------------------------------------------------------- fit

@dataclass
class FitResult:
    """What :func:`fit` returns. ``history`` holds one dict per validation
    (``step``, ``epoch`` and the validation figures)."""
    model: nn.Module
    step: int
    epoch: int
    total_steps: int
    steps_per_epoch: int = 0
    history: list = field(default_factory=list)
    wall_s: float = 0.0          # this call's time
    train_s: float = 0.0         # accumulated over resumed runs
    finished: bool = True
    last_loss: float = float("nan")
    losses: list = field(default_factory=list)  # (step, loss) every log_every steps, this call

    @property
    def last_val(self) -> dict | None:
        return self.history[-1] if self.history else None


def _as_val_dict(value) -> dict:
    if value is None:
        return {}
    if isinstance(value, numbers.Real):
        return {"psnr": float(value)}
    if isinstance(value, Mapping):
        return {str(k): (float(v) if isinstance(v, (numbers.Real, torch.Tensor)) else v) for k, v in value.items()}
    raise TypeError(f"fit: val_fn must return a number or a dict, got {type(value).__name__}")


def _fmt_val(v: dict) -> str:
    return ", ".join(f"{k} {x:.4f}" if isinstance(x, float) else f"{k} {x}" for k, x in v.items())


def fit(model: nn.Module, train_loader: Iterable, make_batch: Callable, val_fn: Callable | None = None, *,
        steps: int | None = None, epochs: int | None = None,
        optimizer="adam", param_groups=None, lr: float = 1e-3, weight_decay: float = 0.0,
        schedule="cosine", milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1,
        min_lr_factor: float = 0.01, warmup: int = 0,
        loss_fn: Callable | None = None, grad_clip: float | None = None, amp: bool = False,
        checkpoint=None, resume: bool = True, checkpoint_every: int | None = None,
        val_every: int | None = None, seed: int = 0, device="cpu",
        log_every: int = 50, progress: bool = True, log: Callable[[str], None] | None = None,
        config: Mapping | None = None, stop_after: int | None = None,
        time_limit: float | None = None, channels_last: bool | None = None,
        desc: str = "train") -> FitResult:
    """Train ``model`` to map ``make_batch``'s inputs to its targets.

    Args:
        model: any ``nn.Module``; ``model(input)`` is compared with the target by
            ``loss_fn(output, target)`` (default ``F.mse_loss``). Moved to ``device``.
        train_loader: an iterable of batches with ``len()`` (a DataLoader); it is
            iterated once per epoch.
        make_batch: ``make_batch(batch, device) -> (input, target)`` (e.g. moves
            clean patches to the device and adds fresh noise).
        val_fn: ``val_fn(model) -> float | dict`` run in eval mode under
            ``torch.no_grad()``; a float is taken as PSNR. Printed and recorded in
            the history; the model is put back in train mode afterwards.
        steps / epochs: how long to train in total (exactly one of them);
            ``epochs`` counts passes over ``train_loader``.
        optimizer: ``"adam"`` (default), ``"adamw"``, ``"sgd"``, a factory
            ``f(param_groups) -> Optimizer`` or a built ``Optimizer`` (then
            ``param_groups``/``lr``/``weight_decay`` are ignored).
        param_groups: parameters or ``torch.optim`` groups (dicts with
            ``params`` and optionally ``lr``); default ``model.parameters()``.
            Each group's learning rate is its base value times :func:`lr_factor`.
        schedule, milestones, gamma, min_lr_factor, warmup: see :func:`lr_factor`.
        grad_clip: clip the total gradient norm to this value (None: no clipping).
        amp: bf16 autocast for the forward pass.
        channels_last: model and inputs in channels_last memory format (default:
            with ``amp``; faster for convolutions on GPUs and on CPUs with bf16).
        checkpoint: path of the checkpoint (None: none). Written atomically every
            ``checkpoint_every`` steps (default: at each validation, or 500),
            at the end, and on KeyboardInterrupt.
        resume: continue from ``checkpoint`` if it exists (its step, epoch,
            optimizer and RNG states, validation history and training time);
            otherwise start over and overwrite it.
        val_every: validate every N steps (default: at the end of each epoch); a
            final validation runs at the end unless one just ran.
        seed: seeds every epoch (see the module docstring).
        log_every: a progress line (or bar refresh) every N steps; 0 for none.
        progress: use tqdm when importable.
        log: where messages go (default: stderr).
        config: plain values stored in the checkpoint (paths become strings).
        stop_after: stop after this many steps in this call (checkpoint written;
            resume later). ``time_limit``: stop after this many seconds.

    Returns a :class:`FitResult`; ``finished`` is False after ``stop_after`` /
    ``time_limit``. A non-finite loss raises ``FloatingPointError`` naming its step,
    found within ``log_every`` (at most 50) steps; the model in memory may have taken
    those steps, the checkpoint on disk predates them.
    """
    import torch.nn.functional as F

    if (steps is None) == (epochs is None):
        raise ValueError("fit: give exactly one of steps and epochs")
    for name, v in (("steps", steps), ("epochs", epochs)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
            raise ValueError(f"fit: {name} must be a positive int, got {v!r}")
    try:
        per_epoch = len(train_loader)
    except TypeError:
        raise TypeError("fit: train_loader must have a length (a DataLoader or a sequence)") from None
    if per_epoch < 1:
        raise ValueError("fit: train_loader yields no batch (fewer samples than the batch size with drop_last?)")
    total = int(steps) if steps is not None else int(epochs) * per_epoch
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"fit: grad_clip must be > 0 or None, got {grad_clip}")
    log = log or _default_log
    loss_fn = loss_fn or F.mse_loss
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("fit: device cuda requested but no CUDA device is available")
    use_cl = bool(amp) if channels_last is None else bool(channels_last)
    model.to(device)
    if use_cl:
        model.to(memory_format=torch.channels_last)
    opt = _make_optimizer(optimizer, model.parameters() if param_groups is None else param_groups,
                          lr, weight_decay)
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])
    config = _plain(dict(config or {}))
    val_every = int(val_every) if val_every else None
    ckpt_every = int(checkpoint_every) if checkpoint_every else (val_every or 500)

    step = epoch = step_in_epoch = 0
    history: list[dict] = []
    train_s_before = 0.0
    resume_rng = None
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if ckpt_path is not None and resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path, map_location="cpu")
        # Optimizer.load_state_dict restores the saved groups' hyperparameters too;
        # this call's (learning rates, weight decay) win, the moments are resumed.
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        try:
            model.load_state_dict(ck["model"], strict=True)
            opt.load_state_dict(ck["optimizer"])
            for g, h in zip(opt.param_groups, hyper):
                g.update(h)
        except (RuntimeError, ValueError, KeyError) as err:
            from spikingir.pipeline import _first_line  # load_state_dict's header + its detail
            raise ValueError(f"checkpoint {ckpt_path} does not fit this model/optimizer: "
                             f"{_first_line(err)}") from err
        step, epoch, step_in_epoch = int(ck["step"]), int(ck["epoch"]), int(ck["step_in_epoch"])
        history = list(ck.get("history", []))
        train_s_before = float(ck.get("train_s", 0.0))
        resume_rng = ck["rng"]
        if step_in_epoch >= per_epoch:  # the loader shrank since: start the next epoch
            epoch, step_in_epoch, resume_rng = epoch + 1, 0, None
        log(f"[{desc}] resumed from {ckpt_path} at step {step} (epoch {epoch}) of {total}")
        changed = _config_changes(ck.get("config") or {}, config)
        if changed:  # allowed (e.g. a new learning rate), but never silent: the run mixes both
            log(f"[{desc}] note: the checkpoint's run had other settings: {changed}")

    hint = amp_hint(device, amp)
    if hint:
        log(f"[{desc}] {hint}")

    def lr_now(s):
        return lr_factor(s, total, schedule, milestones=milestones, gamma=gamma, min_factor=min_lr_factor,
                         warmup=warmup)

    t_start = time.perf_counter()

    rng_after_step = resume_rng  # generator states right after the last completed step

    def save(finished):
        if ckpt_path is None:
            return
        rng = rng_after_step if rng_after_step is not None and step_in_epoch else get_rng_state()
        save_atomic({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "total_steps": total,
                     "finished": bool(finished), "rng": rng, "config": config,
                     "history": history, "train_s": train_s_before + time.perf_counter() - t_start},
                    ckpt_path)

    def validate():
        if val_fn is None:
            return
        was_training = model.training
        model.eval()
        devices = [device.index or 0] if device.type == "cuda" else []
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                v = _as_val_dict(val_fn(model))
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
            model.train(was_training)
        rec = {"step": step, "epoch": epoch, **v}
        history.append(rec)
        bar.write(f"[{desc}] validation at step {step} (epoch {epoch}): {_fmt_val(v)}")

    model.train()
    bar = _Progress(total, step, progress, log_every, log, desc)
    last_val_step = history[-1]["step"] if history else -1
    last_loss, losses = float("nan"), []
    # The losses stay on the device until the host needs them (a log line, a
    # validation, a checkpoint, a stop, and every `read_every` steps: the bar's
    # refresh, at most every 10): reading one back waits for the GPU, and a wait
    # every step (before the backward, as the finiteness check once did) leaves the
    # card idle while the host queues the next kernels. A non-finite loss is still
    # never written to a checkpoint.
    pending: list[torch.Tensor] = []
    read_every = 10 if bar.bar is not None else 50

    def read_losses():
        nonlocal last_loss
        if not pending:
            return
        vals = torch.stack(pending).float().cpu()
        first = len(pending)
        pending.clear()
        bad = (~torch.isfinite(vals)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise FloatingPointError(f"fit: loss is {vals[i].item()} at step {step - first + i}")
        last_loss = float(vals[-1])
    done_here, finished = 0, True
    try:
        while step < total:
            _seed_everything(_epoch_seed(seed, epoch))
            it = iter(train_loader)
            if step_in_epoch:  # replay the loader up to the saved step, then restore the RNG
                for _ in range(step_in_epoch):
                    next(it)
                if resume_rng is not None:
                    set_rng_state(resume_rng)
            resume_rng = None
            stopped = False
            for batch in it:
                inp, target = make_batch(batch, device)
                if use_cl:
                    inp = inp.contiguous(memory_format=torch.channels_last)
                f = lr_now(step)
                for g in opt.param_groups:
                    g["lr"] = g["initial_lr"] * f
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(amp)):
                    out = model(inp)
                loss = loss_fn(out.float(), target.float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                opt.step()
                step += 1
                step_in_epoch += 1
                done_here += 1
                rng_after_step = get_rng_state()
                pending.append(loss.detach())
                logged = bool(log_every) and step % log_every == 0
                do_val = bool(val_every) and step % val_every == 0
                do_save = step % ckpt_every == 0 or step >= total
                stopped = step < total and (
                    (stop_after is not None and done_here >= stop_after)
                    or (time_limit is not None and time.perf_counter() - t_start >= time_limit))
                if logged or do_val or do_save or stopped or step % read_every == 0:
                    read_losses()  # raises FloatingPointError at the first non-finite loss
                if logged:
                    losses.append((step, last_loss))
                bar.update(step, epoch, last_loss, opt.param_groups[0]["lr"])
                if do_val:
                    validate()
                    last_val_step = step
                if do_save:
                    save(step >= total)
                if step >= total or stopped:
                    break
            else:  # a full pass over the loader
                read_losses()
                epoch += 1
                step_in_epoch = 0
                if not val_every and step < total:
                    validate()
                    last_val_step = step
                save(step >= total)
            if stopped:
                finished = False
                save(False)
                bar.write(f"[{desc}] stopped at step {step} of {total}; resume to continue")
                break
        if finished and last_val_step != step:
            validate()
            save(True)
    except KeyboardInterrupt:
        read_losses()  # a diverged run is reported as such, and not checkpointed
        save(False)
        bar.write(f"[{desc}] interrupted at step {step}; checkpoint {ckpt_path}")
        raise
    finally:
        bar.close()
    wall = time.perf_counter() - t_start
    return FitResult(model=model, step=step, epoch=epoch, total_steps=total, steps_per_epoch=per_epoch,
                     history=history, wall_s=wall,
                     train_s=train_s_before + wall, finished=finished, last_loss=last_loss, losses=losses)


# ----------------------------------------------------------------------------- task helpers

#: The dehazing scenes of ../shared/data/sots_train held out for validation.
DEFAULT_VAL_SCENES = ("1420", "1421", "1422", "1423", "1424")
DENOISE_SIGMAS = (15, 25, 50)


def split_held_out(pairs, held_out, data):
    """(training, validation) pairs of ``pairs`` (from the folder ``data``), the
    scenes ``held_out`` for validation; ValueError when no scene is left to train on."""
    train_pairs, val_pairs = pairs.split(held_out)
    if len(train_pairs) == 0:
        raise ValueError(f"{data}: every scene is held out for validation ({held_out}); "
                         "nothing to train on (pass --val-data)")
    return train_pairs, val_pairs


def held_out_scenes(pairs) -> list:
    """The validation scenes a dehazing folder (``DehazePairs``) holds out when
    none are named: ``DEFAULT_VAL_SCENES`` where the folder has them all
    (sots_train), else its last tenth of scene ids (at least one), so that any
    paired folder works. A folder of one scene has none to spare: ValueError."""
    scenes = list(pairs.scenes)
    if set(DEFAULT_VAL_SCENES) <= set(scenes):
        return list(DEFAULT_VAL_SCENES)
    if len(scenes) < 2:
        raise ValueError(f"{pairs.root}: one scene only, none to hold out for validation; "
                         "pass --val-data (pairs of other scenes)")
    ordered = sorted(scenes, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    return ordered[-max(1, len(ordered) // 10):]


def default_data_dir(name: str) -> Path | None:
    """``../shared/data/<name>`` next to the working directory or to this checkout,
    if it exists."""
    here = Path(__file__).resolve().parents[1]
    for base in (Path.cwd(), here):
        p = (base / ".." / "shared" / "data" / name).resolve()
        if p.is_dir():
            return p
    return None


def _predict(model, x: torch.Tensor, device) -> torch.Tensor:
    return model(x.to(device)).float().cpu()


def denoise_validator(images, sigma, crop: int | None = None, device="cpu", seed: int = 0,
                      channels: int = 1) -> Callable:
    """``val_fn`` for :func:`fit`: mean PSNR/SSIM over ``images`` (a folder or
    paths; grayscale) by the DESIGN protocol: center crop (``crop``, None for the
    full image), noise ``sigma/255 * randn`` with numpy seed ``seed`` per image,
    not clipped; output clipped and rounded to uint8. ``channels=3``: for a colour
    model, the images in RGB (gray ones replicated, with a warning), noise drawn
    per channel, PSNR over all channels, SSIM their mean. Images are read now, so a
    bad folder fails before training. The returned function also has ``.noisy``,
    the figures of the noisy inputs."""
    from .data import add_gaussian_noise, center_crop, list_images, load_gray, load_rgb
    from .metrics import psnr, ssim

    if isinstance(channels, bool) or channels not in (1, 3):
        raise ValueError(f"denoise_validator: channels must be 1 (gray) or 3 (RGB), got "
                         f"{channels!r}")
    paths = list_images(images) if isinstance(images, (str, os.PathLike)) else list(images)
    if not paths:
        raise ValueError("denoise_validator: no validation images")
    pairs = []
    for p in paths:
        clean = center_crop(load_gray(p) if channels == 1 else load_rgb(p), crop)
        pairs.append((clean, add_gaussian_noise(clean, sigma, seed=seed)))

    def val_fn(model):
        ps, ss = [], []
        for clean, noisy_img in pairs:
            x = torch.from_numpy(noisy_img)
            x = x[None, None] if x.dim() == 2 else x.permute(2, 0, 1)[None]  # [1, C, H, W]
            out = _predict(model, x, device)
            ps.append(psnr(clean, out))
            ss.append(ssim(clean, out))
        return {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss))}

    val_fn.noisy = {"psnr": float(np.mean([psnr(c, n) for c, n in pairs])),
                    "ssim": float(np.mean([ssim(c, n) for c, n in pairs]))}
    val_fn.images = len(pairs)
    return val_fn


def dehaze_validator(pairs, device="cpu") -> Callable:
    """``val_fn`` for :func:`fit`: mean PSNR/SSIM (RGB) of the restored images of
    ``pairs`` (a ``DehazePairs``; full images). Images are read now. ``.hazy``
    holds the figures of the hazy inputs."""
    from .metrics import psnr, ssim

    if len(pairs) == 0:
        raise ValueError("dehaze_validator: no validation pairs")
    data = [pairs[i] for i in range(len(pairs))]

    def val_fn(model):
        ps, ss = [], []
        for hazy, clean in data:
            out = _predict(model, hazy[None], device)
            c = clean.permute(1, 2, 0).numpy()
            o = out[0].permute(1, 2, 0).numpy()
            ps.append(psnr(c, o))
            ss.append(ssim(c, o))
        return {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss))}

    hz = [(c.permute(1, 2, 0).numpy(), h.permute(1, 2, 0).numpy()) for h, c in data]
    val_fn.hazy = {"psnr": float(np.mean([psnr(c, h) for c, h in hz])),
                   "ssim": float(np.mean([ssim(c, h) for c, h in hz]))}
    val_fn.images = len(data)
    return val_fn


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Replace every BatchNorm's running statistics by their plain average over
    ``batches`` (inputs, already on the model's device). DnCNN's BN momentum of
    0.95 leaves statistics of about one batch; this averages many before folding."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(m.momentum, m.training) for m in bns]
    was_training = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    try:
        for x in batches:
            model(x)
    finally:
        for m, (mom, tr) in zip(bns, saved):
            m.momentum = mom
            m.train(tr)
        model.train(was_training)


@dataclass
class TrainResult:
    """What :func:`train_denoiser` / :func:`train_dehazer` return.

    ``model``: the trained network in eval mode (DnCNN: BN-folded); ``state_dict``:
    what to ship (plain tensors); ``meta``: plain values (task, sigma, steps,
    validation figures, ...); ``fit``: the :class:`FitResult`."""
    model: nn.Module
    state_dict: dict
    meta: dict
    fit: FitResult


def _loader(dataset, batch_size, shuffle, workers, collate_fn=None, device="cpu"):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=True, num_workers=workers,
                      collate_fn=collate_fn, pin_memory=torch.device(device).type == "cuda",
                      persistent_workers=False)


def _common_meta(task, fit_res: FitResult, batch_size, lr, seed, device, amp):
    import platform

    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return {"task": task, "steps": fit_res.step, "epochs": round(fit_res.step / max(1, fit_res.steps_per_epoch), 4),
            "batch_size": batch_size, "lr": lr, "seed": seed,
            "device": str(dev), "device_name": name, "threads": torch.get_num_threads() if dev.type == "cpu"
            else None, "amp": bool(amp), "train_wall_s": round(fit_res.train_s, 1),
            "torch": torch.__version__}


def train_denoiser(sigma: float = 25, *, data=None, val_data=None, steps: int | None = None,
                   epochs: int | None = None, batch_size: int = 64, lr: float = 1e-3, schedule="cosine",
                   device="cpu", seed: int = 0, checkpoint=None, resume: bool = True,
                   val_crop: int | None = None, val_every: int | None = None, checkpoint_every=None,
                   amp: bool = False, workers: int = 0, log_every: int = 50, progress: bool = True,
                   bn_recalibration: int = 20, stop_after=None, time_limit=None, log=None,
                   depth: int = 17, init=None, channels: int = 1) -> TrainResult:
    """DnCNN-S (BN form) for Gaussian noise ``sigma`` on Train400 patches (40 x 40,
    stride 10, 4 scales, flips/rotations; fresh noise every batch), Adam with a
    decaying learning rate, validated on Set12 (DESIGN protocol; ``val_crop``
    center crops keep it fast on a CPU). At the end the BN statistics are
    re-estimated on ``bn_recalibration`` training batches (kept only when the
    validation PSNR does not drop) and folded: ``result.state_dict`` loads
    strictly into ``DnCNN(batchnorm=False)``. With ``val_crop``, the final model
    is also validated on the full images (``meta["val_full_psnr"]``/``["val_full_ssim"]``).

    ``init``: start from a checkpoint or BN-form state dict (e.g. another
    sigma's run) instead of the random initialisation. The patch order and the
    noise depend on ``seed`` only, so give another seed than the run ``init``
    comes from to see other patches.

    ``channels=3`` trains a colour DnCNN (``image_channels=3``) on RGB patches
    with noise drawn per channel, validated in RGB (PSNR over all channels, SSIM
    their mean); gray files in either folder are replicated to RGB with a warning
    (the defaults, Train400 and Set12, are gray: pass colour folders).

    ``data`` / ``val_data`` default to ``../shared/data/train400`` and ``set12``.
    """
    from .data import DnCNNPatches, noisy
    from .models import DnCNN, fold_batchnorm

    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not 0 < sigma < math.inf:
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    data = data if data is not None else default_data_dir("train400")
    val_data = val_data if val_data is not None else default_data_dir("set12")
    if data is None:
        raise FileNotFoundError("no training data: pass --data DIR (Train400 folder; "
                                "../shared/data/train400 was not found)")
    if val_data is None:
        raise FileNotFoundError("no validation data: pass --val-data DIR (Set12 folder; "
                                "../shared/data/set12 was not found)")
    log = log or _default_log
    device = torch.device(device)
    torch.manual_seed(seed)
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ValueError(f"channels: expected 1 (gray) or 3 (RGB), got {channels!r}")
    model = DnCNN(depth=depth, image_channels=channels, batchnorm=True)
    if init is not None:
        _load_init(model, init)
    val_fn = denoise_validator(val_data, sigma, crop=val_crop, device=device, channels=channels)
    patches = DnCNNPatches(data, channels=channels)
    log(f"[train denoise s{sigma:g}] {len(patches)} patches from {data}; validation: {val_fn.images} images "
        f"of {val_data} ({'center ' + str(val_crop) + ' px' if val_crop else 'full'}), noisy input "
        f"PSNR {val_fn.noisy['psnr']:.2f} dB")
    loader = _loader(patches, batch_size, True, workers, device=device)
    s = float(sigma)

    def make_batch(clean, dev):
        clean = clean.to(dev, non_blocking=True)
        return noisy(clean, s), clean

    config = {"task": "denoise", "sigma": s, "data": str(data), "val_data": str(val_data), "val_crop": val_crop,
              "batch_size": batch_size, "lr": lr, "schedule": schedule if isinstance(schedule, str) else "custom",
              "seed": seed, "depth": depth, "init": None if init is None else str(init)}
    if channels != 1:  # only then: a gray run's checkpoint of before the option resumes as it was
        config["channels"] = channels
    res = fit(model, loader, make_batch, val_fn, steps=steps, epochs=epochs, lr=lr, schedule=schedule,
              checkpoint=checkpoint, resume=resume, checkpoint_every=checkpoint_every, val_every=val_every,
              seed=seed, device=device, log_every=log_every, progress=progress, amp=amp, config=config,
              stop_after=stop_after, time_limit=time_limit, log=log, desc=f"denoise s{sigma:g}")
    model.eval()
    folded = fold_batchnorm(model)
    val = _val_eval(val_fn, folded)
    if bn_recalibration and res.finished:
        trial = _copy_model(model)
        gen_state = get_rng_state()
        _seed_everything(_epoch_seed(seed, 10**6))
        it = iter(loader)
        batches = (make_batch(next(it), device)[0] for _ in range(min(bn_recalibration, len(loader))))
        recalibrate_batchnorm(trial, batches)
        set_rng_state(gen_state)
        folded_rc = fold_batchnorm(trial)
        val_rc = _val_eval(val_fn, folded_rc)
        log(f"[train denoise s{sigma:g}] BN statistics over {bn_recalibration} batches: validation PSNR "
            f"{val['psnr']:.4f} -> {val_rc['psnr']:.4f} dB ({'kept' if val_rc['psnr'] >= val['psnr'] else 'dropped'})")
        if val_rc["psnr"] >= val["psnr"]:
            folded, val = folded_rc, val_rc
    folded = folded.cpu().float().eval()
    full = None
    if val_crop and res.finished:  # the figures to report: full images
        full_fn = denoise_validator(val_data, sigma, crop=None, device="cpu", channels=channels)
        full = _val_eval(full_fn, folded)
        log(f"[train denoise s{sigma:g}] full-image validation ({full_fn.images} images): "
            f"PSNR {full['psnr']:.4f} dB, SSIM {full['ssim']:.4f} (noisy {full_fn.noisy['psnr']:.2f} dB)")
    meta = _common_meta("denoise", res, batch_size, lr, seed, device, amp)
    arch = f"DnCNN(depth={depth}{', image_channels=3' if channels == 3 else ''}, batchnorm=False)"
    meta.update({"sigma": int(s) if s.is_integer() else s, "model": arch, "form": "bn-folded",
                 "channels": channels,
                 "train_data": str(data), "patches": len(patches), "val_data": str(val_data),
                 "val_crop": val_crop, "val_images": val_fn.images, "val_psnr": val["psnr"],
                 "val_ssim": val["ssim"], "val_noisy_psnr": val_fn.noisy["psnr"],
                 "val_noisy_ssim": val_fn.noisy["ssim"], "finished": res.finished,
                 "init": None if init is None else str(init)})
    if full is not None:
        meta.update({"val_full_psnr": full["psnr"], "val_full_ssim": full["ssim"]})
    return TrainResult(model=folded, state_dict={k: v.detach().clone().contiguous()
                                                 for k, v in folded.state_dict().items()}, meta=meta, fit=res)


def _load_init(model: nn.Module, init) -> None:
    """Start ``model`` from ``init``: a :func:`fit` checkpoint (its model) or a
    plain state dict of the same form (DnCNN: the BN form)."""
    path = Path(init)
    if not path.is_file():
        raise FileNotFoundError(f"--init: no such file: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        from spikingir.pipeline import _first_line
        raise ValueError(f"--init: cannot read {path} as PyTorch weights ({type(err).__name__}: "
                         f"{_first_line(err)})") from err
    sd = obj["model"] if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT else obj
    try:
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        from spikingir.pipeline import _first_line  # load_state_dict's header + its detail
        raise ValueError(f"--init: {path} does not hold {type(model).__name__} weights of this form "
                         f"({_first_line(err)})") from err


def _copy_model(model):
    import copy
    return copy.deepcopy(model)


def _val_eval(val_fn, model):
    was = model.training
    model.eval()
    with torch.no_grad():
        v = _as_val_dict(val_fn(model))
    model.train(was)
    return v


class _CachedCrops(torch.utils.data.Dataset):
    """Hazy/clean pairs held in memory as uint8; each access returns one random
    ``crop x crop`` window (same for both images) with a random horizontal flip."""

    def __init__(self, pairs, crop: int):
        self.crop = int(crop)
        self.hazy, self.clean = [], []
        for i in range(len(pairs)):
            h, c = pairs[i]
            if min(h.shape[-2:]) < self.crop:
                raise ValueError(f"training image {pairs.pairs[i][0]} ({h.shape[-2]}x{h.shape[-1]}) is smaller "
                                 f"than the crop {self.crop}")
            self.hazy.append(torch.round(h * 255).to(torch.uint8))
            self.clean.append(torch.round(c * 255).to(torch.uint8))

    def __len__(self):
        return len(self.hazy)

    def __getitem__(self, n):
        h, c = self.hazy[n], self.clean[n]
        H, W = h.shape[-2:]
        i = int(torch.randint(0, H - self.crop + 1, ()))
        j = int(torch.randint(0, W - self.crop + 1, ()))
        h = h[:, i:i + self.crop, j:j + self.crop].float() / 255
        c = c[:, i:i + self.crop, j:j + self.crop].float() / 255
        if torch.rand(()) < 0.5:
            h, c = h.flip(-1), c.flip(-1)
        return h, c


class _Repeat(torch.utils.data.Dataset):
    """``times`` passes over ``ds`` as one epoch (small datasets, random crops)."""

    def __init__(self, ds, times):
        self.ds, self.times = ds, int(times)

    def __len__(self):
        return len(self.ds) * self.times

    def __getitem__(self, n):
        return self.ds[n % len(self.ds)]


def train_dehazer(*, data=None, val_data=None, val_scenes=None, steps: int | None = None,
                  epochs: int | None = None, batch_size: int = 16, crop: int = 128, lr: float = 1e-3,
                  schedule="cosine", device="cpu", seed: int = 0, checkpoint=None, resume: bool = True,
                  val_every: int | None = None, checkpoint_every=None, amp: bool = False, workers: int = 0,
                  log_every: int = 50, progress: bool = True, grad_clip: float | None = 0.1,
                  stop_after=None, time_limit=None, log=None, repeat: int = 10, init=None) -> TrainResult:
    """AOD-Net on paired hazy/clean images (``DehazePairs`` layout), random
    ``crop`` x ``crop`` windows with flips, MSE loss, Adam, gradient-norm
    clipping (as the reference, 0.1). Validation on full images: the scenes
    ``val_scenes`` of ``data`` (held out of training; default
    :func:`held_out_scenes`), or all of ``val_data`` when given (then every
    scene of ``data`` trains). An epoch is ``repeat``
    passes over the training pairs.

    ``data`` defaults to ``../shared/data/sots_train``.
    """
    from .data import DehazePairs
    from .models import AODNet

    data = data if data is not None else default_data_dir("sots_train")
    if data is None:
        raise FileNotFoundError("no training data: pass --data DIR (hazy/ + gt/ folders; "
                                "../shared/data/sots_train was not found)")
    log = log or _default_log
    device = torch.device(device)
    torch.manual_seed(seed)
    model = AODNet()
    if init is not None:
        _load_init(model, init)
    pairs = DehazePairs(data)
    if val_data is not None:
        train_pairs, val_pairs, held_out = pairs, DehazePairs(val_data), []
    else:
        held_out = [str(s) for s in val_scenes] if val_scenes is not None else \
            held_out_scenes(pairs)
        train_pairs, val_pairs = split_held_out(pairs, held_out, data)
    val_fn = dehaze_validator(val_pairs, device=device)
    train_ds = _CachedCrops(train_pairs, crop)
    if len(train_ds) * repeat < batch_size:
        raise ValueError(f"{len(train_ds)} training pairs x {repeat} repeats give fewer samples than "
                         f"the batch size {batch_size}")
    log(f"[train dehaze] {len(train_ds)} training pairs ({len(train_pairs.scenes)} scenes) from {data}; "
        f"validation: {val_fn.images} pairs ({'scenes ' + ','.join(held_out) if held_out else val_data}), "
        f"hazy input PSNR {val_fn.hazy['psnr']:.2f} dB SSIM {val_fn.hazy['ssim']:.4f}")
    loader = _loader(_Repeat(train_ds, repeat), batch_size, True, workers, device=device)

    def make_batch(batch, dev):
        h, c = batch
        return h.to(dev, non_blocking=True), c.to(dev, non_blocking=True)

    config = {"task": "dehaze", "data": str(data), "val_data": None if val_data is None else str(val_data),
              "val_scenes": held_out, "batch_size": batch_size, "crop": crop, "lr": lr, "seed": seed,
              "schedule": schedule if isinstance(schedule, str) else "custom", "repeat": repeat,
              "init": None if init is None else str(init)}
    res = fit(model, loader, make_batch, val_fn, steps=steps, epochs=epochs, lr=lr, schedule=schedule,
              grad_clip=grad_clip, checkpoint=checkpoint, resume=resume, checkpoint_every=checkpoint_every,
              val_every=val_every, seed=seed, device=device, log_every=log_every, progress=progress, amp=amp,
              config=config, stop_after=stop_after, time_limit=time_limit, log=log, channels_last=True,
              desc="dehaze")
    model = model.cpu().float().eval()
    val = _val_eval(dehaze_validator(val_pairs, device="cpu"), model) if val_fn.images else {}
    meta = _common_meta("dehaze", res, batch_size, lr, seed, device, amp)
    meta.update({"sigma": None, "model": "AODNet()", "train_data": str(data),
                 "train_scenes": train_pairs.scenes, "train_pairs": len(train_ds), "crop": crop,
                 "val_data": str(val_data if val_data is not None else data), "val_scenes": held_out or
                 val_pairs.scenes, "val_images": val_fn.images, "val_psnr": val.get("psnr"),
                 "val_ssim": val.get("ssim"), "val_hazy_psnr": val_fn.hazy["psnr"],
                 "val_hazy_ssim": val_fn.hazy["ssim"], "finished": res.finished})
    return TrainResult(model=model, state_dict={k: v.detach().clone().contiguous()
                                                for k, v in model.state_dict().items()}, meta=meta, fit=res)


def save_weights(path, state_dict: Mapping, meta: Mapping | None = None) -> Path:
    """Write a plain state dict (tensors only; loads with ``weights_only=True``)
    to ``path`` and ``meta`` as JSON next to it (``path`` with suffix ``.json``),
    both atomically: both temporary files are written before either replaces
    its file, so a failure while writing leaves the old pair (or nothing)."""
    import json

    path = Path(path)
    sd = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"save_weights: {k} is a {type(v).__name__}, not a tensor")
        sd[str(k)] = v.detach().cpu().clone().contiguous()
    if meta is None:
        save_atomic(sd, path)
        return path
    text = json.dumps(_plain(dict(meta), "meta"), indent=1) + "\n"
    # both written before either is renamed: a failure leaves the old pair
    with atomic_paths(path, path.with_suffix(".json")) as (tmp, side):
        _save_synced(sd, tmp)
        with open(side, "w") as f:
            f.write(text)
    return path
