"""Students' feedback on answers: every served answer kept with the context to use it, and their ratings and corrections,
in a SQL database (SQLite by default, any SQLAlchemy URL for a lab with several servers), reviewed before training.

- ``answers``: one row per answer id (the id the OpenAI API returns, ``chatcmpl-…``): the question, the exact prompt
  and the retrieved passages in it, the answer, its sources, the retrieval confidence, whether it was refused, and the model, dataset and index versions.
- ``feedback``: a rating (up or down), a correction and a comment for an answer id, with its review: pending, approved or
  rejected, by whom and when, and which dataset version used it.

The schema is created and changed by alembic migrations (``feedback_migrations/``), run when a store opens, so a new
column never loses rows. Text from students is scrubbed of e-mail addresses, phone numbers and URLs as the crawler
does; no client address is stored. SQLite runs in WAL mode with synchronous=FULL: a row whose request got a 2xx is on
disk, also when the server is killed the next moment.
"""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from . import _text

log = logging.getLogger("culbot.feedback")

MIGRATIONS = Path(__file__).with_name("feedback_migrations")
Rating = Literal["up", "down"]
Status = Literal["pending", "approved", "rejected"]


class Base(DeclarativeBase):
    pass


def _now() -> dt.datetime:
    """UTC, without a zone: every backend stores and compares it the same way (SQLite keeps no zone)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class AnswerRow(Base):
    __tablename__ = "answers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(), default=_now, index=True)
    channel: Mapped[str] = mapped_column(String(16))          # serve, demo or chat
    question: Mapped[str] = mapped_column(Text)
    prompt: Mapped[str] = mapped_column(Text)
    context: Mapped[str] = mapped_column(Text, default="", server_default="")   # the retrieved passages as in the prompt
    answer: Mapped[str] = mapped_column(Text)
    sources: Mapped[list] = mapped_column(JSON, default=list)
    confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    refused: Mapped[bool] = mapped_column(Boolean, default=False)
    model: Mapped[str] = mapped_column(String(200))
    dataset: Mapped[str | None] = mapped_column(String(64), nullable=True)
    index: Mapped[str | None] = mapped_column(String(64), nullable=True)


class FeedbackRow(Base):
    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    answer_id: Mapped[str] = mapped_column(ForeignKey("answers.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(), default=_now, index=True)
    rating: Mapped[str | None] = mapped_column(String(8), nullable=True)
    correction: Mapped[str | None] = mapped_column(Text, nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    reviewer: Mapped[str | None] = mapped_column(String(100), nullable=True)
    reviewed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(), nullable=True)
    used_in: Mapped[str | None] = mapped_column(String(64), nullable=True)   # the dataset version that took it


class UnknownAnswer(KeyError):
    """Feedback names an answer id this store never recorded."""


def scrub(text: str | None, max_chars: int) -> str | None:
    """A student's text as stored: PII removed (as the crawler removes it), whitespace normalised, bounded."""
    if text is None:
        return None
    clean, _ = _text.remove_pii(_text.nfc(text))
    return _text.normalize_ws(clean)[:max_chars] or None


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")     # readers never block the writer; several server workers share the file
        cur.execute("PRAGMA synchronous=FULL")     # a committed row survives a kill or a power cut
        cur.execute("PRAGMA busy_timeout=10000")   # another worker writing: wait for it rather than fail
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (alembic), keeping every row."""
    from alembic import command
    from alembic.config import Config

    logging.getLogger("alembic").setLevel(logging.WARNING)   # "Context impl SQLiteImpl" on every open says nothing
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class FeedbackStore:
    """``FeedbackStore(url)``: answers and feedback in the database at ``url`` (created and migrated on open)."""

    def __init__(self, url: str, *, max_text_chars: int = 4000):
        self.url = url
        self.max_text_chars = max_text_chars
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            path = Path(url.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            _sqlite_pragmas(self.engine)
        migrate(self.engine)

    def record_answer(self, *, id: str, channel: str, question: str, prompt: str, answer: str, sources: list[dict],
                      confidence: float | None, refused: bool, model: str, dataset: str | None, index: str | None,
                      context: str = "") -> None:
        row = AnswerRow(id=id, channel=channel, question=scrub(question, self.max_text_chars) or "", prompt=prompt, answer=answer,
                        context=context,
                        sources=sources, confidence=confidence, refused=refused, model=model, dataset=dataset, index=index)
        with Session(self.engine) as s, s.begin():
            s.merge(row)

    def add(self, answer_id: str, *, rating: Rating | None = None, correction: str | None = None, comment: str | None = None) -> int:
        """Store feedback on a recorded answer; returns its id."""
        with Session(self.engine) as s, s.begin():
            if s.get(AnswerRow, answer_id) is None:
                raise UnknownAnswer(answer_id)
            row = FeedbackRow(answer_id=answer_id, rating=rating, correction=scrub(correction, self.max_text_chars),
                              comment=scrub(comment, self.max_text_chars))
            s.add(row)
            s.flush()
            return row.id

    def items(self, *, status: Status | None = None, rating: Rating | None = None, since: dt.datetime | None = None,
              with_correction: bool | None = None, limit: int | None = None) -> list[dict]:
        """Feedback joined with its answer, newest first."""
        q = select(FeedbackRow, AnswerRow).join(AnswerRow, FeedbackRow.answer_id == AnswerRow.id).order_by(FeedbackRow.id.desc())
        if status:
            q = q.where(FeedbackRow.status == status)
        if rating:
            q = q.where(FeedbackRow.rating == rating)
        if since:
            q = q.where(FeedbackRow.created_at >= since)
        if with_correction is not None:
            q = q.where(FeedbackRow.correction.is_not(None) if with_correction else FeedbackRow.correction.is_(None))
        if limit:
            q = q.limit(limit)
        with Session(self.engine) as s:
            return [_item(f, a) for f, a in s.execute(q)]

    def item(self, feedback_id: int) -> dict | None:
        with Session(self.engine) as s:
            f = s.get(FeedbackRow, feedback_id)
            return _item(f, s.get(AnswerRow, f.answer_id)) if f else None

    def review(self, ids: list[int], *, approve: bool, reviewer: str) -> int:
        """Approve or reject feedback items; returns how many changed. A reviewer's name is required (recorded)."""
        if not reviewer.strip():
            raise ValueError("a review needs the reviewer's name")
        with Session(self.engine) as s, s.begin():
            rows = s.scalars(select(FeedbackRow).where(FeedbackRow.id.in_(ids))).all()
            for r in rows:
                r.status, r.reviewer, r.reviewed_at = ("approved" if approve else "rejected"), reviewer.strip()[:100], _now()
            missing = set(ids) - {r.id for r in rows}
            if missing:
                raise KeyError(f"no feedback item(s) {sorted(missing)}")
            return len(rows)

    def unanswered(self) -> list[dict]:
        """Questions Culbot refused, or whose answer a student voted down (unless a reviewer rejected that vote):
        {question, refused, down, created_at}, oldest first."""
        from sqlalchemy import and_, exists, or_

        down = exists().where(and_(FeedbackRow.answer_id == AnswerRow.id, FeedbackRow.rating == "down", FeedbackRow.status != "rejected"))
        q = select(AnswerRow.question, AnswerRow.refused, down.label("down"), AnswerRow.created_at).where(or_(AnswerRow.refused, down))
        with Session(self.engine) as s:
            return [{"question": r.question, "refused": bool(r.refused), "down": bool(r.down), "created_at": r.created_at.isoformat()}
                    for r in s.execute(q.order_by(AnswerRow.created_at, AnswerRow.id))]

    def state_key(self) -> str:
        """A hash of everything the feedback-data stage reads: approved items (their texts and reviews) and the questions
        of the unanswered report. Its cache key: a new approval or a new refused question rebuilds it."""
        from . import _store

        return _store.hash_json([[(i["id"], i["answer_id"], i["rating"], i["correction"], i["reviewed_at"]) for i in self.items(status="approved")],
                                 self.unanswered()])

    def mark_used(self, ids: list[int], dataset: str) -> None:
        with Session(self.engine) as s, s.begin():
            for r in s.scalars(select(FeedbackRow).where(FeedbackRow.id.in_(ids))):
                r.used_in = dataset

    def purge(self, older_than_days: float) -> int:
        """Delete answers (and their feedback) older than the retention period; returns how many answers went."""
        from sqlalchemy import delete

        old = select(AnswerRow.id).where(AnswerRow.created_at < _now() - dt.timedelta(days=older_than_days))
        with Session(self.engine) as s, s.begin():
            s.execute(delete(FeedbackRow).where(FeedbackRow.answer_id.in_(old)))
            return s.execute(delete(AnswerRow).where(AnswerRow.id.in_(old))).rowcount

    def counts(self) -> dict[str, int]:
        from sqlalchemy import func

        with Session(self.engine) as s:
            by_status = dict(s.execute(select(FeedbackRow.status, func.count()).group_by(FeedbackRow.status)).all())
            return {"answers": s.scalar(select(func.count()).select_from(AnswerRow)) or 0, **{k: by_status.get(k, 0) for k in ("pending", "approved", "rejected")}}


def answer_fields(reply, info, *, channel: str) -> dict[str, Any]:
    """What :meth:`FeedbackStore.record_answer` keeps of a finished ``answer.Reply`` (under its id) from the answerer
    whose ``info()`` is ``info``."""
    return {"id": reply.id, "channel": channel, "question": reply.question, "prompt": reply.prompt, "context": reply.context,
            "answer": reply.text,
            "sources": [s.model_dump(mode="json") for s in reply.sources], "confidence": reply.confidence, "refused": reply.refused,
            "model": info.id, "dataset": info.dataset, "index": info.index}


def _item(f: FeedbackRow, a: AnswerRow) -> dict[str, Any]:
    return {"id": f.id, "answer_id": f.answer_id, "created_at": f.created_at.isoformat(), "rating": f.rating, "correction": f.correction,
            "comment": f.comment, "status": f.status, "reviewer": f.reviewer,
            "reviewed_at": f.reviewed_at.isoformat() if f.reviewed_at else None, "used_in": f.used_in,
            "question": a.question, "answer": a.answer, "prompt": a.prompt, "context": a.context, "sources": a.sources, "confidence": a.confidence,
            "refused": a.refused, "model": a.model, "dataset": a.dataset, "index": a.index, "channel": a.channel}
