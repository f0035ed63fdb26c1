"""Every source kind on real shipped files, every bad-file reason, and record id stability."""

import gzip
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder
from pydicom.uid import HTJ2KLossless, MPEG2MPML

from tensorline.producers.sources import REASONS, BadFile, SourceItem, expand, read, synthetic

NIFTI_DATA = Path(nib.__file__).parent / "tests" / "data"


def dicom(name: str) -> Path:
    """A DICOM shipped by pydicom or pydicom-data, found locally (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not installed"
    return Path(path)


def items(path: Path, **kwargs: int) -> list[SourceItem]:
    return list(read(path, **kwargs))


def reason_of(path: Path, **kwargs: int) -> str:
    with pytest.raises(BadFile) as caught:
        items(path, **kwargs)
    assert str(path) in str(caught.value) and caught.value.reason in str(caught.value)
    assert caught.value.path == str(path)
    return caught.value.reason


def test_reasons_are_the_documented_words() -> None:
    assert REASONS == (
        "empty_file", "not_dicom", "truncated", "unsupported_transfer_syntax", "no_pixel_data",
        "unreadable_nifti", "unreadable_image", "too_large", "unsupported_format",
    )


# --- DICOM -----------------------------------------------------------------------------------


def test_ct_gives_stored_values_and_its_attributes() -> None:
    path = dicom("CT_small.dcm")
    ds = pydicom.dcmread(path)
    (item,) = items(path)
    image = item.tensors["image"]
    assert image.dtype == np.int16 and image.shape == (128, 128)
    np.testing.assert_array_equal(image, ds.pixel_array)
    assert item.record_id == ds.SOPInstanceUID
    assert item.study == ds.StudyInstanceUID
    assert item.source == str(path)
    assert item.label is None
    assert item.attributes == {
        "photometric": "MONOCHROME2",
        "modality": "CT",
        "study_uid": ds.StudyInstanceUID,
        "series_uid": ds.SeriesInstanceUID,
        "rescale_slope": "1.0",
        "rescale_intercept": "-1024.0",
        "rows": "128",
        "cols": "128",
    }


def test_multi_valued_window_gives_its_first_value() -> None:
    (item,) = items(dicom("MR-SIEMENS-DICOM-WithOverlays.dcm"))
    assert item.attributes["window_center"] == "450.0"
    assert item.attributes["window_width"] == "790.0"
    assert item.tensors["image"].dtype == np.uint16


def test_big_endian_file_gives_native_array_equal_to_little_endian_one() -> None:
    (big,) = items(dicom("MR_small_bigendian.dcm"))
    (little,) = items(dicom("MR_small.dcm"))
    assert big.tensors["image"].dtype == np.dtype("int16")  # native order, not '>i2'
    np.testing.assert_array_equal(big.tensors["image"], little.tensors["image"])


def test_chest_radiograph_keeps_monochrome1_and_uint16() -> None:
    (item,) = items(dicom("RG1_UNCI.dcm"))
    assert item.tensors["image"].shape == (1955, 1841)
    assert item.tensors["image"].dtype == np.uint16
    assert item.attributes["photometric"] == "MONOCHROME1"
    assert item.attributes["modality"] == "CR"


def test_jpeg2000_decodes_to_the_same_pixels_as_its_uncompressed_copy() -> None:
    (compressed,) = items(dicom("JPEG2000.dcm"))
    (uncompressed,) = items(dicom("JPEG2000_UNC.dcm"))
    np.testing.assert_array_equal(compressed.tensors["image"], uncompressed.tensors["image"])


def test_multi_frame_gives_one_item_per_frame_with_functional_group_scaling() -> None:
    path = dicom("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    frames = items(path)
    assert [f.record_id for f in frames] == [f"{ds.SOPInstanceUID}.0", f"{ds.SOPInstanceUID}.1"]
    assert [f.source for f in frames] == [f"{path}#frame=0", f"{path}#frame=1"]
    assert {f.study for f in frames} == {ds.StudyInstanceUID}
    for n, frame in enumerate(frames):
        np.testing.assert_array_equal(frame.tensors["image"], ds.pixel_array[n])
        assert frame.attributes["frame_index"] == str(n)
        assert frame.attributes["n_frames"] == "2"
        # Only in the shared functional groups, not at the top level.
        assert frame.attributes["rescale_intercept"] == "-1024.0"
        assert frame.attributes["window_center"] == "49.0"


@pytest.mark.parametrize(
    ("comment", "label"), [("tensorline:label=nodule", "nodule"), ("a note", None)]
)
def test_label_comes_from_image_comments(tmp_path: Path, comment: str, label: str | None) -> None:
    ds = pydicom.dcmread(dicom("CT_small.dcm"))
    ds.ImageComments = comment
    ds.save_as(tmp_path / "labelled.dcm")
    (item,) = items(tmp_path / "labelled.dcm")
    assert item.label == label


# --- NIfTI ------------------------------------------------------------------------------------


def test_4d_nifti_gives_the_slices_of_its_first_volume() -> None:
    path = NIFTI_DATA / "example4d.nii.gz"
    volume = np.asanyarray(nib.load(path).dataobj)
    slices = items(path)
    assert volume.shape == (128, 96, 24, 2) and len(slices) == 24
    volume_id = slices[0].attributes["volume_id"]
    assert len({s.record_id for s in slices}) == 24
    for i, item in enumerate(slices):
        np.testing.assert_array_equal(item.tensors["image"], volume[:, :, i, 0])
        assert item.tensors["image"].dtype == np.int16
        assert item.study == volume_id
        assert item.source == f"{path}#slice={i}"
        assert item.attributes["slice_index"] == str(i)
        assert item.attributes["n_slices"] == "24"
        assert item.label is None


def test_scaled_nifti_keeps_stored_values_and_carries_the_scaling() -> None:
    path = NIFTI_DATA / "functional.nii"
    real = nib.load(path).get_fdata()
    for i, item in enumerate(items(path)):
        image, attrs = item.tensors["image"], item.attributes
        assert image.dtype == np.int16
        scaled = image * float(attrs["rescale_slope"]) + float(attrs["rescale_intercept"])
        np.testing.assert_allclose(scaled, real[:, :, i, 0], rtol=1e-6)
    assert float(attrs["rescale_slope"]) != 1.0


def test_big_endian_nifti_gives_native_int16() -> None:
    slices = items(NIFTI_DATA / "anatomical.nii")
    assert len(slices) == 25
    assert all(s.tensors["image"].dtype == np.dtype("int16") for s in slices)


# --- PNG, JPEG, numpy -------------------------------------------------------------------------


def test_png_grey_8_and_16_bit_keep_their_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for dtype in (np.uint8, np.uint16):
        pixels = rng.integers(0, np.iinfo(dtype).max, (20, 30), dtype=dtype)
        Image.fromarray(pixels).save(tmp_path / f"{dtype.__name__}.png")
        (item,) = items(tmp_path / f"{dtype.__name__}.png")
        assert item.tensors["image"].dtype == dtype
        np.testing.assert_array_equal(item.tensors["image"], pixels)
        assert item.study == item.record_id and item.label is None


def test_rgb_png_becomes_luminance(tmp_path: Path) -> None:
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200  # pure red: luminance 0.299 * 200
    Image.fromarray(rgb).save(tmp_path / "red.png")
    (item,) = items(tmp_path / "red.png")
    assert item.tensors["image"].shape == (4, 5) and item.tensors["image"].dtype == np.uint8
    assert np.all(np.abs(item.tensors["image"].astype(int) - 60) <= 1)
    assert item.attributes["mode"] == "RGB"


def test_jpeg_is_read_by_content_whatever_its_name(tmp_path: Path) -> None:
    Image.fromarray(np.full((16, 8), 128, np.uint8)).save(tmp_path / "grey.jpg")
    os.rename(tmp_path / "grey.jpg", tmp_path / "grey.bin")
    (item,) = items(tmp_path / "grey.bin")
    assert item.tensors["image"].shape == (16, 8)
    assert np.all(np.abs(item.tensors["image"].astype(int) - 128) <= 2)


def test_npy_and_npz_arrays(tmp_path: Path) -> None:
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "a.npy", image)
    (item,) = items(tmp_path / "a.npy")
    np.testing.assert_array_equal(item.tensors["image"], image)
    assert item.tensors["image"].dtype == np.float32

    np.savez(tmp_path / "b.npz", first=image, scalar=np.array(3), second=image.astype(np.int16) * 2)
    members = items(tmp_path / "b.npz")
    assert [m.attributes["array_name"] for m in members] == ["first", "second"]
    np.testing.assert_array_equal(members[1].tensors["image"], image.astype(np.int16) * 2)
    assert members[0].study == members[1].study != members[0].record_id != members[1].record_id


# --- record ids -------------------------------------------------------------------------------


def test_record_ids_are_stable_and_distinct(tmp_path: Path) -> None:
    ct, mr = dicom("CT_small.dcm"), dicom("MR_small.dcm")
    assert items(ct)[0].record_id == items(ct)[0].record_id
    assert items(ct)[0].record_id != items(mr)[0].record_id

    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / "b.png")
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "a.png", tmp_path / "copy" / "a.png")
    paths = (tmp_path / "a.png", tmp_path / "b.png", tmp_path / "copy" / "a.png")
    a, b, copy = (items(p)[0].record_id for p in paths)
    assert a == copy != b
    assert items(tmp_path / "a.png")[0].record_id == a

    volumes = (NIFTI_DATA / "example4d.nii.gz", NIFTI_DATA / "example_nifti2.nii.gz")
    assert len({s.record_id for path in volumes for s in items(path)}) == 24 + 12
    assert [s.record_id for s in items(volumes[1])] == [s.record_id for s in items(volumes[1])]


# --- bad files --------------------------------------------------------------------------------


def test_random_bytes_are_not_dicom(tmp_path: Path) -> None:
    for name in ("random.dcm", "random"):
        (tmp_path / name).write_bytes(np.random.default_rng(2).bytes(1000))
        assert reason_of(tmp_path / name) == "not_dicom"


@pytest.mark.parametrize("name", ["empty.dcm", "empty", "empty.png", "empty.nii", "empty.npy", "empty.npz"])
def test_an_empty_file_says_so_in_our_words(tmp_path: Path, name: str) -> None:
    """Issue 11, finding 8: a zero-byte file was 'not_dicom ... Use force=True to force reading'."""
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(BadFile) as caught:
        items(tmp_path / name)
    assert caught.value.reason == "empty_file"
    assert str(caught.value) == f"{tmp_path / name}: empty_file: the file has no bytes"


def test_not_dicom_is_explained_without_pydicoms_advice(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_bytes(b"not a dicom at all" * 10)
    with pytest.raises(BadFile) as caught:
        items(tmp_path / "notes.txt")
    assert caught.value.reason == "not_dicom" and "force" not in str(caught.value)
    assert "no 'DICM' prefix at byte 128" in str(caught.value)


def test_dicom_cut_in_half_is_truncated(tmp_path: Path) -> None:
    data = dicom("CT_small.dcm").read_bytes()
    (tmp_path / "half.dcm").write_bytes(data[: len(data) // 2])
    assert reason_of(tmp_path / "half.dcm") == "truncated"


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the missing end
@pytest.mark.parametrize(
    "name", ["MR_truncated.dcm", "rtplan_truncated.dcm", "emri_small_jpeg_2k_lossless_too_short.dcm"]
)
def test_shipped_truncated_files_are_truncated(name: str) -> None:
    assert reason_of(dicom(name)) == "truncated"


@pytest.mark.parametrize("syntax, says", [
    (HTJ2KLossless, "needs"),  # pydicom has a decoder for it, its plugins are not installed here
    (MPEG2MPML, "MPEG2"),  # pydicom has no decoder for it at all
])
def test_compressed_dicom_without_a_decoder_is_unsupported_transfer_syntax(tmp_path: Path, syntax, says: str) -> None:
    # The demo's JPEG decoders (pylibjpeg) read JPEG-LS now: the file is relabelled with a
    # syntax nothing installed here decodes.
    assert syntax != HTJ2KLossless or not get_decoder(syntax).is_available, "an HTJ2K decoder is installed"
    ds = pydicom.dcmread(dicom("MR_small_jpeg_ls_lossless.dcm"))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(tmp_path / "relabelled.dcm")
    with pytest.raises(BadFile) as caught:
        items(tmp_path / "relabelled.dcm")
    assert caught.value.reason == "unsupported_transfer_syntax" and says in str(caught.value)


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    assert reason_of(dicom("rtplan.dcm")) == "no_pixel_data"
    ds = pydicom.dcmread(dicom("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "no_pixels.dcm")
    assert reason_of(tmp_path / "no_pixels.dcm") == "no_pixel_data"


def test_garbage_nifti_is_unreadable_nifti(tmp_path: Path) -> None:
    garbage = np.random.default_rng(3).bytes(2000)
    (tmp_path / "raw.nii.gz").write_bytes(garbage)
    (tmp_path / "gzipped.nii.gz").write_bytes(gzip.compress(garbage))
    data = (NIFTI_DATA / "anatomical.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[: len(data) // 2])
    for name in ("raw.nii.gz", "gzipped.nii.gz", "cut.nii"):
        assert reason_of(tmp_path / name) == "unreadable_nifti"


def test_broken_pictures_and_arrays_are_unreadable_image(tmp_path: Path) -> None:
    Image.fromarray(np.tile(np.arange(50, dtype=np.uint8), (50, 1))).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG" + bytes(100))
    (tmp_path / "garbage.npy").write_bytes(b"not an array")
    for name in ("cut.png", "garbage.png", "garbage.npy"):
        assert reason_of(tmp_path / name) == "unreadable_image"


def test_too_large_names_size_and_limit(tmp_path: Path) -> None:
    np.save(tmp_path / "big.npy", np.zeros((100, 100), np.float32))
    with pytest.raises(BadFile, match="40000 pixel bytes .* limit 39999") as caught:
        items(tmp_path / "big.npy", max_bytes=39_999)
    assert caught.value.reason == "too_large"
    assert len(items(tmp_path / "big.npy", max_bytes=40_000)) == 1
    assert reason_of(dicom("CT_small.dcm"), max_bytes=1000) == "too_large"
    assert reason_of(NIFTI_DATA / "example4d.nii.gz", max_bytes=1000) == "too_large"


def test_unsupported_formats(tmp_path: Path) -> None:
    np.save(tmp_path / "volume.npy", np.zeros((2, 3, 4)))
    np.save(tmp_path / "uint32.npy", np.zeros((3, 3), np.uint32))  # no tensor encoding
    three_samples = pydicom.dcmread(dicom("CT_small.dcm"))
    three_samples.SamplesPerPixel = 3  # MONOCHROME2 with 3 samples a pixel: neither grey nor colour
    three_samples.save_as(tmp_path / "three_samples.dcm")
    rgb32 = dicom("SC_rgb_32bit.dcm")  # colour with 32 bits a sample: 8 and 16 are read
    for path in (rgb32, tmp_path / "three_samples.dcm", tmp_path / "volume.npy", tmp_path / "uint32.npy"):
        assert reason_of(path) == "unsupported_format"


def test_colour_dicom_becomes_luminance(tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom("CT_small.dcm"))
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0], rgb[0, 0] = 200, (10, 20, 30)  # red 200: 0.299 * 200 = 59.8; 3 + 11.74 + 3.42 = 18.16
    ds.set_pixel_data(rgb, "RGB", 8)
    ds.save_as(tmp_path / "rgb.dcm")
    (item,) = items(tmp_path / "rgb.dcm")
    expected = np.full((4, 5), 60, np.uint8)
    expected[0, 0] = 18
    np.testing.assert_array_equal(item.tensors["image"], expected)
    assert item.attributes["photometric"] == "MONOCHROME2" and item.attributes["colour"] == "RGB"


def test_colour_ultrasound_ybr_and_palette() -> None:
    (plain,) = items(dicom("US1_UNCR.dcm"))  # RGB, uncompressed
    (ybr,) = items(dicom("US1_J2KR.dcm"))  # the same image as lossless JPEG 2000 in YBR_RCT
    assert plain.tensors["image"].shape == (480, 640) and plain.tensors["image"].dtype == np.uint8
    np.testing.assert_array_equal(ybr.tensors["image"], plain.tensors["image"])
    assert ybr.attributes["colour"] == "YBR_RCT"
    (palette,) = items(dicom("OBXXXX1A.dcm"))  # 8-bit indices into 16-bit colour tables
    ds = pydicom.dcmread(dicom("OBXXXX1A.dcm"))
    table = pydicom.pixels.apply_color_lut(ds.pixel_array, ds).astype(np.float64)
    np.testing.assert_array_equal(palette.tensors["image"], np.rint(table @ [0.299, 0.587, 0.114]))
    assert palette.tensors["image"].dtype == np.uint16 and palette.attributes["colour"] == "PALETTE COLOR"


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about some damage
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cut=st.integers(132, 39_000),
    flips=st.lists(st.tuples(st.integers(128, 3_000), st.integers(0, 255)), max_size=8),
)
def test_damaged_dicom_raises_nothing_but_bad_file(
    tmp_path: Path, cut: int, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(dicom("CT_small.dcm").read_bytes()[:cut])
    for at, value in flips:
        if at < len(data):
            data[at] = value
    (tmp_path / "damaged.dcm").write_bytes(bytes(data))
    try:
        for item in read(tmp_path / "damaged.dcm"):
            assert item.tensors["image"].ndim == 2
    except BadFile as e:
        assert e.reason in REASONS


# --- expand and synthetic ---------------------------------------------------------------------


def test_expand_recurses_sorted_and_skips_hidden(tmp_path: Path) -> None:
    for name in ("b/2.dcm", "b/1.dcm", "a.nii", ".hidden", "c/.git/x", "c/d/e.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    single = tmp_path / "b" / "2.dcm"
    expected = ["a.nii", "b/1.dcm", "b/2.dcm", "c/d/e.png"]
    assert expand([tmp_path, single]) == [tmp_path / name for name in expected] + [single]
    with pytest.raises(FileNotFoundError):
        expand([tmp_path / "missing"])


def test_synthetic_is_deterministic_and_labelled() -> None:
    first, again = list(synthetic(400, seed=5)), list(synthetic(400, seed=5))
    assert [i.record_id for i in first] == [i.record_id for i in again]
    assert all(np.array_equal(a.tensors["image"], b.tensors["image"]) for a, b in zip(first, again))
    assert {i.record_id for i in synthetic(5, seed=6)}.isdisjoint(i.record_id for i in first)
    nodules = [i for i in first if i.label == "nodule"]
    assert 0.4 < len(nodules) / 400 < 0.6
    assert {i.label for i in first} == {"nodule", "normal"}
    peak = {
        label: np.mean([i.tensors["image"].max() for i in first if i.label == label])
        for label in ("nodule", "normal")
    }
    assert peak["nodule"] > peak["normal"] + 100
    (small,) = synthetic(1, shape=(8, 12))
    assert small.tensors["image"].shape == (8, 12) and small.tensors["image"].dtype == np.uint16
