"""Config files: YAML read and validated by pydantic, errors naming the file, the key path and the bad value."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from collab_ray.core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: str | Path, what: str) -> Any:
    """The YAML file at `path`; ConfigError naming `what` and the path if unreadable or invalid."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {e.strerror}") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, where: str) -> Any:
    """YAML text parsed; ConfigError naming `where` if invalid."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {e}") from None


def describe_error(err: ErrorDetails) -> str:
    """One pydantic error as `path: message (got value)`; the value once, when the message does not quote it."""
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    shown = "input" in err and not isinstance(err["input"], dict) and repr(err["input"]) not in msg
    value = f" (got {err['input']!r})" if shown else ""
    return f"{loc}: {msg}{value}" if loc else f"{msg}{value}"


def describe_errors(e: ValidationError, describe: Callable[[ErrorDetails], str] = describe_error) -> str:
    """Every error of `e` described, joined by '; '."""
    return "; ".join(describe(err) for err in e.errors())


def validate(
    model_cls: type[M],
    data: Any,
    where: str,
    expected: str = "a mapping at the top level",
    describe: Callable[[ErrorDetails], str] = describe_error,
) -> M:
    """`data` as a `model_cls`; ConfigError naming `where`, the key path and the bad value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected {expected}, got {type(data).__name__}")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: {describe_errors(e, describe)}") from None
