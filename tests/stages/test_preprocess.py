"""preprocess: rescale, window, MONOCHROME1, resize, normalise, and the views — against numpy by hand."""

from __future__ import annotations

import numpy as np
import pytest

from tensorline.config import parse
from tensorline.schemas import Record
from tensorline.stages.preprocess import LOCAL_FLOOR, Preprocess
from tensorline.engine.runtime import DeadLetter


def stage(**params) -> Preprocess:
    cfg = parse({"pipeline": {"name": "p"}, "topics": {"raw": {}, "pre": {}},
                 "stages": {"preprocess": {"input": "raw", "output": "pre", "params": params}}})
    return Preprocess(cfg, cfg.stages["preprocess"], None)


def rec(image: np.ndarray, **attrs: str) -> Record:
    return Record(record_id="r", source="s", ingest_ts_ms=0, tensors={"image": image}, stage="producer",
                  attributes=attrs)


def test_rescale_and_window_match_the_formula():
    image = np.array([[0, 50], [100, 150]], np.uint16)
    r = rec(image, rescale_slope="2", rescale_intercept="-100", window_center="50", window_width="200")
    [out] = stage(size=2, normalize="none").process([r])
    hu = image.astype(np.float64) * 2 - 100
    expected = np.clip((hu - (50 - 100)) / 200, 0, 1)
    assert out.tensors["image"].shape == (2, 2, 1) and out.stage == "preprocess"
    np.testing.assert_allclose(out.tensors["image"][..., 0], expected, atol=1e-6)


def test_monochrome1_is_inverted():
    image = np.array([[0, 100]], np.int16)
    plain, inverted = stage(size=1, normalize="none").process([
        rec(image.reshape(1, 2), window_center="50", window_width="100"),
        rec(image.reshape(1, 2), window_center="50", window_width="100", photometric="MONOCHROME1")])
    assert plain.tensors["image"].shape == (1, 1, 1)
    np.testing.assert_allclose(plain.tensors["image"] + inverted.tensors["image"], 1.0, atol=1e-6)


def test_resize_and_zscore_in_one_batch_of_mixed_shapes():
    rng = np.random.default_rng(1)
    items = [rec(rng.integers(0, 4000, (100, 80)).astype(np.uint16)), rec(rng.standard_normal((64, 64)).astype(np.float32))]
    outs = stage(size=32).process(items)
    for out in outs:
        img = out.tensors["image"]
        assert img.shape == (32, 32, 1) and img.dtype == np.float32
        assert abs(float(img.mean())) < 1e-3 and abs(float(img.std()) - 1) < 1e-2


def test_fixed_window_from_params_overrides_attributes():
    [out] = stage(size=1, normalize="none", window_center=500, window_width=1000).process(
        [rec(np.array([[500.0]], np.float32), window_center="0", window_width="1")])
    assert out.tensors["image"][0, 0, 0] == pytest.approx(0.5)


@pytest.mark.parametrize("image, attrs, match", [
    (np.zeros((4, 4, 3), np.uint8), {}, "3 channels"),
    (np.zeros((0, 4), np.uint8), {}, "empty"),
    (np.array([[np.nan, 1.0]], np.float32), {}, "NaN"),
    (np.zeros((4, 4), np.uint8), {"rescale_slope": "abc"}, "rescale_slope='abc' is not a number"),
    (np.zeros((4, 4), np.uint8), {"window_center": "1", "window_width": "0"}, "not positive"),
    (np.zeros((2, 2, 2, 2), np.uint8), {}, "rank 2 or 3"),
])
def test_bad_records_are_dead_letters_with_a_reason(image, attrs, match):
    with pytest.raises(DeadLetter, match=match):
        stage().check(rec(image, **attrs))


def test_by_default_only_the_window_view_is_emitted_as_image():
    [out] = stage(size=2).process([rec(np.arange(4, dtype=np.uint16).reshape(2, 2))])
    assert set(out.tensors) == {"image"}


def test_each_view_is_its_own_tensor():
    image = np.arange(16, dtype=np.int16).reshape(4, 4)
    [out] = stage(size=4, views=["window", "full", "equalized"]).process(
        [rec(image, window_center="5", window_width="4")])
    assert set(out.tensors) == {"image", "image_full", "image_equalized"}
    assert all(t.shape == (4, 4, 1) and t.dtype == np.float32 for t in out.tensors.values())


