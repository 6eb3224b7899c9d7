"""Settings are read once (issue 23): each service builds one frozen settings object from
the environment when it starts (or when the object that needs it is built) and hands it
down; a request never reads the environment, and a value a request sends, even 0, wins
over the settings.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from delf_common import config, fetch
from delf_common.fetch import FetchPolicy
from delf_common.images import ImageLimits, ImageRejected, probe_image, thumbnail_jpeg
from delf_extractor.settings import ExtractorSettings
from delf_gateway.settings import GatewaySettings, HealthcheckSettings
from delf_indexer.settings import IndexerSettings
from delf_verifier.settings import VerifierSettings
from delf_web.settings import WebSettings

SETTINGS_CLASSES = (GatewaySettings, HealthcheckSettings, ExtractorSettings, IndexerSettings, VerifierSettings,
                    WebSettings)


@pytest.mark.parametrize("cls", SETTINGS_CLASSES, ids=lambda c: c.__name__)
def test_the_defaults_are_the_registrys(cls, monkeypatch):
    """With no DELF_* variable set, every settings object holds the registry's defaults
    (the values do not change: accuracy and behaviour stay as they were)."""
    for name in config.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    settings = cls.from_env()
    defaults = {name: setting.default for name, setting in config.SETTINGS.items()}
    checked = {"shortlist": "DELF_SHORTLIST", "neighbours": "DELF_NEIGHBOURS", "ratio": "DELF_RATIO",
               "verified_score": "DELF_VERIFIED_SCORE", "ransac_px": "DELF_RANSAC_PX",
               "max_image_bytes": "DELF_MAX_IMAGE_BYTES", "grpc_addr": "DELF_GRPC_ADDR",
               "query_features": "DELF_QUERY_FEATURES", "auth_tokens": "DELF_AUTH_TOKENS"}
    for field, env in checked.items():
        if hasattr(settings, field):
            assert getattr(settings, field) == defaults[env], field
    if hasattr(settings, "image_limits"):
        assert settings.image_limits == ImageLimits(max_bytes=defaults["DELF_MAX_IMAGE_BYTES"],
                                                    max_pixels=defaults["DELF_MAX_IMAGE_PIXELS"],
                                                    min_side=defaults["DELF_MIN_IMAGE_SIDE"])
    if hasattr(settings, "fetch_policy"):
        assert settings.fetch_policy == FetchPolicy(
            url_ingest=defaults["DELF_URL_INGEST"], allowed_hosts=defaults["DELF_URL_ALLOWED_HOSTS"],
            allow_private=defaults["DELF_URL_ALLOW_PRIVATE"], max_bytes=defaults["DELF_MAX_IMAGE_BYTES"],
            timeout_s=defaults["DELF_URL_TIMEOUT_S"])


def test_a_settings_object_is_read_once_and_frozen(monkeypatch):
    monkeypatch.setenv("DELF_SHORTLIST", "7")
    monkeypatch.setenv("DELF_NEIGHBOURS", "20")
    monkeypatch.setenv("DELF_AUTH_TOKENS", "a, b")
    gateway, indexer = GatewaySettings.from_env(), IndexerSettings.from_env()
    assert gateway.shortlist == indexer.shortlist == 7 and indexer.neighbours == 20
    assert gateway.auth_tokens == ("a", "b")
    monkeypatch.setenv("DELF_SHORTLIST", "9")  # a later change reaches only objects built later
    assert gateway.shortlist == 7 and GatewaySettings.from_env().shortlist == 9
    with pytest.raises(dataclasses.FrozenInstanceError):
        gateway.shortlist = 3  # type: ignore[misc]


def test_a_bad_setting_fails_when_the_settings_are_built(monkeypatch):
    monkeypatch.setenv("DELF_RATIO", "zero point nine")
    with pytest.raises(config.ConfigError, match="DELF_RATIO"):
        IndexerSettings.from_env()


def test_the_ratio_test_fetches_one_neighbour_more():
    from delf_indexer.voting import fetched_neighbours

    assert fetched_neighbours(10) == 11 and fetched_neighbours(0) == 1


def test_a_verify_option_sent_as_0_wins_over_the_settings():
    """The gateway's verified_score 0 makes every match verified, whatever the verifier's
    own setting; an option left out takes the settings' value."""
    from delf_common.messages import SearchCandidate, VerifiedMatch, VerifyQuery
    from delf_verifier.tasks import verify_candidates

    rng = np.random.default_rng(3)
    q = rng.uniform(0, 600, (60, 2)).astype(np.float32)
    query = VerifyQuery(q, (600, 600)).to_wire()
    noise = [SearchCandidate("noise", 40, np.arange(60), rng.uniform(0, 600, (60, 2))).to_wire()]
    strict = VerifierSettings(verified_score=1.0, ransac_px=8.0)

    def verified(options: dict) -> bool:
        reply = verify_candidates(query, noise, options, defaults=strict)
        return VerifiedMatch.from_wire(reply["matches"][0]).verified

    assert verified({"verified_score": 0}) is True  # 0 is a value
    assert verified({"verified_score": 0.0, "ransac_px": 8.0}) is True
    assert verified({}) is False  # absent: the settings' 1.0


