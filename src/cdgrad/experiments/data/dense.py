"""Dense (per-pixel) data sets from their official layouts, PascalVOC 2012 and Cityscapes, and their augmentation.

* PascalVOC 2012 segmentation (`read_voc`): ``VOCdevkit/VOC2012/`` with ``ImageSets/Segmentation/{split}.txt``,
  ``JPEGImages/<id>.jpg`` and ``SegmentationClass/<id>.png`` (palette PNGs whose indices are the class ids 0..20,
  255 on object boundaries), or the official ``VOCtrainval_11-May-2012.tar`` read in place. Each image lies at the
  top-left of a ``size x size`` canvas, the image padded with 0 and the mask with `IGNORE_INDEX`.
* Cityscapes fine annotations (`read_cityscapes`): ``leftImg8bit/{split}/{city}/{name}_leftImg8bit.png`` and
  ``gtFine/{split}/{city}/{name}_gtFine_labelIds.png``; label ids become the 19 train ids by
  `CITYSCAPES_TRAIN_IDS`, images are resized bilinearly and label maps by nearest neighbour to one size.

Registered data sets (`load_dataset`): ``voc2012`` (21 classes) and ``cityscapes`` (19 classes), both with the
official val split as test split. Their files are looked up where `find_dataset_dir` looks (``root``,
``$CDGRAD_DATA``, ``~/.cache/cdgrad/data/<name>``, ``/usr/share/datasets/<name>``, each directory itself and its
``<name>`` subdirectory); neither is downloaded automatically. Every error about a file names it. Pillow is
imported only when a file is read.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from cdgrad import validation as V
from cdgrad.experiments.data.dataset import IGNORE_INDEX, Dataset, channel_stats, register_dataset
from cdgrad.experiments.data.formats import DatasetFormatError
from cdgrad.experiments.data.official import read_bytes
from cdgrad.experiments.data.sources import DatasetNotFoundError, candidate_dirs, not_found_message
from cdgrad.validation import check_memory

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "CITYSCAPES_NUM_CLASSES",
    "CITYSCAPES_TRAIN_IDS",
    "CITYSCAPES_URL",
    "VOC_NUM_CLASSES",
    "VOC_TAR",
    "VOC_URL",
    "find_cityscapes_dir",
    "find_voc",
    "find_voc_dir",
    "load_cityscapes",
    "load_voc2012",
    "read_cityscapes",
    "read_voc",
]

VOC_NUM_CLASSES = 21
VOC_TAR = "VOCtrainval_11-May-2012.tar"
VOC_URL = f"http://host.robots.ox.ac.uk/pascal/VOC/voc2012/{VOC_TAR}"
_VOC_IN_TAR = "VOCdevkit/VOC2012"  # the VOC2012 folder inside the official tar

CITYSCAPES_NUM_CLASSES = 19
CITYSCAPES_URL = "https://www.cityscapes-dataset.com"

# trainId of each Cityscapes label id 0..33 (cityscapesScripts, helpers/labels.py); 255: not trained on. The
# label id -1 (license plate, trainId -1) is stored as 255 in the 8-bit labelIds PNGs and maps to 255 as well.
CITYSCAPES_TRAIN_IDS: tuple[int, ...] = (
    255,  # 0 unlabeled
    255,  # 1 ego vehicle
    255,  # 2 rectification border
    255,  # 3 out of roi
    255,  # 4 static
    255,  # 5 dynamic
    255,  # 6 ground
    0,  # 7 road
    1,  # 8 sidewalk
    255,  # 9 parking
    255,  # 10 rail track
    2,  # 11 building
    3,  # 12 wall
    4,  # 13 fence
    255,  # 14 guard rail
    255,  # 15 bridge
    255,  # 16 tunnel
    5,  # 17 pole
    255,  # 18 polegroup
    6,  # 19 traffic light
    7,  # 20 traffic sign
    8,  # 21 vegetation
    9,  # 22 terrain
    10,  # 23 sky
    11,  # 24 person
    12,  # 25 rider
    13,  # 26 car
    14,  # 27 truck
    15,  # 28 bus
    255,  # 29 caravan
    255,  # 30 trailer
    16,  # 31 train
    17,  # 32 motorcycle
    18,  # 33 bicycle
)

# Pixel value of a labelIds PNG -> train id; -1 marks a value that is no label id.
_CITYSCAPES_LUT = np.full(256, -1, dtype=np.int64)
_CITYSCAPES_LUT[: len(CITYSCAPES_TRAIN_IDS)] = CITYSCAPES_TRAIN_IDS
_CITYSCAPES_LUT[255] = IGNORE_INDEX  # label id -1 (license plate) written as an 8-bit value

# Pixel value of a VOC mask -> whether it is a class id (0..20) or the boundary label 255.
_VOC_VALID = np.zeros(256, dtype=bool)
_VOC_VALID[:VOC_NUM_CLASSES] = True
_VOC_VALID[IGNORE_INDEX] = True

_SPLITS = ("train", "val")


def _check_split(split: str) -> str:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    return split


def _listing(paths: Sequence[str], limit: int = 5) -> str:
    """``paths`` joined by ', ', at most ``limit`` of them and a count of the rest."""
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


# ----------------------------------------------------------------------------------------------------------
# Image decoding (Pillow)
# ----------------------------------------------------------------------------------------------------------


def _open_image(data: bytes, source: str, fmt: str, max_hw: tuple[int, int] | None = None) -> PILImage.Image:
    """The decoded image of file ``data`` in format ``fmt`` ("JPEG", "PNG"); its size is checked against
    ``max_hw`` (height, width) before any pixel is decoded."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data), formats=(fmt,))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetFormatError(f"{source}: not a readable {fmt} image ({type(e).__name__}: {e})") from None
    if max_hw is not None and (im.height > max_hw[0] or im.width > max_hw[1]):
        raise DatasetFormatError(
            f"{source}: image of {im.height}x{im.width} pixels is larger than the {max_hw[0]}x{max_hw[1]} canvas"
        )
    try:
        im.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetFormatError(f"{source}: corrupt or truncated {fmt} image ({type(e).__name__}: {e})") from None
    return im


