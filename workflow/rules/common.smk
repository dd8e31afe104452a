# Helpers shared by the rules: paths and config lookups live here, so that rules stay thin.
from pathlib import Path

import yaml

RESULTS = Path(config.get("results", "results"))
DEMO_SPLITS = [split for split, n in config["data"]["demo"]["samples"].items() if n > 0]


def demo_stores():
    return expand(RESULTS / "data/demo/{split}.h5", split=DEMO_SPLITS)


def config_section_yaml(dotted):
    """The config section at ``dotted`` (e.g. ``data.demo``), nested under its keys, as YAML text."""
    keys = dotted.split(".")
    node = config
    for key in keys:
        node = node[key]
    for key in reversed(keys):
        node = {key: node}
    return yaml.safe_dump(node, sort_keys=True)
