"""The training loop of one cascade stage, nnU-Net style, resumable and optionally distributed.

Follows the FLARE 2023 paper and nnU-Net v2: CE + Dice loss with deep
supervision, SGD with Nesterov momentum 0.99 and weight decay 3e-5, initial
learning rate 0.01 halved every 200 epochs (``schedule="poly"`` gives nnU-Net's
polynomial decay), gradient clipping at 12, batch 2, 33 % foreground
oversampling, AMP on CUDA.

The run folder holds ``config.json`` (everything needed to rebuild the net and
its preprocessing, including the intensity statistics), ``checkpoint_latest.pt``
(every epoch, atomic), ``checkpoint_best.pt`` (best validation mean DSC),
``history.json``, ``training_log.txt`` and ``progress.png``.

Distributed training: launch with ``torchrun --nproc_per_node N -m pocketseg
train ...``; each process trains on its own samples with DistributedDataParallel
(NCCL on CUDA, gloo on CPU) and rank 0 validates and writes the run folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from datetime import timedelta
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from pocketseg import __version__
from pocketseg import labels as L
from pocketseg.atomic import atomic_write_bytes
from pocketseg.errors import InputError, OutputError
from pocketseg.trainer import checkpoint as ckpt
from pocketseg.trainer.data import ROI_MARGIN_MM, PatchDataset, RunSampler, SamplingConfig, collate, detail_crop, stage_target
from pocketseg.trainer.dataset import open_dataset, validate_cases
from pocketseg.trainer.loss import DeepSupervisionLoss, DiceCELoss
from pocketseg.trainer.network import PocketUNet
from pocketseg.trainer.preprocess import IntensityStats, compute_fingerprint, load_preprocessed, preprocess_cases
from pocketseg.trainer.presets import STAGES, get_preset

log = logging.getLogger(__name__)

MOMENTUM = 0.99
WEIGHT_DECAY = 3e-5
GRAD_CLIP = 12.0
LR_HALVING_EPOCHS = 200
SPLIT_SEED = 12345  # as nnU-Net's 5-fold split
N_FOLDS = 5


@dataclass
class RunConfig:
    """What ``config.json`` records: enough to rebuild the net, its preprocessing and the run."""

    stage: str
    preset: dict[str, Any]
    intensity: dict[str, float]
    dataset: str
    train_cases: list[str]
    val_cases: list[str]
    epochs: int
    iterations: int
    batch_size: int
    lr: float
    schedule: str
    seed: int
    roi_margin_mm: float = ROI_MARGIN_MM
    labels: dict[str, int] = field(default_factory=L.dataset_json_labels)
    axis_order: str = "zyx"
    pocketseg_version: str = __version__


def learning_rate(epoch: int, epochs: int, lr: float, schedule: str) -> float:
    if schedule == "step":
        return lr * 0.5 ** (epoch // LR_HALVING_EPOCHS)
    if schedule == "poly":
        return lr * (1 - epoch / epochs) ** 0.9
    raise InputError(None, f"schedule must be 'step' or 'poly', got {schedule!r}")


def split_cases(names: list[str], *, fold: int = 0, val_fraction: float | None = None) -> tuple[list[str], list[str]]:
    """Train/validation split: a fixed 5-fold split (nnU-Net's seed) or a held-out fraction."""
    names = sorted(names)
    if len(names) < 2:
        log.warning("only %d case(s): validating on the training case", len(names))
        return names, list(names)
    order = [names[i] for i in np.random.default_rng(SPLIT_SEED).permutation(len(names))]
    if val_fraction is not None:
        if not 0 < val_fraction < 1:
            raise InputError(None, f"val_fraction must be between 0 and 1, got {val_fraction}")
        n_val = min(len(names) - 1, max(1, round(len(names) * val_fraction)))
        val = order[:n_val]
    else:
        if not 0 <= fold < N_FOLDS:
            raise InputError(None, f"fold must be 0-{N_FOLDS - 1}, got {fold}")
        val = order[fold::N_FOLDS] or order[:1]
        if len(val) == len(names):
            val = order[:1]
    return sorted(set(names) - set(val)), sorted(val)


def _dice(pred: np.ndarray, truth: np.ndarray, c: int) -> float:
    p, t = pred == c, truth == c
    denom = int(p.sum()) + int(t.sum())
    return float("nan") if denom == 0 else 2.0 * int((p & t).sum()) / denom


@torch.no_grad()
def validate(model: torch.nn.Module, folder: Path, names: list[str], cfg: SamplingConfig, device: torch.device,
             *, amp: bool = False) -> dict[str, float]:
    """Per-class DSC on whole validation cases (sliding window on the preprocessed grid, tile step 1.0).

    Detail stage: each case is cropped to its foreground box plus the ROI margin, as the ROI stage would.
    """
    from pocketseg.runtime.sliding_window import sliding_window_predict

    net = model.module if hasattr(model, "module") else model
    was_ds = net.deep_supervision
    net.deep_supervision = False
    net.eval()

    def infer(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            return net(x).float().cpu().numpy()

    scores: dict[int, list[float]] = {c: [] for c in range(1, cfg.num_classes)}
    try:
        for name in names:
            case = load_preprocessed(folder, name)
            image, seg = np.asarray(case.image), stage_target(np.asarray(case.seg), cfg.stage)
            if cfg.stage == "detail":
                lo, hi = detail_crop(case.props, image.shape, cfg.spacing_mm_zyx, cfg.roi_margin_mm, 0.0, None)
                box = tuple(slice(a, b) for a, b in zip(lo, hi))
                image, seg = image[box], seg[box]
            logits = sliding_window_predict(image, cfg.patch_zyx, infer, cfg.num_classes, step_fraction=1.0)
            pred = np.argmax(logits, axis=0)
            annotated = set(case.props.get("annotated", L.FOREGROUND_IDS)) if cfg.stage == "detail" else {1}
            for c in scores:
                if c in annotated:
                    d = _dice(pred, seg, c)
                    if not math.isnan(d):
                        scores[c].append(d)
    finally:
        net.deep_supervision = was_ds
        net.train()
    names_by_id = {1: "foreground"} if cfg.stage == "roi" else {lab.id: lab.name for lab in L.LABELS}
    return {names_by_id[c]: float(np.mean(v)) for c, v in scores.items() if v}


def _plot_progress(path: Path, history: list[dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    import io

    from pocketseg.atomic import atomic_write_bytes

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax1.set_ylabel("loss")
    lr_ax = ax1.twinx()
    lr_ax.plot(epochs, [h["lr"] for h in history], color="tab:gray", linestyle="--", label="lr")
    lr_ax.set_ylabel("learning rate")
    ax1.legend(loc="upper right")
    val = [h for h in history if h.get("val_dice")]
    if val:
        ax2.plot([h["epoch"] for h in val], [h["val_mean_dice"] for h in val], "o-", color="black", label="mean DSC")
        for key in val[-1]["val_dice"]:
            ax2.plot([h["epoch"] for h in val], [h["val_dice"].get(key, np.nan) for h in val], alpha=0.35, label=key)
        ax2.set_ylim(0, 1)
        ax2.legend(fontsize=7, ncol=3, loc="lower right")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation DSC")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue(), overwrite=True)


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise InputError(None, f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise InputError(None, "device cuda requested but no CUDA GPU is available to torch")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _check_out_dir(out: Path, resume: bool) -> None:
    latest = out / ckpt.LATEST
    if resume:
        if not latest.is_file():
            raise InputError(out, f"--resume given but there is no {ckpt.LATEST} to resume from")
        return
    if out.exists() and not out.is_dir():
        raise OutputError(out, "exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        raise OutputError(out, "is not empty; pass --resume to continue that run or choose a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(out, f"cannot create the run folder ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise OutputError(out, "run folder is not writable")


def default_cache_dir() -> Path:
    return Path(os.environ.get("POCKETSEG_CACHE", Path.home() / ".cache" / "pocketseg" / "preprocessed"))


def train(
    dataset: str | os.PathLike,
    *,
    stage: str,
    preset: str,
    epochs: int,
    out: str | os.PathLike,
    resume: bool = False,
    device: str = "auto",
    fold: int = 0,
    val_fraction: float | None = None,
    iterations: int = 250,
    batch_size: int = 2,
    lr: float = 0.01,
    schedule: str = "step",
    val_every: int = 5,
    workers: int | None = None,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
    amp: bool = True,
    progress: bool = True,
) -> Path:
    """Train one cascade stage on a raw nnU-Net v2 data set; returns the run folder."""
    if stage not in STAGES:
        raise InputError(None, f"stage must be one of {STAGES}, got {stage!r}")
    net_preset = get_preset(preset, stage)
    for name, value, low in (("epochs", epochs, 1), ("iterations", iterations, 1), ("batch_size", batch_size, 1),
                             ("val_every", val_every, 1)):
        if value < low:
            raise InputError(None, f"{name} must be >= {low}, got {value}")
    learning_rate(0, epochs, lr, schedule)  # validates the schedule name
    if not (math.isfinite(lr) and lr > 0):
        raise InputError(None, f"lr must be a positive number, got {lr}")
    if workers is not None and workers < 0:
        raise InputError(None, f"workers must be >= 0, got {workers}")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _resolve_device(device, local_rank)
    distributed = world > 1
    if distributed and not dist.is_initialized():
        # Rank 0 validates whole cases while the others wait: allow far more than the default timeout.
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)

    out = Path(out)
    data_root = Path(dataset)
    raw = open_dataset(data_root)
    cases = raw.labelled(full_only=True)
    _on_rank0(lambda: _check_out_dir(out, resume), rank, distributed)
    validate_cases(cases, dataset_root=data_root)

    handler = None
    pkg_logger = logging.getLogger("pocketseg")
    old_level = pkg_logger.level
    old_handler_levels: list[tuple[logging.Handler, int]] = []
    if rank == 0:  # the run folder keeps an INFO-level log whatever the console shows
        handler = logging.FileHandler(out / "training_log.txt")
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        pkg_logger.addHandler(handler)
        if pkg_logger.getEffectiveLevel() > logging.INFO:
            pkg_logger.setLevel(logging.INFO)
            for h in logging.getLogger().handlers:  # keep the console as quiet as it was
                old_handler_levels.append((h, h.level))
                h.setLevel(max(h.level, logging.root.level))
    try:
        return _run(raw.root, cases, net_preset, stage, epochs, out, resume, dev, fold, val_fraction, iterations,
                    batch_size, lr, schedule, val_every, workers, seed, cache, amp, progress, rank, world)
    finally:
        if handler is not None:
            pkg_logger.removeHandler(handler)
            pkg_logger.setLevel(old_level)
            for h, level in old_handler_levels:
                h.setLevel(level)
            handler.close()


def _barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()


def _on_rank0(work, rank: int, distributed: bool):
    """Run ``work`` on rank 0 only; every rank raises if it failed, so none is left waiting in a collective."""
    result, error = None, None
    if rank == 0:
        try:
            result = work()
        except Exception as exc:  # re-raised below on rank 0, reported on the others
            error = exc
    if distributed:
        flag = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(flag, src=0)
        if rank != 0 and flag[0] is not None:
            raise RuntimeError(f"rank 0 failed: {flag[0]}")
    if error is not None:
        raise error
    return result


def _write_json(path: Path, data) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode(), overwrite=True)


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, f"missing: the run folder has no {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"{what} is not valid JSON ({exc})") from None


def _run(root, cases, net_preset, stage, epochs, out, resume, dev, fold, val_fraction, iterations, batch_size, lr,
         schedule, val_every, workers, seed, cache, amp, progress, rank, world) -> Path:
    distributed = world > 1
    config_path = out / "config.json"
    if resume:
        try:
            run_cfg = RunConfig(**_read_json(config_path, "config.json"))
        except TypeError as exc:
            raise InputError(config_path, f"is not a config.json of this pocketseg ({exc})") from None
        if run_cfg.stage != stage or run_cfg.preset["name"] != net_preset.name:
            raise InputError(out, f"holds a {run_cfg.stage}/{run_cfg.preset['name']} run, not {stage}/{net_preset.name}")
        # A resumed run continues with the settings it started with; only the number of epochs may change.
        changed = {k: (getattr(run_cfg, k), v) for k, v in (("iterations", iterations), ("batch_size", batch_size),
                   ("lr", lr), ("schedule", schedule), ("seed", seed)) if getattr(run_cfg, k) != v}
        if changed and rank == 0:
            log.warning("resuming with the run's own settings, not %s",
                        ", ".join(f"{k}={new} (run: {old})" for k, (old, new) in changed.items()))
        iterations, batch_size, lr, schedule, seed = (run_cfg.iterations, run_cfg.batch_size, run_cfg.lr,
                                                      run_cfg.schedule, run_cfg.seed)
        run_cfg.epochs = epochs
        train_names, val_names = run_cfg.train_cases, run_cfg.val_cases
        stats = IntensityStats(**run_cfg.intensity)
    else:
        train_names, val_names = split_cases([c.name for c in cases], fold=fold, val_fraction=val_fraction)
        _on_rank0(lambda: _write_json(out / "fingerprint.json", compute_fingerprint(cases, progress=progress)),
                  rank, distributed)
        stats = IntensityStats(**_read_json(out / "fingerprint.json", "fingerprint.json")["intensity"])
        run_cfg = RunConfig(stage=stage, preset=net_preset.to_dict(), intensity=stats.to_dict(), dataset=str(root),
                            train_cases=train_names, val_cases=val_names, epochs=epochs, iterations=iterations,
                            batch_size=batch_size, lr=lr, schedule=schedule, seed=seed)
    _barrier(distributed)  # every rank has read config.json before rank 0 rewrites it
    if rank == 0:
        _write_json(config_path, asdict(run_cfg))

    by_name = {c.name: c for c in cases}
    needed = [by_name[n] for n in sorted(set(train_names) | set(val_names)) if n in by_name]
    if len(needed) != len(set(train_names) | set(val_names)):
        missing = sorted((set(train_names) | set(val_names)) - set(by_name))
        raise InputError(root, f"cases of the run are missing from the data set: {', '.join(missing)}")
    cache_root = Path(cache) if cache is not None else default_cache_dir()
    folder = _on_rank0(lambda: preprocess_cases(needed, stats, net_preset.spacing_mm_zyx, cache_root, progress=progress),
                       rank, distributed)
    if folder is None:
        from pocketseg.trainer.preprocess import cache_key

        folder = cache_root / cache_key(needed, stats, net_preset.spacing_mm_zyx)

    torch.manual_seed(seed)
    model = PocketUNet(net_preset.unet_config(), deep_supervision=True).to(dev)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    use_amp = amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start_epoch, history, best = 0, [], -1.0
    if resume:
        state = ckpt.load_checkpoint(out / ckpt.LATEST, map_location=dev)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best = int(state["epoch"]), float(state["best"])
        history = _read_json(out / "history.json", "history.json")[:start_epoch] if (out / "history.json").is_file() else []
        ckpt.set_rng_state(state["rng"])
        log.info("resuming %s at epoch %d/%d", out, start_epoch + 1, epochs)
    # The lowest deep-supervision head has loss weight 0 (as in nnU-Net) and never gets a gradient;
    # DDP must be told, or it waits for that gradient (static_graph does not cover it: replicas diverge).
    ddp_model = (torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
                 if distributed else model)
    loss_fn = DeepSupervisionLoss(DiceCELoss())

    sampling = SamplingConfig(stage=stage, patch_zyx=net_preset.patch_zyx, spacing_mm_zyx=net_preset.spacing_mm_zyx,
                              strides=net_preset.strides, num_classes=net_preset.num_classes)
    per_epoch = iterations * batch_size
    data = PatchDataset(folder, train_names, sampling, seed=seed, rank=rank, length=(epochs + 1) * per_epoch)
    sampler = RunSampler(per_epoch)
    if workers is None:
        workers = 0 if (os.cpu_count() or 1) <= 2 else min(4, (os.cpu_count() or 1) - 1)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                         collate_fn=collate, pin_memory=dev.type == "cuda",
                                         persistent_workers=workers > 0, worker_init_fn=_worker_init)

    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        epoch_lr = learning_rate(epoch, epochs, lr, schedule)
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr
        sampler.set_epoch(epoch)
        ddp_model.train()
        losses = []
        bar = tqdm(loader, total=iterations, desc=f"epoch {epoch + 1}/{epochs}", unit="it",
                   disable=not progress or rank != 0, leave=False)
        for batch in bar:
            image = batch["image"].to(dev, non_blocking=True)
            targets = [t.to(dev, non_blocking=True) for t in batch["targets"]]
            class_mask = batch["class_mask"].to(dev)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, enabled=use_amp):
                outputs = ddp_model(image)
                loss = loss_fn(outputs, targets, class_mask)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        mean_loss = float(np.mean(losses))
        if distributed:
            t = torch.tensor([mean_loss], dtype=torch.float64, device=dev)  # NCCL reduces device tensors only
            dist.all_reduce(t)
            mean_loss = float(t) / world
        entry: dict[str, Any] = {"epoch": epoch + 1, "train_loss": mean_loss, "lr": epoch_lr,
                                 "seconds": round(time.time() - t0, 2), "world_size": world}
        if distributed:
            entry["ranks_in_sync"] = _ranks_in_sync(model, world)
        if rank == 0 and ((epoch + 1) % val_every == 0 or epoch + 1 == epochs):
            dice = validate(model, folder, val_names, sampling, dev, amp=use_amp)
            entry["val_dice"] = dice
            entry["val_mean_dice"] = float(np.mean(list(dice.values()))) if dice else 0.0
        history.append(entry)
        if rank == 0:
            improved = entry.get("val_mean_dice", -1.0) > best
            if improved:
                best = entry["val_mean_dice"]
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "epoch": epoch + 1, "best": best, "rng": ckpt.rng_state(), "stage": stage,
                     "preset": net_preset.name, "finished": epoch + 1 == epochs}
            _write_json(out / "history.json", history)
            if improved:  # before LATEST: a kill between the two must not leave BEST older than LATEST's "best"
                ckpt.save_checkpoint(out / ckpt.BEST, state)
            ckpt.save_checkpoint(out / ckpt.LATEST, state)  # the epoch counts as done once this lands
            _plot_progress(out / "progress.png", history)
            val_text = ""
            if "val_dice" in entry:
                val_text = f", val mean DSC {entry['val_mean_dice']:.4f}" + (" (best)" if improved else "")
            log.info("epoch %d/%d: train loss %.4f, lr %.5f, %.1f s%s", epoch + 1, epochs, mean_loss, epoch_lr,
                     entry["seconds"], val_text)
        _barrier(distributed)
    if distributed:
        dist.destroy_process_group()
    return out


def _ranks_in_sync(model: torch.nn.Module, world: int) -> bool:
    """DDP keeps replicas identical; check it once per epoch with a cheap weight checksum."""
    with torch.no_grad():
        total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(total) for _ in range(world)]
    dist.all_gather(gathered, total)
    in_sync = all(torch.equal(g, gathered[0]) for g in gathered)
    if not in_sync:
        log.warning("distributed replicas diverged: weight checksums %s", [float(g) for g in gathered])
    return in_sync


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # workers only slice and augment; leave the cores to the training process
