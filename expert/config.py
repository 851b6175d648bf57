"""Typed, frozen stage configs.

Every stage has one config class derived from `StageConfig`: unknown keys are rejected
(with a "did you mean"), values are validated at construction, and all problems are
reported at once in a `ConfigError` that names each bad field. The canonical JSON of a
config is what goes into the stage's cache key.
"""

from __future__ import annotations

import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from expert.errors import ConfigError, did_you_mean

C = TypeVar("C", bound="StageConfig")


class StageConfig(BaseModel):
    """Base class of every stage config: frozen, strict about unknown keys."""

    # No inf or NaN: `learning_rate: .inf` would pass `gt=0` and fail hours later.
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any] | None, where: str = "", source: str = "") -> C:
        """Validate `data`; raise `ConfigError` listing every problem.

        `where` is the section the data is (fields are named `where.field`, as the user writes
        them in a pipeline config); `source` is where it came from (a file, a command), named once.
        """
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(cls, exc, where, source)) from None

    def canonical(self) -> dict[str, Any]:
        """JSON-ready dict of every field (defaults included): the cache-key input.

        Nested configs give their own canonical form, so a section that leaves a field out
        of its key (EvalConfig.runner) leaves it out of every key that includes the section.
        """
        out = self.model_dump(mode="json")
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, StageConfig):
                out[name] = value.canonical()
        return out


def format_validation_error(cls: type[BaseModel], exc: ValidationError, where: str = "", source: str = "") -> str:
    problems: list[str] = []
    branches: dict[str, list[dict]] = {}  # field -> its errors, one per member of a union type
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not _is_union_member(p)]
        field = ".".join(([where] if where else []) + loc) or where or cls.__name__
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(cls, err["loc"][:-1])
            msg = f"unknown key '{field}'" + did_you_mean(loc[-1], allowed)
            problems.append(msg + f"; allowed keys: {', '.join(sorted(allowed))}")
        elif field in branches:
            branches[field].append(err)
        else:
            branches[field] = [err]
            problems.append(field)  # a placeholder: filled in below, once every branch is in
    for i, item in enumerate(problems):
        if item in branches:
            problems[i] = _field_problem(item, branches[item])
    place = source or where
    head = f"invalid {cls.__name__}" + (f" in '{place}'" if place else "")
    return head + ": " + "; ".join(problems)


def _field_problem(field: str, errors: list[dict]) -> str:
    """One field's problem: pydantic's message without its "Value error, " prefix, and a value
    that fits no member of a union type said once ("a valid list or 'all-linear'")."""
    first = errors[0]
    if first["type"] in ("model_type", "dict_type") and first.get("input", "") is None:
        return f"'{field}' is empty (a section with nothing under it): give its fields, or leave it out for its defaults"
    wants = []
    for err in errors:
        text = err["msg"].removeprefix("Value error, ")
        if wants and text.startswith("Input should be "):
            text = text.removeprefix("Input should be ")
        if text not in wants:
            wants.append(text)
    msg = f"'{field}': " + " or ".join(wants)
    if "input" in first and first["type"] != "missing":
        msg += f" (got {first['input']!r})"
    return msg


def _is_union_member(part: Any) -> bool:
    """pydantic names the member of a union type a value failed in the error's location
    (`list[str]`, `literal['all-linear']`, `function-after[...]`): no field is named so."""
    return isinstance(part, str) and (any(c in part for c in "[]-") or part in _TYPE_NAMES)


_TYPE_NAMES = {"int", "float", "str", "bool", "none", "list", "dict"}


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (possibly nested) model that `loc` points into."""
    model: Any = cls
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = _model_in(field.annotation)
    return list(getattr(model, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    """The config class an annotation holds: itself, or the one inside `X | None`."""
    if hasattr(annotation, "model_fields"):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None