def _rgb(im: PILImage.Image) -> np.ndarray:
    """uint8 ``(3, H, W)`` RGB pixels of ``im``."""
    pixels: np.ndarray = np.array(im.convert("RGB"))  # a writable copy
    return np.moveaxis(pixels, 2, 0)


def _label_values(im: PILImage.Image, source: str) -> np.ndarray:
    """uint8 ``(H, W)`` stored values of a label image: the palette indices of a 'P' image, the grey levels of 'L'."""
    if im.mode not in ("P", "L"):
        raise DatasetFormatError(
            f"{source}: a label image must be a palette ('P') or 8-bit grey ('L') PNG whose values are the class "
            f"ids, got mode {im.mode!r}"
        )
    return np.asarray(im)


def _unexpected(values: np.ndarray) -> str:
    bad = np.unique(values)
    return ", ".join(str(int(v)) for v in bad[:10]) + (" ..." if bad.size > 10 else "")


# ----------------------------------------------------------------------------------------------------------
# PascalVOC 2012
# ----------------------------------------------------------------------------------------------------------


class _VocFiles:
    """Files of the VOC2012 folder by their path relative to it: in a directory or in the official tar."""

    def __init__(
        self, folder: Path | None = None, tar: tarfile.TarFile | None = None, tar_path: Path | None = None
    ) -> None:
        self._folder = folder
        self._tar = tar
        self._tar_path = tar_path
        self._members: dict[str, tarfile.TarInfo] = {}
        if tar is not None:
            self._members = {m.name: m for m in tar.getmembers() if m.isfile()}

    def source(self, rel: str) -> str:
        if self._folder is not None:
            return str(self._folder / rel)
        return f"{self._tar_path}:{_VOC_IN_TAR}/{rel}"

    def has(self, rel: str) -> bool:
        if self._folder is not None:
            return (self._folder / rel).is_file()
        return f"{_VOC_IN_TAR}/{rel}" in self._members

    def missing_error(self, rels: Sequence[str]) -> Exception:
        names = _listing([self.source(r) for r in rels])
        if self._folder is not None:
            return DatasetNotFoundError(f"missing files of PascalVOC 2012: {names}")
        return DatasetFormatError(f"{self._tar_path}: the archive lacks the members {names}")

    def read(self, rel: str) -> bytes:
        if not self.has(rel):
            raise self.missing_error([rel])
        try:
            if self._folder is not None:
                return (self._folder / rel).read_bytes()
            assert self._tar is not None
            f = self._tar.extractfile(self._members[f"{_VOC_IN_TAR}/{rel}"])
            assert f is not None  # regular files always have a reader
            return f.read()
        except (OSError, tarfile.TarError, EOFError) as e:
            raise DatasetFormatError(f"{self.source(rel)}: cannot read ({type(e).__name__}: {e})") from None