def test_full_view_is_the_whole_range_never_clipped_by_the_window():
    image = np.array([[0, 50], [100, 400]], np.uint16)
    r = rec(image, rescale_slope="2", rescale_intercept="-100", window_center="-50", window_width="10")
    [out] = stage(size=2, normalize="none", views=["window", "full"]).process([r])
    np.testing.assert_allclose(out.tensors["image_full"][..., 0], image / 400, atol=1e-6)
    assert set(np.unique(out.tensors["image"])) == {0.0, 1.0}  # the narrow window clips all of it


def test_full_view_inverts_monochrome1():
    image = np.array([[0, 30, 100]], np.uint16)
    plain, inverted = stage(size=1, normalize="none", views=["full"]).process(
        [rec(image), rec(image, photometric="MONOCHROME1")])
    assert "image" not in plain.tensors
    np.testing.assert_allclose(plain.tensors["image_full"] + inverted.tensors["image_full"], 1.0, atol=1e-6)


def test_equalized_view_is_each_pixels_rank_fraction_with_ties_equal():
    image = np.array([[5, 1000], [5, -3]], np.int16)
    [out] = stage(size=2, normalize="none", views=["equalized"]).process([rec(image)])
    # Fraction of the image's pixels at or below each one: -3 -> 1/4, both 5s -> 3/4, 1000 -> 1.
    np.testing.assert_allclose(out.tensors["image_equalized"][..., 0], [[0.75, 1.0], [0.75, 0.25]], atol=1e-6)


def test_equalized_view_ignores_rescale_and_window_and_inverts_monochrome1():
    rng = np.random.default_rng(3)
    image = rng.permutation(64).reshape(8, 8).astype(np.uint16)
    s = stage(size=8, normalize="none", views=["equalized"])
    plain, rescaled, inverted = s.process([
        rec(image), rec(image, rescale_slope="3", rescale_intercept="-1024", window_center="0", window_width="1"),
        rec(image, photometric="MONOCHROME1")])
    np.testing.assert_allclose(plain.tensors["image_equalized"], rescaled.tensors["image_equalized"], atol=1e-6)
    ranks = (image.argsort(axis=None).argsort().reshape(8, 8) + 1) / 64
    np.testing.assert_allclose(plain.tensors["image_equalized"][..., 0], ranks, atol=1e-6)
    np.testing.assert_allclose(inverted.tensors["image_equalized"][..., 0], 1 - ranks + 1 / 64, atol=1e-6)


def test_views_without_the_window_do_not_check_it():
    r = rec(np.zeros((4, 4), np.uint8), window_center="1", window_width="0")
    stage(views=["full", "equalized"]).check(r)
    with pytest.raises(DeadLetter, match="not positive"):
        stage(views=["window", "full"]).check(r)


def local_contrast_by_hand(image: np.ndarray, sigma: float) -> np.ndarray:
    """The local view in numpy: standardise, then (z - mean) / sqrt(variance + floor) over a
    Gaussian neighbourhood, the image reflected at its border."""
    z = (image - image.mean()) / max(image.std(), 1 / np.sqrt(image.size))
    radius = int(3 * sigma)
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
    kernel = np.outer(taps, taps) / taps.sum() ** 2

    def blur(a: np.ndarray) -> np.ndarray:
        padded = np.pad(a, radius, mode="reflect")
        return np.array([[np.sum(padded[i:i + 2 * radius + 1, j:j + 2 * radius + 1] * kernel)
                          for j in range(a.shape[1])] for i in range(a.shape[0])])
    mean = blur(z)
    return (z - mean) / np.sqrt(np.maximum(blur(z * z) - mean ** 2, 0) + LOCAL_FLOOR)


def test_local_view_is_each_pixels_contrast_to_its_neighbourhood():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 1000, (24, 24)).astype(np.uint16)
    [out] = stage(size=24, normalize="none", views=["local"], local_sigma=2).process([rec(image)])
    np.testing.assert_allclose(out.tensors["image_local"][..., 0], local_contrast_by_hand(image / 1.0, 2.0),
                               atol=2e-4)


