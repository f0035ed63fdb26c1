"""Files -> `SourceItem`s: one 2-D image of stored pixel values per DICOM frame, NIfTI slice,
PNG/JPEG, or numpy array, with its attributes, the study it belongs to and ground-truth label if any.

Pixel values are kept as stored (dtype included); the rescale and window that give them meaning
travel as attributes, so a stage decides how to normalise. Every file that cannot become items
raises `BadFile` with a one-word reason, the DLQ's reason header.
"""

import hashlib
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import nibabel as nib
import numpy as np
import pydicom
from nibabel.arrayproxy import ArrayProxy
from nibabel.filebasedimages import ImageFileError
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, get_decoder

from tensorline.schemas.codec import DTYPES, MAX_TENSOR_BYTES

Reason = Literal[
    "empty_file",
    "not_dicom",
    "truncated",
    "unsupported_transfer_syntax",
    "no_pixel_data",
    "unreadable_nifti",
    "unreadable_image",
    "too_large",
    "unsupported_format",
]
REASONS: tuple[str, ...] = get_args(Reason)

# How a DICOM carries its ground truth: ImageComments "tensorline:label=<class>".
LABEL_PREFIX = "tensorline:label="

# An encapsulated Pixel Data header (tag, VR OB or OW, undefined length). pydicom drops the
# element, or the whole dataset, when the file ends inside it: these bytes then mean "truncated".
_ENCAPSULATED_PIXEL_DATA = re.compile(rb"\xe0\x7f\x10\x00O[BW]\x00\x00\xff\xff\xff\xff")
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# A DICOM file (PS3.10) is a 128-byte preamble, then "DICM"; pydicom reads nothing else.
_DICM_AT = 128
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# Colour DICOMs (ultrasound, secondary captures) become luminance, as colour PNGs and JPEGs do:
# Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601, as Pillow's "L"), in the samples' dtype; YBR
# is turned to RGB by pydicom's decoder, a palette through its lookup table. 8 and 16 bits.
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
_LUMA = np.array([0.299, 0.587, 0.114])
# Where an enhanced (multi-frame) DICOM keeps rescale and window: its functional groups.
_PER_FRAME, _SHARED = "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"
_TRANSFORM = "PixelValueTransformationSequence"
_VOI = "FrameVOILUTSequence"
# What pydicom raises, lazily at first access, for elements whose bytes are garbage.
_CORRUPT = (
    AttributeError, BytesLengthException, IndexError, KeyError, NotImplementedError, OverflowError,
    RuntimeError, TypeError, ValueError, struct.error,
)
# Pillow modes kept as they are (8/16/32-bit grey, float); any other is turned to luminance.
_GREY_MODES = ("L", "I;16", "I;16L", "I;16B", "I", "F")


@dataclass(frozen=True)
class SourceItem:
    """One 2-D image ready to become a tensor record."""

    record_id: str  # SOPInstanceUID where present, else a content hash
    # The DICOM study, NIfTI volume or .npz archive the image belongs to, else its record id: the
    # partition key under `[producer] key = "study"` (one study in order on one partition).
    study: str
    source: str  # file path, with '#frame=N' or '#slice=N' for one image of many
    tensors: dict[str, np.ndarray]  # {"image": 2-D stored pixel values, dtype kept}
    attributes: dict[str, str]
    label: str | None  # ground truth carried by the file, else None


class BadFile(ValueError):
    """A file that cannot become items; `reason` is one of `REASONS`."""

    def __init__(self, path: str | Path, reason: Reason, detail: str) -> None:
        super().__init__(f"{path}: {reason}: {detail}")
        self.path = str(path)
        self.reason = reason


