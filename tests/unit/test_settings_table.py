"""Each setting is declared once: the flags, --help, the file's known keys and the README's
table all come from the declaration."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from pathlib import Path

from common.settings import SPECS, Settings, add_arguments, settings_table
from tests.conftest import REPO


def _script() -> object:
    spec = importlib.util.spec_from_file_location("settings_table", REPO / "scripts" / "settings_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_table_is_the_declarations() -> None:
    script = _script()
    table = script.readme_table(Path(script.README).read_text())  # type: ignore[attr-defined]
    assert table == settings_table(), "run `make settings-table`"


def test_every_field_but_the_sharing_section_is_a_declared_setting() -> None:
    names = {f.name for f in dataclasses.fields(Settings)}
    assert names - {s.name for s in SPECS} == {"sharing"}
    assert len({s.env for s in SPECS}) == len(SPECS), "one environment variable per setting"


def test_every_setting_has_a_flag_in_help_with_its_environment_variable() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = parser.format_help()
    for spec in SPECS:
        assert spec.flags[0] in text and (spec.env is None or spec.env in text), spec.name
