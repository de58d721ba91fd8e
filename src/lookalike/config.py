"""Pipeline options, typed and validated in one place.

Everything that changes a catalog's vectors is a field here, recorded in the catalog. A value is
checked when the config is made (from Python, `--config key=value`, or a catalog's record), so a typo
or an out-of-range value is refused with one line naming the option, the value and what is allowed,
before anything is written: a catalog never records a config it cannot run.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Literal, get_args

from lookalike.errors import LookalikeError

CropStrategy = Literal["union", "best", "nonwhite", "whole"]
Pooling = Literal["avg", "gem"]
WHITE = (255, 255, 255)


class ConfigError(LookalikeError):
    """An option with a value that cannot work; the message names both and what is allowed."""

    def __init__(self, option: str, value: object, expected: str):
        super().__init__(f"configuration option {option}={value!r}: expected {expected}")
        self.option, self.value, self.expected = option, value, expected


def _number(option: str, value: object, kind: type, low: float, high: float, expected: str) -> None:
    ok = (
        isinstance(value, kind) and not isinstance(value, bool)
        if kind is int
        else (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value))
    )
    if not ok or not low <= value <= high:
        raise ConfigError(option, value, expected)


def _choice(option: str, value: object, literal: object) -> None:
    allowed = get_args(literal)
    if value not in allowed:
        raise ConfigError(option, value, "one of " + ", ".join(allowed))


@dataclass(frozen=True)
class CropConfig:
    """How the embedded square is cut from the photo (`crop.py`)."""

    strategy: CropStrategy = "union"  # union | best (of the detected boxes) | nonwhite | whole
    relative_threshold: float = 0.5  # union: boxes scoring at least this share of the best one
    margin: float = 0.05  # added around the box, as a share of its size
    pad_color: tuple[int, int, int] = WHITE
    white_level: int = 235  # nonwhite: grey level above which a pixel counts as background
    # a photo whose border is plain white (a product shot) is cropped to its non-white box without running
    # the detector: off by default (BENCHMARKS.md, "Catalog shots on plain backgrounds")
    plain: bool = False

    def __post_init__(self) -> None:
        _choice("crop.strategy", self.strategy, CropStrategy)
        _number("crop.relative_threshold", self.relative_threshold, float, 0.0, 1.0, "a number from 0 to 1")
        _number("crop.margin", self.margin, float, 0.0, 1.0, "a number from 0 to 1")
        _number("crop.white_level", self.white_level, int, 1, 255, "a whole number from 1 to 255")
        color = tuple(self.pad_color) if isinstance(self.pad_color, list | tuple) else self.pad_color
        if not (
            isinstance(color, tuple)
            and len(color) == 3
            and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)
        ):
            raise ConfigError("crop.pad_color", self.pad_color, "three whole numbers from 0 to 255, e.g. 255,255,255")
        object.__setattr__(self, "pad_color", color)

    @property
    def uses_boxes(self) -> bool:
        return self.strategy in ("union", "best")


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that changes the vectors: fixed per catalog, recorded in it."""

    detector: str | None = None  # ONNX path; None = the default Open Images SSD
    embedder: str | None = None  # ONNX path; None = the default EfficientNet-Lite0
    embed_size: int = 0  # embedder input size in pixels (multiple of 32); 0 = the model's preferred one
    pooling: Pooling = "gem"  # for feature-map outputs
    gem_p: float = 3.0
    flip: bool = False  # average the crop's vector with its mirror image's
    # PCA whitening to this many dimensions, learned on the catalog; 0 = off. Off by default: it gains
    # 4.6 points of R@1 on suite 2 but costs 4.5 on suite 5 (products it never saw) (BENCHMARKS.md)
    whiten: int = 0
    whiten_power: float = 0.5  # 1 = full whitening, 0.5 = shrunk (divide by sqrt(std))
    crop: CropConfig = field(default_factory=CropConfig)

    def __post_init__(self) -> None:
        for name in ("detector", "embedder"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise ConfigError(name, value, "the path of an ONNX model file, or none for the default")
        if self.embed_size != 0:
            _number("embed_size", self.embed_size, int, 32, 1024, "0 (the model's size) or a multiple of 32 up to 1024")
            if self.embed_size % 32:
                raise ConfigError("embed_size", self.embed_size, "0 (the model's size) or a multiple of 32 up to 1024")
        _choice("pooling", self.pooling, Pooling)
        _number("gem_p", self.gem_p, float, 1.0, 20.0, "a number from 1 to 20")
        if not isinstance(self.flip, bool):
            raise ConfigError("flip", self.flip, "true or false")
        _number("whiten", self.whiten, int, 0, 4096, "0 (off) or a number of dimensions up to 4096")
        _number("whiten_power", self.whiten_power, float, 0.0, 1.0, "a number from 0 to 1")
        if not isinstance(self.crop, CropConfig):
            raise ConfigError("crop", self.crop, "crop.* options")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def embedding_key(self) -> str:
        """What the per-image vectors depend on (not the projection learned on the catalog afterwards)."""
        d = asdict(self)
        d.pop("whiten"), d.pop("whiten_power")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def sized(self, model_size: int) -> PipelineConfig:
        """The same config with embed_size 0 spelled as the model's size: equal configs compare equal."""
        return self if self.embed_size else replace(self, embed_size=model_size)

    @classmethod
    def from_json(cls, text: str) -> PipelineConfig:
        """A recorded config, validated like any other (unknown keys refused)."""
        d = json.loads(text)
        crop = d.pop("crop", {})
        _known(d, cls, "")
        _known(crop, CropConfig, "crop.")
        if "pad_color" in crop:
            crop["pad_color"] = tuple(crop["pad_color"]) if isinstance(crop["pad_color"], list) else crop["pad_color"]
        return cls(crop=CropConfig(**crop), **d)

    def with_options(self, options: dict[str, str]) -> PipelineConfig:
        """A copy with `key=value` options as typed, e.g. {"pooling": "gem", "crop.margin": "0.1"}."""
        config, crop = asdict(self), asdict(self.crop)
        for key, text in options.items():
            target, name = (crop, key[5:]) if key.startswith("crop.") else (config, key)
            if name not in target or name == "crop":
                allowed = [f.name for f in fields(PipelineConfig) if f.name != "crop"]
                allowed += [f"crop.{f.name}" for f in fields(CropConfig)]
                raise LookalikeError(
                    f"unknown configuration option {key}={text!r}: expected one of {', '.join(allowed)}"
                )
            target[name] = _parse_option(key, text, target[name])
        config["crop"] = CropConfig(**crop)
        return PipelineConfig(**config)


def _known(d: dict, cls: type, prefix: str) -> None:
    names = {f.name for f in fields(cls)}
    for key in d:
        if key not in names:
            raise LookalikeError(f"unknown configuration option {prefix}{key!r}")


def _parse_option(key: str, text: str, current: object) -> object:
    """A typed value from the text a user wrote; the dataclasses then check its range."""
    text = str(text).strip()
    if key in ("detector", "embedder"):
        return None if text.lower() in ("", "none") else text
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, tuple | list):
            return tuple(int(v) for v in text.split(","))
    except ValueError:
        kind = (
            "true or false"
            if isinstance(current, bool)
            else (
                "three whole numbers, e.g. 255,255,255"
                if isinstance(current, tuple)
                else f"a {'whole number' if isinstance(current, int) else 'number'}"
            )
        )
        raise ConfigError(key, text, kind) from None
    return text
