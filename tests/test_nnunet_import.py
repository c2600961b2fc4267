"""Importing nnU-Net v2 results folders (pocketseg.engine_build.nnunet_import), built with nnU-Net's own classes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (extra 'train') is needed to import nnU-Net models")
pytest.importorskip("onnxruntime", reason="onnxruntime (extra 'runtime') is not installed")
pytest.importorskip("nnunetv2", reason="nnunetv2 (extra 'peers') builds the reference networks; make test installs it")

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans  # noqa: E402

from pocketseg.cli import main  # noqa: E402
from pocketseg.engine_build.nnunet_import import (convert_state_dict, import_nnunet, open_results,  # noqa: E402
                                                  resolve_configuration, unet_config)
from pocketseg.errors import InputError  # noqa: E402
from pocketseg.manifest import load_package  # noqa: E402
from pocketseg.runtime.network import PocketUNet  # noqa: E402

LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}
PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def arch(class_name: str, stages: int = 4) -> dict:
    kw = {
        "n_stages": stages, "features_per_stage": [4, 8, 16, 32, 32][:stages],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * (stages - 1),
        "strides": [[1, 1, 1], [1, 2, 2]] + [[2, 2, 2]] * (stages - 2),
        "n_conv_per_stage_decoder": [1, 2, 1, 1][: stages - 1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    if class_name == PLAIN:
        kw["n_conv_per_stage"] = [2, 1, 2, 2, 2][:stages]
    else:
        kw["n_blocks_per_stage"] = [1, 2, 2, 1, 1][:stages]
    return {"network_class_name": class_name, "arch_kwargs": kw,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def plans(class_name: str = PLAIN) -> dict:
    fullres = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [16, 32, 32], "median_image_size_in_voxels": [40, 96, 96], "spacing": [5.0, 3.0, 3.0],
        "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": arch(class_name), "batch_dice": False,
    }
    return {
        "dataset_name": "Dataset777_Test", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [5, 3, 3],
        "original_median_shape_after_transp": [40, 96, 96], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": fullres,
                           "3d_small": {"inherits_from": "3d_fullres", "patch_size": [16, 32, 32]}},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 300.0, "mean": 60.0, "median": 58.0, "min": -200.0, "percentile_00_5": -100.0,
            "percentile_99_5": 250.0, "std": 55.0}},
    }


def dataset() -> dict:
    return {"channel_names": {"0": "CT"}, "labels": dict(LABELS), "numTraining": 4, "file_ending": ".nii.gz"}


def reference_network(plan: dict, configuration: str = "3d_fullres", seed: int = 0):
    """nnU-Net's own network of the plans, initialised as nnU-Net initialises it (He), with random seed."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    torch.manual_seed(seed)
    cfg = PlansManager(plan).get_configuration(configuration)
    net = get_network_from_plans(cfg.network_arch_class_name, cfg.network_arch_init_kwargs,
                                 cfg.network_arch_init_kwargs_req_import, 1, len(LABELS), allow_init=True,
                                 deep_supervision=True)
    # He init leaves the norms at 1/0 and biases at 0: make them random too, so that a mix-up would show.
    with torch.no_grad():
        for name, value in net.named_parameters():
            if value.ndim == 1:
                value.uniform_(0.5, 1.5) if "norm" in name else value.uniform_(-0.1, 0.1)
    return net.eval()


