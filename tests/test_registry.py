"""The strategy and method registries: every built-in is registered once, and a name cannot be taken twice."""

import pytest

from s2ft.methods import METHODS, get_method
from s2ft.registry import STRATEGIES, Registry
from s2ft.selection import register


def test_a_second_registration_of_a_name_is_refused():
    registry = Registry("widget")
    registry.register("a")(1)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        registry.register("a")(2)
    assert registry["a"] == 1 and list(registry) == ["a"] and len(registry) == 1


def test_an_unknown_name_lists_the_registered_ones():
    registry = Registry("widget")
    registry.register("a")(1)
    with pytest.raises(KeyError, match="unknown widget 'b'; registered: a"):
        registry["b"]


def test_builtin_strategies_cannot_be_replaced():
    assert list(STRATEGIES) == ["random", "weight", "activation", "weight_activation", "gradient"]
    with pytest.raises(ValueError, match="strategy 'random' is already registered"):
        register("random")(lambda *args, **kwargs: {})


def test_every_method_is_registered_under_its_own_name():
    assert sorted(METHODS) == ["dora", "full", "lora", "none", "s2ft", "spft"]
    assert all(METHODS[name].name == name for name in METHODS)
    assert [name for name in METHODS if not METHODS[name].trains] == ["none"]
    with pytest.raises(ValueError, match=r"unknown method 'qlora'; choose one of \['dora'"):
        get_method("qlora")
