from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from evpretrain.config import ConfigError, from_mapping, load_yaml, section, to_mapping


@dataclass(frozen=True)
class Inner:
    rate: float = 1.0
    mode: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    name: str
    size: int = 3
    pair: tuple[float, float] = (0.0, 1.0)
    counts: dict[str, int] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    path: Path | None = None


def test_builds_nested_dataclasses_and_round_trips():
    built = from_mapping(
        Outer, {"name": "x", "size": 4, "pair": [1, 2], "counts": {"a": 1}, "inner": {"mode": "b"}}, "s"
    )
    assert built == Outer("x", 4, (1.0, 2.0), {"a": 1}, Inner(1.0, "b"))
    assert from_mapping(Outer, to_mapping(built), "s") == built


@pytest.mark.parametrize(
    "values, message",
    [
        ({"name": "x", "sise": 4}, r"s: unknown key\(s\) \['sise'\]"),
        ({"size": 4}, r"s: missing required key\(s\) \['name'\]"),
        ({"name": "x", "size": 4.5}, r"s\.size: expected an integer"),
        ({"name": "x", "size": True}, r"s\.size: expected an integer"),
        ({"name": "x", "pair": [1]}, r"s\.pair: expected 2 items"),
        ({"name": "x", "inner": {"mode": "c"}}, r"s\.inner\.mode: expected one of \['a', 'b'\]"),
        ({"name": "x", "inner": {"rate": "fast"}}, r"s\.inner\.rate: expected a number"),
        ({"name": "x", "counts": {"a": "one"}}, r"s\.counts\.a: expected an integer"),
    ],
)
def test_errors_name_the_dotted_key(values, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(Outer, values, "s")


def test_section_and_yaml_errors_name_what_is_missing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  demo: {seed: 1}\n")
    config = load_yaml(path)
    assert section(config, "data.demo") == {"seed": 1}
    with pytest.raises(ConfigError, match="no section 'data.ef'"):
        section(config, "data.ef")
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="c.yaml: expected a mapping"):
        load_yaml(path)
