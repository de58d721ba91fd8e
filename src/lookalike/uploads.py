"""Uploaded photos kept inside the catalog (uploads/<sha[:2]>/<sha>), content-addressed, so two
products may share one file; paths and URLs are stored as given and never copied."""

from __future__ import annotations

from pathlib import Path

from lookalike.files import replace_atomically
from lookalike.images import Photo
from lookalike.records import Records


class Uploads:
    def __init__(self, directory: Path, records: Records):
        self.folder, self.records = directory / "uploads", records

    def keep(self, photo: Photo) -> str:
        """The stored file of an upload, written once (fsynced, then renamed into place)."""
        folder = self.folder / photo.sha256[:2]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / photo.sha256
        if not path.exists():
            replace_atomically(path, photo.data, tmp=folder / f".{photo.sha256}.tmp")
        return str(path)

    def forget(self, images: list[str]) -> None:
        """Delete stored uploads that no product has any more. Runs after the database commit: a crash
        in between leaves a stray file, never a product without its image."""
        ours = [i for i in images if Path(i).parent.parent == self.folder]
        for path in set(ours) - self.records.images_in_use(ours):
            Path(path).unlink(missing_ok=True)
