"""Culbot flows.

Importing them (as a Prefect worker does to run a deployment) sends culbot's own log lines to the
flow run's logs at INFO. Prefect attaches its API handler to the `culbot` logger only when
PREFECT_LOGGING_EXTRA_LOGGERS names it, and leaves the logger's level at the root's WARNING, so the
training loss lines, the launch command and the QA ledger never reached the UI.
"""
import logging


def _in_a_run(record: logging.LogRecord) -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _culbot_logs_to_the_flow_run() -> None:
    from prefect.logging.handlers import APILogHandler

    log = logging.getLogger("culbot")
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    if not any(isinstance(h, APILogHandler) for h in log.handlers):
        handler = APILogHandler()
        handler.addFilter(_in_a_run)   # a CLI command outside any run logs to the console only, without Prefect's warning
        log.addHandler(handler)


_culbot_logs_to_the_flow_run()
