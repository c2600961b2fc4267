"""Pocket U-Net: paper parameter counts, deep-supervision heads, shapes, FLOPs, presets."""

from __future__ import annotations

import pytest
import torch

from pocketseg.errors import InputError
from pocketseg.runtime.network import PocketUNet, UNetConfig, count_flops, count_parameters
from pocketseg.trainer.presets import PRESETS, get_preset, model_info


@pytest.mark.parametrize("name, paper", [("roi", 5.76e6), ("detail", 7.97e6)])
def test_paper_presets_match_parameter_counts_within_2_percent(name, paper):
    params = count_parameters(PocketUNet(get_preset(name).unet_config()))
    assert abs(params / paper - 1) < 0.02, params


def test_pocket_width_is_constant_and_unet_doubles():
    pocket = get_preset("detail").unet_config()
    unet = get_preset("detail-unet").unet_config()
    assert pocket.stage_channels() == [104] * 6
    assert unet.stage_channels() == [32, 64, 128, 256, 320, 320]
    assert count_parameters(PocketUNet(unet)) > 3 * count_parameters(PocketUNet(pocket))


def test_one_state_dict_serves_training_and_inference():
    cfg = get_preset("detail-tiny").unet_config()
    train_net = PocketUNet(cfg, deep_supervision=True)
    infer_net = PocketUNet(cfg, deep_supervision=False)
    infer_net.load_state_dict(train_net.state_dict())  # strict: same keys, heads always exist
    x = torch.randn(2, 1, 16, 32, 32)
    outs = train_net.eval()(x)
    assert [tuple(o.shape) for o in outs] == [(2, 15, 16, 32, 32), (2, 15, 16, 16, 16)]
    torch.testing.assert_close(infer_net.eval()(x), outs[0])


def test_paper_topology_shapes_on_meta_device():
    for name in ("roi", "detail"):
        p = get_preset(name)
        net = PocketUNet(p.unet_config()).to("meta")
        out = net(torch.empty(1, 1, *p.patch_zyx, device="meta"))
        assert tuple(out.shape) == (1, p.num_classes, *p.patch_zyx)
        stride = p.unet_config().total_stride()
        assert all(s % t == 0 for s, t in zip(p.patch_zyx, stride))


def test_flops_match_a_hand_count():
    cfg = UNetConfig(in_channels=1, num_classes=2, width=4, kernels=((3, 3, 3), (3, 3, 3)), strides=((1, 1, 1), (2, 2, 2)))
    net = PocketUNet(cfg)
    v, h = 8 * 8 * 8, 4 * 4 * 4
    expected = 2 * (v * 1 * 4 * 27 + v * 4 * 4 * 27       # encoder stage 1
                    + h * 4 * 4 * 27 * 2                  # encoder stage 2 (strided + plain)
                    + h * 4 * 4 * 8                       # transposed conv 2x2x2
                    + v * 8 * 4 * 27 + v * 4 * 4 * 27     # decoder convs
                    + v * 4 * 2)                          # head
    assert count_flops(net, (8, 8, 8)) == expected


def test_he_init_and_zero_bias():
    net = PocketUNet(get_preset("detail-tiny").unet_config())
    conv = net.encoder.stages[0][0][0]
    assert torch.count_nonzero(conv.bias) == 0
    fan_in = conv.weight[0].numel()
    expected_std = (2 / (1 + 0.01**2) / fan_in) ** 0.5
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.2


def test_presets_and_model_info():
    with pytest.raises(InputError, match="unknown preset"):
        get_preset("huge")
    with pytest.raises(InputError, match="not detail"):
        get_preset("roi", "detail")
    rows = model_info(flops=False)
    assert {r["name"] for r in rows} == set(PRESETS)
    assert all(isinstance(r["params"], int) and r["params"] > 0 for r in rows)
    with pytest.raises(ValueError):
        UNetConfig(1, 2, 8, ((3, 3, 3),), ((1, 1, 1),))
