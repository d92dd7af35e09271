"""``pipeline.registry.Registry``: register, create, unknown names listing the valid ones, duplicates refused."""

from __future__ import annotations

import pytest

from pipeline.registry import Registry, UnknownNameError


def _registry() -> Registry:
    reg: Registry = Registry("widget")

    @reg.register("b_square")
    def square(*, x: int) -> int:
        return x * x

    @reg.register("a_neg")
    class Neg:
        def __init__(self, x: int) -> None:
            self.value = -x

    return reg


def test_register_returns_the_constructor_unchanged() -> None:
    reg: Registry = Registry("thing")

    def f() -> int:
        return 1

    assert reg.register("f")(f) is f


def test_create_passes_keyword_arguments() -> None:
    reg = _registry()
    assert reg.create("b_square", x=3) == 9
    assert reg.create("a_neg", x=2).value == -2
    assert reg.get("b_square")(x=4) == 16


def test_names_are_sorted_and_iterable() -> None:
    reg = _registry()
    assert reg.names() == ["a_neg", "b_square"]
    assert list(reg) == ["a_neg", "b_square"]
    assert "a_neg" in reg and "c" not in reg


def test_unknown_name_lists_valid_names() -> None:
    reg = _registry()
    with pytest.raises(UnknownNameError) as err:
        reg.create("square", x=1)
    assert str(err.value) == "unknown widget 'square'; valid names: a_neg, b_square"
    assert isinstance(err.value, ValueError)  # callers may catch ValueError
    with pytest.raises(UnknownNameError, match="valid names: a_neg, b_square"):
        reg.get("nope")


def test_duplicate_registration_is_refused() -> None:
    reg = _registry()
    with pytest.raises(KeyError, match="widget 'a_neg' is already registered"):
        reg.register("a_neg")(lambda: None)
    assert reg.create("a_neg", x=1).value == -1  # the first entry is kept


def test_name_is_positional_only() -> None:
    """``create(name, /, **kw)``: a constructor may itself take a ``name`` keyword."""
    reg: Registry = Registry("thing")
    reg.register("named")(lambda *, name: name)
    assert reg.create("named", name="inner") == "inner"


def test_empty_registry_error() -> None:
    with pytest.raises(UnknownNameError, match="unknown gadget 'x'; valid names: $"):
        Registry("gadget").create("x")
