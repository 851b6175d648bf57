"""`expert run`: EXPERT's own errors reach the terminal and the UI without Prefect's tracebacks."""

from __future__ import annotations

import logging

import pytest

from expert.errors import DataError
from flows.quiet_errors import RUN_LOGGERS, DropUserErrorTraceback, user_errors_without_traceback


@pytest.fixture()
def quiet_loggers():
    before = {name: list(logging.getLogger(name).filters) for name in RUN_LOGGERS}
    user_errors_without_traceback()
    user_errors_without_traceback()  # idempotent: `expert run` twice in one process adds no second filter
    yield
    for name, filters in before.items():
        logging.getLogger(name).filters[:] = filters


class _Kept(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_failed_flow_logs_a_user_error_without_traceback_and_others_with_it(prefect_harness, quiet_loggers,
                                                                               monkeypatch):
    from prefect import flow, task

    kept = _Kept()  # Prefect's run loggers do not propagate to the root (caplog): listen on them
    for name in RUN_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "handlers", [*logging.getLogger(name).handlers, kept])

    @task
    def stage(error: Exception) -> None:
        raise error

    @flow
    def pipeline(error: Exception) -> None:
        stage(error)

    for error, traced in ((DataError("data.pubmedqa.source 'x.json' does not exist"), False),
                          (RuntimeError("a bug"), True)):
        kept.records.clear()
        with pytest.raises(type(error)):
            pipeline(error)
        failures = [r for r in kept.records if str(error) in r.getMessage()]
        assert {r.name for r in failures} == set(RUN_LOGGERS)  # the task's failure and the flow's, both logged
        with_traceback = [r.name for r in failures if r.exc_info]
        assert sorted(with_traceback) == (sorted(RUN_LOGGERS) if traced else []), with_traceback
    assert all(sum(isinstance(f, DropUserErrorTraceback) for f in logging.getLogger(name).filters) == 1
               for name in RUN_LOGGERS)
