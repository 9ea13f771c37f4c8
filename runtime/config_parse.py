"""One rule for the configuration readers (``*_config.py``, snapshot config files): whatever a file holds, reading
it either gives a configuration that validates or raises ValueError saying what was wrong — a value of the wrong
type (a list where a number belongs, a string where a table belongs) included, which Python reports as TypeError,
KeyError, AttributeError or OverflowError from deep inside the conversion."""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

__all__ = ["malformed_is_value_error"]

F = TypeVar("F", bound=Callable[..., Any])


def malformed_is_value_error(fn: F) -> F:
    """Wraps a ``from_dict``-style reader: TypeError, KeyError, AttributeError, OverflowError and RecursionError
    raised while converting become ValueError naming the reader and the cause."""
    @functools.wraps(fn)
    def read(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (TypeError, KeyError, AttributeError, OverflowError, RecursionError) as e:
            owner = fn.__qualname__.rsplit(".", 1)[0]
            raise ValueError(f"{owner}: malformed configuration ({type(e).__name__}: {e})") from e
    return read  # type: ignore[return-value]
