"""The learned projection (whitening) a catalog's index and its queries go through.

Learned on the catalog's own vectors (never on queries), stored in the catalog database, and applied
here: the records keep vectors as embedded, so a refit needs no re-embedding."""

from __future__ import annotations

from lookalike.config import PipelineConfig
from lookalike.embed import WHITEN_MIN_IMAGES, WHITEN_REFIT_CHANGE, Whitening, learn_whitening
from lookalike.live_index import LiveIndex
from lookalike.records import Records


class Projection:
    """The catalog's current projection (or none), kept in step with what any process stored."""

    def __init__(self, records: Records, live: LiveIndex):
        self.records, self.live = records, live
        self.load()

    def load(self) -> None:
        self.version, arrays = self.records.projection()
        self.whitening = Whitening(*arrays) if arrays is not None else None
        self.live.set_transform(self.whitening)

    def follow(self) -> None:
        """Reload when another process (or a tuning job) stored a new projection."""
        if self.records.projection_version() != self.version:
            self.load()

    def dim(self, stored: int | None) -> int | None:
        return self.whitening.dim if self.whitening is not None else stored

    def refresh(self, config: PipelineConfig, force: bool = False) -> bool:
        """(Re)learn the projection when the catalog is new or grew or shrank a lot (by
        WHITEN_REFIT_CHANGE). Returns whether it was refitted."""
        if not config.whiten:
            return False
        images = self.records.count()[1]
        fitted_on = int(self.records.get_meta("whitening_fitted_on") or 0)
        if not force and fitted_on and abs(images - fitted_on) < WHITEN_REFIT_CHANGE * fitted_on:
            return False
        if not force and not fitted_on and images < WHITEN_MIN_IMAGES:
            return False
        whitening = learn_whitening(config, self.records.vectors())
        self.records.set_projection((whitening.mean, whitening.matrix) if whitening is not None else None)
        self.records.set_meta("whitening_fitted_on", str(images))
        self.load()
        return True
