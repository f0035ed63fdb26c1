"""The demo set: split by source image, deterministic, balanced, lesions where the labels say,
and DICOMs that read back as the same pixels and labels."""

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from tensorline.producers import demo_data, sources


@pytest.fixture(scope="module")
def splits() -> dict[str, demo_data.Split]:
    return demo_data.build()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # bad_sequence.dcm's UIDs, malformed on purpose
def test_source_images_are_real_one_per_patient() -> None:
    paths = demo_data.source_images()
    names = [p.name for p in paths]
    assert len(paths) >= 17 and names == sorted(names)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    patients = [str(h.get("PatientID") or h.StudyInstanceUID) for h in headers]
    assert len(set(patients)) == len(patients)
    # Lossless copies win over their lossy twins, uncompressed over compressed; crops lose to the
    # full image; Siemens mosaics (tiles of slices) are left out.
    assert "693_UNCR.dcm" in names and not {"693_UNCI.dcm", "693_J2KR.dcm"} & set(names)
    assert "JPEG-LL.dcm" in names and "JPEG2000_UNC.dcm" not in names
    assert "MR-SIEMENS-DICOM-WithOverlays.dcm" in names and "examples_overlay.dcm" not in names
    assert "0.dcm" not in names
    # Patients shipped only compressed (JPEG 2000 through Pillow, JPEG Lossless through pylibjpeg),
    # and nibabel's MR projection.
    new = {"explicit_VR-UN.dcm", "J2K_pixelrep_mismatch.dcm", "bad_sequence.dcm",
           "JPGLosslessP14SV1_1s_1f_8b.dcm", "slicethickness_empty_string.dcm"}
    assert new <= set(names)
    # Colour ultrasound, read as luminance: RGB, a palette of 8-bit and one of 16-bit indices, and
    # a YBR JPEG shipped only lossy (its larger copy).
    colour = {"US1_UNCR.dcm", "OBXXXX1A.dcm", "gdcm-US-ALOKA-16.dcm", "color3d_jpeg_baseline.dcm"}
    assert colour <= set(names) and not {"US1_J2KR.dcm", "examples_ybr_color.dcm"} & set(names)
    for path in paths:  # every source decodes as the producer reads it
        item = next(sources.read(path, max_bytes=1 << 30))
        assert min(item.tensors["image"].shape) >= 128
        assert item.attributes["photometric"] in ("MONOCHROME1", "MONOCHROME2")
        assert item.attributes["modality"] not in ("OT", "SEG")


def test_of_a_patient_the_first_file_that_decodes_is_kept(tmp_path: Path, monkeypatch) -> None:
    original = next(p for p in demo_data.source_images() if p.name == "J2K_pixelrep_mismatch.dcm")
    broken = pydicom.dcmread(original)
    broken.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])  # a JPEG 2000 stream cut short
    broken.save_as(tmp_path / "a_broken.dcm")
    shutil.copy(original, tmp_path / "b_whole.dcm")
    monkeypatch.setattr(demo_data, "_folders", lambda: [tmp_path])
    assert [p.name for p in demo_data.source_images()] == ["b_whole.dcm"]
    (tmp_path / "b_whole.dcm").unlink()
    assert demo_data.source_images() == []


def test_splits_are_by_source_image(splits: dict[str, demo_data.Split]) -> None:
    sources_of = {name: set(split.source_ids) for name, split in splits.items()}
    assert set(sources_of) == {"train", "val", "test"}
    assert all(sources_of.values())
    assert len(sources_of["val"]) >= 3  # the fusion is cross-validated by image on val
    assert sources_of["train"].isdisjoint(sources_of["val"] | sources_of["test"])
    assert sources_of["val"].isdisjoint(sources_of["test"])
    assert set().union(*sources_of.values()) == {p.stem for p in demo_data.source_images()}


def test_shapes_sizes_and_positive_fraction(splits: dict[str, demo_data.Split]) -> None:
    assert len(splits["train"].images) >= 2400
    assert len(splits["val"].images) >= 500 and len(splits["test"].images) >= 500
    for split in splits.values():
        n = len(split.images)
        assert split.images.shape[1:] == (64, 64)
        assert split.labels.shape == split.source_ids.shape == (n,) and len(split.attrs) == n
        assert set(split.labels) == {"nodule", "normal"}
        assert abs(np.mean(split.labels == "nodule") - 0.5) <= 0.05
    quarter = demo_data.build(positive_fraction=0.25)["val"]
    assert abs(np.mean(quarter.labels == "nodule") - 0.25) <= 0.05


