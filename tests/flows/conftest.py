import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for all flow tests: it takes seconds to start."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def prefect_home(tmp_path, tmp_path_factory):
    """A PREFECT_HOME for a test's own `expert run`, its database already migrated."""
    from tests.fixtures.prefect_home import migrated_home

    return migrated_home(tmp_path / "prefect", tmp_path_factory)
