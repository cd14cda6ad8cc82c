"""Tests of cdgrad.experiments.data.dense: PascalVOC 2012 and Cityscapes readers, their loaders, scale_crop_flip."""

from __future__ import annotations

import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cdgrad.experiments import data as D
from cdgrad.experiments.data import dense
from helpers import isolate_data_env

HYP = settings(max_examples=25, deadline=None)


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    return isolate_data_env(tmp_path, monkeypatch)


def raises_naming(exc: type[Exception], path: Path | str):
    """pytest.raises(exc) whose message contains ``path`` verbatim."""
    return pytest.raises(exc, match=re.escape(str(path)))


# ----------------------------------------------------------------------------------------------------------
# PascalVOC 2012 fixtures
# ----------------------------------------------------------------------------------------------------------


def voc_colormap() -> np.ndarray:
    """The PascalVOC palette: the bits of index i spread over the high bits of R, G, B (VOCdevkit's labelcolormap)."""
    cmap = np.zeros((256, 3), np.uint8)
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= (c & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


VOC_SPLITS = {"train": [("2007_000032", 30, 34), ("2007_000039", 36, 24)], "val": [("2008_000002", 30, 40)]}


def smooth_image(h: int, w: int, k: int) -> np.ndarray:
    """(h, w, 3) uint8 gradients, a different one per channel (so JPEG keeps them close and a transposition shows)."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = 20 + 200 * xx // max(w - 1, 1)
    g = 30 + 180 * yy // max(h - 1, 1)
    b = np.full((h, w), 60 + 40 * k)
    return np.stack([r, g, b], -1).astype(np.uint8)


def voc_mask(h: int, w: int, k: int) -> np.ndarray:
    """(h, w) uint8 class ids 0..20 in 3x3 blocks, with boundary pixels 255."""
    rng = np.random.default_rng(k)
    blocks = rng.integers(0, 21, (-(-h // 3), -(-w // 3)))
    mask = np.kron(blocks, np.ones((3, 3), np.int64))[:h, :w].astype(np.uint8)
    mask[::5, ::7] = 255
    mask[0, 0], mask[-1, -1] = 0, 20  # both ends of the class range
    return mask


def save_palette_png(mask: np.ndarray, path: Path) -> None:
    im = Image.fromarray(mask, mode="P")
    im.putpalette(voc_colormap().reshape(-1).tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def write_voc(base: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Official layout base/VOCdevkit/VOC2012; returns the folder and, per id, the written (image, mask)."""
    voc = base / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    written = {}
    for k, (split, entries) in enumerate(VOC_SPLITS.items()):
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i, _, _ in entries))
        for j, (i, h, w) in enumerate(entries):
            image, mask = smooth_image(h, w, 2 * k + j), voc_mask(h, w, 2 * k + j)
            Image.fromarray(image).save(voc / "JPEGImages" / f"{i}.jpg", quality=95)
            save_palette_png(mask, voc / "SegmentationClass" / f"{i}.png")
            written[i] = (image, mask)
    return voc, written


