"""A bundle's configs read from `bundle_root` by the tools that build parts of them outside a bundle run (benchmark,
report timing, head checks, failure set): MONAI's `%file#id` macros resolve file names from the working directory."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from monai.bundle import ConfigParser


def load(bundle_root: str, config_files: Sequence[str], overrides: dict[str, Any] | None = None) -> ConfigParser:
    """The parsed chain of `config_files` (relative to `bundle_root`) with `bundle_root` and `overrides` set.

    Only what is asked for (`get_parsed_content`) is built: a training config's dataset is never read.
    """
    parser = ConfigParser()
    parser.read_config([os.path.join(bundle_root, name) for name in config_files])
    parser.update({"bundle_root": bundle_root, **(overrides or {})})
    parser.parse()
    return parser