def find_voc(d: str | os.PathLike[str]) -> Path | None:
    """The PascalVOC 2012 copy in directory ``d``: the folder ``VOC2012`` (``d/VOCdevkit/VOC2012``, ``d/VOC2012``
    or ``d`` itself, the first holding ``ImageSets/Segmentation``), else the official tar
    ``d/VOCtrainval_11-May-2012.tar``, else None."""
    d = Path(d)
    for folder in (d / "VOCdevkit" / "VOC2012", d / "VOC2012", d):
        if (folder / "ImageSets" / "Segmentation").is_dir():
            return folder
    return d / VOC_TAR if (d / VOC_TAR).is_file() else None


@contextlib.contextmanager
def _voc_files(root: str | os.PathLike[str]) -> Iterator[_VocFiles]:
    location = find_voc(root)
    if location is None:
        raise DatasetNotFoundError(
            f"{root}: holds no PascalVOC 2012 (neither VOCdevkit/VOC2012/, VOC2012/ nor ImageSets/Segmentation/ "
            f"nor {VOC_TAR}); get the official tar from {VOC_URL}"
        )
    if location.is_dir():
        yield _VocFiles(folder=location)
        return
    with contextlib.ExitStack() as stack:
        try:
            tar = stack.enter_context(tarfile.open(location, mode="r:"))
            files = _VocFiles(tar=tar, tar_path=location)
        except (OSError, tarfile.TarError, EOFError) as e:
            raise DatasetFormatError(f"{location}: not a readable tar archive ({type(e).__name__}: {e})") from None
        yield files


def _voc_ids(files: _VocFiles, split: str) -> list[str]:
    rel = f"ImageSets/Segmentation/{split}.txt"
    source = files.source(rel)
    try:
        ids = files.read(rel).decode("ascii").split()
    except UnicodeDecodeError:
        raise DatasetFormatError(f"{source}: not an ASCII list of image ids") from None
    if not ids:
        raise DatasetFormatError(f"{source}: lists no image ids")
    bad = [i for i in ids if "/" in i or "\\" in i or i.startswith(".")]
    if bad:
        raise DatasetFormatError(f"{source}: image ids must be plain file names, got {_listing(bad)}")
    return ids


def read_voc(root: str | os.PathLike[str], split: str, size: int = 500) -> tuple[Tensor, Tensor]:
    """Images uint8 ``(N, 3, size, size)`` and masks int64 ``(N, size, size)`` of PascalVOC 2012 segmentation.

    ``root``: a directory holding ``VOCdevkit/VOC2012/`` (or being ``VOCdevkit/`` or ``VOC2012/``) or holding the
    official ``VOCtrainval_11-May-2012.tar``, read in place without extracting. ``split``: 'train' or 'val', the ids of
    ``ImageSets/Segmentation/{split}.txt`` in their order. Image ``i`` (``JPEGImages/<id>.jpg`` as RGB) lies at the
    top-left of the canvas, padded with 0; its mask (the palette indices of ``SegmentationClass/<id>.png``: class
    ids 0..20, 255 on boundaries) likewise, padded with `IGNORE_INDEX` (255). Raises `DatasetNotFoundError` for
    a missing file of a folder and `DatasetFormatError` for a member missing from the tar, an image larger than
    ``size``, a mask that is not a 'P' or 'L' PNG, of another size than its image or with a value outside 0..20
    and 255; each names the file, and nothing is returned in those cases. A ``size`` whose arrays cannot fit in the
    available memory is refused (`MemoryRequestError`) before any is allocated.
    """
    _check_split(split)
    size = V.check_int(size, "size", 1)
    with _voc_files(root) as files:
        ids = _voc_ids(files, split)
        pairs = [(f"JPEGImages/{i}.jpg", f"SegmentationClass/{i}.png") for i in ids]
        absent = [rel for pair in pairs for rel in pair if not files.has(rel)]
        if absent:
            raise files.missing_error(absent)
        # uint8 images and int64 masks (11 bytes a pixel), and one decoded image with its mask (about 24 a pixel)
        what = f"{len(ids)} images and masks of {size} x {size} pixels"
        check_memory((11 * len(ids) + 24) * size * size, "size", size, what=what)
        images = torch.zeros((len(ids), 3, size, size), dtype=torch.uint8)
        masks = torch.full((len(ids), size, size), IGNORE_INDEX, dtype=torch.int64)
        for n, (img_rel, mask_rel) in enumerate(pairs):
            img_src, mask_src = files.source(img_rel), files.source(mask_rel)
            image = _rgb(_open_image(files.read(img_rel), img_src, "JPEG", (size, size)))
            mask = _label_values(_open_image(files.read(mask_rel), mask_src, "PNG"), mask_src)
            if mask.shape != image.shape[1:]:
                raise DatasetFormatError(
                    f"{mask_src}: mask of {mask.shape[0]}x{mask.shape[1]} pixels, but its image {img_src} has "
                    f"{image.shape[1]}x{image.shape[2]}"
                )
            invalid = ~_VOC_VALID[mask]
            if invalid.any():
                raise DatasetFormatError(
                    f"{mask_src}: mask values must be class ids 0..{VOC_NUM_CLASSES - 1} or {IGNORE_INDEX}, got "
                    f"{_unexpected(mask[invalid])}"
                )
            h, w = mask.shape
            images[n, :, :h, :w] = torch.from_numpy(image)
            masks[n, :h, :w] = torch.from_numpy(mask.astype(np.int64))
    return images, masks


