"""Training: the loss falls, resume is exact, a killed run resumes, 2-process DDP, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pocketseg.errors import InputError, OutputError
from pocketseg.synth.dataset import synthesize_dataset
from pocketseg.trainer import checkpoint as ckpt
from pocketseg.trainer.train import split_cases, train

QUICK = dict(iterations=3, batch_size=2, val_every=1, workers=0, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "ds"
    synthesize_dataset(root, full=4, partial=1, seed=5, small=True, slices=40, progress=False)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def weights(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(run / ckpt.LATEST)["model"]


def test_loss_falls_on_the_tiny_preset(dataset, cache, tmp_path):
    run = train(dataset, stage="detail", preset="detail-tiny", epochs=4, out=tmp_path / "run", cache=cache,
                **{**QUICK, "iterations": 12, "val_every": 4})
    history = json.loads((run / "history.json").read_text())
    losses = [h["train_loss"] for h in history]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert losses[-1] < losses[0] - 0.1, losses
    assert "liver" in history[-1]["val_dice"] and 0 <= history[-1]["val_mean_dice"] <= 1
    config = json.loads((run / "config.json").read_text())
    assert config["stage"] == "detail" and config["preset"]["name"] == "detail-tiny"
    assert set(config["intensity"]) == {"mean", "std", "percentile_00_5", "percentile_99_5"}
    assert set(config["val_cases"]).isdisjoint(config["train_cases"])
    assert "FLARESyn_0005" not in config["train_cases"] + config["val_cases"]  # the partial case is not used
    assert (run / "progress.png").read_bytes()[:4] == b"\x89PNG"
    best = ckpt.load_checkpoint(run / ckpt.BEST)
    validated = [h for h in history if "val_mean_dice" in h]
    assert best["epoch"] == max(validated, key=lambda h: h["val_mean_dice"])["epoch"]
    assert best["best"] == pytest.approx(max(h["val_mean_dice"] for h in validated))
    assert "epoch 4/4" in (run / "training_log.txt").read_text()


def test_the_short_cpu_recipe_options_are_recorded_and_take_effect(dataset, cache, tmp_path, monkeypatch):
    """AdamW, bf16 autocast on the CPU and no mirroring (the reference model's recipe): each reaches the step."""
    from pocketseg.trainer import augment, train as train_module

    casts, mirrors = [], []
    real_autocast, real_transforms = train_module._autocast, augment.training_transforms

    def spy_autocast(device, *, amp, cpu_bf16):
        casts.append(cpu_bf16)
        return real_autocast(device, amp=amp, cpu_bf16=cpu_bf16)

    def spy_transforms(patch, *, mirror_axes=(0, 1, 2)):
        mirrors.append(tuple(mirror_axes))
        return real_transforms(patch, mirror_axes=mirror_axes)

    monkeypatch.setattr(train_module, "_autocast", spy_autocast)
    monkeypatch.setattr("pocketseg.trainer.data.training_transforms", spy_transforms)
    run = train(dataset, stage="detail", preset="detail-tiny", epochs=2, out=tmp_path / "run", cache=cache,
                device="cpu", optimizer="adamw", lr=0.003, cpu_bf16=True, mirror=False,
                **{**QUICK, "iterations": 6, "val_every": 2})
    config = json.loads((run / "config.json").read_text())
    assert (config["optimizer"], config["cpu_bf16"], config["mirror"]) == ("adamw", True, False)
    state = ckpt.load_checkpoint(run / ckpt.LATEST)["optimizer"]
    assert "exp_avg" in next(iter(state["state"].values()))  # AdamW's moments, not SGD's momentum buffer
    assert casts and all(casts)
    assert mirrors == [()]
    history = json.loads((run / "history.json").read_text())
    assert all(np.isfinite(h["train_loss"]) for h in history)
    with pytest.raises(InputError, match="optimizer must be"):
        train(dataset, stage="detail", preset="detail-tiny", epochs=1, out=tmp_path / "bad", cache=cache,
              optimizer="adam", **QUICK)


def test_fine_tuning_starts_from_given_weights_on_widened_crops(dataset, cache, tmp_path, monkeypatch):
    """--init-weights (a run's checkpoint or a package's safetensors) and --crop-widen-mm (the reference model's
    phase 2): the new run starts from those weights, records them with their SHA-256, and samples wider crops."""
    from pocketseg.manifest import sha256_file
    from pocketseg.runtime.network import PocketUNet
    from pocketseg.trainer import data as data_module
    from pocketseg.trainer import train as train_module
    from pocketseg.trainer.presets import get_preset

    first = train(dataset, stage="detail", preset="detail-tiny", epochs=1, out=tmp_path / "first", cache=cache,
                  **QUICK)
    start = first / ckpt.LATEST
    loaded, widen = [], []
    real_load, real_crop = train_module.load_init_weights, data_module.detail_crop

    def spy_load(model, path, preset):
        real_load(model, path, preset)
        loaded.append({k: v.clone() for k, v in model.state_dict().items()})

    def spy_crop(*args, **kwargs):
        widen.append(args[6] if len(args) > 6 else kwargs.get("widen_mm", 0.0))
        return real_crop(*args, **kwargs)

    monkeypatch.setattr(train_module, "load_init_weights", spy_load)
    monkeypatch.setattr(data_module, "detail_crop", spy_crop)
    run = train(dataset, stage="detail", preset="detail-tiny", epochs=1, out=tmp_path / "tuned", cache=cache,
                init_weights=start, crop_widen_mm=40.0, **QUICK)
    config = json.loads((run / "config.json").read_text())
    assert config["init_weights"] == {"path": str(start.resolve()), "sha256": sha256_file(start)}
    assert config["crop_widen_mm"] == 40.0
    assert loaded and all(torch.equal(loaded[-1][k], v) for k, v in weights(first).items())
    assert widen and set(widen) == {40.0}

    # Widening grows every side of the crop by 0..40 mm (one voxel of rounding), and by clearly more than nothing.
    props = {"fg_bbox_zyx": [[30, 50], [100, 140], [100, 140]]}
    spacing = np.array([2.5, 1.6, 1.6])
    rng = np.random.default_rng(0)
    lo0, hi0 = real_crop(props, (200, 400, 400), tuple(spacing), 20.0, 0.0, None)
    grown = []
    for _ in range(50):
        lo, hi = real_crop(props, (200, 400, 400), tuple(spacing), 20.0, 0.0, rng, 40.0)
        assert np.all(lo <= lo0) and np.all(hi >= hi0)
        assert np.all((lo0 - lo) * spacing <= 40.0 + spacing) and np.all((hi - hi0) * spacing <= 40.0 + spacing)
        grown.append(np.concatenate([(lo0 - lo) * spacing, (hi - hi0) * spacing]))
    assert 15.0 < np.mean(grown) < 25.0  # uniform on 0..40 mm: a mean of 20 mm per side

    # A package's safetensors works as well; a net of another preset, a missing file and widening the ROI stage
    # are refused before anything is written, even into an existing empty folder.
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    net = PocketUNet(get_preset("detail-tiny", "detail").unet_config(), deep_supervision=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "detail.safetensors"))
    train(dataset, stage="detail", preset="detail-tiny", epochs=1, out=tmp_path / "from-package", cache=cache,
          init_weights=tmp_path / "detail.safetensors", **QUICK)
    (tmp_path / "misfit").mkdir()
    with pytest.raises(InputError, match="do not fit the 'roi-tiny' net"):
        train(dataset, stage="roi", preset="roi-tiny", epochs=1, out=tmp_path / "misfit", cache=cache,
              init_weights=start, **QUICK)
    assert not any((tmp_path / "misfit").iterdir())
    with pytest.raises(InputError, match="no such file"):
        train(dataset, stage="detail", preset="detail-tiny", epochs=1, out=tmp_path / "none", cache=cache,
              init_weights=tmp_path / "absent.pt", **QUICK)
    with pytest.raises(InputError, match="detail stage only"):
        train(dataset, stage="roi", preset="roi-tiny", epochs=1, out=tmp_path / "roi-widen", cache=cache,
              crop_widen_mm=10.0, **QUICK)
    assert not (tmp_path / "none").exists() and not (tmp_path / "roi-widen").exists()


