import pytest
import torch

from napari_meshchop.network.model import (
    BRAINCHOP_DILATIONS,
    PAPER_DILATIONS,
    Architecture,
    MeshNet,
    count_parameters,
)


@pytest.mark.parametrize("preset, expected", [("meshnet-5", 5_682), ("meshnet-16", 56_194),
                                              ("meshnet-26", 147_474)])
def test_preset_parameter_counts_match_the_paper(preset, expected):
    assert count_parameters(MeshNet(Architecture.preset(preset))) == expected


def test_block_structure_and_dilations():
    model = MeshNet(Architecture(channels=8))
    assert [b.conv.dilation[0] for b in model.blocks] == list(PAPER_DILATIONS)
    assert [b.conv.padding[0] for b in model.blocks] == list(PAPER_DILATIONS)
    block = model.blocks[0]
    assert [type(m).__name__ for m in block] == ["Conv3d", "BatchNorm3d", "ReLU"]
    assert block.conv.bias is not None and block.bn.affine
    assert model.head.kernel_size == (1, 1, 1) and model.head.out_channels == 2
    brainchop = MeshNet(Architecture(channels=8, dilations=BRAINCHOP_DILATIONS))
    assert [b.conv.dilation[0] for b in brainchop.blocks] == [1, 2, 4, 8, 16, 8, 4, 2, 1]
    assert count_parameters(brainchop) == count_parameters(model)


def test_dropout_is_optional():
    assert not any(isinstance(m, torch.nn.Dropout3d) for m in MeshNet().modules())
    with_dropout = MeshNet(Architecture(channels=4, dropout=0.25))
    assert sum(isinstance(m, torch.nn.Dropout3d) for m in with_dropout.modules()) == 9


def test_xavier_normal_init_with_relu_gain_and_zero_biases():
    torch.manual_seed(0)
    model = MeshNet(Architecture(channels=26))
    conv = model.blocks[3].conv
    fan = 26 * 27
    expected_std = (2.0**0.5) * (2.0 / (fan + fan)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    assert all((m.bias == 0).all() for m in model.modules() if isinstance(m, torch.nn.Conv3d))


def test_same_size_output_and_receptive_field():
    torch.manual_seed(0)
    arch = Architecture(channels=3, dilations=(1, 2, 4))
    assert arch.receptive_field == 15
    model = MeshNet(arch).eval()
    x = torch.zeros(1, 1, 33, 33, 33)
    y0 = model(x)
    assert y0.shape == (1, 2, 33, 33, 33)
    x[0, 0, 16, 16, 16] = 1.0
    changed = (model(x) - y0).abs().sum(dim=(0, 1)) > 0
    # A voxel influences exactly the voxels within the receptive field's radius.
    idx = changed.nonzero()
    assert idx.min().item() >= 16 - 7 and idx.max().item() <= 16 + 7
    assert changed[16 - 7, 16, 16] and changed[16 + 7, 16, 16]


def test_architecture_round_trips_and_rejects_nonsense():
    arch = Architecture(channels=16, dilations=BRAINCHOP_DILATIONS, dropout=0.1)
    assert Architecture.from_dict(arch.to_dict()) == arch
    with pytest.raises(ValueError):
        Architecture(channels=0)
    with pytest.raises(ValueError, match="unknown preset"):
        Architecture.preset("meshnet-99")
