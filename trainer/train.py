"""The training loop of one cascade stage, nnU-Net style, resumable and optionally distributed.

Follows the FLARE 2023 paper and nnU-Net v2: CE + Dice loss with deep
supervision, SGD with Nesterov momentum 0.99 and weight decay 3e-5, initial
learning rate 0.01 halved every 200 epochs (``schedule="poly"`` gives nnU-Net's
polynomial decay), gradient clipping at 12, batch 2, 33 % foreground
oversampling, AMP on CUDA. For short budgets ``optimizer="adamw"`` learns in far
fewer iterations (the reference model's recipe). On the CPU, ``cpu_bf16`` trains under bf16 autocast
(2.6x faster per iteration on a CPU with AVX-512 BF16; weights, optimiser and
loss stay fp32), and ``mirror=False`` leaves out mirroring, which makes left
and right organs look alike patch by patch.

The run folder holds ``config.json`` (everything needed to rebuild the net and
its preprocessing, including the intensity statistics), ``checkpoint_latest.pt``
(every epoch, atomic), ``checkpoint_best.pt`` (best validation mean DSC),
``history.json``, ``training_log.txt`` and ``progress.png``.

Distributed training: launch with ``torchrun --nproc_per_node N -m pocketseg
train ...``; each process trains on its own samples with DistributedDataParallel
(NCCL on CUDA, gloo on CPU) and rank 0 validates and writes the run folder.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from pocketseg import labels as L
from pocketseg.atomic import atomic_write_bytes, ensure_dir, read_json, write_json
from pocketseg.errors import InputError, MissingDependencyError, OutputError
from pocketseg.geometry import ROI_MARGIN_MM
from pocketseg.manifest import Intensity, sha256_file
from pocketseg.plotting import png_bytes, pyplot
from pocketseg.runtime.engines import cpu_bf16_support
from pocketseg.runtime.network import PocketUNet
from pocketseg.runtime.sliding_window import sliding_window_predict
from pocketseg.trainer import checkpoint as ckpt
from pocketseg.trainer.data import PatchDataset, RunSampler, SamplingConfig, collate, detail_crop, stage_target
from pocketseg.trainer.dataset import CaseRecord, open_dataset, validate_cases
from pocketseg.trainer.loss import DeepSupervisionLoss, DiceCELoss
from pocketseg.trainer.preprocess import cache_key, compute_fingerprint, load_preprocessed, preprocess_cases
from pocketseg.trainer.presets import STAGES, Preset, get_preset
from pocketseg.version import __version__

log = logging.getLogger(__name__)

MOMENTUM = 0.99
WEIGHT_DECAY = 3e-5
ADAMW_WEIGHT_DECAY = 1e-4
OPTIMIZERS = ("sgd", "adamw")
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
    cpu_bf16: bool = False
    mirror: bool = True
    optimizer: str = "sgd"
    crop_widen_mm: float = 0.0
    init_weights: dict[str, str] | None = None
    labels: dict[str, int] = field(default_factory=L.dataset_json_labels)
    axis_order: str = "zyx"
    pocketseg_version: str = __version__


def load_init_weights(model: torch.nn.Module, path: Path, preset: Preset) -> None:
    """Load a package's stage weights (safetensors) or a run's checkpoint into ``model``; one clear error if they
    are missing, unreadable or belong to another net."""
    if not path.is_file():
        raise InputError(path, "initial weights: no such file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file  # optional (train extra), as for the torch backend
        except ImportError:
            raise MissingDependencyError("safetensors", "Initial weights from a package", "train") from None
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise InputError(path, f"initial weights: not a readable safetensors file ({exc})") from None
    else:
        state = ckpt.load_checkpoint(path).get("model")
        if not isinstance(state, dict):
            raise InputError(path, "initial weights: the checkpoint holds no model weights")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(path, f"initial weights do not fit the {preset.name!r} net "
                               f"({str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc})"
                         ) from None
    log.info("initial weights from %s", path)


def make_optimizer(model: torch.nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum 0.99 and weight decay 3e-5 (nnU-Net, the paper), or AdamW."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=ADAMW_WEIGHT_DECAY)
    raise InputError(None, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


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
             *, amp: bool = False, cpu_bf16: bool = False) -> dict[str, float]:
    """Per-class DSC on whole validation cases (sliding window on the preprocessed grid, tile step 1.0).

    Detail stage: each case is cropped to its foreground box plus the ROI margin, as the ROI stage would.
    """
    net = model.module if hasattr(model, "module") else model
    was_ds = net.deep_supervision
    net.deep_supervision = False
    net.eval()

    def infer(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
        with _autocast(device, amp=amp, cpu_bf16=cpu_bf16):
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
            logits = sliding_window_predict(image, cfg.patch_zyx, infer, cfg.num_classes, overlap=0.0)
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


def _autocast(device: torch.device, *, amp: bool, cpu_bf16: bool):
    """fp16 autocast on CUDA (with ``amp``), bf16 autocast on the CPU (with ``cpu_bf16``), else none."""
    if device.type == "cuda":
        return torch.autocast("cuda", enabled=amp)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16)


def _plot_progress(path: Path, history: list[dict[str, Any]]) -> None:
    try:
        plt = pyplot("The training progress plot")
    except MissingDependencyError:  # matplotlib is optional (viz extra): the run then has no progress.png
        return
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
    atomic_write_bytes(path, png_bytes(fig, dpi=80), overwrite=True)


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
    ensure_dir(out, "run folder")
    if not os.access(out, os.W_OK):
        raise OutputError(out, "run folder is not writable")


def default_cache_dir() -> Path:
    return Path(os.environ.get("POCKETSEG_CACHE", Path.home() / ".cache" / "pocketseg" / "preprocessed"))


@dataclass(frozen=True)
class TrainSettings:
    """What the caller of :func:`train` asked for (a resumed run keeps its recorded settings, see :class:`Trainer`)."""

    stage: str
    preset: Preset
    epochs: int
    resume: bool = False
    fold: int = 0
    val_fraction: float | None = None
    iterations: int = 250
    batch_size: int = 2
    lr: float = 0.01
    schedule: str = "step"
    val_every: int = 5
    workers: int | None = None
    seed: int = 0
    cache: Path | None = None
    amp: bool = True
    cpu_bf16: bool = False
    mirror: bool = True
    optimizer: str = "sgd"
    crop_widen_mm: float = 0.0
    init_weights: Path | None = None
    progress: bool = True

    def check(self) -> None:
        """Refuse bad values before anything is read or written."""
        for name, value, low in (("epochs", self.epochs, 1), ("iterations", self.iterations, 1),
                                 ("batch_size", self.batch_size, 1), ("val_every", self.val_every, 1)):
            if value < low:
                raise InputError(None, f"{name} must be >= {low}, got {value}")
        learning_rate(0, self.epochs, self.lr, self.schedule)  # validates the schedule name
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(None, f"lr must be a positive number, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(None, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not (math.isfinite(self.crop_widen_mm) and self.crop_widen_mm >= 0):
            raise InputError(None, f"crop_widen_mm must be a number >= 0, got {self.crop_widen_mm}")
        if self.crop_widen_mm > 0 and self.stage != "detail":
            raise InputError(None, "crop_widen_mm applies to the detail stage only (the ROI stage sees whole scans)")
        if self.init_weights is not None and not self.resume:
            # Read and fitted to the preset's net now, before a run folder exists: a wrong file leaves nothing.
            load_init_weights(PocketUNet(self.preset.unet_config(), deep_supervision=True), self.init_weights,
                              self.preset)
        if self.workers is not None and self.workers < 0:
            raise InputError(None, f"workers must be >= 0, got {self.workers}")


@dataclass(frozen=True)
class Ranks:
    """This process's place in a distributed run (torchrun's environment); one process: rank 0 of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @staticmethod
    def from_environment() -> Ranks:
        return Ranks(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                     int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def distributed(self) -> bool:
        return self.world > 1


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
    cpu_bf16: bool = False,
    mirror: bool = True,
    optimizer: str = "sgd",
    crop_widen_mm: float = 0.0,
    init_weights: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Train one cascade stage on a raw nnU-Net v2 data set (``pocketseg train``); returns the run folder.

    Args:
        dataset: raw data set folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``).
        stage: ``roi`` or ``detail``.
        preset: network preset of that stage (``pocketseg model-info`` lists them).
        epochs: number of epochs (a resumed run may be given more).
        out: run folder, created; it must be new unless ``resume``.
        resume: continue the run in ``out`` from its last checkpoint, with the settings it started with.
        device: ``auto``, ``cpu`` or ``cuda``.
        fold: validation fold of a fixed 5-fold split; or ``val_fraction``: hold out this fraction instead.
        iterations: iterations per epoch. batch_size: patches per iteration. lr: initial learning rate.
        schedule: ``step`` (halve every 200 epochs, the paper) or ``poly`` (nnU-Net).
        val_every: validate every N epochs (and after the last).
        workers: background data-loading processes (default: by core count).
        seed: random seed. cache: preprocessing cache folder. amp: mixed precision on CUDA.
        cpu_bf16: bf16 autocast when training on the CPU (fast where the CPU has AVX-512 BF16 or AMX).
        mirror: mirroring augmentation along every axis (nnU-Net's default).
        optimizer: ``sgd`` (Nesterov momentum 0.99, the paper and nnU-Net) or ``adamw`` (weight decay 1e-4;
            learns in far fewer iterations, used by the reference model's short CPU recipe).
        crop_widen_mm: detail stage: also widen each side of the ROI-like training crop by a random 0..N mm, so
            that the net learns the wider boxes of an ROI net that marks neighbouring tissue (default 0).
        init_weights: start a new run from these weights instead of He initialisation: a package's stage weights
            (``roi.safetensors`` / ``detail.safetensors``) or a run's checkpoint (``checkpoint_*.pt``) of the same
            preset; recorded with its SHA-256 in ``config.json`` (fine-tuning).
        progress: show progress bars.
    """
    if stage not in STAGES:
        raise InputError(None, f"stage must be one of {STAGES}, got {stage!r}")
    settings = TrainSettings(stage=stage, preset=get_preset(preset, stage), epochs=epochs, resume=resume, fold=fold,
                             val_fraction=val_fraction, iterations=iterations, batch_size=batch_size, lr=lr,
                             schedule=schedule, val_every=val_every, workers=workers, seed=seed,
                             cache=None if cache is None else Path(cache), amp=amp, cpu_bf16=cpu_bf16, mirror=mirror,
                             optimizer=optimizer, crop_widen_mm=crop_widen_mm,
                             init_weights=None if init_weights is None else Path(init_weights), progress=progress)
    settings.check()
    ranks = Ranks.from_environment()
    dev = _resolve_device(device, ranks.local_rank)
    if ranks.distributed and not dist.is_initialized():
        # Rank 0 validates whole cases while the others wait: allow far more than the default timeout.
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)

    out = Path(out)
    data_root = Path(dataset)
    raw = open_dataset(data_root)
    cases = raw.labelled(full_only=True)
    if not cases:
        validate_cases(cases, dataset_root=data_root)  # refuses: nothing to train on
    # Every label file, the partially labelled ones too (not trained on here, but a bad one would surface only
    # in self-training), before the run folder exists: bad data leaves nothing behind.
    validate_cases(raw.labelled(full_only=False), dataset_root=data_root)
    created = not out.exists()
    _on_rank0(lambda: _check_out_dir(out, resume), ranks)
    try:
        with _run_log(out, ranks):
            return Trainer(raw.root, cases, settings, out, dev, ranks).fit()
    except BaseException:
        if created and ranks.rank == 0:
            _remove_unstarted_run(out)
        raise


def _remove_unstarted_run(out: Path) -> None:
    """Remove the run folder this call created when the run failed before its first checkpoint, so that a
    rerun is not refused for a folder that holds nothing but the failed attempt's log (the error itself has
    been raised to the caller)."""
    if (out / ckpt.LATEST).exists():
        return
    log.warning("%s: the run failed before its first checkpoint; its folder is removed", out)
    shutil.rmtree(out, ignore_errors=True)


@contextlib.contextmanager
def _run_log(out: Path, ranks: Ranks) -> Iterator[None]:
    """On rank 0, an INFO-level ``training_log.txt`` in the run folder whatever the console shows."""
    if ranks.rank != 0:
        yield
        return
    pkg_logger = logging.getLogger("pocketseg")
    old_level = pkg_logger.level
    old_handler_levels: list[tuple[logging.Handler, int]] = []
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
        yield
    finally:
        pkg_logger.removeHandler(handler)
        pkg_logger.setLevel(old_level)
        for h, level in old_handler_levels:
            h.setLevel(level)
        handler.close()


def _barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def _on_rank0(work, ranks: Ranks):
    """Run ``work`` on rank 0 only; every rank raises if it failed, so none is left waiting in a collective."""
    result, error = None, None
    if ranks.rank == 0:
        try:
            result = work()
        except Exception as exc:  # re-raised below on rank 0, reported on the others
            error = exc
    if ranks.distributed:
        flag = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(flag, src=0)
        if ranks.rank != 0 and flag[0] is not None:
            raise RuntimeError(f"rank 0 failed: {flag[0]}")
    if error is not None:
        raise error
    return result


def _read_json(path: Path, what: str):
    return read_json(path, missing=f"missing: the run folder has no {what}")


class Trainer:
    """One stage's training run over its run folder: the run config and the train state, advanced epoch by epoch.

    :meth:`fit` runs what is left of the run: :meth:`train_step` per batch, :meth:`validate` every
    ``val_every`` epochs on rank 0, and :meth:`save_epoch` (history, checkpoints, plot) after each epoch.
    A resumed run continues with the settings recorded in its ``config.json``; only the number of
    epochs may change.
    """

    def __init__(self, root: Path, cases: list[CaseRecord], settings: TrainSettings, out: Path, device: torch.device,
                 ranks: Ranks = Ranks()):
        self.root, self.cases, self.settings, self.out, self.device, self.ranks = root, cases, settings, out, device, ranks
        self.config = self._load_config() if settings.resume else self._new_config()
        _barrier(ranks)  # every rank has read config.json before rank 0 rewrites it
        if ranks.rank == 0:
            write_json(out / "config.json", asdict(self.config), overwrite=True)
        self.folder = self._preprocess()
        preset, cfg = settings.preset, self.config
        torch.manual_seed(cfg.seed)
        self.model = PocketUNet(preset.unet_config(), deep_supervision=True).to(device)
        self.optimizer = make_optimizer(self.model, cfg.optimizer, cfg.lr)
        self.use_amp = settings.amp and device.type == "cuda"
        self.cpu_bf16 = self.config.cpu_bf16 and device.type == "cpu"
        if self.config.cpu_bf16 and device.type == "cpu" and ranks.rank == 0:
            native, why = cpu_bf16_support()
            if not native:
                log.warning("bf16 training on a CPU without native bf16 is slower than fp32 (%s)", why)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.start_epoch, self.history, self.best = 0, [], -1.0
        if settings.resume:
            self._restore()
        elif self.config.init_weights is not None:
            load_init_weights(self.model, Path(self.config.init_weights["path"]), settings.preset)
        # The lowest deep-supervision head has loss weight 0 (as in nnU-Net) and never gets a gradient;
        # DDP must be told, or it waits for that gradient (static_graph does not cover it: replicas diverge).
        self.ddp_model = (torch.nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=True)
                          if ranks.distributed else self.model)
        self.loss_fn = DeepSupervisionLoss(DiceCELoss())
        self.sampling = SamplingConfig(stage=cfg.stage, patch_zyx=preset.patch_zyx, spacing_mm_zyx=preset.spacing_mm_zyx,
                                       strides=preset.strides, num_classes=preset.num_classes,
                                       mirror_axes=(0, 1, 2) if cfg.mirror else (), crop_widen_mm=cfg.crop_widen_mm)
        self.loader, self.sampler = self._loader()

    # ---------------------------------------------------------------------------------------------- the run config

    def _load_config(self) -> RunConfig:
        s, config_path = self.settings, self.out / "config.json"
        try:
            cfg = RunConfig(**_read_json(config_path, "config.json"))
        except TypeError as exc:
            raise InputError(config_path, f"is not a config.json of this pocketseg ({exc})") from None
        if cfg.stage != s.stage or cfg.preset["name"] != s.preset.name:
            raise InputError(self.out, f"holds a {cfg.stage}/{cfg.preset['name']} run, not {s.stage}/{s.preset.name}")
        changed = {k: (getattr(cfg, k), getattr(s, k))
                   for k in ("iterations", "batch_size", "lr", "schedule", "seed", "cpu_bf16", "mirror",
                             "optimizer", "crop_widen_mm")
                   if getattr(cfg, k) != getattr(s, k)}
        if s.init_weights is not None and self.ranks.rank == 0:
            recorded = (cfg.init_weights or {}).get("path")
            log.warning("resuming from the run's last checkpoint; --init-weights %s is not used (the run started "
                        "from %s)", s.init_weights, recorded or "He initialisation")
        if changed and self.ranks.rank == 0:
            log.warning("resuming with the run's own settings, not %s",
                        ", ".join(f"{k}={new} (run: {old})" for k, (old, new) in changed.items()))
        cfg.epochs = s.epochs
        return cfg

    def _new_config(self) -> RunConfig:
        s = self.settings
        train_names, val_names = split_cases([c.name for c in self.cases], fold=s.fold, val_fraction=s.val_fraction)
        _on_rank0(lambda: write_json(self.out / "fingerprint.json", compute_fingerprint(self.cases, progress=s.progress),
                                     overwrite=True), self.ranks)
        intensity = _read_json(self.out / "fingerprint.json", "fingerprint.json")["intensity"]
        return RunConfig(stage=s.stage, preset=s.preset.to_dict(), intensity=intensity, dataset=str(self.root),
                         train_cases=train_names, val_cases=val_names, epochs=s.epochs, iterations=s.iterations,
                         batch_size=s.batch_size, lr=s.lr, schedule=s.schedule, seed=s.seed,
                         cpu_bf16=s.cpu_bf16, mirror=s.mirror, optimizer=s.optimizer, crop_widen_mm=s.crop_widen_mm,
                         init_weights=None if s.init_weights is None else
                         {"path": str(s.init_weights.resolve()), "sha256": sha256_file(s.init_weights)})

    @property
    def intensity(self) -> Intensity:
        return Intensity(**self.config.intensity)

    def _preprocess(self) -> Path:
        cfg, preset = self.config, self.settings.preset
        wanted = set(cfg.train_cases) | set(cfg.val_cases)
        by_name = {c.name: c for c in self.cases}
        missing = sorted(wanted - set(by_name))
        if missing:
            raise InputError(self.root, f"cases of the run are missing from the data set: {', '.join(missing)}")
        needed = [by_name[n] for n in sorted(wanted)]
        cache_root = self.settings.cache if self.settings.cache is not None else default_cache_dir()
        folder = _on_rank0(lambda: preprocess_cases(needed, self.intensity, preset.spacing_mm_zyx, cache_root,
                                                    progress=self.settings.progress), self.ranks)
        return folder if folder is not None else cache_root / cache_key(needed, self.intensity, preset.spacing_mm_zyx)

    # ---------------------------------------------------------------------------------------------- the train state

    def _restore(self) -> None:
        state = ckpt.load_checkpoint(self.out / ckpt.LATEST, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.best = int(state["epoch"]), float(state["best"])
        history_path = self.out / "history.json"
        self.history = _read_json(history_path, "history.json")[: self.start_epoch] if history_path.is_file() else []
        ckpt.set_rng_state(state["rng"])
        log.info("resuming %s at epoch %d/%d", self.out, self.start_epoch + 1, self.config.epochs)

    def _loader(self) -> tuple[torch.utils.data.DataLoader, RunSampler]:
        cfg = self.config
        per_epoch = cfg.iterations * cfg.batch_size
        data = PatchDataset(self.folder, cfg.train_cases, self.sampling, seed=cfg.seed, rank=self.ranks.rank,
                            length=(cfg.epochs + 1) * per_epoch)
        sampler = RunSampler(per_epoch)
        workers = self.settings.workers
        if workers is None:
            workers = 0 if (os.cpu_count() or 1) <= 2 else min(4, (os.cpu_count() or 1) - 1)
        loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                                             collate_fn=collate, pin_memory=self.device.type == "cuda",
                                             persistent_workers=workers > 0, worker_init_fn=_worker_init)
        return loader, sampler

    # ---------------------------------------------------------------------------------------------- epochs

    def train_step(self, batch: dict[str, Any]) -> float:
        """One optimiser step on one batch; returns its loss."""
        dev = self.device
        image = batch["image"].to(dev, non_blocking=True)
        targets = [t.to(dev, non_blocking=True) for t in batch["targets"]]
        class_mask = batch["class_mask"].to(dev)
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(dev, amp=self.use_amp, cpu_bf16=self.cpu_bf16):
            outputs = self.ddp_model(image)
        loss = self.loss_fn([o.float() for o in outputs], targets, class_mask)  # softmax and CE in fp32
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch; returns its history entry (loss averaged over the ranks)."""
        cfg, ranks = self.config, self.ranks
        t0 = time.time()
        epoch_lr = learning_rate(epoch, cfg.epochs, cfg.lr, cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = epoch_lr
        self.sampler.set_epoch(epoch)
        self.ddp_model.train()
        losses = []
        bar = tqdm(self.loader, total=cfg.iterations, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="it",
                   disable=not self.settings.progress or ranks.rank != 0, leave=False)
        for batch in bar:
            losses.append(self.train_step(batch))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        mean_loss = float(np.mean(losses))
        if ranks.distributed:
            t = torch.tensor([mean_loss], dtype=torch.float64, device=self.device)  # NCCL reduces device tensors only
            dist.all_reduce(t)
            mean_loss = float(t) / ranks.world
        entry: dict[str, Any] = {"epoch": epoch + 1, "train_loss": mean_loss, "lr": epoch_lr,
                                 "seconds": round(time.time() - t0, 2), "world_size": ranks.world}
        if ranks.distributed:
            entry["ranks_in_sync"] = _ranks_in_sync(self.model, ranks.world)
        return entry

    def validate(self) -> dict[str, float]:
        """Per-class validation DSC of the current weights (see :func:`validate`)."""
        return validate(self.model, self.folder, self.config.val_cases, self.sampling, self.device, amp=self.use_amp,
                        cpu_bf16=self.cpu_bf16)

    def save_epoch(self, entry: dict[str, Any]) -> None:
        """Rank 0: record the epoch (history, checkpoints, progress plot) and log it."""
        cfg, epoch = self.config, entry["epoch"]
        self.history.append(entry)
        improved = entry.get("val_mean_dice", -1.0) > self.best
        if improved:
            self.best = entry["val_mean_dice"]
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "epoch": epoch, "best": self.best, "rng": ckpt.rng_state(),
                 "stage": cfg.stage, "preset": self.settings.preset.name, "finished": epoch == cfg.epochs}
        write_json(self.out / "history.json", self.history, overwrite=True, allow_nan=True)  # a diverged loss is NaN
        if improved:  # before LATEST: a kill between the two must not leave BEST older than LATEST's "best"
            ckpt.save_checkpoint(self.out / ckpt.BEST, state)
        ckpt.save_checkpoint(self.out / ckpt.LATEST, state)  # the epoch counts as done once this lands
        _plot_progress(self.out / "progress.png", self.history)
        val_text = ""
        if "val_dice" in entry:
            val_text = f", val mean DSC {entry['val_mean_dice']:.4f}" + (" (best)" if improved else "")
        log.info("epoch %d/%d: train loss %.4f, lr %.5f, %.1f s%s", epoch, cfg.epochs, entry["train_loss"],
                 entry["lr"], entry["seconds"], val_text)

    def fit(self) -> Path:
        """Train the epochs that are left; returns the run folder."""
        cfg, ranks = self.config, self.ranks
        for epoch in range(self.start_epoch, cfg.epochs):
            entry = self.train_epoch(epoch)
            if ranks.rank == 0 and ((epoch + 1) % self.settings.val_every == 0 or epoch + 1 == cfg.epochs):
                dice = self.validate()
                entry["val_dice"] = dice
                entry["val_mean_dice"] = float(np.mean(list(dice.values()))) if dice else 0.0
            if ranks.rank == 0:
                self.save_epoch(entry)
            else:
                self.history.append(entry)
            _barrier(ranks)
        if ranks.distributed:
            dist.destroy_process_group()
        return self.out


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
