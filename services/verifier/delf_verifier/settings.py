"""The verifier's settings, read from the environment once per worker process.

The gateway sends ``verified_score`` and ``ransac_px`` with every verify task; these are
what a task uses when the request leaves one out (a value sent, even 0, counts).
"""
from __future__ import annotations

import dataclasses

from delf_common import config


@dataclasses.dataclass(frozen=True)
class VerifierSettings:
    verified_score: float
    ransac_px: float

    @classmethod
    def from_env(cls) -> "VerifierSettings":
        return cls(verified_score=float(config.get("DELF_VERIFIED_SCORE")),
                   ransac_px=float(config.get("DELF_RANSAC_PX")))
