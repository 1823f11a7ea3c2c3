"""Mappings for tests, derived from the example that ships with the product.

The example maps all three platforms; most scenarios need two, and deals mode needs the deal
stages the example gives in comments.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from pathlib import Path

from bridge.mapping import StatusMapping, parse_mapping
from bridge.platforms import PLATFORMS

EXAMPLE = Path(__file__).parents[1] / "bridge" / "mapping.example.toml"
_BITRIX_LINE = re.compile(r'^bitrix24 = \{ target = "([^"]+)" \}.*deals: "([^"]+)"', re.M)


def mapping_text(
    platforms: Iterable[str] = ("shoptet", "metakocka"), bitrix_mode: str = "orders"
) -> str:
    text = EXAMPLE.read_text("utf-8")
    if bitrix_mode == "deals":
        text = _BITRIX_LINE.sub(lambda m: f'bitrix24 = {{ target = "{m.group(2)}" }}', text)
    keep = set(platforms)
    lines = [
        line
        for line in text.splitlines()
        if not any(line.startswith(f"{p} = ") for p in PLATFORMS if p not in keep)
    ]
    return "\n".join(lines) + "\n"


def mapping(
    platforms: Iterable[str] = ("shoptet", "metakocka"), bitrix_mode: str = "orders"
) -> StatusMapping:
    return parse_mapping(tomllib.loads(mapping_text(platforms, bitrix_mode)), PLATFORMS)


def mapping_file(
    folder: Path, platforms: Iterable[str] = ("shoptet", "metakocka"), bitrix_mode: str = "orders"
) -> Path:
    path = folder / "bridge.toml"
    path.write_text(mapping_text(platforms, bitrix_mode), "utf-8")
    return path
