"""FLARE 2023 label table."""

import pytest

from pocketseg import labels as L


def test_flare2023_ids_and_names():
    expected = ["background", "liver", "right_kidney", "spleen", "pancreas", "aorta", "inferior_vena_cava",
                "right_adrenal_gland", "left_adrenal_gland", "gallbladder", "esophagus", "stomach", "duodenum",
                "left_kidney", "tumor"]
    assert [lab.name for lab in L.LABELS] == expected
    assert [lab.id for lab in L.LABELS] == list(range(15))
    assert L.NUM_CLASSES == 15 and L.TUMOR == 14 and L.ORGAN_IDS == tuple(range(1, 14))
    assert L.dataset_json_labels()["inferior_vena_cava"] == 6
    assert len({lab.color_rgb for lab in L.LABELS}) == 15


def test_unknown_label_name_lists_known_ones():
    with pytest.raises(KeyError, match="liver"):
        L.label_id("livre")
    assert L.label_id("duodenum") == 12
