"""The seeds' torchvision/timm nets, pretrained weights from a file, Kaiming fan_out init, erasing and grayscale."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lmc_lightning import get_net, load_net, load_weights
from lmc_lightning.data.transforms import BatchTransform, random_erasing, random_grayscale


def test_tv_vgg16_is_torchvision_vgg16() -> None:
    from torchvision.models import vgg16

    with torch.device("meta"):  # structure only: 134M parameters are not allocated
        net = get_net("tv_vgg16", num_classes=10, init="kaiming_fan_out")
        ref = vgg16(weights=None, num_classes=10)
    assert [(k, v.shape) for k, v in net.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert net.avgpool.output_size == (7, 7)
    linears = [m for m in net.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(25088, 4096), (4096, 4096), (4096, 10)]
    assert sum(isinstance(m, nn.Dropout) for m in net.classifier) == 2


def test_kaiming_fan_out_init_covers_linear_layers() -> None:
    torch.manual_seed(0)
    net = get_net("tv_resnet18", num_classes=10, init="kaiming_fan_out")
    assert net.conv1.kernel_size == (7, 7) and isinstance(net.maxpool, nn.MaxPool2d)  # ImageNet stem
    fc = net.fc.weight  # fan_out = 10: std sqrt(2 / 10)
    assert fc.std().item() == pytest.approx((2 / 10) ** 0.5, rel=0.05)
    conv = net.layer1[0].conv1.weight  # fan_out = 64 * 9
    assert conv.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)
    assert torch.count_nonzero(net.fc.bias) == 0
    default = get_net("tv_resnet18", num_classes=10)
    assert default.fc.weight.abs().max().item() < 1 / 512 ** 0.5 + 1e-6  # torchvision's uniform Linear init


def test_pretrained_weights_from_a_file_then_a_new_head(tmp_path: Path) -> None:
    from torchvision.models import mobilenet_v2

    torch.manual_seed(1)
    imagenet = mobilenet_v2(weights=None, num_classes=1000)
    path = tmp_path / "mobilenet_v2_imagenet.pth"
    torch.save(imagenet.state_dict(), path)
    net = get_net("tv_mobilenet_v2", num_classes=10, weights=str(path))
    torch.testing.assert_close(net.features[0][0].weight, imagenet.features[0][0].weight, rtol=0, atol=0)
    assert net.classifier[1].out_features == 10
    with pytest.raises(FileNotFoundError, match="cannot be downloaded"):
        get_net("tv_mobilenet_v2", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="overwrite"):
        get_net("tv_mobilenet_v2", weights=str(path), init="kaiming_fan_out")


def test_mcsurface_resnet_checkpoint_loads_into_tv_resnet18(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    torch.manual_seed(2)
    theirs = resnet18(weights=None, num_classes=10).eval()
    path = tmp_path / "model_epoch_160.pth"
    torch.save({"epoch": 160, "model_state_dict": theirs.state_dict(), "loss": 0.1, "accuracy": 94.0}, path)
    ours = load_net(path, net="tv_resnet18", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    one_channel = get_net("tv_resnet18", num_classes=10, in_channels=1)
    assert one_channel(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_timm_vit_resizes_to_224_and_loads_mcsurface_keys(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    from lmc_lightning.nets.seeds import ResizeInput

    torch.manual_seed(3)
    theirs = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10).eval()
    path = tmp_path / "vit.pth"
    torch.save({"model_state_dict": theirs.state_dict()}, path)
    state, _ = load_weights(path, key_map="mcsurface_vit")
    with torch.device("meta"):
        ours = get_net("timm_vit_small_patch16_224", num_classes=10)
    assert isinstance(ours, ResizeInput) and ours.size == 224
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in ours.state_dict().items()}
    x = torch.rand(1, 3, 32, 32)
    resized = nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        out = torch.func.functional_call(ResizeInput(theirs, 224), state, (x,))
        torch.testing.assert_close(out, theirs(resized), rtol=1e-5, atol=1e-5)


def test_random_erasing_as_torchvision() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.ones(4000, 3, 32, 32)
    out = random_erasing(x, p=1.0, generator=gen)
    frac = (out[:, 0] == 0).float().mean((1, 2))
    assert frac.min().item() >= 0.015 and frac.max().item() <= 0.26  # area in 0.02-0.25, up to rounding
    assert frac.mean().item() == pytest.approx(0.135, abs=0.015)
    assert torch.equal(out[:, 0], out[:, 2])  # all channels erased together
    half = random_erasing(x, p=0.5, generator=gen)
    assert (half != 1).flatten(1).any(1).float().mean().item() == pytest.approx(0.5, abs=0.03)
    ys, xs = torch.nonzero(out[0, 0] == 0, as_tuple=True)  # one rectangle
    assert len(ys) == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)


def test_random_grayscale_and_batch_transform_order() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2000, 3, 8, 8), dtype=torch.uint8, generator=gen)
    grey = random_grayscale(x, 1.0, gen)
    expected = (x.float() * torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1).round().to(torch.uint8)
    assert torch.equal(grey[:, 0], expected) and torch.equal(grey[:, 1], grey[:, 2])
    some = random_grayscale(x, 0.1, gen)
    assert (some[:, 0] == some[:, 1]).flatten(1).all(1).float().mean().item() == pytest.approx(0.1, abs=0.03)
    tf = BatchTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), erasing=1.0)
    out, _ = tf((torch.full((50, 3, 16, 16), 255, dtype=torch.uint8), torch.zeros(50)), gen)
    assert set(out.unique().tolist()) == {-2.0, 2.0}  # erased to 0 before normalisation: (0 - 0.5) / 0.25
    assert tf.stochastic and not BatchTransform((0.5,), (0.5,)).stochastic