def test_a_0_or_false_a_caller_passes_to_the_shared_library_wins_over_the_environment(monkeypatch):
    """The shared library takes its limits from the calling service's settings: an explicit
    0 or False is a value, never replaced by the environment's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from photos import png, sample_photo

    monkeypatch.setenv("DELF_MIN_IMAGE_SIDE", "32")
    monkeypatch.setenv("DELF_THUMBNAIL_SIDE", "320")
    monkeypatch.setenv("DELF_URL_INGEST", "1")
    monkeypatch.setenv("DELF_URL_ALLOW_PRIVATE", "1")
    tiny = png(np.full((8, 8, 3), 128, np.uint8))
    with pytest.raises(ImageRejected, match="at least 32"):
        probe_image(tiny, ImageLimits.from_env())
    assert probe_image(tiny, dataclasses.replace(ImageLimits.from_env(), min_side=0))[:2] == (8, 8)
    assert thumbnail_jpeg(sample_photo("coffee"), 0) == b""  # 0: no thumbnail, whatever DELF_THUMBNAIL_SIDE

    policy = FetchPolicy.from_env()
    assert policy.url_ingest and policy.allow_private
    assert fetch.check_url("http://127.0.0.1/a.jpg", policy)[1] == "127.0.0.1"
    with pytest.raises(fetch.FetchError, match="loopback"):
        fetch.check_url("http://127.0.0.1/a.jpg", dataclasses.replace(policy, allow_private=False))
    with pytest.raises(fetch.FetchError, match="URL ingest is off"):
        fetch.check_url("http://127.0.0.1/a.jpg", dataclasses.replace(policy, url_ingest=False))


def test_an_explicit_heartbeat_interval_is_kept():
    from delf_common.celery_app import Heartbeat

    assert Heartbeat(["verify"], "n", interval=0.5).interval == 0.5
    with pytest.raises(ValueError, match="positive"):  # 0 is refused, not replaced by DELF_HEARTBEAT_S
        Heartbeat(["verify"], "n", interval=0)


def test_a_job_store_reads_its_timings_once(monkeypatch):
    from delf_common.jobs import JobStore, JobTimings

    monkeypatch.setenv("DELF_JOB_STALLED_AFTER_S", "0.5")
    monkeypatch.setenv("DELF_JOB_RESUME_AFTER_S", "0")
    store = JobStore(client=object())
    assert store.timings == JobTimings(stalled_after_s=0.5, resume_after_s=0.0,
                                       visibility_timeout_s=config.SETTINGS["DELF_VISIBILITY_TIMEOUT_S"].default)
    monkeypatch.setenv("DELF_JOB_STALLED_AFTER_S", "not a number")  # a worker's store never fails on it
    assert JobStore(client=object()).timings.stalled_after_s == config.SETTINGS["DELF_JOB_STALLED_AFTER_S"].default
    monkeypatch.setenv("DELF_JOB_STALLED_AFTER_S", "7")  # the gateway's store: the gateway's settings
    assert GatewaySettings.from_env().job_timings.stalled_after_s == 7.0

