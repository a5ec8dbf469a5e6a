"""ConvNet-3 as in the protocol, MLP, and build_model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedistill.models import ConvNet, ModelSpec, build_model


def test_convnet3_on_28x28_pads_to_32_and_has_2048_features() -> None:
    net = build_model(ModelSpec(), (1, 28, 28), 10)
    assert isinstance(net, ConvNet)
    assert net.feature_dim == 2048
    first = net.features[0]
    assert isinstance(first, nn.Conv2d) and first.padding == (3, 3)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_instance_norm_is_groupnorm_with_one_channel_per_group() -> None:
    net = build_model(ModelSpec(norm="instancenorm", width=64), (3, 32, 32), 10)
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 and all(m.num_groups == m.num_channels == 64 for m in norms)
    assert net.feature_dim == 64 * 4 * 4


@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm", "groupnorm", "none"])
@pytest.mark.parametrize("pooling", ["avgpool", "maxpool", "none"])
def test_variants_build_and_run(norm: str, pooling: str) -> None:
    net = build_model(ModelSpec(width=8, depth=2, norm=norm, pooling=pooling), (1, 8, 8), 5)  # type: ignore[arg-type]
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 5)


def test_deep_net_on_tiny_images_stops_pooling_at_one_pixel() -> None:
    net = build_model(ModelSpec(width=8, depth=5), (1, 8, 8), 10)
    assert net.feature_dim == 8
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_mlp_and_unknown_arch() -> None:
    assert build_model(ModelSpec(arch="mlp", hidden=32), (1, 8, 8), 10)(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    with pytest.raises(ValueError, match="allowed: convnet, mlp"):
        build_model(ModelSpec(arch="resnet"), (1, 8, 8), 10)  # type: ignore[arg-type]
