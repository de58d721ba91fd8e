"""What a server operator sets: the write token, the limits on what one request may cost."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lookalike.errors import LookalikeError
from lookalike.pipeline import Limits

# what one uploaded or fetched image may be (the pipeline's own defaults are for local files)
API_LIMITS = Limits(max_bytes=10 * 1024 * 1024, max_pixels=40_000_000, timeout_s=10.0)


@dataclass(frozen=True)
class ApiSettings:
    token: str | None = None  # None: writes are off
    protect_reads: bool = False
    limits: Limits = field(default=API_LIMITS)  # size, pixels, URL deadline, private addresses (tests only)
    max_images_per_product: int = 20
    threads: int = 2
    max_url_fetches: int = 8  # URL fetches in flight; more are refused at once (503), never queued
    max_searches: int = 4  # inferences at once (2 cores); more wait without holding a thread

    @property
    def max_upload_bytes(self) -> int:
        return self.limits.max_bytes

    @classmethod
    def from_env(
        cls, token_file: str | None = None, max_upload_bytes: int | None = None, url_timeout_s: float | None = None,
        allow_private_urls: bool = False, **overrides,
    ) -> ApiSettings:  # fmt: skip
        token = os.environ.get("LOOKALIKE_API_TOKEN") or None
        if token_file:
            try:
                token = Path(token_file).read_text().strip() or None
            except OSError as e:
                raise LookalikeError(f"{token_file}: cannot read the API token ({e.strerror})") from None
        limits = Limits(
            max_bytes=max_upload_bytes or API_LIMITS.max_bytes, max_pixels=API_LIMITS.max_pixels,
            timeout_s=url_timeout_s or API_LIMITS.timeout_s, allow_private_urls=allow_private_urls,
        )  # fmt: skip
        return cls(token=token, limits=limits, **overrides)
