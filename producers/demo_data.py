"""An honest labelled demo set: patches of real DICOM images, some with an implanted lesion.

The lesions are synthetic Gaussian blobs implanted into real images, because no labelled medical
images can be shipped or downloaded here. Results on this set measure the pipeline (and how well
models find a blob in real anatomy and noise), not clinical performance.

The real images are the DICOM test files shipped by pydicom, pydicom-data and nibabel, one per
patient, compressed ones included (decoded by Pillow and pylibjpeg, both dependencies), colour
ultrasound read as its luminance (as the producer reads it, `sources.COLOUR`).
Splits are by source image, so no image (nor patient) is on two sides; a fixed seed gives the
same arrays on every run. Nothing is cached on disk.
"""

import hashlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel
import numpy as np
import pydicom
from data_store import DataStore
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

from tensorline.producers import sources

LABELS = ("normal", "nodule")

# Modalities of real anatomy; OT (test patterns), SEG (masks) and RT objects are left out.
_MODALITIES = frozenset({"CT", "MR", "CR", "DX", "MG", "US", "NM", "PT", "XA", "RF", "IO", "PX"})
# Smaller images give too few distinct 64x64 patches.
_MIN_SIDE = 128

# Lesion and noise. The blob's contrast is in units of the local std (stored values, noise
# included) within 3 sigma of its centre. The range is tuned to keep the task short of trivial:
# a small CNN (4 conv layers, z-scored patches, 15 epochs, ~40 s on CPU) reaches 86 % on the
# test split of seed 7, and 80-89 % over seeds 1, 3 and 7. The noise is in units of the patch's std.
_SIGMA_PX = (2.0, 6.0)
_CONTRAST = (3.0, 9.0)
_NOISE = 0.05
# Patches are cut inside the body: at most a quarter of them at the image's most frequent value
# (the padding, collimation or zeroed air around the body, where there is one), and not nearly
# constant (std at least 3 % of the image's 1st-99th percentile range).
_MAX_PLATEAU = 0.25
_MIN_STD = 0.03


@dataclass(frozen=True)
class Split:
    """One split: N patches of stored values, their labels, and where each came from."""

    images: np.ndarray  # (N, patch, patch) int32 stored values; source dtype in attrs["dtype"]
    labels: np.ndarray  # (N,) str: "nodule" or "normal"
    source_ids: np.ndarray  # (N,) str: the source image's file stem
    attrs: list[dict[str, str]]  # per patch: rescale, window, photometric, modality, dtype, bits
    lesions: np.ndarray  # (N, 3) float32 blob centre row, col and sigma; NaN for "normal"


def source_images() -> list[Path]:
    """The real 2-D DICOMs usable here, one per patient, sorted by file name.

    Usable: MONOCHROME1/2 or colour (read as luminance), at least 128x128, an anatomical modality, not a mosaic (tiles of
    slices), and its pixels decode here. Several test files hold the same image (lossy and
    lossless copies, compressed and not, crops): of each patient, the first that decodes of the
    lossless, then uncompressed, then largest, then first-named files is kept.
    """
    candidates: dict[str, list[tuple[tuple[bool, bool, int, str], Path]]] = {}
    for path in sorted(p for folder in _folders() for p in folder.glob("*.dcm")):
        try:
            with _quietly():
                ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
        syntax = ds.file_meta.get("TransferSyntaxUID")
        usable = (
            syntax is not None
            and syntax.is_transfer_syntax
            and ds.get("Modality") in _MODALITIES
            and ds.get("PhotometricInterpretation") in ("MONOCHROME1", "MONOCHROME2", *sources.COLOUR)
            and ds.get("BitsAllocated") in (8, 16)
            and min(ds.get("Rows", 0), ds.get("Columns", 0)) >= _MIN_SIDE
            and "MOSAIC" not in ds.get("ImageType", [])
        )
        if not usable:
            continue
        patient = str(ds.get("PatientID") or ds.get("StudyInstanceUID") or path)
        rank = (ds.get("LossyImageCompression") == "01", syntax.is_compressed, -ds.Rows * ds.Columns, path.name)
        candidates.setdefault(patient, []).append((rank, path))
    kept = (next((path for _, path in sorted(files) if _decodes(path)), None) for files in candidates.values())
    return sorted((path for path in kept if path is not None), key=lambda p: p.name)


def _folders() -> list[Path]:
    """Where the packages keep their DICOM test files."""
    nibabel_root = Path(nibabel.__file__).parent
    return [Path(get_testdata_file("CT_small.dcm", download=False)).parent, DataStore().data_path,
            nibabel_root / "tests" / "data", nibabel_root / "nicom" / "tests" / "data"]


def _decodes(path: Path) -> bool:
    """Whether the file's first image decodes as the producer reads it."""
    try:
        with _quietly():
            next(sources.read(path, max_bytes=1 << 30))
    except sources.BadFile:
        return False
    return True


