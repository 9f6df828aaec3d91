"""Small pieces the methods share: resolution choice and config validation."""

import dataclasses
import math
import types
import typing

from jaxmask.maps import AttentionMaps


def finest(resolutions) -> int:
    if not resolutions:
        raise ValueError("the model has no attention resolutions to capture at")
    return max(resolutions)


def side(resolutions, divisor: int, what: str, parameter: str) -> int:
    """The attention side ``max(resolutions) // divisor`` (16 for SD at 512 px with divisor 4).

    SD 1.x/2.x at 512 px has attention at 64/32/16/8; the references read CA at 16 = 64/4 and
    SA at 32 = 64/2. Expressing that as a fraction of the finest side keeps the methods
    working for other image sizes and for the bundled toy model (32/16/8). Where the model
    has no attention at that side the error names ``parameter``, the method's field to set.
    """
    r = finest(resolutions) // divisor
    if r not in resolutions:
        raise ValueError(
            f"{what} needs attention at side {r} (= finest {finest(resolutions)} / {divisor}); "
            f"the model has {sorted(resolutions)}. Set the method's {parameter} to one of "
            f"them (methods.get(name, {parameter}=...), or --param {parameter}=... on the "
            "command line)."
        )
    return r


def nearest_side(have: tuple[int, ...], target: int) -> int:
    """The side in ``have`` closest to ``target`` by factors of two; on a tie, the finer.

    >>> nearest_side((8, 16), 4), nearest_side((8, 32), 16)
    (8, 32)
    """
    return min(have, key=lambda r: (abs(math.log2(r / max(target, 1))), -r))


def check_unit(name: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def check_thresholds(fg: float, ignore: float | None, fg_name: str = "fg_threshold") -> None:
    """``fg`` in [0, 1] and ``ignore`` in [0, fg] or None; errors name the config's fields."""
    check_unit(fg_name, fg)
    check_unit("ignore_threshold", ignore)
    if ignore is not None and ignore > fg:
        raise ValueError(f"ignore_threshold ({ignore}) must not exceed {fg_name} ({fg})")


def _fits(value, kind) -> bool:
    """Whether ``value`` is of the annotated type ``kind`` (the few forms method configs use)."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, k) for k in typing.get_args(kind))
    if origin is typing.Literal:
        return value in typing.get_args(kind)
    if origin is tuple:
        (item, _) = typing.get_args(kind)
        return isinstance(value, tuple) and all(_fits(v, item) for v in value)
    if kind is type(None):
        return value is None
    if kind is float:  # an int is a number too; a bool, NaN or infinity is not
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _describe(kind) -> str:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(k) for k in typing.get_args(kind))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(kind))
    if origin is tuple:
        plural = {float: "numbers", int: "integers", str: "strings"}
        return f"a list of {plural.get(typing.get_args(kind)[0], 'values')}"
    names = {float: "a finite number", int: "an integer", str: "a string", type(None): "None"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def check_fields(cfg) -> None:
    """Every field of the frozen config ``cfg`` holds a value of its annotated type.

    Raises:
      ValueError: naming the field, what it takes and what it got (``beta=nan``, ``power="4"``).

    >>> from jaxmask.methods.ca import CAConfig
    >>> CAConfig(upsample="nearest")
    Traceback (most recent call last):
    ...
    ValueError: upsample must be one of 'bilinear', 'bicubic', 'bicubic_cv2', got 'nearest'
    """
    hints = typing.get_type_hints(type(cfg))
    for field in dataclasses.fields(cfg):
        value, kind = getattr(cfg, field.name), hints[field.name]
        if not _fits(value, kind):
            raise ValueError(f"{field.name} must be {_describe(kind)}, got {value!r}")


def cross_sides(maps: AttentionMaps) -> tuple[int, ...]:
    return tuple(sorted(maps.cross))