def test_build_is_deterministic(splits: dict[str, demo_data.Split]) -> None:
    again = demo_data.build()
    for name, split in splits.items():
        np.testing.assert_array_equal(split.images, again[name].images)
        np.testing.assert_array_equal(split.labels, again[name].labels)
        np.testing.assert_array_equal(split.source_ids, again[name].source_ids)
        assert split.attrs == again[name].attrs
    other = demo_data.build(seed=8)
    assert not np.array_equal(other["train"].images[:10], splits["train"].images[:10])


def test_lesions_are_where_the_labels_say(splits: dict[str, demo_data.Split]) -> None:
    yy, xx = np.mgrid[:64, :64]

    def centre_minus_ring(split: demo_data.Split, i: int, lesion: np.ndarray) -> float:
        """Displayed brightness at a blob's centre minus on a ring around it."""
        row, col, sigma = lesion
        distance = np.hypot(yy - row, xx - col)
        sign = -1 if split.attrs[i]["photometric"] == "MONOCHROME1" else 1
        image = sign * split.images[i].astype(float)
        ring = (distance >= 2.5 * sigma) & (distance <= 3.5 * sigma)
        return image[distance <= max(1.0, sigma / 2)].mean() - image[ring].mean()

    for split in splits.values():
        positive = np.flatnonzero(split.labels == "nodule")
        negative = np.flatnonzero(split.labels == "normal")
        assert np.isnan(split.lesions[negative]).all()
        assert not np.isnan(split.lesions[positive]).any()
        with_blob = [centre_minus_ring(split, i, split.lesions[i]) > 0 for i in positive]
        # The same positions in patches without a blob: bright centres only by chance.
        without = [
            centre_minus_ring(split, j, split.lesions[i]) > 0 for i, j in zip(positive, negative)
        ]
        assert np.mean(with_blob) >= 0.97
        assert np.mean(without) <= 0.8


def test_values_fit_the_source_bits(splits: dict[str, demo_data.Split]) -> None:
    for split in splits.values():
        for image, attrs in zip(split.images[::50], split.attrs[::50]):
            bits = int(attrs["bits_stored"])
            if np.iinfo(attrs["dtype"]).min < 0:
                assert -(1 << (bits - 1)) <= image.min() and image.max() < 1 << (bits - 1)
            else:
                assert 0 <= image.min() and image.max() < 1 << bits


def test_written_dicoms_read_back_the_same(
    splits: dict[str, demo_data.Split], tmp_path: Path
) -> None:
    split = splits["test"]
    paths = demo_data.write_dicoms(split, tmp_path / "first")
    assert len(paths) == len(split.images)
    read = [item for path in paths for item in sources.read(path)]
    for i, item in enumerate(read):
        assert item.tensors["image"].dtype == np.dtype(split.attrs[i]["dtype"])
        np.testing.assert_array_equal(item.tensors["image"], split.images[i])
        assert item.label == split.labels[i]
        for key in ("photometric", "modality", "rescale_slope", "rescale_intercept"):
            assert item.attributes[key] == split.attrs[i][key]
        assert item.attributes.get("window_center") == split.attrs[i].get("window_center")
    assert len({item.record_id for item in read}) == len(read)
    # One study per source image (the partition key under `[producer] key = "study"`).
    keys = {(item.study, source) for item, source in zip(read, split.source_ids)}
    assert len(keys) == len({key for key, _ in keys}) == len(set(split.source_ids))

    few = dataclasses.replace(
        split, images=split.images[:5], labels=split.labels[:5], source_ids=split.source_ids[:5],
        attrs=split.attrs[:5], lesions=split.lesions[:5],
    )
    rewritten = demo_data.write_dicoms(few, tmp_path / "again")
    again = [next(sources.read(path)).record_id for path in rewritten]
    assert again == [item.record_id for item in read[:5]]
