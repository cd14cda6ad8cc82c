"""Registry and Option: registration rules, accepted values, and the messages of rejected ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdgrad import validation as V
from cdgrad.experiments.registry import Option, Param, Registry


def test_registry_order_lookup_and_errors():
    r: Registry[int] = Registry("widget")
    r.register("b", 2, builtin=True)
    r.register("a", 1)
    assert r.names() == ("b", "a") and list(r) == ["b", "a"] and len(r) == 2
    assert r.get("a") == 1 and r["b"] == 2 and r.index("a") == 1 and "a" in r and "c" not in r
    assert dict(r.items()) == {"b": 2, "a": 1} and list(r.values()) == [2, 1]
    with pytest.raises(ValueError, match=r"widget must be one of \('b', 'a'\), got 'c'"):
        r.get("c")
    with pytest.raises(TypeError, match="widget must be one of"):
        r.get(3)
    r.register("a", 10)  # a name that is not built in may be registered again
    assert r.get("a") == 10
    with pytest.raises(ValueError, match="built in"):
        r.register("b", 3)
    with pytest.raises(ValueError, match="built in"):
        r.unregister("b")
    r.unregister("a")
    r.unregister("never-there")
    assert r.names() == ("b",)
    for bad in ("", " x", "two words", "a,b", "k=v"):
        with pytest.raises(ValueError, match="non-empty word"):
            r.register(bad, 0)
    with pytest.raises(TypeError, match="widget name must be a str"):
        r.register(5, 0)


@pytest.mark.parametrize(
    "option, text",
    [
        (Option(help="", minimum=0.0), ">= 0"),
        (Option(help="", minimum=0.0, exclusive_minimum=True), "> 0"),
        (Option(help="", minimum=0.0, maximum=1.0, exclusive_maximum=True), "in [0, 1)"),
        (Option(help="", minimum=-1.0, maximum=2.5, exclusive_minimum=True), "in (-1, 2.5]"),
        (Option(help="", maximum=3.0), "<= 3"),
        (Option(help=""), ""),
    ],
)
def test_range_text(option, text):
    assert option.range_text() == text


def inside(option: Option, x: float) -> bool:
    """Membership written out from the declaration, independently of the code under test."""
    if not math.isfinite(x):
        return False
    if option.minimum is not None and (x <= option.minimum if option.exclusive_minimum else x < option.minimum):
        return False
    return option.maximum is None or (x < option.maximum if option.exclusive_maximum else x <= option.maximum)


OPTIONS = [
    Option(help="", minimum=0.0),
    Option(help="", minimum=0.0, exclusive_minimum=True),
    Option(help="", minimum=0.0, maximum=1.0, exclusive_maximum=True),
    Option(help="", minimum=-1.0, maximum=1.0, exclusive_minimum=True),
    Option(help=""),
]


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(OPTIONS),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, -1.0, -0.0])),
)
def test_float_options_accept_exactly_their_interval(option, x):
    if inside(option, x):
        assert option.check(x, "opt", float) == x
        assert option.check(np.float64(x), "opt", float) == x
    else:
        with pytest.raises(ValueError, match=r"^opt must be a finite real number"):
            option.check(x, "opt", float)


@settings(max_examples=100, deadline=None)
@given(st.integers(-5, 5), st.integers(-(2**70), 2**70))
def test_int_options(lo, x):
    option = Option(help="", minimum=lo)
    if x >= lo:
        assert option.check(x, "n", int) == x and option.check(np.int64(max(min(x, 2**62), lo)), "n", int) >= lo
    else:
        with pytest.raises(ValueError, match=rf"^n must be an int >= {lo}, got {x}$"):
            option.check(x, "n", int)


def test_wrong_types_are_type_errors():
    number = Option(help="", minimum=0.0)
    for bad in ("1", None, True, [1.0], 1 + 0j):
        with pytest.raises(TypeError, match="opt must be a finite real number >= 0"):
            number.check(bad, "opt", float)
    for bad in (1.5, "2", True):
        with pytest.raises(TypeError, match="n must be an int"):
            Option(help="").check(bad, "n", int)
    with pytest.raises(TypeError, match="flag must be True or False"):
        Option(help="").check(1, "flag", bool)
    with pytest.raises(TypeError, match="name must be a string"):
        Option(help="").check(3, "name", str)
    with pytest.raises(TypeError, match="mode must be one of"):
        Option(help="", choices=("a", "b")).check(3, "mode", str)


def test_choices_static_and_read_when_checked():
    names = ["a"]
    live = Option(help="", choices=lambda: tuple(names))
    assert live.check("a", "kind", str) == "a"
    with pytest.raises(ValueError, match=r"kind must be one of \('a',\), got 'b'"):
        live.check("b", "kind", str)
    names.append("b")
    assert live.check("b", "kind", str) == "b" and live.accepted_choices() == ("a", "b")
    assert Option(help="", choices=("x",)).accepted_choices() == ("x",) and Option(help="").accepted_choices() is None


def test_huge_ints_for_float_options_are_value_errors():
    with pytest.raises(ValueError, match="x must be a finite real number"):
        V.check_interval(10**400, "x")
    assert V.check_interval(np.float32(0.5), "x", minimum=0.0, maximum=1.0) == 0.5


def test_param_but_and_resolve():
    p = Param(name="direction", type=str, choices=("a", "b", "c"), help="h")
    q = p.but(choices=("a",), default="a")
    assert (q.name, q.type, q.help, q.choices, q.default) == ("direction", str, "h", ("a",), "a")
    assert q.resolve(None) == "a" and q.resolve("b") == "b" and p.resolve(None) is None
    with pytest.raises(ValueError, match="name or type"):
        p.but(name="other")
