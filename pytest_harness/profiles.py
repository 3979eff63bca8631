"""Hypothesis profiles of the harness, registered and loaded only when a user asks for one.

- harness-ci: 15 examples per property, derandomized: every CI run tries the same examples, so
  a red build is a change in the code (not a new random draw), and the failure reproduces
  anywhere with `--hypothesis-profile harness-ci`; no example database (a throwaway runner).
- harness-dev: 25 random examples, failures kept in .hypothesis/ and replayed first.
- harness-nightly: 500 random examples, to find what harness-ci's fixed 15 cannot.
Examples run whole models (tenths of a second each): no deadline, no too_slow health check.

Asked for means: `--hypothesis-profile harness-...` (hypothesis's own option, which then loads
it), or the ini option `harness_hypothesis_profile` (a profile name, or `auto`: harness-ci where
the CI variable is set, else harness-dev), which this plugin loads. Otherwise nothing here runs
and the project's hypothesis settings are exactly what they would be without the plugin.
"""

from __future__ import annotations

import os

import pytest

PREFIX = "harness-"
NAMES = ("harness-ci", "harness-dev", "harness-nightly")


def register() -> None:
    """Register the three profiles (the current profile is left as it is)."""
    from hypothesis import HealthCheck, settings

    common = dict(
        parent=settings.get_profile("default"),  # else unset fields follow whichever profile is loaded
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile("harness-ci", max_examples=15, derandomize=True, database=None, **common)
    settings.register_profile("harness-dev", max_examples=25, **common)
    settings.register_profile("harness-nightly", max_examples=500, **common)


def chosen(config: pytest.Config) -> str | None:
    """The profile the ini option names (`auto` resolved), or None."""
    value = config.getini("harness_hypothesis_profile").strip()
    if not value:
        return None
    if value == "auto":
        ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
        return "harness-ci" if ci else "harness-dev"
    return value


def configure(config: pytest.Config) -> None:
    asked = config.getoption("hypothesis_profile", default=None)  # hypothesis's own option
    from_ini = chosen(config)
    if not (from_ini or (asked or "").startswith(PREFIX)):
        return
    if asked and asked.startswith(PREFIX) and asked not in NAMES:  # else hypothesis's INTERNALERROR
        raise pytest.UsageError(f"--hypothesis-profile: {asked!r} is not one of {', '.join(NAMES)}")
    register()
    if from_ini and not asked:  # the command line wins over the ini file
        from hypothesis import settings

        if from_ini not in NAMES and from_ini.startswith(PREFIX):
            raise pytest.UsageError(
                f"harness_hypothesis_profile: {from_ini!r} is not one of {', '.join(NAMES)}, auto"
            )
        try:
            settings.load_profile(from_ini)
        except Exception as exc:  # hypothesis's InvalidArgument: a name nobody registered
            raise pytest.UsageError(f"harness_hypothesis_profile: {exc}") from None
