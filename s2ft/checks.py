"""Value checks shared by the run's config validation (`s2ft.run_config`) and the library's checks of its arguments."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable


def is_positive_int(value) -> bool:
    """An int >= 1 (a bool is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_number(value) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_positive_int(name: str, value) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is an int >= 1 (a library function's count argument)."""
    if not is_positive_int(value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def did_you_mean(key: str, valid: Iterable[str], prefix: str = "") -> str:
    """ "did you mean X?" for the closest of `valid` to `key`, else the list of valid keys."""
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        return f"did you mean {prefix}{close[0]}?"
    return f"valid keys{f' of {prefix[:-1]}' if prefix else ''}: {', '.join(valid)}"