# ----------------------------------------------------------------------------------------------------------
# Cityscapes
# ----------------------------------------------------------------------------------------------------------

_IMG_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"


def _cityscapes_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, labelIds) paths of ``split``, ordered by city then file name."""
    img_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    if not img_dir.is_dir():
        raise DatasetNotFoundError(f"{img_dir}: folder missing; unpack leftImg8bit_trainvaltest.zip into {root}")
    pairs = [
        (img, gt_dir / city.name / (img.name[: -len(_IMG_SUFFIX)] + _LABEL_SUFFIX))
        for city in sorted(p for p in img_dir.iterdir() if p.is_dir())
        for img in sorted(city.glob(f"*{_IMG_SUFFIX}"))
    ]
    if not pairs:
        raise DatasetNotFoundError(f"{img_dir}: holds no <city>/*{_IMG_SUFFIX} images")
    absent = [str(label) for _, label in pairs if not label.is_file()]
    if absent:
        raise DatasetNotFoundError(
            f"missing gtFine label maps of Cityscapes images: {_listing(absent)} (unpack gtFine_trainvaltest.zip "
            f"into {root})"
        )
    return pairs


def read_cityscapes(
    root: str | os.PathLike[str], split: str, size: tuple[int, int] = (256, 512)
) -> tuple[Tensor, Tensor]:
    """Images uint8 ``(N, 3, H, W)`` and train-id maps int64 ``(N, H, W)`` of the Cityscapes fine annotations.

    ``(H, W) = size``. Reads ``root/leftImg8bit/{split}/{city}/{name}_leftImg8bit.png`` with its
    ``root/gtFine/{split}/{city}/{name}_gtFine_labelIds.png`` (``split``: 'train' or 'val'), ordered by city and
    name. Label ids map to train ids by `CITYSCAPES_TRAIN_IDS` (ids without a train id, and the 255 that stands
    for id -1, to `IGNORE_INDEX`). The image is resized by Pillow's bilinear filter, the label map by nearest
    neighbour. Raises `DatasetNotFoundError` for a missing folder or label map and `DatasetFormatError` for a
    label map of another size than its image, not an 'L' or 'P' PNG or holding a value that is no label id;
    each names the file, and nothing is returned in those cases. A ``size`` whose arrays cannot fit in the
    available memory is refused (`MemoryRequestError`) before any is allocated.
    """
    from PIL import Image

    _check_split(split)
    if not isinstance(size, Sequence) or len(size) != 2:
        raise ValueError(f"size must be a pair (height, width) of positive ints, got {size!r}")
    h, w = (V.check_int(s, "each entry of size", 1) for s in size)
    pairs = _cityscapes_pairs(Path(root), split)
    # uint8 images and int64 maps (11 bytes a pixel), and one resized image with its maps (about 24 bytes a pixel)
    what = f"{len(pairs)} images and label maps of {h} x {w} pixels"
    check_memory((11 * len(pairs) + 24) * h * w, "size", tuple(size), what=what)
    images = torch.empty((len(pairs), 3, h, w), dtype=torch.uint8)
    labels = torch.empty((len(pairs), h, w), dtype=torch.int64)
    for n, (img_path, label_path) in enumerate(pairs):
        image = _open_image(read_bytes(img_path), str(img_path), "PNG")
        label = _open_image(read_bytes(label_path), str(label_path), "PNG")
        ids = _label_values(label, str(label_path))
        if label.size != image.size:
            raise DatasetFormatError(
                f"{label_path}: label map of {label.height}x{label.width} pixels, but its image {img_path} has "
                f"{image.height}x{image.width}"
            )
        train_ids = _CITYSCAPES_LUT[ids]
        if (train_ids < 0).any():
            raise DatasetFormatError(
                f"{label_path}: values must be Cityscapes label ids 0..{len(CITYSCAPES_TRAIN_IDS) - 1} (or 255 for "
                f"-1), got {_unexpected(ids[train_ids < 0])}"
            )
        if (image.height, image.width) != (h, w):
            image = image.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
            ids = np.asarray(label.resize((w, h), Image.Resampling.NEAREST))
        images[n] = torch.from_numpy(_rgb(image))
        labels[n] = torch.from_numpy(_CITYSCAPES_LUT[ids])
    return images, labels


# ----------------------------------------------------------------------------------------------------------
# Lookup and registration
# ----------------------------------------------------------------------------------------------------------


def _find(name: str, root: str | os.PathLike[str] | None, found: Callable[[Path], Path | None], how: str) -> Path:
    candidates = candidate_dirs(name, root)
    for d in candidates:
        location = found(d) if d.is_dir() else None
        if location is not None:
            return location
    what = " (it is not downloaded automatically)"
    raise DatasetNotFoundError(not_found_message(name, candidates, what, name, root, how + " "))


def _cityscapes_root(d: Path) -> Path | None:
    ok = all((d / top / split).is_dir() for top in ("leftImg8bit", "gtFine") for split in _SPLITS)
    return d if ok else None


_VOC_HOW = f"Get the official {VOC_TAR} from {VOC_URL} (the tar itself or its extracted VOCdevkit/ folder)."
_CITYSCAPES_HOW = (
    f"Get leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from {CITYSCAPES_URL} (login needed) and unpack "
    "both into one folder (it then holds leftImg8bit/ and gtFine/)."
)


def find_voc_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The first searched directory holding PascalVOC 2012 (see `find_voc`); `DatasetNotFoundError` listing the
    directories searched and where to get the official tar otherwise."""
    return _find("voc2012", root, lambda d: d if find_voc(d) is not None else None, _VOC_HOW)


