"""Settings are read once (issue 23): each service builds one frozen settings object from
the environment when it starts (or when the object that needs it is built) and hands it
down; a request never reads the environment, and a value a request sends, even 0, wins
over the settings.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from delf_common import config
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
