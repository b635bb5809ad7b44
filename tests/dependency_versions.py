"""The versions the suite runs with, against pyproject's supported ranges and the last green CI run.

`pytest_report_header` (conftest.py) prints `report_lines()` at the top of every run, so a failing run names
the dependency that moved; `tests/test_dependencies.py` fails when one is outside its supported range.
`tests/tested_versions.txt` holds the versions of the last green CI run (update it with the run that proves
a new version, and raise a lower bound in pyproject.toml only to a version listed there).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

TESTED_FILE = Path(__file__).with_name("tested_versions.txt")


@dataclass(frozen=True)
class Dependency:
    name: str                   # canonical distribution name
    supported: SpecifierSet     # pyproject's range (core and `test` extra)
    installed: str | None       # the running version, None when not installed
    tested: str | None          # the version of the last green CI run

    @property
    def in_range(self) -> bool:
        return self.installed is not None and self.supported.contains(Version(self.installed), prereleases=True)


def supported_ranges(dist: str = "lightning-lora", extras: tuple[str, ...] = ("test",)) -> dict[str, SpecifierSet]:
    """Distribution name -> the range pyproject states, for the core dependencies and `extras`."""
    ranges: dict[str, SpecifierSet] = {}
    for line in metadata.requires(dist) or []:
        req = Requirement(line)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        ranges[canonicalize_name(req.name)] = req.specifier
    return ranges


def last_green_versions(path: Path = TESTED_FILE) -> dict[str, str]:
    """`name==version` lines (comments with #) -> {canonical name: version}."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version.strip()
    return out


def dependencies() -> list[Dependency]:
    tested = last_green_versions()
    deps = []
    for name, spec in supported_ranges().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        deps.append(Dependency(name, spec, installed, tested.get(name)))
    return deps


def report_lines() -> list[str]:
    """The header: every dependency's version; those outside pyproject's range, and those that differ from the
    last green CI run, named on lines of their own."""
    deps = dependencies()
    lines = ["dependencies: " + ", ".join(f"{d.name} {d.installed or 'missing'}" for d in deps)]
    outside = [f"{d.name} {d.installed or 'missing'} (supported: {d.supported or 'any'})" for d in deps
               if not d.in_range]
    if outside:
        lines.append("OUTSIDE pyproject's supported range: " + ", ".join(outside))
    changed = [f"{d.name} {d.tested} -> {d.installed}" for d in deps
               if d.tested is not None and d.installed is not None and Version(d.installed).public != d.tested]
    if changed:
        lines.append("changed since the last green CI run (tests/tested_versions.txt): " + ", ".join(changed))
    return lines
