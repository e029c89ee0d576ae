"""Rewrites the README's settings table from the declarations in common/settings (`make
settings-table`); tests/unit/test_settings_table.py fails while the two differ."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.settings import settings_table

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- settings table: made from common/settings by `make settings-table`; a test keeps it equal -->\n"
END = "<!-- end of settings table -->\n"


def readme_table(text: str) -> str:
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)]


def main() -> int:
    text = README.read_text()
    README.write_text(text.replace(readme_table(text), settings_table(), 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
