"""Small pieces the methods share: resolution choice and config validation."""

import math

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


def check_thresholds(fg: float, ignore: float | None) -> None:
    check_unit("fg_threshold", fg)
    check_unit("ignore_threshold", ignore)
    if ignore is not None and ignore > fg:
        raise ValueError(f"ignore_threshold ({ignore}) must not exceed fg_threshold ({fg})")


def cross_sides(maps: AttentionMaps) -> tuple[int, ...]:
    return tuple(sorted(maps.cross))
