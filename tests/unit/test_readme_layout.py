"""The README's layout table names only what is in the tree."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def expand(pattern: str) -> list[str]:
    """``a/{b,c}.py`` -> ``a/b.py``, ``a/c.py`` (each brace group in turn)."""
    parts = re.split(r"\{([^}]*)\}", pattern)
    fixed, choices = parts[0::2], [group.split(",") for group in parts[1::2]]
    return [
        "".join(itertools.chain(*zip(fixed, combo, strict=False), fixed[len(combo) :]))
        for combo in itertools.product(*choices)
    ]


def layout_rows() -> list[tuple[list[str], list[str]]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        rows.append((re.findall(r"`([^`]+)`", cells[0]), re.findall(r"`([^`]+)`", cells[1])))
    return rows


def test_expand() -> None:
    assert expand("a/{b,c}.py") == ["a/b.py", "a/c.py"]
    assert expand("t/{u,v}") == ["t/u", "t/v"] and expand("x/") == ["x/"]


def test_every_path_in_the_layout_table_exists() -> None:
    rows = layout_rows()
    assert len(rows) >= 8, rows
    for paths, mentioned in rows:
        folders = []
        for pattern in paths:
            for path in expand(pattern):
                assert (ROOT / path).exists(), f"README layout: {path} is not in the tree"
                folders.append(ROOT / path if (ROOT / path).is_dir() else (ROOT / path).parent)
        # Files and folders the description names are in one of the row's folders (or at the root).
        for name in mentioned:
            if not (name.endswith((".py", "/")) or "/" in name):
                continue
            assert any((base / name).exists() for base in [*folders, ROOT]), f"README layout: {name} ({paths})"
