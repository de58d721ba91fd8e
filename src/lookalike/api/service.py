"""What every route shares: the catalog, the settings, the limiters, the counters and the one tuning
job, held by the app (`app.state.service`) and handed to routes with `Depends(service)`."""

from __future__ import annotations

import hmac
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import anyio
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from lookalike.api.schemas import TuneStatus
from lookalike.api.settings import ApiSettings
from lookalike.errors import LookalikeError
from lookalike.pipeline import Catalog

MAX_MESSAGE = 1000  # characters of an error message: errors never echo unbounded input
SMALL_BODY = 64 * 1024  # JSON bodies and form fields: URLs, ids, metadata


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.time()
        self.searches = 0
        self.writes = 0
        self.latencies: deque[float] = deque(maxlen=1000)

    def search(self, ms: float) -> None:
        with self.lock:
            self.searches += 1
            self.latencies.append(ms)

    def wrote(self) -> None:
        with self.lock:
            self.writes += 1

    def snapshot(self) -> dict:
        with self.lock:
            lat = sorted(self.latencies)
        pick = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 2)) if lat else (lambda q: None)
        return {"searches": self.searches, "writes": self.writes, "uptime_s": round(time.time() - self.started, 1),
                "search_ms_p50": pick(0.5), "search_ms_p95": pick(0.95)}  # fmt: skip


class TuneJob:
    """The catalog's one tuning job at a time, run in a background thread; searches go on meanwhile
    with the old vectors, which are swapped for the tuned ones in one transaction at the end."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.lock = threading.Lock()
        self.status = TuneStatus(state="idle")

    def start(self, options: dict[str, str]) -> TuneStatus:
        with self.lock:
            if self.status.state == "running":
                raise HTTPException(409, "a tuning job is already running: GET /tune for its progress")
            self.status = TuneStatus(state="running", started=time.time())
        threading.Thread(target=self._run, args=(options,), daemon=True, name="lookalike-tune").start()
        return self.status

    def _progress(self, stage: str, done: int, total: int | None) -> None:
        with self.lock:
            self.status = self.status.model_copy(update={"stage": stage, "done": done, "total": total})

    def _run(self, options: dict[str, str]) -> None:
        try:
            result = self.catalog.tune(options, progress=self._progress)
            update = {"state": "done", "result": result}
        except Exception as e:  # reported through GET /tune, never lost in a thread
            message = str(e) if isinstance(e, LookalikeError) else f"internal error ({type(e).__name__}: {e})"
            update = {"state": "failed", "error": message[:MAX_MESSAGE]}
        with self.lock:
            self.status = self.status.model_copy(update={**update, "finished": time.time()})


@dataclass
class Service:
    catalog: Catalog
    settings: ApiSettings
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self) -> None:
        # Inference and URL fetches get their own capacity, so a crowd of slow sources or heavy searches
        # never takes the thread pool that /health and the product reads run in.
        self.inference = anyio.CapacityLimiter(self.settings.max_searches)
        self.url_slots = threading.BoundedSemaphore(self.settings.max_url_fetches)
        self.url_threads = anyio.CapacityLimiter(self.settings.max_url_fetches)
        self.tuning = TuneJob(self.catalog)

    def take_url_slot(self) -> None:
        """One of a bounded number of URL-fetch slots: when all are busy the client is told to come back
        (503) at once, rather than queueing behind slow sources."""
        if not self.url_slots.acquire(blocking=False):
            raise HTTPException(503, "too many image URLs being fetched; retry shortly", {"Retry-After": "1"})

    async def fetch(self, url: str) -> bytes:
        self.take_url_slot()
        try:
            return await anyio.to_thread.run_sync(self.catalog.fetch, url, limiter=self.url_threads)
        finally:
            self.url_slots.release()


def service(request: Request) -> Service:
    return request.app.state.service


bearer = HTTPBearer(auto_error=False)


def token_refusal(token: str | None, given: str) -> HTTPException | None:
    """Why a request that needs the token is refused, or None: with no token set, writes are off."""
    if token is None:
        return HTTPException(403, "writes are disabled: start the server with LOOKALIKE_API_TOKEN set")
    if not hmac.compare_digest(given.encode(), token.encode()):
        return HTTPException(401, "missing or wrong bearer token")
    return None


def writer(credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
           svc: Service = Depends(service)) -> None:  # noqa: B008  # fmt: skip
    """Writes (and reads, with --protect-reads) need the bearer token (checked again here, and in the
    OpenAPI document as its security scheme, after `gate.TokenFirst` checked it before the body)."""
    refusal = token_refusal(svc.settings.token, credentials.credentials if credentials else "")
    if refusal is not None:
        raise refusal
