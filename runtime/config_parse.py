"""One rule for the configuration readers (``*_config.py``, snapshot config files): whatever a file holds, reading
it either gives a configuration that validates or raises ValueError saying what was wrong — a value of the wrong
type (a list where a number belongs, a string where a table belongs) included, which Python reports as TypeError,
KeyError, AttributeError or OverflowError from deep inside the conversion."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Dict, TypeVar

__all__ = ["malformed_is_value_error", "read_json_object"]

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


def read_json_object(path: Path) -> Dict[str, Any]:
    """The JSON object in the file ``path``; ValueError naming the file if it is not UTF-8 JSON holding an object
    (OSError, e.g. FileNotFoundError, passes through)."""
    try:
        with Path(path).open("r", encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not valid JSON text ({e})") from e
    except RecursionError as e:
        raise ValueError(f"{path}: JSON nested too deeply") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
