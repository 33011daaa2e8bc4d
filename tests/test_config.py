import pytest
from omegaconf import OmegaConf

from s2ft.config import COMPONENTS, S2FTConfig, S2FTConfigError


def problems(**fields) -> list[str]:
    """The listed problems of an S2FTConfig built from `fields` (each on its own '  - ' line)."""
    with pytest.raises(S2FTConfigError) as err:
        S2FTConfig(**fields)
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid S2FTConfig:"
    return [line.removeprefix("  - ") for line in lines[1:]]


def test_valid_configs():
    cfg = S2FTConfig(ratios={"down": 0.1, "o": 0.5}, strategy="gradient", order="small", allocation="global")
    assert cfg.components == ["o", "down"]  # COMPONENTS order, whatever the dict order
    assert S2FTConfig(target_params=1000).components == ["o", "down"]
    assert S2FTConfig(target_params=0.01, target_split={"q": 0.25, "up": 0.75}).components == ["q", "up"]
    assert S2FTConfig(ratios=dict.fromkeys(COMPONENTS, 1.0), layers=[0, 3], layout="permuted").layers == [0, 3]


def test_hydra_containers_become_plain():
    cfg = S2FTConfig(ratios=OmegaConf.create({"o": 0.5}), layers=OmegaConf.create([1]))
    assert type(cfg.ratios) is dict and type(cfg.layers) is list


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"ratios": {"mlp": 0.1}}, "unknown component 'mlp'; valid components: q, k, v, o, gate, up, down"),
        ({"ratios": {"o": 0.0}}, "ratios['o'] must be a number in (0, 1], got 0.0"),
        ({"ratios": {"o": 1.5}}, "ratios['o'] must be a number in (0, 1], got 1.5"),
        ({"ratios": {"o": "0.1"}}, "ratios['o'] must be a number in (0, 1], got '0.1'"),
        ({"ratios": {}}, "ratios must be a non-empty dict"),
        ({}, "give exactly one of ratios or target_params (neither given)"),
        ({"ratios": {"o": 0.1}, "target_params": 10}, "give exactly one of ratios or target_params (both given)"),
        ({"target_params": 0}, "target_params must be a parameter count (int >= 1)"),
        ({"target_params": 1.0}, "or a fraction of all parameters (float in (0, 1)), got 1.0"),
        ({"target_params": True}, "got True"),
        ({"ratios": {"o": 0.1}, "target_split": {"o": 1.0}}, "target_split is only used with target_params"),
        ({"target_params": 10, "target_split": {"o": 0.5, "down": 0.4}}, "target_split shares must sum to 1, got 0.9"),
        ({"target_params": 10, "target_split": {"attn": 1.0}}, "target_split: unknown component 'attn'"),
        ({"ratios": {"o": 0.1}, "strategy": "fisher"}, "unknown strategy 'fisher'; valid: random, weight, activation"),
        ({"ratios": {"o": 0.1}, "order": "top"}, "unknown order 'top'; valid: large, small"),
        ({"ratios": {"o": 0.1}, "allocation": "layer"}, "unknown allocation 'layer'; valid: uniform, global"),
        ({"ratios": {"o": 0.1}, "layout": "dense"}, "unknown layout 'dense'; valid: gather, permuted"),
        ({"ratios": {"o": 0.1}, "seed": 1.5}, "seed must be an int, got 1.5"),
        ({"ratios": {"o": 0.1}, "layers": [0, -1]}, "layers must be a non-empty list of layer indices >= 0"),
        ({"ratios": {"o": 0.1}, "layers": [1, 1]}, "layers has duplicates: [1, 1]"),
        ({"ratios": {"o": 0.1}, "exclude": 3}, "exclude must be an adapter, a selection dict or an adapter path"),
    ],
)
def test_each_bad_field_is_named(fields, expected):
    found = problems(**fields)
    assert len(found) == 1 and expected in found[0], found


def test_validate_reports_every_problem_at_once():
    found = problems(ratios={"o": 2, "ffn": 0.1}, strategy="nope", order="up", allocation="x", layout="y")
    assert len(found) == 6
    for fragment in ("ratios['o']", "'ffn'", "strategy 'nope'", "order 'up'", "allocation 'x'", "layout 'y'"):
        assert sum(fragment in line for line in found) == 1, (fragment, found)


def test_validate_rechecks_after_mutation():
    cfg = S2FTConfig(ratios={"o": 0.1})
    cfg.order = "middle"
    cfg.ratios["gate"] = -1
    with pytest.raises(S2FTConfigError) as err:
        cfg.validate()
    assert "unknown order 'middle'" in str(err.value) and "ratios['gate']" in str(err.value)