def test_mirroring_is_left_out_of_the_pipeline_when_asked():
    pytest.importorskip("batchgeneratorsv2")
    from pocketseg.trainer.augment import training_transforms

    def names(pipeline):
        return [type(getattr(t, "transform", t)).__name__ for t in pipeline.transforms]

    assert "MirrorTransform" in names(training_transforms((16, 32, 32)))
    assert "MirrorTransform" not in names(training_transforms((16, 32, 32), mirror_axes=()))


def test_resume_continues_exactly(dataset, cache, tmp_path):
    straight = train(dataset, stage="roi", preset="roi-tiny", epochs=2, out=tmp_path / "a", cache=cache, **QUICK)
    part = train(dataset, stage="roi", preset="roi-tiny", epochs=1, out=tmp_path / "b", cache=cache, **QUICK)
    torch.manual_seed(999)  # disturb the global RNG: resume must restore what it needs
    np.random.seed(999)
    # Changed settings on the command line do not alter a resumed run: it continues with its own.
    resumed = train(dataset, stage="roi", preset="roi-tiny", epochs=2, out=part, resume=True, cache=cache,
                    **{**QUICK, "iterations": 7, "lr": 0.5, "seed": 3})
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ha = json.loads((straight / "history.json").read_text())
    hb = json.loads((resumed / "history.json").read_text())
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]


