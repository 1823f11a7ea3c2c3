"""Mapping tables: native statuses <-> canonical statuses, loaded from a TOML file.

Pure: parsing and lookups only. The file format is documented in the annotated example that
ships with the product (``bridge/mapping.example.toml``) and in docs/configuration.md.

Inbound, many native statuses may map to one canonical status (``target`` plus ``also``).
Outbound, each canonical status has exactly one ``target`` per platform. Every mistake is
reported with the file, the key and what is wrong, so an operator can fix it without guessing.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bridge.platforms.base import PlatformSpec, TargetOptions

ANY = "*"


class MappingError(Exception):
    """An invalid mapping file: ``file``, ``key`` (dotted path) and ``reason``."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file, self.key, self.reason = file, key, reason
        where = f"{file}: {key}: " if key else f"{file}: "
        super().__init__(where + reason)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a canonical status goes on one platform, with its side-effect flags."""

    native: str
    options: TargetOptions


@dataclass(frozen=True, slots=True)
class CanonicalStatus:
    key: str
    rank: int
    targets: Mapping[str, Target]  # platform -> outbound target
    inbound: Mapping[str, frozenset[str]]  # platform -> native statuses that mean this


@dataclass(frozen=True)
class StatusMapping:
    statuses: Mapping[str, CanonicalStatus]
    platforms: frozenset[str]
    backward: frozenset[tuple[str, str]]  # allowed (from, to); either side may be "*"
    source: str = "<memory>"
    # Platforms by authority, most trusted first: breaks ties between equally ranked statuses.
    authority: tuple[str, ...] = ()
    # (platform, native) -> canonical: the inbound lookup, derived once from ``statuses``.
    _inbound: dict[tuple[str, str], str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[tuple[str, str], str] = {}
        for status in self.statuses.values():
            for platform, natives in status.inbound.items():
                for native in natives:
                    index[(platform, native)] = status.key
        object.__setattr__(self, "_inbound", index)

    def canonical_for(self, platform: str, native: str) -> str | None:
        """The canonical status a native status means; None if it is not mapped."""
        return self._inbound.get((platform, native))

    def target_for(self, platform: str, canonical: str) -> Target:
        return self.statuses[canonical].targets[platform]

    def rank(self, canonical: str) -> int:
        return self.statuses[canonical].rank

    def authority_index(self, platform: str) -> int:
        try:
            return self.authority.index(platform)
        except ValueError:
            return len(self.authority)

    def allows_backward(self, from_status: str, to_status: str) -> bool:
        b = self.backward
        return (from_status, to_status) in b or (ANY, to_status) in b or (from_status, ANY) in b


def load_mapping(path: str | Path, platforms: Mapping[str, PlatformSpec]) -> StatusMapping:
    """Read and validate a mapping file. Raises MappingError naming file, key and reason."""
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise MappingError(file, "", f"cannot read the file ({exc.strerror or exc})") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MappingError(file, "", "the file is not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise MappingError(file, "", f"not valid TOML: {exc}") from exc
    return parse_mapping(data, platforms, file)


def parse_mapping(
    data: Mapping[str, Any], platforms: Mapping[str, PlatformSpec], file: str = "<memory>"
) -> StatusMapping:
    def fail(key: str, reason: str) -> MappingError:
        return MappingError(file, key, reason)

    unknown = set(data) - {"statuses", "backward", "authority"}
    if unknown:
        key = sorted(unknown)[0]
        raise fail(key, "unknown key (expected authority, [statuses.<name>] and [[backward]])")
    statuses_raw = data.get("statuses")
    if not isinstance(statuses_raw, dict) or not statuses_raw:
        raise fail("statuses", "at least one [statuses.<name>] table is required")

    used_platforms: set[str] = set()
    for body in statuses_raw.values():
        if isinstance(body, dict):
            used_platforms.update(k for k in body if k != "rank")
    for platform in sorted(used_platforms):
        if platform not in platforms:
            where = next(
                f"statuses.{n}.{platform}"
                for n, b in statuses_raw.items()
                if isinstance(b, dict) and platform in b
            )
            known = ", ".join(sorted(platforms))
            raise fail(where, f"unknown platform {platform!r} (known: {known})")
    if not used_platforms:
        raise fail("statuses", "no platform has any status mapped")

    statuses: dict[str, CanonicalStatus] = {}
    seen_native: dict[tuple[str, str], str] = {}
    for name, body in statuses_raw.items():
        key = f"statuses.{name}"
        if not isinstance(body, dict):
            raise fail(key, "must be a table")
        rank = body.get("rank")
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise fail(f"{key}.rank", "required, an integer (higher = further along)")
        targets: dict[str, Target] = {}
        inbound: dict[str, frozenset[str]] = {}
        for platform in sorted(used_platforms):
            pkey = f"{key}.{platform}"
            spec = platforms[platform]
            entry = body.get(platform)
            if entry is None:
                raise fail(pkey, "missing: every status needs a target on every platform used")
            if not isinstance(entry, dict):
                raise fail(pkey, "must be a table with at least `target`")
            if "target" not in entry:
                raise fail(f"{pkey}.target", "required: the native status to write")
            natives = [_native(fail, f"{pkey}.target", entry["target"], spec)]
            also = entry.get("also", [])
            if not isinstance(also, list):
                raise fail(f"{pkey}.also", "must be a list of native statuses")
            natives += [_native(fail, f"{pkey}.also[{i}]", v, spec) for i, v in enumerate(also)]
            for native in natives:
                other = seen_native.get((platform, native))
                if other is not None and other != name:
                    raise fail(
                        pkey,
                        f"native status {native!r} is already mapped to {other!r}; "
                        "a native status can mean only one canonical status",
                    )
                seen_native[(platform, native)] = name
            option_values = {k: v for k, v in entry.items() if k not in ("target", "also")}
            try:
                options = spec.options.model_validate(option_values)
            except ValidationError as exc:
                err = exc.errors()[0]
                loc = ".".join(str(p) for p in err["loc"])
                raise fail(f"{pkey}.{loc}" if loc else pkey, err["msg"]) from None
            targets[platform] = Target(native=natives[0], options=options)
            inbound[platform] = frozenset(natives)
        extra = set(body) - used_platforms - {"rank"}
        if extra:
            raise fail(f"{key}.{sorted(extra)[0]}", "unknown key")
        statuses[name] = CanonicalStatus(name, rank, targets, inbound)

    backward: set[tuple[str, str]] = set()
    rules = data.get("backward", [])
    if not isinstance(rules, list):
        raise fail("backward", "must be an array of tables: [[backward]] from = ..., to = ...")
    for i, rule in enumerate(rules):
        rkey = f"backward[{i}]"
        if not isinstance(rule, dict) or set(rule) != {"from", "to"}:
            raise fail(rkey, 'needs exactly `from` and `to` (a status name or "*")')
        pair = []
        for side in ("from", "to"):
            value = rule[side]
            if value != ANY and value not in statuses:
                raise fail(f"{rkey}.{side}", f"unknown status {value!r}")
            pair.append(value)
        backward.add((pair[0], pair[1]))

    authority = data.get("authority", list(platforms))
    if not isinstance(authority, list) or not all(isinstance(p, str) for p in authority):
        raise fail("authority", "must be a list of platform names, most trusted first")
    for i, platform in enumerate(authority):
        if platform not in platforms:
            raise fail(f"authority[{i}]", f"unknown platform {platform!r}")
    if len(set(authority)) != len(authority):
        raise fail("authority", "names a platform twice")
    order = tuple(p for p in authority if p in used_platforms)
    order += tuple(sorted(used_platforms - set(order)))

    return StatusMapping(statuses, frozenset(used_platforms), frozenset(backward), file, order)


def _native(fail: Any, key: str, value: Any, spec: PlatformSpec) -> str:
    if spec.native_type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(key, f"{spec.name} statuses are integer ids, got {value!r}")
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise fail(key, f"{spec.name} statuses are non-empty strings, got {value!r}")
    return value
