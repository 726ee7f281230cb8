"""Shared fixtures. Tests run against the installed package (see pyproject: importlib mode)."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings

from edgeos import filters

# The suite's property tests draw the same examples in every run (seeded by each test's name):
# a run is reproducible, and a red CI names a change, not a lucky draw. Exploring new random
# examples is the fuzz targets' job (tests/fuzz, `python bench/run.py fuzz`), and
# HYPOTHESIS_PROFILE=explore runs the suite's own properties on fresh draws.
settings.register_profile("suite", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))


@pytest.fixture(params=["compiled", "reference"])
def kernel_impl(request: pytest.FixtureRequest) -> str:
    """Runs a test on both kernel implementations; the compiled half fails (never skips) when
    the extension was not built."""
    if request.param == "compiled":
        assert filters.COMPILED, "edgeos.filters._kernels is not built: the install is missing its compiled kernels"
    return request.param


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a TOML config (dedented) into a fresh directory; data_dir defaults to ./data."""

    def write(body: str, name: str = "edgeos.toml", **files: str) -> Path:
        for fname, content in files.items():
            (tmp_path / fname.replace("__", ".")).write_text(textwrap.dedent(content))
        p = tmp_path / name
        p.write_text(textwrap.dedent(body))
        return p

    return write


@pytest.fixture
def run_runtime():
    """Start a Runtime, wait (bounded) for a condition, stop it gracefully; returns the runtime."""
    import asyncio

    from edgeos.runtime import Runtime

    async def run(config, *, until=None, seconds: float = 1.0, timeout: float = 15.0, **kw):
        rt = Runtime(config, **kw)
        task = asyncio.create_task(rt.run(), name="runtime-under-test")
        try:
            async with asyncio.timeout(timeout):
                await rt.running.wait()
                if until is None:
                    await asyncio.sleep(seconds)
                else:
                    while not until(rt):
                        await asyncio.sleep(0.02)
        finally:
            rt.stop()
            await asyncio.wait_for(task, timeout)
        return rt

    return run


def pytest_report_header(config):
    import edgeos

    return f"edgeos {edgeos.__version__} from {edgeos.__file__} (kernels: {filters.implementation()})"
