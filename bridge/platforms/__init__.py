"""The platform registry: one line per platform."""

from __future__ import annotations

from bridge.platforms import bitrix24, metakocka, shoptet
from bridge.platforms.base import PlatformSpec

PLATFORMS: dict[str, PlatformSpec] = {
    shoptet.SPEC.name: shoptet.SPEC,
    metakocka.SPEC.name: metakocka.SPEC,
    bitrix24.SPEC.name: bitrix24.SPEC,
}

__all__ = ["PLATFORMS", "PlatformSpec"]
