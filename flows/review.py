"""The feedback review as a pause of data-refresh: Prefect's pause_flow_run with a form (a RunInput) that lists the
pending items; what the reviewer answers is recorded in the feedback store before any stage reads it.

The Prefect UI shows the form on the paused run (Resume); `resume_flow_run(id, run_input={...})` does what the UI does.
"""
from __future__ import annotations

import os
from functools import partial

from prefect import get_run_logger, pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from culbot.pipeline_config.schema import FeedbackConfig
from culbot.tasks._text import table_cell
from culbot.tasks.feedback_store import FeedbackStore

REVIEW_POLL_S = int(os.environ.get("CULBOT_REVIEW_POLL_S", "10"))   # how often a paused run checks for the answer


FEEDBACK_REVIEW_MD_ROWS = 50   # pending items listed in the pause form; the rest are named by count


class FeedbackReview(RunInput):
    """What a lab member answers in the Prefect UI when data-refresh pauses for review of students' feedback."""

    approve: list[int] = Field(default_factory=list, description="Feedback ids to approve for training.")
    reject: list[int] = Field(default_factory=list, description="Feedback ids that never reach training.")
    reviewer: str = Field("", description="Who reviews (recorded with each decision).")


def review_markdown(pending: list[dict]) -> str:
    """The pending items as the pause form shows them: id, rating, question, answer and correction."""
    cell = partial(table_cell, width=200)
    lines = [f"# {len(pending)} feedback item(s) wait for review", "",
             "Put the ids to train on in **approve** and the others in **reject**; items in neither stay pending.", "",
             "| id | rating | question | answer | correction |", "|---:|---|---|---|---|"]
    lines += [f"| {i['id']} | {i['rating'] or '-'} | {cell(i['question'])} | {cell(i['answer'])} | {cell(i['correction'])} |"
              for i in pending[:FEEDBACK_REVIEW_MD_ROWS]]
    if len(pending) > FEEDBACK_REVIEW_MD_ROWS:
        lines.append(f"\n… and {len(pending) - FEEDBACK_REVIEW_MD_ROWS} more (`culbot feedback list --status pending`).")
    return "\n".join(lines) + "\n"


def review_feedback(feedback: FeedbackConfig) -> None:
    """Pause this flow run for review when feedback is pending and the profile asks for it (feedback.review: pause);
    the decisions from the form are recorded in the store before any stage reads it."""
    if not feedback.enabled or feedback.review != "pause":
        return
    store = FeedbackStore(feedback.url())
    pending = store.items(status="pending")
    log = get_run_logger()
    if not pending:
        log.info("feedback: nothing pending review")
        return
    log.info("feedback: %d item(s) pending; pausing for review in the Prefect UI (up to %g h)", len(pending), feedback.review_timeout_hours)
    form = FeedbackReview.with_initial_data(description=review_markdown(pending))
    answer = pause_flow_run(wait_for_input=form, timeout=int(feedback.review_timeout_hours * 3600), poll_interval=REVIEW_POLL_S)
    if not answer.reviewer.strip():
        raise ValueError("feedback review: the form's reviewer is empty; say who reviewed (nothing was recorded)")
    both = set(answer.approve) & set(answer.reject)
    if both:
        raise ValueError(f"feedback review: ids {sorted(both)} are both approved and rejected (nothing was recorded)")
    if answer.approve:
        store.review(answer.approve, approve=True, reviewer=answer.reviewer)
    if answer.reject:
        store.review(answer.reject, approve=False, reviewer=answer.reviewer)
    log.info("feedback review by %s: %d approved, %d rejected, %d still pending", answer.reviewer, len(answer.approve), len(answer.reject),
             len(pending) - len(answer.approve) - len(answer.reject))