def write_voc_tar(voc: Path, dest: Path) -> Path:
    """The folder ``voc`` packed as the official tar (members under VOCdevkit/VOC2012/) in ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    tar_path = dest / dense.VOC_TAR
    with tarfile.open(tar_path, "w") as tar:
        tar.add(voc, arcname="VOCdevkit/VOC2012")
    return tar_path


@pytest.fixture
def voc(tmp_path):
    return write_voc(tmp_path / "data")


# ----------------------------------------------------------------------------------------------------------
# PascalVOC 2012
# ----------------------------------------------------------------------------------------------------------


def test_read_voc_pixels_and_padding(voc):
    folder, written = voc
    x, y = dense.read_voc(folder.parent.parent, "train", size=48)
    assert x.shape == (2, 3, 48, 48) and x.dtype == torch.uint8
    assert y.shape == (2, 48, 48) and y.dtype == torch.int64
    for n, (i, h, w) in enumerate(VOC_SPLITS["train"]):
        image, mask = written[i]
        decoded = np.asarray(Image.open(folder / "JPEGImages" / f"{i}.jpg").convert("RGB"))
        got = x[n, :, :h, :w].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, decoded)  # exactly what Pillow decodes
        assert np.abs(got.astype(int) - image).max() <= 12  # and the written image within JPEG loss
        np.testing.assert_array_equal(y[n, :h, :w].numpy(), mask)  # palette indices, exact
        assert (x[n, :, h:] == 0).all() and (x[n, :, :, w:] == 0).all()
        assert (y[n, h:] == 255).all() and (y[n, :, w:] == 255).all()


def test_read_voc_root_variants_and_tar_agree(voc, tmp_path):
    folder, _ = voc
    base = folder.parent.parent
    tar_dir = tmp_path / "tar_only"
    write_voc_tar(folder, tar_dir)
    for split in ("train", "val"):
        ref_x, ref_y = dense.read_voc(base, split, size=40)
        for root in (base / "VOCdevkit", folder, tar_dir):
            x, y = dense.read_voc(root, split, size=40)
            assert torch.equal(x, ref_x) and torch.equal(y, ref_y), (root, split)
    assert dense.find_voc(tar_dir) == tar_dir / dense.VOC_TAR and dense.find_voc(base) == folder


def _rm(rel: str):
    return lambda voc: (voc / rel).unlink()


def _mask(rel: str, mask: np.ndarray):
    return lambda voc: save_palette_png(mask, voc / rel)


def _rgb_mask(voc: Path) -> None:
    Image.fromarray(smooth_image(30, 34, 0)).save(voc / "SegmentationClass/2007_000032.png")


VOC_ERRORS = {
    "missing split file": ("val", _rm("ImageSets/Segmentation/val.txt"), D.DatasetNotFoundError,
                           "ImageSets/Segmentation/val.txt", "missing|lacks"),
    "missing image": ("train", _rm("JPEGImages/2007_000039.jpg"), D.DatasetNotFoundError,
                      "JPEGImages/2007_000039.jpg", "missing|lacks"),
    "missing mask": ("val", _rm("SegmentationClass/2008_000002.png"), D.DatasetNotFoundError,
                     "SegmentationClass/2008_000002.png", "missing|lacks"),
    "mask size differs": ("train", _mask("SegmentationClass/2007_000039.png", np.zeros((36, 25), np.uint8)),
                          D.DatasetFormatError, "SegmentationClass/2007_000039.png", "36x25 .* 36x24"),
    "mask value 21": ("train", _mask("SegmentationClass/2007_000032.png", np.full((30, 34), 21, np.uint8)),
                      D.DatasetFormatError, "SegmentationClass/2007_000032.png", "got 21$"),
    "mask value 254": ("val", _mask("SegmentationClass/2008_000002.png", np.full((30, 40), 254, np.uint8)),
                       D.DatasetFormatError, "SegmentationClass/2008_000002.png", "got 254$"),
    "RGB mask": ("train", _rgb_mask, D.DatasetFormatError, "SegmentationClass/2007_000032.png", "mode 'RGB'"),
}  # fmt: skip


@pytest.mark.parametrize("case", VOC_ERRORS)
def test_read_voc_errors_name_the_file(voc, tmp_path, case):
    folder, _ = voc
    split, damage, exc, rel, why = VOC_ERRORS[case]
    damage(folder)
    with raises_naming(exc, folder / rel) as info:
        dense.read_voc(folder, split, size=48)
    assert re.search(why, str(info.value)), str(info.value)
    # the same damage inside the tar: a missing member is a format error of the archive, named as tar:member
    tar_path = write_voc_tar(folder, tmp_path / "tar")
    exc = D.DatasetFormatError if exc is D.DatasetNotFoundError else exc
    with raises_naming(exc, f"{tar_path}:VOCdevkit/VOC2012/{rel}") as info:
        dense.read_voc(tar_path.parent, split, size=48)
    assert re.search(why, str(info.value)), str(info.value)


def test_read_voc_image_larger_than_canvas_and_bad_arguments(voc, tmp_path):
    folder, _ = voc
    with raises_naming(D.DatasetFormatError, folder / "JPEGImages/2007_000039.jpg"):
        dense.read_voc(folder, "train", size=35)  # 30x34 fits, 36x24 has a row too many
    with raises_naming(D.DatasetFormatError, folder / "JPEGImages/2008_000002.jpg"):
        dense.read_voc(folder, "val", size=39)  # 30x40: a column too many
    assert dense.read_voc(folder, "train", size=36)[0].shape == (2, 3, 36, 36)
    with pytest.raises(ValueError, match="split"):
        dense.read_voc(folder, "test")
    with pytest.raises(ValueError, match="size"):
        dense.read_voc(folder, "train", size=0)
    with pytest.raises(D.DatasetNotFoundError, match=re.escape(dense.VOC_URL)):
        dense.read_voc(tmp_path / "nowhere", "train")


def test_voc2012_loader(voc, clean_env, monkeypatch):
    folder, _ = voc
    ds = D.load_dataset("voc2012", root=folder.parent.parent)
    assert ds.name == "voc2012" and ds.dense and ds.num_classes == 21
    train_x, train_y = dense.read_voc(folder, "train", 512)
    val_x, val_y = dense.read_voc(folder, "val", 512)
    assert train_x.shape == (2, 3, 512, 512) and val_y.shape == (1, 512, 512)
    assert torch.equal(ds.train_x, train_x) and torch.equal(ds.train_y, train_y)
    assert torch.equal(ds.test_x, val_x) and torch.equal(ds.test_y, val_y)
    assert (ds.mean, ds.std) == D.channel_stats(train_x)
    # no root: the tar in $CDGRAD_DATA/voc2012 is found
    env = clean_env / "env"
    write_voc_tar(folder, env / "voc2012")
    monkeypatch.setenv("CDGRAD_DATA", str(env))
    ds_env = D.load_dataset("voc2012")
    assert torch.equal(ds_env.train_y, train_y) and torch.equal(ds_env.test_x, val_x)


def test_voc2012_not_found(clean_env):
    empty = clean_env / "empty"
    empty.mkdir()
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_dataset("voc2012", root=empty)
    msg = str(info.value)
    assert dense.VOC_URL in msg and str(empty) in msg and str(empty / "voc2012") in msg
    assert "Put the missing files in the data root" in msg  # an explicit root is used or refused


# ----------------------------------------------------------------------------------------------------------
# Cityscapes
# ----------------------------------------------------------------------------------------------------------

# trainId of each label id, from cityscapesScripts helpers/labels.py (name: id -> trainId; -1 and 255 ignored).
OFFICIAL_TRAIN_IDS = {
    0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255,  # unlabeled .. ground
    7: 0, 8: 1, 9: 255, 10: 255, 11: 2, 12: 3, 13: 4, 14: 255, 15: 255, 16: 255,  # road .. tunnel
    17: 5, 18: 255, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,  # pole .. rider
    26: 13, 27: 14, 28: 15, 29: 255, 30: 255, 31: 16, 32: 17, 33: 18,  # car .. bicycle
    255: 255,  # license plate, id -1, stored as 255
}  # fmt: skip

CITY_SPLITS = {
    "train": {"bochum": ["bochum_000000_000313"], "aachen": ["aachen_000001_000019", "aachen_000000_000019"]},
    "val": {"frankfurt": ["frankfurt_000000_000294"]},
}
CITY_H, CITY_W = 16, 32


def write_cityscapes(base: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Official layout in ``base``; per name, the written (image (H, W, 3), label ids (H, W)) in 2x2 blocks."""
    ids = np.array(sorted(OFFICIAL_TRAIN_IDS), np.uint8)
    written = {}
    for split, cities in CITY_SPLITS.items():
        for city, names in cities.items():
            for name in names:
                rng = np.random.default_rng(len(written))
                image = rng.integers(0, 256, (CITY_H, CITY_W, 3), dtype=np.uint8)
                blocks = rng.choice(ids, (CITY_H // 2, CITY_W // 2))
                label = np.kron(blocks, np.ones((2, 2), np.uint8)).astype(np.uint8)
                for top, suffix, arr in (("leftImg8bit", "leftImg8bit", image), ("gtFine", "gtFine_labelIds", label)):
                    d = base / top / split / city
                    d.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(arr).save(d / f"{name}_{suffix}.png")
                written[name] = (image, label)
    return written


def map_ids(label: np.ndarray) -> np.ndarray:
    return np.vectorize(OFFICIAL_TRAIN_IDS.__getitem__, otypes=[np.int64])(label)


@pytest.fixture
def city(tmp_path):
    root = tmp_path / "cityscapes"
    return root, write_cityscapes(root)


def test_cityscapes_table_is_the_official_one():
    assert len(D.CITYSCAPES_TRAIN_IDS) == 34
    assert {i: D.CITYSCAPES_TRAIN_IDS[i] for i in range(34)} == {i: OFFICIAL_TRAIN_IDS[i] for i in range(34)}
    assert sorted(set(D.CITYSCAPES_TRAIN_IDS) - {255}) == list(range(19))


def test_read_cityscapes_maps_every_label_id(tmp_path):
    label = np.array(sorted(OFFICIAL_TRAIN_IDS), np.uint8).reshape(5, 7)  # ids 0..33 and 255
    for top, name, arr in (("leftImg8bit", "x_leftImg8bit", np.zeros((5, 7, 3), np.uint8)),
                           ("gtFine", "x_gtFine_labelIds", label)):  # fmt: skip
        (tmp_path / top / "val" / "city").mkdir(parents=True)
        Image.fromarray(arr).save(tmp_path / top / "val" / "city" / f"{name}.png")
    _, y = D.read_cityscapes(tmp_path, "val", size=(5, 7))
    for (i, j), label_id in np.ndenumerate(label):
        assert int(y[0, i, j]) == OFFICIAL_TRAIN_IDS[int(label_id)], label_id


def test_read_cityscapes_native_size_and_order(city):
    root, written = city
    x, y = D.read_cityscapes(root, "train", size=(CITY_H, CITY_W))
    order = ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313"]  # by city, then name
    assert x.shape == (3, 3, CITY_H, CITY_W) and y.shape == (3, CITY_H, CITY_W) and y.dtype == torch.int64
    for n, name in enumerate(order):
        image, label = written[name]
        np.testing.assert_array_equal(x[n].permute(1, 2, 0).numpy(), image)
        np.testing.assert_array_equal(y[n].numpy(), map_ids(label))


def test_read_cityscapes_resized(city):
    root, written = city
    x, y = D.read_cityscapes(root, "val", size=(CITY_H // 2, CITY_W // 2))
    image, label = written["frankfurt_000000_000294"]
    assert x.shape == (1, 3, CITY_H // 2, CITY_W // 2)
    np.testing.assert_array_equal(y[0].numpy(), map_ids(label[::2, ::2]))  # nearest keeps each 2x2 block's id
    ref = np.asarray(Image.fromarray(image).resize((CITY_W // 2, CITY_H // 2), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(x[0].permute(1, 2, 0).numpy(), ref)


def _city_label(split: str, city: str, name: str) -> str:
    return f"gtFine/{split}/{city}/{name}_gtFine_labelIds.png"


CITY_ERRORS = {
    "missing label map": (lambda p: p.unlink(), D.DatasetNotFoundError),
    "size differs": (lambda p: Image.fromarray(np.zeros((CITY_H, CITY_W + 2), np.uint8)).save(p), D.DatasetFormatError),
    "id 34": (lambda p: Image.fromarray(np.full((CITY_H, CITY_W), 34, np.uint8)).save(p), D.DatasetFormatError),
    "RGB label map": (lambda p: Image.fromarray(np.zeros((CITY_H, CITY_W, 3), np.uint8)).save(p), D.DatasetFormatError),
}  # fmt: skip


@pytest.mark.parametrize("case", CITY_ERRORS)
def test_read_cityscapes_errors_name_the_file(city, case):
    root, _ = city
    damage, exc = CITY_ERRORS[case]
    label = root / _city_label("train", "bochum", "bochum_000000_000313")
    damage(label)
    with raises_naming(exc, label):
        D.read_cityscapes(root, "train", size=(8, 16))
    D.read_cityscapes(root, "val", size=(8, 16))  # the other split is intact


def test_read_cityscapes_missing_folder_and_bad_arguments(city):
    root, _ = city
    with pytest.raises(ValueError, match="split"):
        D.read_cityscapes(root, "test")
    with pytest.raises(ValueError, match="size"):
        D.read_cityscapes(root, "val", size=(8, 0))
    shutil.rmtree(root / "leftImg8bit" / "val")
    with raises_naming(D.DatasetNotFoundError, root / "leftImg8bit" / "val"):
        D.read_cityscapes(root, "val")


def test_read_cityscapes_refuses_a_size_that_cannot_fit(city, monkeypatch):
    """(H, W) = (100000, 100000) asks for 11 bytes a pixel per image (uint8 RGB, int64 train ids): refused naming
    size before any array is allocated; the boundary is that count plus one resized image (24 bytes a pixel)."""
    from cdgrad import validation

    root, _ = city
    monkeypatch.setattr(validation, "ALWAYS_FITS", 0)
    monkeypatch.setattr(validation, "available_memory", lambda device=None: 64 * 2**30)
    with pytest.raises(validation.MemoryRequestError, match=r"size=\(100000, 100000\) needs about .*3 images"):
        D.read_cityscapes(root, "train", size=(100000, 100000))
    expected = D.read_cityscapes(root, "train", size=(8, 16))
    need = (11 * 3 + 24) * 8 * 16
    monkeypatch.setattr(validation, "available_memory", lambda device=None: need - 1)
    with pytest.raises(validation.MemoryRequestError, match=r"size=\(8, 16\)"):
        D.read_cityscapes(root, "train", size=(8, 16))
    monkeypatch.setattr(validation, "available_memory", lambda device=None: need)
    got = D.read_cityscapes(root, "train", size=(8, 16))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_cityscapes_loader(city, clean_env):
    root, _ = city
    ds = D.load_dataset("cityscapes", root=root)
    assert ds.name == "cityscapes" and ds.dense and ds.num_classes == 19
    assert ds.train_x.shape == (3, 3, 256, 512) and ds.test_y.shape == (1, 256, 512)
    val_x, val_y = D.read_cityscapes(root, "val")
    assert torch.equal(ds.test_x, val_x) and torch.equal(ds.test_y, val_y)
    assert (ds.mean, ds.std) == D.channel_stats(ds.train_x)
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_dataset("cityscapes", root=root / "gtFine")
    msg = str(info.value)
    for part in ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip", "https://www.cityscapes-dataset.com",
                 "login", str(root / "gtFine")):  # fmt: skip
        assert part in msg


# ----------------------------------------------------------------------------------------------------------
# scale_crop_flip
# ----------------------------------------------------------------------------------------------------------

# A distinct non-zero colour per class: the class of a pixel can be read back from the image.
COLOURS = torch.tensor([[10, 200, 30], [90, 20, 250], [170, 140, 60], [250, 60, 120], [40, 120, 180], [130, 250, 5]])


def colour_of(y: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) image whose pixels are the colours of the classes of y."""
    return COLOURS[y].permute(0, 3, 1, 2).to(torch.uint8).contiguous()


def is_window(out: torch.Tensor, full: torch.Tensor, crop: int) -> bool:
    """Whether ``out`` equals a crop x crop window of ``full`` or of its horizontal mirror."""
    for src in (full, full.flip(-1)):
        for oy in range(full.shape[-2] - crop + 1):
            for ox in range(full.shape[-1] - crop + 1):
                if torch.equal(out, src[..., oy : oy + crop, ox : ox + crop]):
                    return True
    return False


@HYP
@given(n=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), crop=st.integers(1, 11),
       classes=st.integers(1, 6), seed=st.integers(0, 2**16))  # fmt: skip
def test_scale_crop_flip_unit_scale_keeps_image_and_mask_aligned(n, h, w, crop, classes, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n, h, w), generator=g)
    x = colour_of(y)
    ox, oy = D.scale_crop_flip(x, y, crop, scale=(1.0, 1.0), generator=torch.Generator().manual_seed(seed))
    assert ox.shape == (n, 3, crop, crop) and ox.dtype == torch.uint8
    assert oy.shape == (n, crop, crop) and oy.dtype == torch.int64
    pad = oy == 255
    assert (ox.permute(0, 2, 3, 1)[pad] == 0).all()
    assert torch.equal(ox.permute(0, 2, 3, 1)[~pad], COLOURS[oy[~pad]].to(torch.uint8))
    padded = F.pad(y, (0, max(0, crop - w), 0, max(0, crop - h)), value=255)
    for i in range(n):
        assert is_window(oy[i], padded[i], crop)
    assert int(pad.sum()) == n * crop * crop - n * min(h, crop) * min(w, crop)


@HYP
@given(n=st.integers(1, 4), h=st.integers(2, 10), w=st.integers(2, 10), crop=st.integers(1, 14),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_scale_crop_flip_random_scale_keeps_padding_aligned(n, h, w, crop, seed):
    # one class per image: any resampling keeps its colour exactly, so image and mask agree pixel by pixel
    y = (torch.arange(n) % 6)[:, None, None].expand(n, h, w).contiguous()
    x = colour_of(y)
    ox, oy = D.scale_crop_flip(x, y, crop, scale=(0.5, 2.0), generator=torch.Generator().manual_seed(seed))
    pad = oy == 255
    assert (ox.permute(0, 2, 3, 1)[pad] == 0).all()
    assert torch.equal(ox.permute(0, 2, 3, 1)[~pad], COLOURS[oy[~pad]].to(torch.uint8))
    assert set(oy.unique().tolist()) <= {255, *range(min(n, 6))}
    for i in range(n):
        assert set(oy[i].unique().tolist()) <= {255, i % 6}
        # the image is a rectangle in the top-left corner (top-right when flipped), the rest is padding
        rows, cols = (~pad[i]).any(-1), (~pad[i]).any(-2)
        k, m = int(rows.sum()), int(cols.sum())
        assert k > 0 and m > 0 and rows[:k].all() and (cols[:m].all() or cols[-m:].all())
        assert torch.equal(~pad[i], rows[:, None] & cols[None, :])


def test_scale_crop_flip_upscale_matches_interpolation():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (6, 3, 5, 5), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 21, (6, 5, 5), generator=g)
    ref_x = F.interpolate(x.float(), size=(10, 10), mode="bilinear", align_corners=False).round().to(torch.uint8)
    ref_y = y.repeat_interleave(2, -1).repeat_interleave(2, -2)
    flips = set()
    for seed in range(4):
        ox, oy = D.scale_crop_flip(x, y, 10, scale=(2.0, 2.0), generator=torch.Generator().manual_seed(seed))
        for i in range(6):
            flipped = not torch.equal(oy[i], ref_y[i])
            flips.add(flipped)
            want_x, want_y = (ref_x[i].flip(-1), ref_y[i].flip(-1)) if flipped else (ref_x[i], ref_y[i])
            assert torch.equal(ox[i], want_x) and torch.equal(oy[i], want_y)
    assert flips == {True, False}


def test_scale_crop_flip_downscale_samples_pixel_centres_and_pads():
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (3, 2, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 21, (3, 8, 8), generator=g)
    ox, oy = D.scale_crop_flip(x, y, 6, scale=(0.5, 0.5), generator=torch.Generator().manual_seed(0))
    ref_x = F.interpolate(x.float(), size=(4, 4), mode="bilinear", align_corners=False).round().to(torch.uint8)
    for i in range(3):
        flipped = bool((oy[i, :4, :2] == 255).all())  # padding on the left: flipped
        gx, gy = (ox[i].flip(-1), oy[i].flip(-1)) if flipped else (ox[i], oy[i])
        assert torch.equal(gy[:4, :4], y[i, 1::2, 1::2])  # nearest: the pixel holding each output centre
        assert torch.equal(gx[:, :4, :4], ref_x[i])
        assert (gy[4:] == 255).all() and (gy[:, 4:] == 255).all()
        assert (gx[:, 4:] == 0).all() and (gx[:, :, 4:] == 0).all()


def test_scale_crop_flip_deterministic_and_validated():
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (8, 3, 12, 10), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 21, (8, 12, 10), generator=g)
    a = D.scale_crop_flip(x, y, 9, generator=torch.Generator().manual_seed(11))
    b = D.scale_crop_flip(x, y, 9, generator=torch.Generator().manual_seed(11))
    c = D.scale_crop_flip(x, y, 9, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    e = D.scale_crop_flip(x[:0], y[:0], 4)
    assert e[0].shape == (0, 3, 4, 4) and e[1].shape == (0, 4, 4)
    with pytest.raises(TypeError, match="x"):
        D.scale_crop_flip(x.float(), y, 4)
    with pytest.raises(TypeError, match="y"):
        D.scale_crop_flip(x, y[:, :-1], 4)
    with pytest.raises(ValueError, match="crop"):
        D.scale_crop_flip(x, y, 0)
    for bad in ((0.0, 1.0), (2.0, 1.0), (1.0, float("inf"))):
        with pytest.raises(ValueError, match="scale"):
            D.scale_crop_flip(x, y, 4, scale=bad)


def test_read_voc_refuses_a_size_that_cannot_fit(voc, monkeypatch):
    """size 100000 asks for 11 bytes a pixel per image (uint8 RGB, int64 mask) on a 100000 x 100000 canvas: refused
    naming size before any array is allocated; the boundary is that count plus one decoded image (24 bytes a
    pixel)."""
    from cdgrad import validation

    folder, _ = voc
    monkeypatch.setattr(validation, "ALWAYS_FITS", 0)
    monkeypatch.setattr(validation, "available_memory", lambda device=None: 64 * 2**30)
    with pytest.raises(validation.MemoryRequestError, match=r"size=100000 needs about .*2 images and masks"):
        dense.read_voc(folder, "train", size=100000)
    expected = dense.read_voc(folder, "train", size=36)
    need = (11 * 2 + 24) * 36 * 36
    monkeypatch.setattr(validation, "available_memory", lambda device=None: need - 1)
    with pytest.raises(validation.MemoryRequestError, match=r"size=36 needs"):
        dense.read_voc(folder, "train", size=36)
    monkeypatch.setattr(validation, "available_memory", lambda device=None: need)
    got = dense.read_voc(folder, "train", size=36)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
