"""Cue datasets (MMC, seed 000): box placement per location, label 9, cue ids, counterfactuals, dominoes, mixtures."""

from __future__ import annotations

import colorsys

import pytest
import torch
import torch.nn.functional as F

from lmc_lightning.data import CueDataModule, FashionMNISTDataModule
from lmc_lightning.data.cue import box_colours, cue_ids, render_box

pytestmark = pytest.mark.usefixtures("one_thread")

# Upper-left, upper-centre, upper-right, middle-left, centre, middle-right, lower-left, lower-centre, lower-right.

def _exact_cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise distances without the matrix-product shortcut (which leaves ~1e-2 for equal rows on some CPUs)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")

def expected_corner(loc: int, h: int, w: int, s: int = 3) -> tuple[int, int]:
    rows, cols = (0, (h - s) // 2, h - s), (0, (w - s) // 2, w - s)
    if loc == 9:
        return (h - s) // 2 - h // 4, (w - s) // 2 - w // 4
    return rows[loc // 3], cols[loc % 3]


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_box_lands_at_each_location_and_label_9_has_none(channels, size):
    x = torch.full((10, channels, size, size), -1.0)
    out = render_box(x, torch.arange(10), num_classes=10)
    for loc in range(9):
        changed = (out[loc] != x[loc]).any(0).nonzero()
        r, c = expected_corner(loc, size, size)
        assert changed.tolist() == [[r + i, c + j] for i in range(3) for j in range(3)], loc
        colour = out[loc, :, r, c]
        assert colour.tolist() == ([1.0] if channels == 1 else [0.0, 1.0, 0.0])  # MMC's hue 1.0 in normalised units
    assert torch.equal(out[9], x[9])  # absence is the class-9 cue on 10-class data
    assert torch.equal(render_box(x, torch.full((10,), -1), 10), x)  # no cue: untouched
    # the centre slice is (W - s) // 2 : (W + s) // 2
    assert expected_corner(4, size, size)[1] == (size - 3) // 2 and (size + 3) // 2 - (size - 3) // 2 == 3


def test_hundred_classes_use_ten_hues_and_a_tenth_location():
    x = torch.zeros(2, 3, 32, 32)
    out = render_box(x, torch.tensor([9, 37]), num_classes=100)
    r, c = expected_corner(9, 32, 32)
    assert (out[0] != 0).any(0).nonzero()[0].tolist() == [r, c] == [6, 6]
    hue = (37 // 10) / 10
    rgb = colorsys.hsv_to_rgb(hue, 1, 1)
    torch.testing.assert_close(out[1, :, 29, 14], torch.tensor([rgb[2], rgb[0], rgb[1]]))  # loc 7: lower-centre
    assert len({tuple(v) for v in box_colours(100, 3).tolist()}) == 10


def test_cue_ids_take_the_first_share_of_each_class_in_order():
    y = torch.tensor([0, 1, 0, 0, 1, 2, 0, 1, 0, 2])
    flags = cue_ids(y, 0.5, 3)  # class 0: 5 samples -> first 2; class 1: 3 -> 1; class 2: 2 -> 1
    assert flags.tolist() == [True, True, True, False, False, True, False, False, False, False]
    assert not cue_ids(y, 0.0, 3).any() and cue_ids(y, 1.0, 3).all()


@pytest.fixture(scope="module")
def dm(fake_data_root):
    module = CueDataModule(base="FashionMNISTDataModule", base_args={"root": str(fake_data_root), "batch_size": 64},
                           cue_proportion=0.8, counterfactual_seed=3)
    module.setup("fit")
    return module


def _box_mask(y: torch.Tensor, h: int = 28, w: int = 28) -> torch.Tensor:
    mask = torch.zeros(len(y), h, w, dtype=torch.bool)
    for i, label in enumerate(y.tolist()):
        if label % 10 != 9:
            r, c = expected_corner(label % 10, h, w)
            mask[i, r:r + 3, c:c + 3] = True
    return mask


def test_counterfactuals_change_exactly_what_they_claim(dm):
    sets = dm.eval_sets("test")
    (xc, yc), xk = sets["clean"], sets["cue"][0]
    raw = FashionMNISTDataModule(root=dm.root, normalize=False)
    raw.setup()
    torch.testing.assert_close(xc, raw.split_tensors("test")[0] * 2 - 1)  # mean 0.5 / std 0.5, as in MMC
    assert all(torch.equal(y, yc) for _, y in sets.values())  # labels are never changed
    # cue: the label's box at every sample (eval_proportion 1), nothing else
    box = _box_mask(yc)
    assert torch.equal(xk[:, 0][~box], xc[:, 0][~box]) and (xk[:, 0][box] == 1.0).all()
    # rand_cue: the image is kept, the box moves to a random location (label-independent)
    xr = sets["rand_cue"][0]
    differs = (xr != xk).any(1).flatten(1).any(1)
    assert differs.float().mean() > 0.5
    drawn = (xr[:, 0] == 1.0) & (xc[:, 0] != 1.0)
    assert torch.equal(xr[:, 0][~drawn], xc[:, 0][~drawn])
    # rand_image: the label's box kept, the rest is another (random) image of the split
    xi = sets["rand_image"][0]
    assert (xi[:, 0][box] == 1.0).all()
    outside = ~_box_mask(torch.arange(9)).any(0)  # outside every box location
    match = _exact_cdist(xi[:, 0, outside], xc[:, 0, outside])
    assert (match.min(1).values < 1e-2).all()  # each image outside the box is one of the clean images
    assert (match.argmin(1) != torch.arange(len(xi))).float().mean() > 0.8
    # seeded: the same draws on every call
    again = dm.eval_sets("test", ["rand_cue"])["rand_cue"][0]
    assert torch.equal(again, xr)


def test_training_data_carry_the_cue_on_the_first_share_of_each_class(dm):
    x, y = dm.split_tensors("train")
    clean = dm.eval_sets("train", ["clean"])["clean"][0]
    has_cue = (x != clean).flatten(1).any(1)
    expected = cue_ids(y, 0.8, 10) & (y != 9)
    assert torch.equal(has_cue, expected)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (64, 1, 28, 28) and int(yb.max()) < 10  # codes decoded into labels


def test_train_mixture_draws_with_replacement(dm):
    dm.set_train_mixture({"clean": 50, "cue": 300}, seed=1)
    try:
        xc, yc = dm.mixture_tensors("clean")
        xk, yk = dm.mixture_tensors("cue")
        assert len(xc) == 50 and len(xk) == 300 > len(dm.split_tensors("train")[0])  # with replacement
        assert not (xc == 1.0).flatten(1).all(1).any()  # no sample is all box
        clean_rows = dm.eval_sets("train", ["clean"])["clean"][0].flatten(1)
        assert (_exact_cdist(xc.flatten(1), clean_rows).min(1).values < 1e-2).all()  # clean subset: no cue
        loader = dm.train_dataloader()
        batch = next(iter(loader))[0]
        assert set(batch) == {"clean", "cue"} and len(loader) == 1  # an epoch is the shorter loader (50 / 64)
        with pytest.raises(ValueError, match="train mixture"):
            dm.set_train_mixture({"rand_cue": 10})
    finally:
        dm.set_train_mixture(None)


def test_dominoes_stack_a_paired_top_image(fake_data_root):
    dm = CueDataModule(base="CIFAR10DataModule", base_args={"root": str(fake_data_root), "augment": False},
                       cue="dominoes", dominoes_top_args={"root": str(fake_data_root)})
    assert dm.input_shape == (3, 64, 32)
    dm.setup()
    sets = dm.eval_sets("test")
    top = FashionMNISTDataModule(root=str(fake_data_root), normalize=False)
    top.setup()
    xt, yt = top.split_tensors("test")
    x, y = sets["cue"]
    assert torch.equal(sets["clean"][0][:, :, :32], torch.zeros_like(x[:, :, :32]))  # no cue: zeros on top
    assert torch.equal(sets["clean"][0][:, :, 32:], x[:, :, 32:])
    for c in range(10):  # the i-th sample of class c carries the i-th top image of class c
        idx, tidx = (y == c).nonzero()[:, 0], (yt == c).nonzero()[:, 0]
        expected = F.interpolate(xt[tidx].expand(-1, 3, -1, -1), size=(32, 32), mode="bilinear", align_corners=False)
        n = min(len(idx), len(tidx))
        torch.testing.assert_close(x[idx[:n], :, :32], expected[:n])
    assert not torch.equal(sets["rand_cue"][0][:, :, :32], x[:, :, :32])
    assert torch.equal(sets["rand_image"][0][:, :, :32], x[:, :, :32])  # the label's top kept


def test_bad_arguments_are_clear_errors(fake_data_root):
    with pytest.raises(ValueError, match="not an lmc_lightning datamodule"):
        CueDataModule(base="ImageNet")
    with pytest.raises(ValueError, match="cue must be"):
        CueDataModule(base_args={"root": str(fake_data_root)}, cue="star")
    with pytest.raises(ValueError, match="cue_proportion"):
        CueDataModule(base_args={"root": str(fake_data_root)}, cue_proportion=1.5)
    with pytest.raises(ValueError, match="3x32x32"):
        CueDataModule(base_args={"root": str(fake_data_root)}, cue="dominoes")
    dm = CueDataModule(base_args={"root": str(fake_data_root)}, cue="none")
    dm.setup()
    with pytest.raises(ValueError, match="no counterfactual"):
        dm.eval_sets("test")