def test_killed_run_keeps_a_good_checkpoint_and_resumes(dataset, cache, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pocketseg", "-q", "train", str(dataset), "--stage", "roi", "--preset", "roi-tiny",
           "--epochs", "4", "--iterations", "15", "--out", str(run), "--cache", str(cache), "--workers", "0",
           "--val-every", "10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and not (run / "history.json").is_file():
        time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()
    time.sleep(0.3)  # now somewhere inside epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = ckpt.load_checkpoint(run / ckpt.LATEST)
    assert 1 <= state["epoch"] < 4 and not state["finished"]
    assert not list(run.glob(".*.part")) or all(p.suffix == ".part" for p in run.glob(".*.part"))
    res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    final = ckpt.load_checkpoint(run / ckpt.LATEST)
    assert final["epoch"] == 4 and final["finished"]
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_process_ddp_on_gloo(dataset, cache, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pocketseg",
           "-q", "train", str(dataset), "--stage", "roi", "--preset", "roi-tiny", "--epochs", "2", "--iterations", "2",
           "--out", str(run), "--cache", str(cache), "--workers", "0", "--device", "cpu", "--val-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["world_size"] == 2 and h["ranks_in_sync"] for h in history)
    assert ckpt.load_checkpoint(run / ckpt.LATEST)["finished"]


def test_split_is_fixed_and_disjoint():
    names = [f"c{i}" for i in range(11)]
    folds = [split_cases(names, fold=f) for f in range(5)]
    assert sorted(sum((v for _, v in folds), [])) == sorted(names)
    for tr, va in folds:
        assert set(tr).isdisjoint(va) and set(tr) | set(va) == set(names)
    assert split_cases(names, fold=2) == split_cases(list(reversed(names)), fold=2)
    tr, va = split_cases(names, val_fraction=0.3)
    assert len(va) == 3
    with pytest.raises(InputError):
        split_cases(names, fold=7)


def _copy(dataset: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ds"
    shutil.copytree(dataset, dst)
    return dst


def _rewrite_label(path: Path, fn) -> None:
    img = nib.load(path)
    data = fn(np.asanyarray(img.dataobj))
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)


def test_a_bad_partial_label_is_refused_before_training(cache, tmp_path):
    # train uses the fully labelled cases only, yet a partially labelled case's bad label file is reported now,
    # with the same message as a full one's, not hours later in self-training.
    data = synthesize_dataset(tmp_path / "data", full=2, partial=1, seed=4, small=True, slices=24, progress=False)
    partial = json.loads((data / "dataset.json").read_text())["pocketseg"]["subsets"]["partial"][0]
    _rewrite_label(data / "labelsTr" / f"{partial}.nii.gz", lambda a: np.where(a == a.max(), 99, a).astype(np.uint8))
    with pytest.raises(InputError, match=f"{partial}: label values outside 0-14: \\[99\\]"):
        train(data, out=tmp_path / "run", stage="roi", preset="roi-tiny", epochs=1, cache=cache, **QUICK)
    assert not (tmp_path / "run").exists()


def test_bad_input_is_reported_before_training(dataset, cache, tmp_path):
    args = dict(stage="roi", preset="roi-tiny", epochs=1, cache=cache, **QUICK)
    ds = _copy(dataset, tmp_path)
    (ds / "labelsTr" / "FLARESyn_0002.nii.gz").unlink()
    with pytest.raises(InputError, match="FLARESyn_0002"):
        train(ds, out=tmp_path / "r1", **args)
    assert not (tmp_path / "r1").exists()

    ds = _copy(dataset, tmp_path / "b")
    _rewrite_label(ds / "labelsTr" / "FLARESyn_0003.nii.gz", lambda a: np.where(a == 1, 17, a).astype(np.uint8))
    _rewrite_label(ds / "labelsTr" / "FLARESyn_0001.nii.gz", lambda a: a[:, :, :-1])
    with pytest.raises(InputError) as err:
        train(ds, out=tmp_path / "r2", **args)
    assert "FLARESyn_0003" in str(err.value) and "17" in str(err.value)
    assert "FLARESyn_0001" in str(err.value) and "shape" in str(err.value)
    assert not (tmp_path / "r2").exists()  # bad labels are found before the run folder is made

    empty = tmp_path / "empty"
    (empty / "imagesTr").mkdir(parents=True)
    (empty / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", "labels": {}}))
    with pytest.raises(InputError, match="no usable cases"):
        train(empty, out=tmp_path / "r3", **args)

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        train(dataset, out=busy, **args)
    with pytest.raises(InputError, match="resume"):
        train(dataset, out=tmp_path / "nothing", resume=True, **args)
    with pytest.raises(OutputError, match="not a folder"):
        train(dataset, out=busy / "notes.txt", **args)
    with pytest.raises(InputError, match="lr must be"):
        train(dataset, out=tmp_path / "r5", **{**args, "lr": float("nan")})
    with pytest.raises(OutputError, match="cannot create"):
        train(dataset, out=busy / "notes.txt" / "run", **args)  # a file where a folder must go
    with pytest.raises(InputError, match="not detail"):
        train(dataset, out=tmp_path / "r4", **{**args, "stage": "detail"})


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(dataset, cache, tmp_path, monkeypatch):
    from pocketseg.trainer import train as train_module

    def broken(self):
        (self.out / "half-written.txt").write_text("x")
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(train_module.Trainer, "fit", broken)
    args = dict(stage="roi", preset="roi-tiny", epochs=1, cache=cache, **QUICK)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        train(dataset, out=tmp_path / "run", **args)
    assert not (tmp_path / "run").exists()  # a rerun is not refused for a folder holding only the failed attempt
    mine = tmp_path / "mine"
    mine.mkdir()  # an empty folder the user made is the user's: it stays
    with pytest.raises(RuntimeError):
        train(dataset, out=mine, **args)
    assert mine.is_dir()
