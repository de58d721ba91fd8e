"""Indexing on Ray Data: a source's photos are read, decoded, detected, cropped and embedded by a pool
of actors (each loads its ONNX sessions once), on this machine or a Ray cluster; the records come
back, in order, to the one process that writes them to the store. Each photo takes exactly the path
it takes locally (`prepare.prepare`, one intra-op thread), so the vectors and the bad-input report
are the same. Image URLs are downloaded by a stage before the actors (`fetch_stage`: many at a time,
with the local fetch pool's guards and retries), which Ray Data streams ahead of them, so the models
do not wait for the network one photo at a time. On a cluster every worker must reach the images
(shared storage or URLs) and have lookalike and its model files installed.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from lookalike.config import PipelineConfig
from lookalike.encoder import BATCH, Encoder, Progress, safely
from lookalike.errors import BadImageError, LookalikeError
from lookalike.fetching import Fetcher
from lookalike.images import Limits, Photo, describe, is_url, sha256_bytes
from lookalike.sources import Item

LOCAL = "local"  # start a Ray instance on this machine (as ray.init(address="local") does)
BLOCK = 128  # rows per Ray block: small enough that results stream back while the rest is embedded
FETCH_BATCH = 16  # URLs a fetch task downloads at once


class RayRunner:
    """Runs `prepare.prepare` over items on Ray: `address` LOCAL (a new local Ray with `workers`
    CPUs), "auto" or "ray://host:10001" (join a running cluster)."""

    def __init__(self, address: str = LOCAL, workers: int | None = None):
        if workers is not None and workers < 1:
            raise LookalikeError(f"--workers {workers}: expected at least 1")
        self.address, self.workers = address or LOCAL, workers

    def start(self) -> int:
        """Join or start Ray (quietly); returns the actors the pool will have."""
        try:
            import ray
        except ImportError:
            raise LookalikeError("indexing on Ray needs ray: pip install 'lookalike[ray]'") from None
        if not ray.is_initialized():
            local = self.address == LOCAL
            cpus = self.workers or os.cpu_count() or 1
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a Ray of our own, on loopback only
            try:
                with _stdout_away():  # the processes Ray starts inherit it
                    ray.init(address=self.address, num_cpus=cpus if local else None, include_dashboard=False,
                             log_to_driver=False, logging_level=logging.ERROR, configure_logging=True,
                             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})  # fmt: skip
            except Exception as e:  # Ray's own errors (no cluster at the address, ...): one line
                raise LookalikeError(f"ray {self.address}: cannot start or join Ray ({e})") from None
            atexit.register(_quiet_shutdown)  # runs before Ray's own (atexit is last in, first out)
        import ray.data

        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-run notices; our bar says it all

        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # the same ids, in the same order, as locally
        context.enable_progress_bars = False  # the caller shows one bar with an ETA
        context.print_on_execution_start = False
        return self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))

    def map(self, config: PipelineConfig, limits: Limits, items: list[Item], known: dict, source: str, embed: bool,
            progress: Progress | None) -> Iterator[list[tuple[Item, object]]]:  # fmt: skip
        """[(item, outcome), ...] a batch at a time, in the items' order: outcome as `indexing` has it
        (a record, None when unchanged, or the reason it failed)."""
        import ray.data

        actors = self.start()
        rows = [{"n": n, "product_id": it.product_id, "image": it.image, "metadata": json.dumps(it.metadata),
                 "known": known.get((it.product_id, it.image), ("",))[0] or ""}
                for n, it in enumerate(items)]  # fmt: skip
        if not rows:
            return
        dataset = ray.data.from_items(rows, override_num_blocks=max(actors, -(-len(rows) // BLOCK)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Ray's spelling of max_restarts is changing
            # max_restarts 0: a lost actor fails the run rather than being restarted (a rerun picks up
            # where it stopped: what was written is skipped as unchanged)
            # URLs are fetched by a stage of their own, many at a time, streaming ahead of the actors (no
            # CPU asked: the actors hold every CPU; its tasks wait on the network)
            dataset = dataset.map_batches(fetch_stage(limits), batch_size=FETCH_BATCH, batch_format="numpy",
                                          num_cpus=0)  # fmt: skip
            dataset = dataset.map_batches(
                actor_class(config.to_json(), limits, source, embed),
                compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1, batch_size=16, batch_format="numpy",
                max_restarts=0,
            )  # fmt: skip
        done = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Ray Data's advice on block counts for tiny sources
            for batch in dataset.iter_batches(batch_size=BATCH * actors, batch_format="numpy"):
                part = [(items[int(n)], pickle.loads(o)) for n, o in zip(batch["n"], batch["outcome"], strict=True)]
                yield part
                done += len(part)
                if progress:
                    progress(done, len(items))


@contextmanager
def _stdout_away() -> Iterator[None]:
    """Standard output is the command's data (`index --json`); Ray's processes and its shutdown once
    wrote a notice there after the report (once, in a fresh-clone test run; not reproduced): send them to
    /dev/null. Ray's errors are exceptions, its logs stay in its session folder."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _quiet_shutdown() -> None:
    import ray

    if ray.is_initialized():
        with _stdout_away():
            ray.shutdown()


def fetch_stage(limits: Limits) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The stage before the actors: a batch's image URLs downloaded at once (`fetching.Fetcher`: guards,
    retries, a cap per host) into a `body` column, or the reason one failed into `error`; a path is left
    for the actor to read. Conditional requests stay local (`fetch.db` is the catalog's)."""

    def fetch_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fetcher = Fetcher(limits)

        def one(image: str) -> tuple[bytes, str]:
            if not is_url(image):
                return b"", ""
            try:
                return fetcher.get(image).data or b"", ""
            except BadImageError as e:
                return b"", e.reason

        try:
            with ThreadPoolExecutor(FETCH_BATCH) as pool:
                got = list(pool.map(one, [str(i) for i in batch["image"]]))
        finally:
            fetcher.close()
        return {**batch, "body": np.array([b for b, _ in got], dtype=object),
                "error": np.array([e for _, e in got], dtype=object)}  # fmt: skip

    return fetch_batch


def actor_class(config_json: str, limits: Limits, source: str, embed: bool) -> type:
    """The Ray Data actor, its settings bound in the class (shipped with it, rather than as constructor
    arguments in the object store): an Encoder whose ONNX sessions are loaded once, with one intra-op
    thread as local indexing uses, that turns a batch of items into outcomes, pickled."""

    class PrepareActor:
        def __init__(self):
            from lookalike.prepare import prepare

            self.encoder = Encoder(PipelineConfig.from_json(config_json), threads=1, limits=limits)
            self.prepare = prepare

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            outcomes = []
            for product_id, image, metadata, sha, body, error in zip(
                batch["product_id"],
                batch["image"],
                batch["metadata"],
                batch["known"],
                batch["body"],
                batch["error"],
                strict=True,
            ):
                if error:  # the fetch stage's reason, as the local fetch pool reports it
                    outcomes.append(pickle.dumps(str(error)))
                    continue
                item = Item(str(product_id), str(image), json.loads(str(metadata)))
                known = {(item.product_id, item.image): (str(sha), None)} if sha else {}
                photo = Photo(describe(item.image), bytes(body), sha256_bytes(bytes(body))) if len(body) else None
                step: Callable = safely(lambda it, known=known, photo=photo: self.prepare(
                    self.encoder, it, known, source, embed, photo=photo))  # fmt: skip
                outcomes.append(pickle.dumps(step(item)))
            return {"n": batch["n"], "outcome": np.array(outcomes, dtype=object)}

    return PrepareActor