@contextmanager
def _quietly() -> Iterator[None]:
    """pydicom's warnings off: some test files are malformed on purpose (invalid UIDs, VRs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def build(
    seed: int = 7, patch: int = 64, patches_per_image: int = 300, positive_fraction: float = 0.5
) -> dict[str, Split]:
    """'train', 'val' and 'test' splits, by source image: a quarter of the images (at least one)
    for test, a fifth (at least one) for val, the rest for train. Of the 17 images here, test gets
    4 and val 3 (enough for the fusion's cross-validation by image, `ops.train`); 300 patches each
    keep the test split at 1,200 records, and give 3,000 to train on from 10 images.

    Each image gives `patches_per_image` patches at random positions, skipping nearly constant
    ones; exactly round(positive_fraction * patches_per_image) of them get a blob.
    """
    if patch > _MIN_SIDE:
        raise ValueError(f"patch {patch} is larger than the smallest source image side {_MIN_SIDE}")
    paths = source_images()
    if len(paths) < 3:
        raise RuntimeError(f"need 3 usable source images for 3 splits, found {len(paths)}")
    order = np.random.default_rng(seed).permutation(len(paths))
    n_test, n_val = max(1, round(len(paths) / 4)), max(1, round(len(paths) / 5))
    groups = {
        "test": order[:n_test],
        "val": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
    }
    return {
        name: _concat(
            [
                _patches(paths[i], i, seed, patch, patches_per_image, positive_fraction)
                for i in sorted(group)
            ]
        )
        for name, group in groups.items()
    }


def write_dicoms(split: Split, folder: Path) -> list[Path]:
    """One DICOM per patch (Secondary Capture, explicit VR little endian), labelled in its
    ImageComments, so that `sources.read` gives back the same pixels and label.

    UIDs are deterministic: a study per source image, a SOP instance per patch.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, label, source_id, attrs) in enumerate(
        zip(split.images, split.labels, split.source_ids, split.attrs, strict=True)
    ):
        pixels = image.astype(attrs["dtype"])
        content = hashlib.sha1(pixels.tobytes()).hexdigest()
        sop_uid = generate_uid(entropy_srcs=["tensorline-demo", str(source_id), str(i), content])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{i:05d}.dcm"
        ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = generate_uid(entropy_srcs=["tensorline-demo-study", str(source_id)])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=["tensorline-demo-series", str(source_id)])
        ds.Modality = attrs["modality"]
        ds.ConversionType = "SYN"  # synthetic image: a real patch with an implanted lesion
        ds.ImageComments = f"{sources.LABEL_PREFIX}{label}"
        ds.RescaleSlope = format_number_as_ds(float(attrs["rescale_slope"]))
        ds.RescaleIntercept = format_number_as_ds(float(attrs["rescale_intercept"]))
        if "window_center" in attrs:
            ds.WindowCenter = format_number_as_ds(float(attrs["window_center"]))
            ds.WindowWidth = format_number_as_ds(float(attrs["window_width"]))
        ds.set_pixel_data(
            pixels, attrs["photometric"], int(attrs["bits_stored"]), generate_instance_uid=False
        )
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _patches(
    path: Path, index: int, seed: int, patch: int, count: int, positive_fraction: float
) -> Split:
    """`count` patches of one source image, a blob implanted in the first-drawn positives."""
    with _quietly():
        item = next(sources.read(path, max_bytes=1 << 30))
        header = pydicom.dcmread(path, stop_before_pixels=True)
    image = item.tensors["image"]
    # A colour image is read as its luminance, in the dtype of its samples (a palette's: its table's).
    bits = image.dtype.itemsize * 8 if "colour" in item.attributes else int(header.BitsStored)
    signed = image.dtype.kind == "i"
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    attrs = {k: v for k, v in item.attributes.items() if k.startswith(("rescale_", "window_"))} | {
        "photometric": item.attributes["photometric"],
        "modality": item.attributes["modality"],
        "dtype": image.dtype.name,
        "bits_stored": str(bits),
    }
    # A blob is bright where it is displayed: MONOCHROME1 shows low stored values as bright.
    sign = -1.0 if attrs["photometric"] == "MONOCHROME1" else 1.0
    p1, p99 = np.percentile(image, [1, 99])
    levels, counts = np.unique(image, return_counts=True)
    plateau = levels[np.argmax(counts)]  # padding, collimation or zeroed air, where there is one
    rng = np.random.default_rng([seed, index])
    positive = np.zeros(count, bool)
    positive[rng.permutation(count)[: round(positive_fraction * count)]] = True
    yy, xx = np.mgrid[:patch, :patch]
    out = np.empty((count, patch, patch), np.int32)
    lesions = np.full((count, 3), np.nan, np.float32)
    for n in range(count):
        crop = _body_crop(image, patch, rng, plateau, _MIN_STD * (p99 - p1))
        values = crop + rng.normal(0.0, _NOISE * crop.std(), crop.shape)
        if positive[n]:
            sigma = rng.uniform(*_SIGMA_PX)
            row, col = rng.uniform(patch / 4, 3 * patch / 4, 2)
            near = (np.abs(yy - row) <= 3 * sigma) & (np.abs(xx - col) <= 3 * sigma)
            amplitude = sign * rng.uniform(*_CONTRAST) * values[near].std()
            values += amplitude * np.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (2 * sigma**2))
            lesions[n] = row, col, sigma
        out[n] = np.clip(np.rint(values), low, high)
    return Split(
        images=out,
        labels=np.where(positive, LABELS[1], LABELS[0]),
        source_ids=np.full(count, path.stem),
        attrs=[dict(attrs) for _ in range(count)],
        lesions=lesions,
    )


def _body_crop(
    image: np.ndarray, patch: int, rng: np.random.Generator, plateau: float, min_std: float
) -> np.ndarray:
    """A random crop (float64) that is not nearly constant and mostly off the plateau value."""
    rows, cols = image.shape
    for _ in range(10_000):
        r, c = rng.integers(0, rows - patch + 1), rng.integers(0, cols - patch + 1)
        crop = image[r : r + patch, c : c + patch].astype(np.float64)
        if crop.std() >= min_std and np.mean(crop == plateau) <= _MAX_PLATEAU:
            return crop
    raise RuntimeError(f"no textured {patch}x{patch} patch in a {rows}x{cols} image")


def _concat(parts: list[Split]) -> Split:
    return Split(
        images=np.concatenate([p.images for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        source_ids=np.concatenate([p.source_ids for p in parts]),
        attrs=[a for p in parts for a in p.attrs],
        lesions=np.concatenate([p.lesions for p in parts]),
    )
