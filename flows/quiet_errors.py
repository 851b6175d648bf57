"""`expert run` in a terminal: a user error (a bad path, a bad config value) without tracebacks.

Prefect logs a failed task run and the failed flow run each with the full traceback, so a
missing model folder printed about 80 lines, two tracebacks deep in Prefect's engine, above
the one paragraph that says what to fix. For EXPERT's own errors (ExpertError: the message
names the field or file and the fix) the traceback says nothing more; they are logged with
their message only, in the terminal and in the run's logs in the UI alike. Any other exception
keeps its traceback; `expert run --debug` keeps them all.
"""

from __future__ import annotations

import logging

from expert.errors import ExpertError

# The loggers of Prefect's task and flow engines (prefect.logging.loggers.get_run_logger).
RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


class DropUserErrorTraceback(logging.Filter):
    """Keeps the record, without the traceback when its exception is an ExpertError."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ExpertError):
            record.exc_info, record.exc_text = None, None
        return True


def user_errors_without_traceback() -> None:
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropUserErrorTraceback) for f in logger.filters):
            logger.addFilter(DropUserErrorTraceback())