def read(path: str | Path, *, max_bytes: int = MAX_TENSOR_BYTES) -> Iterator[SourceItem]:
    """The items of one file, by content or suffix; anything unrecognised is tried as DICOM.

    `max_bytes` bounds one item's pixel bytes (one Kafka record) and is checked from the header
    before decoding. `BadFile` is raised while iterating, possibly after some items, or at once
    for an empty file.
    """
    path = Path(path)
    name = path.name.lower()
    with path.open("rb") as f:
        head = f.read(8)
    if not head:  # no reader's own message would say so (pydicom's says "Use force=True")
        raise BadFile(path, "empty_file", "the file has no bytes")
    if name.endswith((".nii", ".nii.gz")):
        return _read_nifti(path, max_bytes)
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff")) or name.endswith((".png", ".jpg", ".jpeg")):
        return _read_picture(path, max_bytes)
    if head.startswith(b"\x93NUMPY") or name.endswith(".npy"):
        return _read_npy(path, max_bytes)
    if name.endswith(".npz"):
        return _read_npz(path, max_bytes)
    return _read_dicom(path, max_bytes)


def expand(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given and the files under folders (recursive, sorted, hidden ones skipped)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(
                f
                for f in path.rglob("*")
                if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)
            )
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(path)
    return files


def synthetic(
    n: int, *, shape: tuple[int, int] = (64, 64), seed: int = 0, positive_fraction: float = 0.5
) -> Iterator[SourceItem]:
    """`n` labelled 12-bit noise images, a bright Gaussian blob in the "nodule" ones (load tests).

    Item i depends only on (seed, i), so any prefix of the stream is the same on every run.
    """
    rows, cols = shape
    yy, xx = np.mgrid[:rows, :cols]
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        image = rng.normal(1000.0, 50.0, shape)
        positive = bool(rng.random() < positive_fraction)
        if positive:
            r, c = rng.uniform(0.25, 0.75, 2) * (rows, cols)
            image += 300.0 * np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * 4.0**2))
        pixels = np.clip(np.rint(image), 0, 4095).astype(np.uint16)
        record_id = _content_id(pixels)
        yield SourceItem(
            record_id=record_id,
            study=record_id,
            source=f"synthetic:{seed}#{i}",
            tensors={"image": pixels},
            attributes={
                "modality": "OT",
                "photometric": "MONOCHROME2",
                "rescale_slope": "1.0",
                "rescale_intercept": "0.0",
            }
            | _shape_attrs(pixels),
            label="nodule" if positive else "normal",
        )


def _read_dicom(path: Path, max_bytes: int) -> Iterator[SourceItem]:
    """`_dicom_items`, with pydicom's many errors on corrupt elements reported as `not_dicom`."""
    try:
        yield from _dicom_items(path, max_bytes)
    except BadFile:
        raise
    except _CORRUPT as e:
        raise BadFile(path, "not_dicom", f"corrupt DICOM: {e!r}") from e


