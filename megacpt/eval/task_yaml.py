"""lm-eval task YAML read safely: plain data only, plus lm-eval's `!function module.name` tag,
which is read as the plain string it names (never imported, never run)."""

from __future__ import annotations

import yaml


class TaskLoader(yaml.SafeLoader):
    """SafeLoader plus lm-eval's `!function` tag, read as a string."""


TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def parse_task_yaml(stream):
    """The YAML document in `stream` (text or an open file); raises yaml.YAMLError when malformed."""
    return yaml.load(stream, Loader=TaskLoader)  # a SafeLoader subclass: only plain data is constructed
