"""Errors a user can act on: each carries one readable line."""


class LookalikeError(Exception):
    """Base class: the message is meant to be shown to the user as is."""


class ModelMissingError(LookalikeError):
    """A model file is absent or fails its checksum."""


class BadImageError(LookalikeError):
    """An input could not be turned into an RGB image; the message names it and says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class VectorsChangedError(LookalikeError):
    """The catalog's vectors were rebuilt with another model while a search was running."""


class FeedbackRefused(LookalikeError):
    """Feedback that names no kept search or no catalog product (`missing`: 404 over the API), or a
    product the search did not show (422)."""

    def __init__(self, message: str, missing: bool):
        super().__init__(message)
        self.missing = missing