def write_results(root: Path, *, class_name: str = PLAIN, folds=("all",), configuration: str = "3d_fullres",
                  trainer: str = "nnUNetTrainer", plan: dict | None = None, data: dict | None = None,
                  extra: dict | None = None, weights_plan: dict | None = None) -> Path:
    """A results folder as nnU-Net's trainer leaves it (checkpoint dict, numpy scalar included).

    The weights are those of nnU-Net's network of ``weights_plan`` (default: ``plan``).
    """
    plan = plan or plans(class_name)
    data = data or dataset()
    folder = root / "Dataset777_Test" / f"{trainer}__nnUNetPlans__{configuration}"
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plan))
    (folder / "dataset.json").write_text(json.dumps(data))
    for k, fold in enumerate(folds):
        net = reference_network(weights_plan or plan, "3d_fullres", seed=k)
        state = {"network_weights": net.state_dict(), "optimizer_state": {}, "grad_scaler_state": None,
                 "logging": {}, "_best_ema": np.float32(0.5), "current_epoch": 3,
                 "init_args": {"plans": plan, "configuration": configuration, "fold": fold, "dataset_json": data,
                               "device": torch.device("cpu")},
                 "trainer_name": trainer, "inference_allowed_mirroring_axes": (0, 1, 2), **(extra or {})}
        (folder / f"fold_{fold}").mkdir()
        torch.save(state, folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


# ------------------------------------------------------------------------------------------------------ networks

@pytest.mark.parametrize("class_name", [PLAIN, RESENC])
def test_converted_network_has_nnunets_numerics(tmp_path, class_name):
    folder = write_results(tmp_path, class_name=class_name)
    results = open_results(folder)
    cfg = unet_config(results)
    assert cfg.encoder == ("plain" if class_name == PLAIN else "residual")
    ours = PocketUNet(cfg, deep_supervision=False)
    ours.load_state_dict(convert_state_dict(results.states[0]["network_weights"], cfg))
    ours.eval()
    theirs = reference_network(plans(class_name))  # the same seed: the same weights as the checkpoint
    theirs.decoder.deep_supervision = False
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(2, 1, 16, 32, 32)).astype(np.float32))
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a.shape == b.shape == (2, len(LABELS), 16, 32, 32)
    assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("class_name", [PLAIN, RESENC])
def test_import_writes_a_checked_format_2_package(tmp_path, class_name):
    folder = write_results(tmp_path, class_name=class_name)
    package = import_nnunet(folder, tmp_path / "pkg", fp16=False)
    manifest = load_package(package)
    assert manifest.roi is None and manifest.labels == LABELS and manifest.format_version == 2
    detail = manifest.detail
    assert detail.num_classes == 4 and detail.spacing_mm_zyx == (5.0, 3.0, 3.0) and detail.patch_zyx == (16, 32, 32)
    assert detail.voxel_order == "native" and detail.crop_to_nonzero and detail.mirror_axes == (0, 1, 2)
    assert detail.normalization.scheme == "ct" and detail.intensity.percentile_99_5 == 250.0
    assert manifest.inference.overlap == 0.5 and manifest.inference.gaussian and manifest.inference.mirroring
    assert manifest.inference.back_resampling == "logits" and manifest.postprocess.largest_component_labels == ()
    assert manifest.source["trainer"] == "nnUNetTrainer" and set(manifest.source["sha256"]) == {
        "dataset.json", "plans.json", "fold_all/checkpoint_final.pth"}
    report = json.loads((package / "export_report.json").read_text())
    assert report["detail_fold_all_nnunet_network"]["nnunet_max_abs_logit_diff"] <= 1e-4


def test_old_plans_layout_and_inherits_from(tmp_path):
    plan = plans(PLAIN)
    kw = plan["configurations"]["3d_fullres"].pop("architecture")["arch_kwargs"]
    plan["configurations"]["3d_fullres"].update({
        "UNet_class_name": "PlainConvUNet", "UNet_base_num_features": 4, "unet_max_num_features": 32,
        "n_conv_per_stage_encoder": kw["n_conv_per_stage"], "n_conv_per_stage_decoder": kw["n_conv_per_stage_decoder"],
        "num_pool_per_axis": [2, 3, 3], "pool_op_kernel_sizes": kw["strides"], "conv_kernel_sizes": kw["kernel_sizes"]})
    assert resolve_configuration(plan, "3d_small")["UNet_class_name"] == "PlainConvUNet"  # inherited
    folder = write_results(tmp_path, plan=plan, configuration="3d_small")
    cfg = unet_config(open_results(folder))
    assert cfg.stage_channels() == [4, 8, 16, 32] and cfg.encoder_depths() == [2, 1, 2, 2]
    assert load_package(import_nnunet(folder, tmp_path / "pkg", fp16=False)).detail.patch_zyx == (16, 32, 32)


def test_folds_as_nnunet_picks_them_and_as_asked(tmp_path):
    folder = write_results(tmp_path, folds=("0", "1", "all"))
    assert [f for f, _ in open_results(folder, load=False).checkpoints] == ["fold_0", "fold_1"]
    assert [f for f, _ in open_results(folder, folds="all", load=False).checkpoints] == ["fold_all"]
    assert [f for f, _ in open_results(folder, folds=["1"], load=False).checkpoints] == ["fold_1"]
    only_all = write_results(tmp_path / "b", folds=("all",))
    assert [f for f, _ in open_results(only_all, load=False).checkpoints] == ["fold_all"]
    manifest = load_package(import_nnunet(folder, tmp_path / "pkg", fp16=False, check=False))
    assert len(manifest.detail.members) == 2
    assert set(manifest.detail.files.values()) == {"detail_fold0.onnx", "detail_fold0.safetensors"}