def test_local_view_ignores_rescale_and_inverts_monochrome1():
    rng = np.random.default_rng(6)
    image = rng.integers(0, 4000, (32, 32)).astype(np.uint16)
    s = stage(size=32, views=["local"])
    plain, rescaled, inverted = s.process([rec(image), rec(image, rescale_slope="3", rescale_intercept="-1024"),
                                           rec(image, photometric="MONOCHROME1")])
    np.testing.assert_allclose(plain.tensors["image_local"], rescaled.tensors["image_local"], atol=1e-4)
    np.testing.assert_allclose(plain.tensors["image_local"], -inverted.tensors["image_local"], atol=1e-4)


def test_a_blob_reads_the_same_in_the_local_view_beside_an_edge_as_on_a_flat_patch():
    """What the view is for: a blob of the same contrast to its surroundings reads the same
    whatever else the patch holds (here an edge across the flat patch's twin, away from the blob),
    where in the full view the edge takes the range and the blob fades."""
    yy, xx = np.mgrid[:64, :64]
    blob = 50 * np.exp(-((yy - 32) ** 2 + (xx - 32) ** 2) / (2 * 3.0 ** 2))
    flat = 1000 + np.random.default_rng(7).normal(0, 10, (64, 64)) + blob
    edged = flat + np.where(xx < 12, 80, 0)
    out = stage(size=64, normalize="none", views=["local", "full"]).process(
        [rec(flat.astype(np.float32)), rec(edged.astype(np.float32))])
    local = [o.tensors["image_local"][28:37, 28:37].max() for o in out]
    full = [o.tensors["image_full"][28:37, 28:37].max() for o in out]
    assert local[0] > 2 and local[1] == pytest.approx(local[0], rel=0.05)
    assert full[1] < 0.8 * full[0]


def test_a_bad_local_sigma_is_a_config_error_only_where_the_local_view_is_used():
    for bad in (9, 0.1, "4", "wide", True):
        with pytest.raises(ValueError, match="params.local_sigma"):
            stage(views=["local"], size=16, local_sigma=bad)
    stage(views=["full"], size=2)  # the default sigma does not fit 2 px, nor does it need to


@pytest.mark.parametrize("views", [[], ["window", "window"], ["clahe"], "full"])
def test_bad_views_are_a_config_error(views):
    with pytest.raises(ValueError, match="params.views"):
        stage(views=views)


def test_unknown_normalisation_is_a_config_error():
    with pytest.raises(ValueError, match="params.normalize"):
        stage(normalize="l2")


def test_a_rescale_that_overflows_is_a_non_finite_dead_letter_naming_record_and_view():
    """Issue 11, finding 6: rescale_slope 1e38 made image_full all NaN, and a result came out."""
    from tensorline.engine.runtime import Message, Worker, header
    from tensorline.engine.testing import MemorySink, MemorySource
    from tensorline.schemas import encode_record

    image = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    records = [rec(image), rec(image, rescale_slope="1e38"), rec(image)]
    messages = [Message("p.raw", 0, i, b"k", bytes(encode_record(Record(
        record_id=f"r{i}", source="s", ingest_ts_ms=0, tensors=r.tensors, stage="producer",
        attributes=r.attributes))), [], 0) for i, r in enumerate(records)]
    sink = MemorySink()
    Worker(stage(size=8, views=["full", "equalized"]), MemorySource(messages), sink, output_topic="out",
           dlq_topic="dlq", max_batch=8, max_delay_ms=0).run(until_idle_s=0)
    assert [o.key for o in sink.topic("out")] == [b"k", b"k"]
    [dead] = sink.topic("dlq")
    assert header(dead.headers, "tl.dlq.reason") == b"non_finite"
    assert header(dead.headers, "tl.dlq.offset") == b"1" and dead.value == messages[1].value
    message = header(dead.headers, "tl.dlq.message").decode()
    assert "record r1" in message and "'image_full'" in message and "64 of 64 values" in message


@pytest.mark.parametrize("image, attrs, reason", [
    (np.zeros((4, 4, 3), np.uint8), {}, "bad_shape"),
    (np.array([[np.inf, 1.0]], np.float32), {}, "non_finite"),
    (np.zeros((4, 4), np.uint8), {"rescale_slope": "abc"}, "bad_attribute"),
    (np.zeros((4, 4), np.uint8), {"window_center": "1", "window_width": "0"}, "bad_attribute"),
])
def test_each_dead_letter_names_its_own_reason(image, attrs, reason):
    with pytest.raises(DeadLetter) as caught:
        stage().check(rec(image, **attrs))
    assert caught.value.reason == reason
