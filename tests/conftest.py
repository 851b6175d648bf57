"""Test-wide settings: Prefect state in a throwaway folder, no telemetry, no network."""

import atexit
import os
import shutil
import tempfile

import pytest

# Set before anything imports prefect: its settings are read at import time.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="expert-tests-prefect-")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A model's own code (the trust_remote_code tests) is copied here by transformers, read at import.
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="expert-tests-hf-modules-")
# Registered before prefect is imported, so it runs after Prefect's own exit handlers (LIFO),
# once the test server has stopped writing its database: a test run leaves nothing in /tmp.
for _folder in (os.environ["PREFECT_HOME"], os.environ["HF_MODULES_CACHE"]):
    atexit.register(shutil.rmtree, _folder, ignore_errors=True)


@pytest.hookimpl(wrapper=True)  # marks before any plugin reads them: pytest-xdist renames what it groups
def pytest_collection_modifyitems(items):
    """Under `make test`'s two workers (`--dist loadgroup`), the tests of a module that share a
    module-scoped fixture (a trained run, a Prefect server) run on one worker, so it is built
    once; every other test is handed out on its own, to whichever worker is free, slow modules
    first."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is not None and any(fixture.scope == "module"
                                    for fixtures in info.name2fixturedefs.values() for fixture in fixtures):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    # Modules with a slow test go first, whole, those with a group (a chain of tests that one
    # worker runs in turn: a Prefect server's takes minutes) before the others: long runs start
    # at the beginning instead of near the end, where one worker would run them alone, and the
    # many short tests even out the two workers' ends. Each module's tests stay together, so a
    # module-scoped fixture is still built once on a single worker.
    slow = {_module(item) for item in items if item.get_closest_marker("slow")}
    chains = {_module(item) for item in items if item.get_closest_marker("xdist_group")}
    items.sort(key=lambda item: (_module(item) not in slow, _module(item) not in chains))  # stable within
    return (yield)


def _module(item) -> str:
    module = getattr(item, "module", None)
    return module.__name__ if module is not None else ""


@pytest.fixture(autouse=True)
def _no_stop_watch_carried_over():
    """An in-process flow run starts expert.signals' watch of stops, for the rest of the process:
    a stop a later test sends its own process (and catches) would be raised again at the next
    progress point, and the wakeup fd would not be free. Each test starts without it."""
    yield
    from expert.signals import stop_watching

    stop_watching()
