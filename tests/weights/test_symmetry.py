"""Intertwiner maps folded into a layer: group membership, function preserved (G_ReLU) or not (orthogonal)."""

from __future__ import annotations

import pytest
import torch

from lmc_lightning.nets import get_net
from lmc_lightning.weights.symmetry import random_map, transform_layer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_random_maps_are_group_elements() -> None:
    q = random_map(6, "orthogonal", seed=1)
    torch.testing.assert_close(q @ q.T, torch.eye(6, dtype=torch.float64))
    g = random_map(6, "grelu", seed=1)
    assert ((g > 0).sum(0) == 1).all() and ((g > 0).sum(1) == 1).all() and (g >= 0).all()
    scales = torch.stack([random_map(200, "grelu", seed=s).sum(1) for s in range(5)])
    assert abs(float(scales.mean()) - 1.0) < 0.05  # exp(sigma z) / exp(sigma^2 / 2) has mean 1


@pytest.mark.parametrize("layer", ["0", "2", "5", "8"])
def test_grelu_map_with_inverse_preserves_the_function_orthogonal_does_not(layer: str) -> None:
    torch.manual_seed(0)
    net = get_net("mcnn_k", in_channels=1, input_size=28, width=0.125).eval()
    x = torch.randn(4, 1, 28, 28)
    same = transform_layer(net, layer, "grelu", compensate=True, input_shape=(1, 28, 28))
    torch.testing.assert_close(same(x), net(x), rtol=1e-4, atol=1e-5)
    moved = transform_layer(net, layer, "grelu", input_shape=(1, 28, 28))
    assert not torch.allclose(moved(x), net(x), atol=1e-3)
    rotated = transform_layer(net, layer, "orthogonal", compensate=True, input_shape=(1, 28, 28))
    assert not torch.allclose(rotated(x), net(x), atol=1e-3)
    assert torch.equal(net(x), net(x))  # the original is untouched


def test_transform_layer_errors() -> None:
    net = get_net("mcnn", in_channels=1, input_size=28, width=0.125)
    with pytest.raises(ValueError, match="is not a Conv2d or Linear"):
        transform_layer(net, "1", input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="norm layer"):
        transform_layer(net, "0", compensate=True, input_shape=(1, 28, 28))
