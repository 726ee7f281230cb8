"""A plugin whose import fails, as a badly packaged third-party one would."""

import edgeos_fixture_dependency_that_is_not_installed  # noqa: F401

protocol = None