def test_an_ensemble_predicts_the_mean_of_its_folds(tmp_path):
    from pocketseg.runtime.cascade import CascadePredictor

    folder = write_results(tmp_path, folds=("0", "1"))
    package = import_nnunet(folder, tmp_path / "pkg", fp16=False, check=False)
    p = CascadePredictor(package, device="cpu", backend="onnxruntime", mirroring=False)
    nets = p.networks["detail"]
    batch = np.random.default_rng(0).normal(size=(1, 1, 16, 32, 32)).astype(np.float32)
    expected = (nets.engines[0](batch) + nets.engines[1](batch)) / 2
    np.testing.assert_allclose(nets(batch), expected, rtol=1e-5, atol=1e-5)


def test_mirroring_averages_every_flip(tmp_path):
    from pocketseg.runtime.cascade import CascadePredictor

    package = import_nnunet(write_results(tmp_path), tmp_path / "pkg", fp16=False, check=False)
    p = CascadePredictor(package, device="cpu", backend="onnxruntime")
    nets = p.networks["detail"]
    assert len(nets.flips) == 7  # every non-empty combination of the three axes
    engine = nets.engines[0]
    batch = np.random.default_rng(0).normal(size=(2, 1, 16, 32, 32)).astype(np.float32)
    expected = engine(batch).copy()
    for axes in nets.flips:
        expected += np.flip(engine(np.ascontiguousarray(np.flip(batch, axes))), axes)
    np.testing.assert_allclose(nets(batch), expected / 8, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------- refusals

def _refused(tmp_path, folder, match, **kwargs):
    with pytest.raises(InputError, match=match):
        import_nnunet(folder, tmp_path / "refused", fp16=False, **kwargs)
    assert not (tmp_path / "refused").exists()


def test_refusals_each_one_line(tmp_path, capsys):
    two_d = plans()
    two_d["configurations"]["2d"] = {**copy.deepcopy(two_d["configurations"]["3d_fullres"]), "patch_size": [96, 96]}
    _refused(tmp_path, write_results(tmp_path / "a", plan=two_d, configuration="2d"), "is 2D")
    cascade = plans()
    cascade["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    _refused(tmp_path, write_results(tmp_path / "b", plan=cascade, configuration="3d_cascade_fullres"), "own cascade")
    regions = dataset()
    regions["labels"] = {"background": 0, "whole": [1, 2, 3], "core": [2, 3]}
    regions["regions_class_order"] = [1, 2]
    _refused(tmp_path, write_results(tmp_path / "c", data=regions), "region-based")
    channels = dataset()
    channels["channel_names"] = {"0": "T1", "1": "T2"}
    _refused(tmp_path, write_results(tmp_path / "d", data=channels), "2 input channels")
    unknown = plans()
    unknown["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "mypackage.SwinUNet"
    _refused(tmp_path, write_results(tmp_path / "e", plan=unknown, weights_plan=plans()),
             "network class mypackage.SwinUNet")
    _refused(tmp_path, write_results(tmp_path / "f", trainer="STUNetTrainer_base"), "builds its own network")
    _refused(tmp_path, write_results(tmp_path / "g"), "has no fold_3", folds=["3"])
    _refused(tmp_path, write_results(tmp_path / "h"), "checkpoint_best.pth: does not exist",
             checkpoint="checkpoint_best.pth")
    # A trainer whose network differs from the plans' (another width): its weights do not fit.
    other = plans()
    other["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32, 64]
    mismatch = write_results(tmp_path / "i", plan=other)
    (mismatch / "plans.json").write_text(json.dumps(plans()))  # the folder's plans say [4, 8, 16, 32]
    _refused(tmp_path, mismatch, "not the plans' network")
    _refused(tmp_path, tmp_path / "a" / "Dataset777_Test", "is not an nnU-Net v2 results folder")
    # The CLI: one line, exit status 2, nothing written.
    assert main(["-q", "import-nnunet", str(tmp_path / "a" / "Dataset777_Test"), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pocketseg: error:") and not (tmp_path / "x").exists()


class _Payload:
    """Stands for anything a checkpoint could pickle that is not data."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_checkpoints_are_loaded_without_running_pickled_code(tmp_path, capsys):
    folder = write_results(tmp_path, extra={"payload": _Payload()})
    _refused(tmp_path, folder, "without running pickled code")
    assert "pickled code ran" not in capsys.readouterr().out


def test_checkpoints_written_under_numpy_1_load(tmp_path):
    """numpy 1 pickles its scalar as numpy.core.multiarray.scalar; the allow-list takes both names."""
    import zipfile

    folder = write_results(tmp_path)
    checkpoint = folder / "fold_all" / "checkpoint_final.pth"
    with zipfile.ZipFile(checkpoint) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    pickled = next(n for n in entries if n.endswith("data.pkl"))
    assert b"numpy._core.multiarray" in entries[pickled]
    entries[pickled] = entries[pickled].replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    with zipfile.ZipFile(checkpoint, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    state = open_results(folder).states[0]
    assert float(state["_best_ema"]) == 0.5 and "decoder.seg_layers.0.weight" in state["network_weights"]


# ------------------------------------------------------------------------------------------------------ inference

def test_imported_package_segments_and_fast_mode_differs_only_in_settings(tmp_path):
    from pocketseg.runtime.cascade import CascadePredictor
    from pocketseg.synth.phantom import make_phantom
    from pocketseg.volume import Volume

    package = import_nnunet(write_results(tmp_path), tmp_path / "pkg", fp16=False, check=False)
    ph = make_phantom(0, small=True, slices=24)
    volume = Volume(ph.image, ph.affine)
    exact = CascadePredictor(package, device="cpu", backend="onnxruntime")
    fast = CascadePredictor(package, device="cpu", backend="onnxruntime", fast=True)
    assert exact.settings.nnunet_numerics and exact.settings.overlap == 0.5
    assert not fast.settings.mirroring and fast.settings.back_resampling == "labels" and fast.overlap == 0.0
    a, b = exact.predict(volume).labels, fast.predict(volume).labels
    assert a.shape == b.shape == volume.shape and a.dtype == np.uint8
    assert set(np.unique(a)) <= set(LABELS.values())


# ------------------------------------------------------------------------------------------------ label mapping

def test_label_mapping_writes_flare_ids_and_names(tmp_path, capsys):
    from pocketseg.runtime.cascade import CascadePredictor
    from pocketseg.synth.phantom import make_phantom
    from pocketseg.volume import Volume

    folder = write_results(tmp_path)
    plain = import_nnunet(folder, tmp_path / "plain", fp16=False, check=False)
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"liver": "liver", "2": "spleen", "kidney": "right_kidney"}))
    mapped = import_nnunet(folder, tmp_path / "mapped", fp16=False, check=False, labels=mapping)
    manifest = load_package(mapped)
    assert manifest.labels == {"background": 0, "liver": 1, "right_kidney": 2, "spleen": 3}
    assert manifest.output_labels == (0, 1, 3, 2)
    assert manifest.source["label_map"]["model_labels"] == LABELS and manifest.source["label_map"]["dropped"] == []

    ph = make_phantom(1, small=True, slices=16)
    volume = Volume(ph.image, ph.affine)
    before = CascadePredictor(plain, device="cpu", backend="onnxruntime", fast=True).predict(volume).labels
    after = CascadePredictor(mapped, device="cpu", backend="onnxruntime", fast=True).predict(volume).labels
    assert len(set(np.unique(before)) & {1, 2, 3}) >= 2  # classes whose ids the mapping changes are there
    assert np.array_equal(after, np.array([0, 1, 3, 2], np.uint8)[before])

    only_liver = import_nnunet(folder, tmp_path / "liver", fp16=False, check=False, labels={"liver": "liver"})
    assert load_package(only_liver).output_labels == (0, 1, 0, 0)
    assert load_package(only_liver).source["label_map"]["dropped"] == ["spleen (2)", "kidney (3)"]

    for bad, match in (({"colon": "liver"}, "'colon', which is not a label of the model"),
                       ({"kidney": "kidney"}, "'kidney', which is not a FLARE 2023 label name"),
                       ({"liver": "liver", "1": "spleen"}, "names the model's class liver (1) twice"),
                       ([], "must be a JSON object")):
        mapping.write_text(json.dumps(bad))
        code = main(["import-nnunet", str(folder), "-o", str(tmp_path / "refused"), "--labels", str(mapping),
                     "--no-check", "--no-fp16"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and match in err and str(mapping) in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "refused").exists()
