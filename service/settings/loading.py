"""Reading the settings at start-up: :func:`load_settings` and its one-line :class:`InvalidSettingsError`."""

from __future__ import annotations

import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import SettingsError

from service.settings.groups import GROUPS
from service.settings.model import GunicornSettings, Settings

M = TypeVar("M", bound=BaseModel)


class InvalidSettingsError(ValueError):
    """Settings that cannot be used. ``str()`` is one line: each bad variable, what it was given (for a secret only
    its length) and the form it expects."""


def load_settings(overrides: Mapping[str, object] | None = None, *, flags: Mapping[str, str] | None = None) -> Settings:
    """:class:`Settings` from the environment and ``overrides`` (command-line values), or
    :class:`InvalidSettingsError` with a one-line explanation instead of pydantic's multi-line report.

    ``flags`` names the command-line option behind an override (``{"port": "--port"}``) for the message.
    """
    return _load(Settings, overrides, flags)


def load_gunicorn_settings() -> GunicornSettings:
    """:class:`GunicornSettings` from the environment, or :class:`InvalidSettingsError` (one line)."""
    return _load(GunicornSettings, None, None)


def _load(model: type[M], overrides: Mapping[str, object] | None, flags: Mapping[str, str] | None) -> M:
    given = dict(overrides or {})
    try:
        return model(**given)
    except ValidationError as err:
        raise InvalidSettingsError(_describe(model, err, given, flags or {})) from err
    except SettingsError as err:  # a value pydantic-settings decodes itself (a field without NoDecode) was malformed
        match = re.search(r'field "(\w+)"', str(err))
        name = env_name(match.group(1)) if match else "(unknown)"
        raise InvalidSettingsError(f"invalid setting {name}: it cannot be decoded") from err


def env_name(path: str) -> str:
    """The variable of a setting: ``port`` -> ``CXR_PORT``, ``audit.url`` -> ``CXR_AUDIT_URL``."""
    return "CXR_" + path.replace(".", "_").upper()


def field_info(model: type[BaseModel], path: str) -> FieldInfo | None:
    """The field behind ``port`` or ``audit.url`` (a group's field), or None."""
    *groups, name = path.split(".")
    for group in groups:
        info = model.model_fields.get(group)
        annotation = info.annotation if info is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model.model_fields.get(name)


def _describe(
    model: type[BaseModel], err: ValidationError, overrides: Mapping[str, object], flags: Mapping[str, str]
) -> str:
    environ = {name.lower(): value for name, value in os.environ.items()}  # pydantic-settings ignores the case
    problems: dict[str, str] = {}
    for error in err.errors(include_url=False):
        loc = [str(part) for part in error.get("loc", ())]
        # A group's field is two parts deep (audit, url); a list's item adds its index.
        field = ".".join(loc[:2] if len(loc) > 1 and loc[0] in GROUPS else loc[:1])
        if field in problems:
            continue  # one line per variable: its first problem (a list's items may each fail)
        info = field_info(model, field) if field else None
        if info is None:  # a rule across settings (no field), or a keyword from code that is no setting
            problems[field] = f"invalid settings: {_reason(error)}" if not field else f"unknown setting {field}"
            continue
        given = _given_in(overrides, field)
        if given is not _ABSENT:
            name, raw = flags.get(field, field), given
        else:
            name = env_name(field)
            raw = environ.get(name.lower(), error.get("input"))
        expected = _reason(error) if error.get("type") in ("value_error", "assertion_error") else _expected(info)
        problems[field] = f"invalid setting {name}: {expected}, got {_given(field, info, raw)}"
    return "; ".join(problems.values()) or "invalid settings"


_ABSENT = object()


def _given_in(overrides: Mapping[str, object], path: str) -> object:
    """What the code gave for ``port`` or ``audit.url`` (a group given as a mapping), or ``_ABSENT``."""
    value: object = overrides
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def setting_fields() -> dict[str, FieldInfo]:
    """Every setting of the app by its path (``port``, ``audit.url``): the groups' fields in place of the groups."""
    fields: dict[str, FieldInfo] = {}
    for name, info in Settings.model_fields.items():
        if name in GROUPS:
            fields.update({f"{name}.{field}": sub for field, sub in GROUPS[name].model_fields.items()})
        else:
            fields[name] = info
    return fields


def variable_names() -> frozenset[str]:
    """Every ``CXR_`` variable a setting reads: the app's (groups included) and Gunicorn's."""
    return frozenset(env_name(path) for path in [*setting_fields(), *GunicornSettings.model_fields])


def _reason(error: Any) -> str:
    """A validator's own message, without pydantic's "Value error, " prefix."""
    message = str(error.get("msg", "invalid"))
    return message.split(", ", 1)[1] if message.startswith(("Value error, ", "Assertion failed, ")) else message


def is_secret(field: str, info: FieldInfo) -> bool:
    return "key" in field or "SecretStr" in repr(info.annotation)


def _given(field: str, info: FieldInfo, raw: object) -> str:
    """What the variable held, for the message: never a secret's value, only its length."""
    if is_secret(field, info):
        if isinstance(raw, str):
            return f"a value of {len(raw)} characters"
        return f"a {type(raw).__name__} value"
    text = repr(raw)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _expected(info: FieldInfo) -> str:
    """The form a field takes, in words: ``an integer from 1 to 100``, ``one of flag, reject``."""
    annotation = without_none(info.annotation)
    origin = get_origin(annotation)
    if origin is Literal:
        return "expected one of " + ", ".join(str(choice) for choice in get_args(annotation))
    if origin is list:
        return "expected a JSON list or comma-separated values"
    if annotation is bool:
        return "expected true or false"
    if annotation is Path:
        return "expected a path"
    if annotation in (int, float):
        noun = "an integer" if annotation is int else "a number"
        return f"expected {noun}{_bounds(info)}"
    return "expected a string"


def _bounds(info: FieldInfo) -> str:
    low: tuple[str, object] | None = None
    high: tuple[str, object] | None = None
    for item in info.metadata:
        if isinstance(item, annotated_types.Ge):
            low = ("ge", item.ge)
        elif isinstance(item, annotated_types.Gt):
            low = ("gt", item.gt)
        elif isinstance(item, annotated_types.Le):
            high = ("le", item.le)
        elif isinstance(item, annotated_types.Lt):
            high = ("lt", item.lt)
    if low and high and low[0] == "ge" and high[0] == "le":
        return f" from {low[1]} to {high[1]}"
    words = {"ge": "at least", "gt": "greater than", "le": "at most", "lt": "less than"}
    parts = [f"{words[bound[0]]} {bound[1]}" for bound in (low, high) if bound is not None]
    text = " and ".join(parts)
    return f" of {text}" if text.startswith("at ") else f" {text}" if text else ""


def without_none(annotation: Any) -> Any:
    """``int`` for ``int | None``: the type a set variable takes."""
    if get_origin(annotation) in (Union, types.UnionType):
        return next(arg for arg in get_args(annotation) if arg is not type(None))
    return annotation