def _dicom_items(path: Path, max_bytes: int) -> Iterator[SourceItem]:
    """One item per frame of a grayscale DICOM, or of a colour one as its luminance (`COLOUR`)."""
    with path.open("rb") as f:
        f.seek(_DICM_AT)
        if f.read(4) != b"DICM":  # said here: pydicom's own message advises force=True, no help here
            raise BadFile(path, "not_dicom", f"no 'DICM' prefix at byte {_DICM_AT}, and not a PNG, JPEG, "
                          "NIfTI or numpy file either")
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise BadFile(path, "not_dicom", str(e)) from e
    except (EOFError, OSError, struct.error, zlib.error) as e:
        # pydicom raises OSError("No tag to read at file position ...") at the end of the file.
        raise BadFile(path, "truncated", f"file ends inside the header ({e})") from e
    _check_complete(path, ds)
    if not any(k in ds for k in _PIXEL_DATA_KEYWORDS):
        raise BadFile(path, "no_pixel_data", f"no Pixel Data element ({ds.get('Modality', '?')})")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    try:
        rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
        n_frames, samples = int(ds.get("NumberOfFrames") or 1), int(ds.get("SamplesPerPixel") or 1)
    except (AttributeError, ValueError, TypeError) as e:
        raise BadFile(path, "unsupported_format", f"bad Image Pixel module: {e}") from e
    colour = photometric in COLOUR
    one_sample = photometric in (*_MONOCHROME, "PALETTE COLOR")
    if not (colour or photometric in _MONOCHROME) or samples != (1 if one_sample else 3):
        raise BadFile(path, "unsupported_format", f"photometric {photometric!r} with {samples} samples per "
                      "pixel is neither grayscale nor colour")
    if colour and bits not in (8, 16):
        raise BadFile(path, "unsupported_format", f"colour ({photometric}) with {bits} bits per sample: 8 or 16 "
                      "are read")
    # A colour image is decoded as three samples before it becomes one.
    _check_size(path, rows * cols * max(1, bits // 8) * (3 if colour else 1), max_bytes)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_transfer_syntax:
        raise BadFile(path, "unsupported_transfer_syntax", f"no known transfer syntax ({syntax})")
    if "PixelData" in ds and not syntax.is_compressed:
        stored = 2 if photometric == "YBR_FULL_422" else samples  # 4:2:2 keeps 2 values a pixel
        expected = (rows * cols * n_frames * bits * stored + 7) // 8
        if len(ds.PixelData) < expected:
            got = len(ds.PixelData)
            raise BadFile(path, "truncated", f"Pixel Data has {got} of {expected} bytes")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as e:
        raise BadFile(path, "unsupported_transfer_syntax", str(e)) from e
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise BadFile(path, "unsupported_transfer_syntax", f"{syntax.name} needs {missing}")

    sop_uid = str(ds.get("SOPInstanceUID", ""))
    base_id = sop_uid or (_file_id(path) if n_frames > 1 else "")
    comment = str(ds.get("ImageComments", ""))
    label = comment.removeprefix(LABEL_PREFIX) if comment.startswith(LABEL_PREFIX) else None
    common = {
        "photometric": "MONOCHROME2" if colour else photometric,
        "colour": photometric if colour else "",
        "modality": str(ds.get("Modality", "")),
        "study_uid": str(ds.get("StudyInstanceUID", "")),
        "series_uid": str(ds.get("SeriesInstanceUID", "")),
    }
    for n in range(n_frames):
        try:
            frame = _native(decoder.as_array(ds, index=n)[0])
            if colour:  # YBR arrives as RGB (the decoder's default), a palette needs its table
                frame = _luminance(apply_color_lut(frame, ds) if photometric == "PALETTE COLOR" else frame)
        except _CORRUPT as e:
            # pydicom wraps every decoding plugin's failure in RuntimeError; a broken palette
            # table raises what its parsing meets.
            reason: Reason = (
                "unsupported_transfer_syntax" if syntax.is_compressed else "unsupported_format"
            )
            raise BadFile(path, reason, f"frame {n}: {e}") from e
        _check_dtype(path, frame)
        record_id = f"{base_id}.{n}" if n_frames > 1 else base_id or _content_id(frame)
        attributes = {k: v for k, v in common.items() if v} | _dicom_scaling(ds, n)
        if n_frames > 1:
            attributes |= {"frame_index": str(n), "n_frames": str(n_frames)}
        yield SourceItem(
            record_id=record_id,
            study=common["study_uid"] or (base_id if n_frames > 1 else record_id),
            source=f"{path}#frame={n}" if n_frames > 1 else str(path),
            tensors={"image": frame},
            attributes=attributes | _shape_attrs(frame),
            label=label,
        )


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """(rows, cols, 3) RGB -> (rows, cols) luminance (BT.601), rounded, in the samples' dtype."""
    info = np.iinfo(rgb.dtype)
    return np.clip(np.rint(rgb @ _LUMA), info.min, info.max).astype(rgb.dtype)


def _check_complete(path: Path, ds: pydicom.Dataset) -> None:
    """Raise `truncated` when the file ended inside an element: pydicom keeps what it got."""
    for tag in ds.keys():
        element = ds.get_item(tag)
        if (
            isinstance(element, RawDataElement)
            and isinstance(element.value, bytes)
            and element.length != 0xFFFFFFFF  # undefined length
            and len(element.value) < element.length
        ):
            raise BadFile(
                path, "truncated", f"{tag} has {len(element.value)} of {element.length} bytes"
            )
    if "PixelData" not in ds and _ENCAPSULATED_PIXEL_DATA.search(path.read_bytes()):
        raise BadFile(path, "truncated", "file ends inside the encapsulated Pixel Data")


def _dicom_scaling(ds: pydicom.Dataset, frame: int) -> dict[str, str]:
    """Rescale (identity if absent) and first window of a frame, top level or functional groups."""
    values = {
        "rescale_slope": _dicom_value(ds, "RescaleSlope", _TRANSFORM, frame, 1.0),
        "rescale_intercept": _dicom_value(ds, "RescaleIntercept", _TRANSFORM, frame, 0.0),
        "window_center": _dicom_value(ds, "WindowCenter", _VOI, frame),
        "window_width": _dicom_value(ds, "WindowWidth", _VOI, frame),
    }
    return {k: str(float(v)) for k, v in values.items() if v is not None}


def _dicom_value(
    ds: pydicom.Dataset, keyword: str, group: str, frame: int, default: float | None = None
) -> Any:
    """A value at the top level, else in the frame's own or the shared functional group."""
    places = [ds]
    for sequence, index in ((_PER_FRAME, frame), (_SHARED, 0)):
        if sequence in ds and len(ds[sequence].value) > index and group in ds[sequence][index]:
            places += ds[sequence][index][group].value[:1]
    for place in places:
        if place.get(keyword) not in (None, ""):
            value = place[keyword].value
            return value[0] if isinstance(value, MultiValue) else value
    return default


def _read_nifti(path: Path, max_bytes: int) -> Iterator[SourceItem]:
    """One item per slice along the last spatial axis (x, y as stored, not reoriented).

    A 4-D (or higher) image gives its first volume only. Values stay as stored; the header's
    scl_slope/scl_inter travel as rescale attributes, as for DICOM.
    """
    try:
        proxy = nib.load(path).dataobj
        shape, dtype = proxy.shape, np.dtype(proxy.dtype)
        raw = ArrayProxy(path, (shape, dtype, proxy.offset, 1.0, 0.0), order=proxy.order)
        slope, inter = float(proxy.slope), float(proxy.inter)
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as e:
        raise BadFile(path, "unreadable_nifti", str(e)) from e
    if len(shape) < 2 or dtype.kind not in "biuf":
        raise BadFile(path, "unsupported_format", f"shape {shape} of {dtype} is not an image")
    _check_size(path, shape[0] * shape[1] * dtype.itemsize, max_bytes)
    volume_id = _file_id(path)
    n_slices = shape[2] if len(shape) > 2 else 1
    for i in range(n_slices):
        # [:, :, i, 0, 0...]: slice i of the first volume; a 2-D image is its own slice 0.
        index = (slice(None), slice(None), *((i,) + (0,) * (len(shape) - 3))[: len(shape) - 2])
        try:
            image = _native(np.asarray(raw[index]))
        except (OSError, EOFError, ValueError, zlib.error) as e:
            raise BadFile(path, "unreadable_nifti", f"slice {i}: {e}") from e
        _check_dtype(path, image)
        attributes = {
            "volume_id": volume_id,
            "slice_index": str(i),
            "n_slices": str(n_slices),
            "rescale_slope": str(slope),
            "rescale_intercept": str(inter),
        }
        yield SourceItem(
            record_id=f"{volume_id}.{i}",
            study=volume_id,
            source=f"{path}#slice={i}",
            tensors={"image": image},
            attributes=attributes | _shape_attrs(image),
            label=None,
        )


def _read_picture(path: Path, max_bytes: int) -> Iterator[SourceItem]:
    """A PNG or JPEG: grey and float kept as stored, colour turned to luminance (uint8)."""
    try:
        with Image.open(path) as picture:
            mode = picture.mode
            target = mode if mode in _GREY_MODES else "L"
            bytes_per_pixel = {"L": 1, "I": 4, "F": 4}.get(target, 2)
            _check_size(path, picture.width * picture.height * bytes_per_pixel, max_bytes)
            image = _native(np.array(picture.convert(target) if target != mode else picture))
    except BadFile:
        raise
    except Image.DecompressionBombError as e:
        raise BadFile(path, "too_large", str(e)) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadFile(path, "unreadable_image", str(e)) from e
    record_id = _content_id(image)
    yield SourceItem(
        record_id=record_id,
        study=record_id,
        source=str(path),
        tensors={"image": image},
        attributes={"mode": mode} | _shape_attrs(image),
        label=None,
    )


def _read_npy(path: Path, max_bytes: int) -> Iterator[SourceItem]:
    """A 2-D .npy array (memory-mapped, so the size check precedes the read)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise BadFile(path, "unreadable_image", str(e)) from e
    image = _array_image(path, array, max_bytes)
    record_id = _content_id(image)
    yield SourceItem(record_id, record_id, str(path), {"image": image}, _shape_attrs(image), None)


def _read_npz(path: Path, max_bytes: int) -> Iterator[SourceItem]:
    """Each 2-D array of an .npz archive, in archive order; arrays of other ranks are skipped."""
    file_id = _file_id(path)
    found = False
    try:
        with np.load(path, allow_pickle=False) as archive:
            for name in archive.files:
                array = archive[name]
                if array.ndim != 2:
                    continue
                found = True
                image = _array_image(path, array, max_bytes)
                yield SourceItem(
                    record_id=f"{file_id}.{name}",
                    study=file_id,
                    source=f"{path}#array={name}",
                    tensors={"image": image},
                    attributes={"array_name": name} | _shape_attrs(image),
                    label=None,
                )
    except BadFile:
        raise
    except (
        EOFError, NotImplementedError, OSError, ValueError, zipfile.BadZipFile, zlib.error
    ) as e:  # zipfile raises NotImplementedError for compression methods it lacks
        raise BadFile(path, "unreadable_image", str(e)) from e
    if not found:
        raise BadFile(path, "unsupported_format", "no 2-D array in the archive")


def _array_image(path: Path, array: np.ndarray, max_bytes: int) -> np.ndarray:
    """A numpy array checked to be a 2-D image the codec can carry, in native byte order."""
    if array.ndim != 2:
        raise BadFile(path, "unsupported_format", f"array of shape {array.shape} is not 2-D")
    _check_size(path, array.nbytes, max_bytes)
    image = _native(np.array(array))
    _check_dtype(path, image)
    return image


def _check_size(path: Path, nbytes: int, max_bytes: int) -> None:
    if nbytes > max_bytes:
        raise BadFile(path, "too_large", f"{nbytes} pixel bytes in one image, limit {max_bytes}")


def _check_dtype(path: Path, image: np.ndarray) -> None:
    if image.dtype.name not in DTYPES:
        raise BadFile(path, "unsupported_format", f"dtype {image.dtype} has no tensor encoding")


def _native(array: np.ndarray) -> np.ndarray:
    """The array contiguous, in native byte order (big-endian files decode as '>u2' and such)."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))


def _shape_attrs(image: np.ndarray) -> dict[str, str]:
    return {"rows": str(image.shape[0]), "cols": str(image.shape[1])}


def _content_id(image: np.ndarray) -> str:
    """sha1 hex of the pixel bytes, shape and dtype: the id of an image without a UID."""
    digest = hashlib.sha1(np.ascontiguousarray(image).tobytes())
    digest.update(f"{image.shape}{image.dtype.str}".encode())
    return digest.hexdigest()


def _file_id(path: Path) -> str:
    """sha1 hex of a file's bytes: the id of a volume or archive, its items numbered after it."""
    digest = hashlib.sha1()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
