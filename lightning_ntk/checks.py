"""Checks of option values shared by the config dataclasses, the pipeline and the solver: one place per
kind of value, each error naming the option, the value and what is allowed."""

from __future__ import annotations

import math
import os
from typing import Any

FORMULATIONS = ("multinomial", "ovr")


def check_count(name: str, value: Any, allow_none: bool = True, minimum: int = 1, hint: str = "") -> None:
    """An integer ≥ ``minimum`` (or None where ``allow_none``); booleans are refused. ``hint``: the other
    values allowed, for the message."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}{' or None' if allow_none else ''}{hint}, got {value!r}.")


def is_positive(value: Any) -> bool:
    """Whether ``value`` is a finite real number > 0 (booleans, strings, NaN and inf are not)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_flag(name: str, value: Any) -> None:
    """True or False, not a truthy string or number."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")


def check_choice(name: str, value: Any, choices: Any) -> None:
    """One of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {list(choices)}.")


def check_path(name: str, value: Any) -> None:
    """None or a folder path (a string or ``os.PathLike``)."""
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{name} must be a folder path (a string) or None, got {value!r}.")


def check_alpha(alpha: Any) -> None:
    if not is_positive(alpha):
        raise ValueError(
            f"alpha is an L2 penalty and must be > 0 and finite, got {alpha!r}: without it a kernel machine separates its "
            "training set and its objective has no minimum; the default is 1e-4."
        )


def check_solver_options(tolerance: Any, max_iter: Any, minimum_iterations: int = 0) -> None:
    """The solver's stopping rule: ``tolerance`` on the estimated relative gap, ``max_iter`` Newton steps."""
    if not is_positive(tolerance):
        raise ValueError(f"tolerance must be > 0 and finite (the estimated relative gap to the optimum at which the fit stops), got {tolerance!r}.")
    check_count("max_iter", max_iter, allow_none=False, minimum=minimum_iterations)
