"""Image URLs fetched many at a time, apart from the models.

A feed's images sit on a CDN 100-200 ms away; the models take tens of ms an image. Fetching them in the
model workers pays that wait in series with the models. Here a pool of fetch threads (`Fetcher`) runs
ahead of the model workers through a bounded window (`prefetch`), handing out photos as they arrive:
memory stays bounded whatever the feed's size, and the models always have images waiting. Each fetch
keeps the guards of `images.fetch` (public addresses unless allowed, one deadline, the size limit);
connections are kept alive and capped per host; timeouts, 429 and 5xx are tried again after a backoff or the server's
Retry-After; conditional requests (`FetchState`'s validators) skip images that have not changed.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from lookalike.images import DEFAULT_LIMITS, Connections, Fetched, FetchError, Limits, fetch

LAG = 8  # windows a fetch may start past the oldest one not yet taken (`prefetch`)


@dataclass(frozen=True)
class FetchOptions:
    connections: int = 32  # fetches in flight at once
    per_host: int = 16  # of those, to one host (CDNs throttle a client that opens hundreds)
    attempts: int = 4  # tries of a URL that fails in a way worth trying again
    backoff_s: float = 0.5  # first wait, doubled at each try (with jitter), unless the server says
    max_wait_s: float = 60.0  # a Retry-After longer than this fails the URL instead of stalling the run


class Fetcher:
    """Guarded GETs with retries, shared connections and a cap per host; safe to call from many threads.
    `stats` counts requests, bytes and 304s (what a re-index's report and the benchmark show)."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS, options: FetchOptions | None = None,
                 sleep: Callable[[float], None] = time.sleep):  # fmt: skip
        self.limits, self.options, self.sleep = limits, options or FetchOptions(), sleep
        self.connections = Connections(self.options.per_host)
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "bytes": 0, "not_modified": 0, "retries": 0}

    def _host(self, url: str) -> threading.BoundedSemaphore:
        try:
            host = (urlsplit(url).hostname or "").lower()
        except ValueError:
            host = ""
        with self._lock:
            return self._hosts.setdefault(host, threading.BoundedSemaphore(self.options.per_host))

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def get(self, url: str, validators: tuple[str | None, str | None] | None = None) -> Fetched:
        """The URL's body (or Fetched(None) when unchanged since `validators`), tried again on
        timeouts, 429 and 5xx; the last failure is raised with the number of tries."""
        opts = self.options
        for attempt in range(1, opts.attempts + 1):
            try:
                with self._host(url):
                    self._count("requests")
                    got = fetch(url, self.limits, validators, self.connections)
                self._count("bytes", len(got.data or b""))
                self._count("not_modified", got.data is None)
                return got
            except FetchError as e:
                if not e.retryable or attempt == opts.attempts:
                    tries = f" (after {attempt} tries)" if attempt > 1 else ""
                    raise FetchError(e.source, e.reason + tries) from None
                wait = e.retry_after if e.retry_after is not None else \
                    opts.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)  # fmt: skip
                if wait > opts.max_wait_s:
                    raise FetchError(e.source, f"{e.reason}: the server asks to wait {wait:.0f} s, over the "
                                               f"{opts.max_wait_s:g} s this run waits") from None  # fmt: skip
                self._count("retries")
                self.sleep(wait)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.connections.close()


def prefetch(items: Iterable, fetch_one: Callable, workers: int, window: int
             ) -> Iterator[tuple[int, object, Future]]:  # fmt: skip
    """(position, item, future of fetch_one(item)) for every item, each once its fetch is done, in the
    order they finish: a URL waiting for its retry holds up no model worker (`in_order` puts the results
    back in the items' order before they are stored, so a catalog's ids are the same on every run and
    on Ray). At most `window` fetches are started and not yet taken, so the consumer's pace bounds
    memory and `workers` threads keep the window full while it works; none starts more than `LAG`
    windows past the oldest one not taken, which bounds what `in_order` holds back."""
    pending: dict[Future, tuple[int, object]] = {}
    finished: queue.SimpleQueue[Future] = queue.SimpleQueue()  # each fetch puts itself here when done
    source = enumerate(items)
    following = next(source, None)  # the next item to fetch
    with ThreadPoolExecutor(workers, thread_name_prefix="fetch") as pool:
        try:
            while pending or following:
                oldest = min((at for at, _ in pending.values()), default=following[0] if following else 0)
                while following and len(pending) < window and following[0] - oldest <= LAG * window:
                    future = pool.submit(fetch_one, following[1])
                    pending[future] = following
                    future.add_done_callback(finished.put)
                    following = next(source, None)
                if pending:
                    future = finished.get()
                    position, item = pending.pop(future)
                    yield position, item, future
        finally:  # the consumer stopped early (an error, ctrl-c): fetches not started are dropped
            for future in pending:
                future.cancel()


def in_order(batches: Iterable[list[tuple[int, object]]]) -> Iterator[list]:
    """Batches of (position, value), positions 0, 1, 2, ... each once in any order -> batches of the
    values in position order: a value done early waits for those before it."""
    waiting: dict[int, object] = {}
    following = 0
    for batch in batches:
        waiting.update(batch)
        ready = []
        while following in waiting:
            ready.append(waiting.pop(following))
            following += 1
        if ready:
            yield ready
    if waiting:
        raise AssertionError(f"positions missing before {min(waiting)}")