def find_cityscapes_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The first searched directory holding ``leftImg8bit/{train,val}`` and ``gtFine/{train,val}``;
    `DatasetNotFoundError` listing the directories searched and where to get the official files otherwise."""
    return _find("cityscapes", root, _cityscapes_root, _CITYSCAPES_HOW)


def _dense_dataset(name: str, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], classes: int) -> Dataset:
    mean, std = channel_stats(train[0])
    return Dataset(name, train[0], train[1], test[0], test[1], classes, mean, std)


VOC_CANVAS = 512  # the side of the canvas `load_voc2012` pads every image to


def load_voc2012(root: str | os.PathLike[str] | None = None, download: bool = False) -> Dataset:
    """PascalVOC 2012 segmentation as a `Dataset`: train split for training, val for testing, 512 x 512 canvases
    (`read_voc`: the images, at most 500 x 500, padded to a size the UNet's five 2x downsamplings divide; the
    padding is labelled 255 and ignored), 21 classes. ``download`` is accepted for the loader signature; nothing
    is downloaded."""
    d = find_voc_dir(root)
    return _dense_dataset("voc2012", read_voc(d, "train", VOC_CANVAS), read_voc(d, "val", VOC_CANVAS), VOC_NUM_CLASSES)


def load_cityscapes(root: str | os.PathLike[str] | None = None, download: bool = False) -> Dataset:
    """Cityscapes fine annotations as a `Dataset`: train split for training, val for testing, resized to
    256 x 512 (`read_cityscapes`), 19 classes. ``download`` is accepted for the loader signature; nothing is
    downloaded."""
    d = find_cityscapes_dir(root)
    return _dense_dataset("cityscapes", read_cityscapes(d, "train"), read_cityscapes(d, "val"), CITYSCAPES_NUM_CLASSES)


register_dataset("voc2012", load_voc2012)
register_dataset("cityscapes", load_cityscapes)
