import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from evpretrain.config import (
    ConfigError,
    from_mapping,
    load_section,
    load_yaml,
    optional_section,
    section,
    to_mapping,
)


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
        ({"name": "x", "inner": {"rate": math.inf}}, r"s\.inner\.rate: expected a finite number, got inf$"),
        ({"name": "x", "inner": {"rate": -math.inf}}, r"s\.inner\.rate: expected a finite number, got -inf$"),
        ({"name": "x", "pair": [0, math.nan]}, r"s\.pair\[1\]: expected a finite number, got nan$"),
        ({"name": "x", "pair": [10**400, 1]}, r"s\.pair\[0\]: expected a finite number, got 1000"),
        ({"name": "x", "inner": []}, r"s\.inner: expected a mapping, got \[\]$"),
        ({"name": "x", "inner": 3}, r"s\.inner: expected a mapping, got 3$"),
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


STUDY = {"model": {"outer": {"name": "x", "inner": {"mode": "b"}}, "flag": 3, "empty": None}}


def test_load_section_builds_the_dataclass_at_a_dotted_key():
    assert load_section(Outer, STUDY, "model.outer") == Outer("x", inner=Inner(mode="b"))


@pytest.mark.parametrize(
    "dotted, message",
    [
        ("model.inner", r"config has no section 'model\.inner'$"),
        ("train.outer", r"config has no section 'train\.outer' \(no 'train'\)"),
        ("model.flag", r"config section 'model\.flag' must be a mapping, got int"),
        ("model.flag.outer", r"config section 'model\.flag' must be a mapping, got int"),
        ("model.empty", r"config section 'model\.empty' must be a mapping, got NoneType"),
    ],
)
def test_load_section_names_a_missing_or_non_mapping_section(dotted, message):
    with pytest.raises(ConfigError, match=message):
        load_section(Outer, STUDY, dotted)


def test_load_section_names_an_unknown_key_of_a_nested_section_by_its_full_path():
    study = {"model": {"outer": {"name": "x", "inner": {"mode": "a", "rte": 2.0}}}}
    with pytest.raises(ConfigError, match=r"model\.outer\.inner: unknown key\(s\) \['rte'\]"):
        load_section(Outer, study, "model.outer")


def test_optional_section_is_none_where_left_out_and_strict_where_present():
    assert optional_section(STUDY, "model.outer") == STUDY["model"]["outer"]
    assert optional_section(STUDY, "model.absent") is None
    assert optional_section(STUDY, "data.convert.mvsec") is None  # no 'data' at all
    assert optional_section(STUDY, "model.empty") is None  # `empty:` with nothing after it in YAML
    assert optional_section(STUDY, "model.empty.deeper") is None
    with pytest.raises(ConfigError, match=r"config section 'model\.flag' must be a mapping, got int"):
        optional_section(STUDY, "model.flag")
    with pytest.raises(ConfigError, match=r"config section 'model\.flag' must be a mapping, got int"):
        optional_section(STUDY, "model.flag.deeper")


@dataclass(frozen=True)
class Checked:
    low: float = 0.0

    def __post_init__(self) -> None:
        if self.low < 0:
            raise ConfigError(f"other.key: low must be >= 0, got {self.low}")  # names its key itself
        if self.low > 1:
            raise ValueError(f"low must be <= 1, got {self.low}")


def test_a_check_of_the_dataclass_is_prefixed_by_the_section_unless_it_names_its_key():
    with pytest.raises(ConfigError, match=r"^s: low must be <= 1, got 2\.0$"):
        from_mapping(Checked, {"low": 2}, "s")
    with pytest.raises(ConfigError, match=r"^other\.key: low must be >= 0, got -1\.0$"):
        from_mapping(Checked, {"low": -1}, "s")
