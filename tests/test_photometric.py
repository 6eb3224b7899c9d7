"""Dark photos lifted before extraction (`delf_extractor.photometric`, DELF_DARK_LIGHTNESS):
a well-lit photo is extracted exactly as before, a dark one is brightened first, for indexed
photos and queries alike. What it does to accuracy is measured through the running system
(BENCHMARKS.md, "Dark photos lifted before extraction")."""
from __future__ import annotations

import dataclasses

from extractor_fixtures import landmark_photo  # first: sets the test Redis

import cv2
import numpy as np
import pytest
from skimage import data

from delf_extractor import photometric
from delf_extractor.extract import DelfExtractor
from delf_extractor.settings import ExtractorSettings


def night(rgb: np.ndarray, gain: float = 0.25) -> np.ndarray:
    """A dark copy of a photo: a gamma of 2.2 and a low exposure, as an underexposed shot."""
    return np.clip(255.0 * gain * (rgb / 255.0) ** 2.2, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def extractors() -> dict[float, DelfExtractor]:
    s = ExtractorSettings.from_env()
    return {bar: DelfExtractor("effnet-lite0-cat32", device="cpu",
                               settings=dataclasses.replace(s, dark_lightness=bar)) for bar in (0.0, 50.0)}


def test_the_default_lifts_photos_darker_than_50(monkeypatch):
    monkeypatch.delenv("DELF_DARK_LIGHTNESS", raising=False)
    assert ExtractorSettings.from_env().dark_lightness == 50.0
    monkeypatch.setenv("DELF_DARK_LIGHTNESS", "0")
    assert ExtractorSettings.from_env().dark_lightness == 0.0


def test_a_well_lit_photo_is_used_as_it_is():
    rgb = data.astronaut()
    assert photometric.lightness(rgb) > 100
    assert photometric.lift_dark(rgb, 50.0) is rgb


def test_a_dark_photo_is_brightened_towards_the_target_and_keeps_its_hues():
    rgb = data.coffee()
    dark = night(rgb)
    assert photometric.lightness(dark) < 30
    lifted = photometric.lift_dark(dark, 50.0)
    assert lifted.shape == dark.shape and lifted.dtype == np.uint8
    assert abs(photometric.lightness(lifted) - photometric.TARGET_LIGHTNESS) < 30
    # The hue of the coloured pixels is kept (the lift works on the lightness).
    hue = [cv2.cvtColor(im, cv2.COLOR_RGB2HSV)[..., 0].astype(int) for im in (rgb, lifted)]
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1] > 80
    diff = np.abs(hue[0] - hue[1])[sat]
    assert np.median(np.minimum(diff, 180 - diff)) <= 6


def test_a_bar_of_0_never_lifts():
    dark = night(data.coffee())
    assert photometric.lift_dark(dark, 0.0) is dark


def test_the_lightness_of_a_large_photo_is_read_on_a_sample():
    big = np.full((3000, 4000, 3), 30, np.uint8)
    big[:1000] = 200  # a bright third: the median is the dark part's
    assert photometric.lightness(big) == photometric.lightness(np.full((2, 2, 3), 30, np.uint8)) < 50
    assert photometric.lift_dark(np.zeros((2, 2, 3), np.uint8), 50.0).shape == (2, 2, 3)  # tiny: no crash


def test_the_extractor_changes_nothing_for_a_well_lit_photo(extractors):
    rgb = landmark_photo(0)
    assert photometric.lightness(rgb) >= 50
    a, b = (extractors[bar].extract(rgb) for bar in (0.0, 50.0))
    np.testing.assert_array_equal(a.descriptors, b.descriptors)
    np.testing.assert_array_equal(a.locations, b.locations)


def test_the_extractor_sees_a_dark_photo_lifted(extractors):
    """Extracting a dark photo with the setting on is extracting its lifted copy with it off:
    the same rule for indexed photos and queries, before anything else."""
    dark = night(landmark_photo(0))
    on = extractors[50.0].extract(dark)
    lifted = extractors[0.0].extract(photometric.lift_dark(dark, 50.0))
    off = extractors[0.0].extract(dark)
    np.testing.assert_allclose(on.descriptors, lifted.descriptors, atol=1e-5)
    assert not np.allclose(on.descriptors[:50], off.descriptors[:50], atol=1e-3)
    assert on.image_size == off.image_size  # keypoints stay in the submitted photo's pixels
