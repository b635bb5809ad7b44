"""pyproject.toml's supported ranges against the versions this run uses (the header line prints them too)."""

from __future__ import annotations

from dependency_versions import Dependency, dependencies, last_green_versions, report_lines, supported_ranges
from packaging.specifiers import SpecifierSet
from packaging.version import Version


def test_every_dependency_is_within_its_supported_range():
    outside = [f"{d.name} {d.installed} (pyproject: {d.supported})" for d in dependencies() if not d.in_range]
    assert outside == [], "running outside pyproject's supported range: " + ", ".join(outside)


def test_every_dependency_states_a_lower_bound_that_a_green_run_tested():
    """A lower bound is a version the suite passed with: not above the last green run's version, and every
    dependency has both."""
    tested = last_green_versions()
    for name, spec in supported_ranges().items():
        lower = [s for s in spec if s.operator == ">="]
        assert len(lower) == 1, f"{name}: pyproject states no lower bound ({spec or 'any'})"
        assert name in tested, f"{name} is missing from tests/tested_versions.txt"
        assert Version(lower[0].version) <= Version(tested[name]), (name, str(spec), tested[name])
        assert spec.contains(tested[name]), f"{name}: the tested {tested[name]} is outside {spec}"


def test_the_header_names_what_is_outside_the_range_and_what_changed(monkeypatch):
    import dependency_versions

    deps = [Dependency("transformers", SpecifierSet(">=5.24"), "5.26.0", "5.25.0"),
            Dependency("torch", SpecifierSet(">=2.13"), "2.12.0", "2.13.0"),
            Dependency("rich", SpecifierSet(">=15"), "15.0.0", "15.0.0")]
    monkeypatch.setattr(dependency_versions, "dependencies", lambda: deps)
    assert dependency_versions.report_lines() == [
        "dependencies: transformers 5.26.0, torch 2.12.0, rich 15.0.0",
        "OUTSIDE pyproject's supported range: torch 2.12.0 (supported: >=2.13)",
        "changed since the last green CI run (tests/tested_versions.txt): transformers 5.25.0 -> 5.26.0, "
        "torch 2.13.0 -> 2.12.0",
    ]


def test_the_header_of_this_run_lists_every_dependency():
    first = report_lines()[0]
    for name in supported_ranges():
        assert f" {name} " in first + " "
