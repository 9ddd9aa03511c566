"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): an IDX reader, the loader and a deterministic validation split.

The data are four IDX files (gzipped or not): 60,000 training and 10,000 test images of 28×28 grey pixels
(uint8), labels 0..9. Debian/Ubuntu ship them in the package ``dataset-fashion-mnist``, installed under
``/usr/share/datasets/fashion-mnist`` (the default folder here); any folder holding the four standard files
works through ``data_dir``.

IDX format (LeCun's MNIST page): a big-endian header — two zero bytes, a type byte (0x08: unsigned byte), the
number of dimensions — then one big-endian uint32 per dimension, then the values in row-major order. Images
have magic number 2051 (0x00000803: ubyte, 3 dimensions: count, rows, columns), labels 2049 (0x00000801: ubyte,
1 dimension: count).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_DATA_DIR",
    "FILES",
    "IMAGES_MAGIC",
    "LABELS_MAGIC",
    "FashionMNIST",
    "FashionMNISTNotFoundError",
    "IDXFormatError",
    "find_files",
    "load_fashion_mnist",
    "read_idx",
    "read_idx_images",
    "read_idx_labels",
    "validation_split",
]

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
# the standard file names (as distributed by Zalando Research and the Debian package), without ".gz"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_HOW_TO_GET = (
    "Install them with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu: they land in "
    f"{DEFAULT_DATA_DIR}), or pass --data-dir (data_dir=) pointing at a folder holding the four standard IDX files "
    "(gzipped or not; the originals are at https://github.com/zalandoresearch/fashion-mnist)"
)


class IDXFormatError(ValueError):
    """An IDX file whose header or length is not what it should be."""


class FashionMNISTNotFoundError(FileNotFoundError):
    """The Fashion-MNIST files are not where they were looked for (the message says where and how to get them)."""


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic bytes (whatever its name)."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise IDXFormatError(f"{path}: not a valid gzip file ({error})") from None
    return raw


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzipped or plain) into a uint8 array of the dimensions in its header.

    Raises :class:`IDXFormatError` when the magic number is not ``expected_magic`` (or not a ubyte IDX magic at
    all), or when the data length differs from the product of the dimensions.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXFormatError(f"{path}: {len(data)} bytes, too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if data[:3] != b"\x00\x00\x08":
        raise IDXFormatError(
            f"{path}: magic number {magic} (0x{magic:08x}) is not an IDX file of unsigned bytes (0x000008nn)"
        )
    if expected_magic is not None and magic != expected_magic:
        raise IDXFormatError(f"{path}: magic number {magic}, expected {expected_magic}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXFormatError(f"{path}: {len(data)} bytes, too short for a header of {ndim} dimensions")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise IDXFormatError(
            f"{path}: header says dimensions {dims} ({expected} bytes of data), but the file holds "
            f"{len(data) - header} bytes after the header"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx_images(path: str | Path) -> np.ndarray:
    """Images: magic 2051, three dimensions (count, rows, columns); uint8 [count, rows, columns]."""
    return read_idx(path, IMAGES_MAGIC)


def read_idx_labels(path: str | Path) -> np.ndarray:
    """Labels: magic 2049, one dimension (count); int64 [count]."""
    return read_idx(path, LABELS_MAGIC).astype(np.int64)


def find_files(data_dir: str | Path | None = None) -> dict[str, Path]:
    """The four files in ``data_dir`` (default /usr/share/datasets/fashion-mnist): each standard name, gzipped
    (``.gz``) or plain. Raises :class:`FashionMNISTNotFoundError` naming every path looked for."""
    folder = Path(DEFAULT_DATA_DIR if data_dir is None else data_dir).expanduser()
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, name in FILES.items():
        candidates = [folder / f"{name}.gz", folder / name]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            missing.append(f"{candidates[0].name} (or {candidates[1].name})")
        else:
            found[key] = hit
    if missing:
        where = "does not exist" if not folder.is_dir() else "lacks " + ", ".join(missing)
        raise FashionMNISTNotFoundError(
            f"Fashion-MNIST not found: the folder {folder} {where}. Looked for these four files in {folder}: "
            + ", ".join(f"{name}.gz (or {name})" for name in FILES.values())
            + f". {_HOW_TO_GET}."
        )
    return found


@dataclass(frozen=True)
class FashionMNIST:
    """Images uint8 [N, 28, 28], labels int64 [N]; the files they came from."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    files: dict[str, Path]


def _pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path)
    if images.ndim != 3:
        raise IDXFormatError(f"{images_path}: images need 3 dimensions (count, rows, columns), got {images.shape}")
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise IDXFormatError(f"{labels_path}: labels must be in 0..{len(CLASSES) - 1}, got {labels.min()}..{labels.max()}")
    return images, labels


def load_fashion_mnist(data_dir: str | Path | None = None, *, image_shape: tuple[int, int] | None = (28, 28)) -> FashionMNIST:
    """Fashion-MNIST's training and test sets from ``data_dir`` (default /usr/share/datasets/fashion-mnist).

    ``image_shape``: the rows × columns required (None: any). A missing file raises
    :class:`FashionMNISTNotFoundError` (a ``FileNotFoundError``) saying which files were looked for where and how
    to get them; a malformed one :class:`IDXFormatError`.
    """
    files = find_files(data_dir)
    train_images, train_labels = _pair(files["train_images"], files["train_labels"])
    test_images, test_labels = _pair(files["test_images"], files["test_labels"])
    if image_shape is not None:
        for key, images in (("train_images", train_images), ("test_images", test_images)):
            if images.shape[1:] != tuple(image_shape):
                raise IDXFormatError(f"{files[key]}: images of {images.shape[1:]} pixels, expected {tuple(image_shape)}")
    return FashionMNIST(train_images, train_labels, test_images, test_labels, files)


def validation_split(n: int, validation_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split of ``range(n)`` into (train, validation) index arrays, each sorted.

    The validation indices are the first ``validation_size`` of a permutation drawn by numpy's PCG64 generator
    seeded with ``seed``: the same (n, validation_size, seed) always gives the same split, on every platform.
    """
    if not 0 < validation_size < n:
        raise ValueError(f"validation_size must be in 1..{n - 1}, got {validation_size}")
    order = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    return np.sort(order[validation_size:]), np.sort(order[:validation_size])
