"""Answering a student: retrieve, render the training prompt, generate, cut at the template's stop strings.

One core for `culbot chat`, `culbot serve`, `culbot demo` and the answer-quality eval. Everything about how
to prompt comes from the model folder (merged model or adapter): the run card's templates and RAG context
format (templates.json), the answer settings and the no-answer threshold that eval measured. The prompt is
rendered by ``templates.render_prompt``, the function that rendered the training rows.

Below the no-answer threshold (the best lexical score of the question against the index) the answer is the
configured refusal, naming the office for the question's topic; nothing is generated, so nothing is invented.
EOS is the tokenizer's; stop strings are the template's section headers (### 명령어: ...), never a fixed id.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

from culbot.pipeline_config.train_schema import AnswerConfig, InputLimits

from . import _store
from .contracts import EVAL_REPORT_FILE, ContextFormat, Contract, EvalReport, RunCard, SpecialTokens, Template, short_hash
from .run_folder import read_run_card
from .templates import render_context, render_prompt

log = logging.getLogger("culbot.answer")


class Source(Contract):
    """A passage an answer was given with (the documented ``sources`` field of the API)."""

    title: str
    url: str
    doc: str
    score: float


class ModelInfo(Contract):
    """What a served model says about itself: /v1/models, the demo's header, chat's banner."""

    id: str
    folder: str
    kind: str                      # "merged" or "adapter"
    run: str | None = None
    dataset: str | None = None     # short hash of the dataset version
    template: str
    eval_status: str | None = None
    eval_loss: float | None = None
    answer_metrics: dict[str, float] = {}
    index: str | None = None       # the index folder's name (its short content hash)
    no_answer_threshold: float | None = None
    threshold_source: str | None = None   # where that threshold comes from: the index's calibration or the answer settings


@dataclass
class Reply:
    """One answer in the making: what was retrieved and the prompt, then the text as it streams."""

    question: str
    prompt: str
    template: str
    sources: list[Source]
    refused: bool
    confidence: float | None
    notes: list[str]
    deltas: Iterator[str]
    context: str = ""          # the retrieved passages as they are in the prompt
    meter: dict = field(default_factory=dict)   # the generator's own count of generated tokens, when it has one
    text: str = ""
    first_token_s: float | None = None
    seconds: float | None = None
    tokens: int = 0
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")   # as OpenAI's API shapes it; feedback names it
    _t0: float = field(default_factory=time.monotonic)

    @property
    def empty(self) -> bool:
        """The model generated no text (the answer is answer.empty_answer)."""
        return bool(self.meter.get("empty"))

    @property
    def finish_reason(self) -> str:
        """OpenAI's: "length" when generation stopped at max_new_tokens, else "stop" (EOS, a stop string, a refusal)."""
        return self.meter.get("finish_reason") or "stop"

    def __iter__(self) -> Iterator[str]:
        """The text as generated, without leading or trailing whitespace (whitespace waits for the text after it);
        .text is exactly what was yielded, so a streamed answer and a whole one are the same."""
        pending = ""
        for d in self.deltas:
            if self.first_token_s is None:
                self.first_token_s = time.monotonic() - self._t0
            d = (pending + d) if self.text else d.lstrip()
            shown = d.rstrip()
            pending = d[len(shown):]
            if shown:
                self.text += shown
                yield shown
        self.seconds = time.monotonic() - self._t0

    def cancel(self) -> None:
        """Stop generating (a client went away); what was generated so far stays in .text."""
        stop = self.meter.get("cancel")
        if stop is not None:
            stop.set()

    def finish(self) -> "Reply":
        for _ in self:
            pass
        return self

    def as_dict(self) -> dict:
        return {"question": self.question, "answer": self.text, "refused": self.refused, "empty": self.empty, "confidence": self.confidence,
                "sources": [s.model_dump() for s in self.sources], "template": self.template, "notes": self.notes,
                "prompt": self.prompt, "tokens": self.tokens, "first_token_s": self.first_token_s, "seconds": self.seconds}


# ----- generators: the model in this process, or an OpenAI-compatible completions server (vLLM) ----------

class Generator(Protocol):
    name: str

    def stream(self, prompt: str, spec: AnswerConfig, stops: list[str], meter: dict, tokens: SpecialTokens | None = None,
               chat: bool = False) -> Iterator[str]:
        """``tokens``: the run's special tokens (BOS before an alpaca-style prompt, the stop ids); ``chat``: the prompt
        came from a chat template, which writes its own BOS."""

    def count_tokens(self, text: str) -> int: ...

    def context_window(self) -> int | None:
        """Most tokens of prompt and answer together (None: unknown, nothing is cut)."""


class InputRejected(ValueError):
    """A request past one of answer.limits. ``param``: what is too large (the API's error param); ``status``: 413 or 400."""

    def __init__(self, message: str, param: str, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def check_messages(texts: list[str], limits: InputLimits) -> None:
    """Every message of a request, in order (the question last), against the limits; the first one broken is raised."""
    if len(texts) > limits.max_messages:
        raise InputRejected(f"{len(texts)} messages; at most {limits.max_messages} (answer.limits.max_messages)", "messages")
    for i, t in enumerate(texts):
        if len(t) > limits.max_message_chars:
            raise InputRejected(f"message {i} has {len(t)} characters; at most {limits.max_message_chars} "
                                f"(answer.limits.max_message_chars)", f"messages[{i}].content")
    total = sum(map(len, texts))
    if total > limits.max_total_chars:
        raise InputRejected(f"the messages hold {total} characters together; at most {limits.max_total_chars} "
                            f"(answer.limits.max_total_chars)", "messages")


def stop_strings(t: Template) -> list[str]:
    """Where an answer ends besides EOS: the template's section headers (a model that starts a new section is done)."""
    heads = re.findall(r"###\s*[^\n:#]+:", t.prompt_input + "\n" + t.prompt_no_input)
    return sorted(set(heads), key=heads.index)


def cut_at_stops(deltas: Iterator[str], stops: list[str], meter: dict | None = None) -> Iterator[str]:
    """Pass text through, holding back only a tail that could be the start of a stop string; end at the first stop
    (``meter["finish_reason"]`` = "stop")."""
    buf = ""
    for d in deltas:
        buf += d
        hit = min((i for i in (buf.find(s) for s in stops) if i >= 0), default=-1)
        if hit >= 0:
            if buf[:hit]:
                yield buf[:hit]
            if meter is not None:
                meter["finish_reason"] = "stop"
            return
        hold = max((n for s in stops for n in range(1, min(len(s), len(buf) + 1)) if buf.endswith(s[:n])), default=0)
        if len(buf) > hold:
            yield buf[:len(buf) - hold]
            buf = buf[len(buf) - hold:]
    if buf:
        yield buf


class TokenStreamer:
    """A transformers streamer (put/end) that releases text at every token whose text is whole. TextIteratorStreamer
    holds text back until a space, so Korean without spaces arrived in a few large pieces. Incremental decoding as
    vLLM does it: a piece is the decoded text of the tokens since an offset, minus that of the tokens already shown,
    so a leading space of a token is kept and a character split over several byte tokens waits for its last byte."""

    def __init__(self, tokenizer, timeout: float = 600):
        import queue

        self.tokenizer, self.timeout, self.queue = tokenizer, timeout, queue.Queue()
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.prompt_seen = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def put(self, value) -> None:
        if not self.prompt_seen:   # generate() hands the prompt over first
            self.prompt_seen = True
            return
        self.ids.extend(int(x) for x in value.reshape(-1).tolist())
        shown, now = self._decode(self.ids[self.prefix:self.read]), self._decode(self.ids[self.prefix:])
        if len(now) > len(shown) and not now.endswith("\ufffd"):
            self.queue.put(now[len(shown):])
            self.prefix, self.read = self.read, len(self.ids)

    def end(self) -> None:
        shown, now = self._decode(self.ids[self.prefix:self.read]), self._decode(self.ids[self.prefix:])
        if len(now) > len(shown):
            self.queue.put(now[len(shown):].replace("\ufffd", ""))
        self.queue.put(None)

    def __iter__(self) -> Iterator[str]:
        while (piece := self.queue.get(timeout=self.timeout)) is not None:
            yield piece


class LocalGenerator:
    """transformers generate() in a thread, streamed through TextIteratorStreamer; one generation at a time."""

    def __init__(self, model, tokenizer, name: str, *, without_adapter: bool = False, lock: threading.Lock | None = None):
        """``without_adapter``: generate with a PEFT model's adapter switched off (the base model, as a baseline)."""
        self.model, self.tokenizer, self.name, self.without_adapter = model, tokenizer, name, without_adapter
        self.lock = lock or threading.Lock()

    def stream(self, prompt: str, spec: AnswerConfig, stops: list[str], meter: dict, tokens: SpecialTokens | None = None,
               chat: bool = False) -> Iterator[str]:
        """Text as it is generated; ``meter["tokens"]``: how many tokens were generated, once done."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        tok = self.tokenizer
        ids = (list(tokens.bos) if tokens and not chat else []) + tok(prompt, add_special_tokens=False)["input_ids"]   # as in training
        enc = {"input_ids": torch.tensor([ids], device=self.model.device), "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=self.model.device)}
        streamer = TokenStreamer(tok)
        cancel = meter["cancel"] = threading.Event()

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw) -> bool:
                return cancel.is_set()
        kwargs = dict(**enc, streamer=streamer, max_new_tokens=spec.max_new_tokens, eos_token_id=tokens.stop_ids if tokens else tok.eos_token_id,
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                      repetition_penalty=spec.repetition_penalty, do_sample=spec.do_sample,
                      stop_strings=stops or None, tokenizer=tok, stopping_criteria=StoppingCriteriaList([Cancelled()]))
        if spec.do_sample:
            kwargs.update(temperature=spec.temperature, top_p=spec.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with self.lock, torch.no_grad(), (self.model.disable_adapter() if self.without_adapter else contextlib.nullcontext()):
                    out = self.model.generate(**kwargs)
                meter["tokens"] = int(out.shape[1] - enc["input_ids"].shape[1])
                stop_ids = set(tokens.stop_ids if tokens else [tok.eos_token_id])
                if meter["tokens"] >= spec.max_new_tokens and int(out[0, -1]) not in stop_ids and not cancel.is_set():
                    meter.setdefault("finish_reason", "length")
            except BaseException as e:   # surfaced to the reader below
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=run, name="culbot-generate", daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def context_window(self) -> int | None:
        """Most tokens (prompt and answer) the model takes: its configured positions."""
        cfg = self.model.config
        return next((int(v) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                     if isinstance(v := getattr(cfg, k, None), int) and v > 0), None)


class RemoteGenerator:
    """An OpenAI-compatible /v1/completions server (vLLM, TGI, another `culbot serve`) given the rendered prompt."""

    def __init__(self, base_url: str, model: str, tokenizer=None, api_key_env: str = "CULBOT_UPSTREAM_API_KEY"):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "none", max_retries=1)
        self.name, self.tokenizer = model, tokenizer
        self._window: list[int | None] = []

    def stream(self, prompt: str, spec: AnswerConfig, stops: list[str], meter: dict, tokens: SpecialTokens | None = None,
               chat: bool = False) -> Iterator[str]:
        extra = {"repetition_penalty": spec.repetition_penalty} if spec.repetition_penalty != 1 else {}
        if chat:
            extra["add_special_tokens"] = False   # vLLM: the chat template's text holds its BOS already
        chunks = self.client.completions.create(model=self.name, prompt=prompt, max_tokens=spec.max_new_tokens, stream=True,
                                                temperature=spec.temperature if spec.do_sample else 0.0,
                                                top_p=spec.top_p if spec.do_sample else 1.0,
                                                stop=stops[:4] or None, extra_body=extra or None)
        try:
            for c in chunks:
                if c.choices and c.choices[0].finish_reason:
                    meter.setdefault("finish_reason", "length" if c.choices[0].finish_reason == "length" else "stop")
                if c.choices and c.choices[0].text:
                    yield c.choices[0].text
        finally:
            chunks.close()   # a client that went away closes the upstream stream too, which stops vLLM's generation

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if self.tokenizer else len(text.split())

    def context_window(self) -> int | None:
        """vLLM's max_model_len from /v1/models, else the tokenizer's model_max_length; asked once."""
        if not self._window:
            window = None
            try:
                listed = self.client.models.list().data
                model = next((m for m in listed if m.id == self.name), listed[0] if len(listed) == 1 else None)
                window = (model.model_extra or {}).get("max_model_len") if model else None
            except Exception as e:   # the upstream may not list models; the tokenizer still knows
                log.debug("upstream /v1/models: %s", e)
            limit = getattr(self.tokenizer, "model_max_length", None)
            self._window.append(int(window) if window else (int(limit) if isinstance(limit, int) and 0 < limit < 10**7 else None))
        return self._window[0]


# ----- loading a model folder ----------------------------------------------------------------------

def is_adapter(folder: Path) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def default_name(folder: Path) -> str:
    """The model id in the API and the demo: the run's name for an adapter (its folder is always 'adapter'), else the folder's."""
    folder = Path(folder).resolve()
    return folder.parent.name if is_adapter(folder) else f"culbot-{folder.name}"


def eval_report_of(folder: Path, card: RunCard) -> EvalReport | None:
    """The eval a model passed: in a merged model's card, or <run>/eval/eval.json beside an adapter."""
    if card.eval is not None:
        return card.eval
    p = Path(folder).parent / "eval" / EVAL_REPORT_FILE
    return _store.read_model(p, EvalReport) if is_adapter(folder) and p.is_file() else None


def load_local(folder: Path, dtype: str | None = None):
    """(model, tokenizer, card) of a merged model or an adapter folder, in eval mode."""
    from .model_io import load_adapted, load_merged

    return (load_adapted if is_adapter(folder) else load_merged)(Path(folder), dtype)


def office_for(question: str, spec: AnswerConfig) -> tuple[str, str]:
    fallback = next((o for o in spec.offices if not o.topics), None)
    chosen = next((o for o in spec.offices if any(t in question for t in o.topics)), fallback)
    return (chosen.name, chosen.contact) if chosen else ("학교 담당 부서", "")


def refusal_text(question: str, spec: AnswerConfig) -> str:
    name, contact = office_for(question, spec)
    return spec.refusal.replace("{office}", name).replace("{contact}", contact).replace("()", "")


# ----- the core ---------------------------------------------------------------------------------------

class Answerer:
    """A model folder (and optionally an index) ready to answer. ``spec`` None: the answer settings the model was
    evaluated with (eval.json), else the defaults."""

    def __init__(self, folder: Path, generator: Generator, tokenizer, card: RunCard, *, retriever=None,
                 spec: AnswerConfig | None = None, index_dir: Path | None = None):
        self.folder, self.generator, self.tokenizer, self.card, self.retriever = Path(folder), generator, tokenizer, card, retriever
        self.evaluation = eval_report_of(self.folder, card)
        self.spec = spec or (self.evaluation.answer if self.evaluation and self.evaluation.answer else AnswerConfig())
        self.template = card.template_for(self.spec.source)
        self.stops = stop_strings(self.template) if self.template.kind == "alpaca" else []
        self.context_format = card.templates.context or ContextFormat()
        self.index_dir = Path(index_dir) if index_dir else None
        self.threshold, self.threshold_source = self.choose_threshold()
        if self.retriever is not None:
            log.info("no-answer threshold %s: %s", self.threshold, self.threshold_source)

    def choose_threshold(self) -> tuple[float | None, str | None]:
        """The answer settings' threshold when one is set (answer.no_answer_threshold), else the index's own, calibrated on
        it when it was built: a threshold measured on one index does not hold on another (confidence is scaled to it)."""
        if self.retriever is None:
            return None, None
        own = self.retriever.threshold
        where = self.index_dir.name if self.index_dir else "the index"
        if self.spec.no_answer_threshold is not None:
            return self.spec.no_answer_threshold, (f"set in the answer settings (answer.no_answer_threshold), not the index's own "
                                                   f"{own} calibrated for {where}")
        if own is None:
            return None, f"{where} has no calibrated threshold (built before culbot calibrated refusal; rebuild it): never refuses"
        return own, f"calibrated for index {where} when it was built (off-topic and pseudo-questions)"

    @classmethod
    def load(cls, folder: Path, index: Path | None = None, *, spec: AnswerConfig | None = None, upstream: str | None = None,
             served_name: str | None = None, dtype: str | None = None, max_new_tokens: int | None = None) -> "Answerer":
        """``upstream``: an OpenAI-compatible base URL that generates (vLLM); only the tokenizer is loaded here.
        ``max_new_tokens``: overrides the answer settings' (the model's, or ``spec``)."""
        folder = Path(folder).resolve()
        if not folder.is_dir():   # before transformers reads the name as a Hub repo id and says that instead
            near = sorted(p.parent.name for p in folder.parent.glob("*/culbot.json"))[-3:] if folder.parent.is_dir() else []
            raise FileNotFoundError(f"{folder}: no such model folder (a merged model is artifacts/models/<hash>, an adapter "
                                    f"artifacts/runs/<run>/adapter)" + (f"; in {folder.parent}: {', '.join(near)}" if near else ""))
        if upstream:
            from transformers import AutoTokenizer

            tokenizer, card = AutoTokenizer.from_pretrained(str(folder)), read_run_card(folder)
            generator: Generator = RemoteGenerator(upstream, served_name or default_name(folder), tokenizer)
        else:
            t0 = time.monotonic()
            model, tokenizer, card = load_local(folder, dtype)
            generator = LocalGenerator(model, tokenizer, served_name or default_name(folder))
            log.info("loaded %s (%s) in %.1f s", folder, "adapter" if is_adapter(folder) else "merged", time.monotonic() - t0)
        retriever = None
        if index is not None:
            from .retrieval import Retriever

            retriever = Retriever(Path(index))
        answerer = cls(folder, generator, tokenizer, card, retriever=retriever, spec=spec, index_dir=index)
        if max_new_tokens:
            answerer.spec = answerer.spec.model_copy(update={"max_new_tokens": max_new_tokens})
        return answerer

    def info(self) -> ModelInfo:
        ev = self.evaluation
        return ModelInfo(id=self.generator.name, folder=str(self.folder), kind="adapter" if is_adapter(self.folder) else "merged",
                         run=ev.run if ev else None, dataset=short_hash(self.card.lineage.dataset or "") or None,
                         template=self.template.name, eval_status=ev.status if ev else None, eval_loss=ev.eval_loss if ev else None,
                         answer_metrics=ev.answers.metrics.gated() if ev and ev.answers else {},
                         index=self.index_dir.name if self.index_dir else None, no_answer_threshold=self.threshold,
                         threshold_source=self.threshold_source)

    def warm_up(self) -> None:
        """Load what the first question would (the morphological analyser, the tokenizer's caches)."""
        if self.retriever is not None:
            self.retriever.search("기숙사 신청은 언제 해요?", k=1)
        self.generator.count_tokens("warm up")

    def history_for_prompt(self, history: list[tuple[str, str]], notes: list[str]) -> list[tuple[str, str]]:
        if not history:
            return []
        if self.template.kind != "chat":
            notes.append(f"template {self.template.name!r} has no conversation form; only the last question is in the prompt")
            return []
        return list(history)[-self.spec.history_turns:] if self.spec.history_turns else []

    def reply(self, question: str, history: list[tuple[str, str]] = (), *, retrieval: bool = True, spec: AnswerConfig | None = None) -> Reply:
        """Retrieve, render and start generating; iterate the Reply for the text (or call .finish()).
        ``spec``: this request's generation settings (the API's max_tokens, temperature), else the model's."""
        spec = spec or self.spec
        check_messages([m for turn in history for m in turn] + [question], self.spec.limits)
        question = question.strip()
        notes: list[str] = []
        passages: list | None = None
        confidence = None
        if self.retriever is not None and retrieval:
            k = self.spec.context_k or self.context_format.k
            res = self.retriever.search(question, k=k)
            confidence = res.confidence
            if self.threshold is not None and confidence < self.threshold:
                text = refusal_text(question, self.spec)
                notes.append(f"retrieval confidence {confidence} < no-answer threshold {self.threshold}: refused")
                return Reply(question, prompt="", template=self.template.name, sources=[], refused=True,
                             confidence=confidence, notes=notes, deltas=iter([text]))
            passages = list(res.hits)
            if self.card.templates.context is None:
                notes.append("this model was trained without retrieved context; the passages are given in the training input format anyway")
        elif self.retriever is None:
            notes.append("no index: answering without retrieval")
        turns = self.history_for_prompt(list(history), notes)
        question, passages, turns, spec = self.fit(question, passages, turns, spec, notes)
        context = render_context([(h.title, h.passage) for h in passages], self.context_format) if passages else ""
        # One source per document: the passages of a page are one page to the student.
        by_doc: dict[str, Source] = {}
        for h in passages or []:
            by_doc.setdefault(h.doc, Source(title=h.title, url=h.url, doc=h.doc, score=h.score))
        prompt = render_prompt(self.template, question, context, self.tokenizer, history=turns)
        meter: dict = {}
        deltas = self.never_blank(cut_at_stops(self.generator.stream(prompt, spec, self.stops, meter, self.card.special_tokens, self.template.kind == "chat"), self.stops, meter), spec, notes, meter)
        return Reply(question, prompt=prompt, template=self.template.name, sources=list(by_doc.values()), refused=False,
                     confidence=confidence, notes=notes, deltas=deltas, context=context, meter=meter)

    def prompt_length(self, question: str, passages: list | None, turns: list[tuple[str, str]]) -> int:
        context = render_context([(h.title, h.passage) for h in passages], self.context_format) if passages else ""
        bos = len(self.card.special_tokens.bos) if self.card.special_tokens and self.template.kind != "chat" else 0
        return bos + self.generator.count_tokens(render_prompt(self.template, question, context, self.tokenizer, history=turns))

    def fit(self, question: str, passages: list | None, turns: list[tuple[str, str]], spec: AnswerConfig,
            notes: list[str]) -> tuple[str, list | None, list[tuple[str, str]], AnswerConfig]:
        """The prompt cut to the model's context, keeping room for the answer: the earliest turns go first, then the
        last passages, then the start of the question (its end, where the question is, stays); max_new_tokens is
        capped to what is left."""
        window = self.generator.context_window()
        if not window:
            return question, passages, turns, spec
        room = min(spec.max_new_tokens, window // 4)   # the answer's share a long prompt cannot take
        length = self.prompt_length(question, passages, turns)
        dropped_turns = dropped_passages = 0
        while length > window - room and turns:
            turns, dropped_turns = turns[1:], dropped_turns + 1
            length = self.prompt_length(question, passages, turns)
        while length > window - room and passages:
            passages, dropped_passages = passages[:-1], dropped_passages + 1
            length = self.prompt_length(question, passages, turns)
        if dropped_turns or dropped_passages:
            notes.append(f"the prompt was cut to the model's context of {window} tokens: {dropped_turns} earlier turns and "
                         f"{dropped_passages} passages left out")
        if length > window - room:   # the longest end of the question that fits (binary search: a dozen tokenizations)
            lo, hi = 0, len(question)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self.prompt_length("…" + question[-mid:], passages, turns) <= window - room:
                    lo = mid
                else:
                    hi = mid - 1
            if lo:   # else the template alone is too long for this model: leave it to generate what it can
                question = "…" + question[-lo:]
                length = self.prompt_length(question, passages, turns)
                notes.append(f"the question was cut to its last {lo} characters to fit the model's context of {window} tokens")
        left = window - length
        if left < spec.max_new_tokens:
            notes.append(f"max_new_tokens {spec.max_new_tokens} capped to {max(left, 1)}: the prompt takes {length} of {window} tokens")
            spec = spec.model_copy(update={"max_new_tokens": max(left, 1)})
        return question, passages, turns, spec

    @staticmethod
    def never_blank(deltas: Iterator[str], spec: AnswerConfig, notes: list[str], meter: dict) -> Iterator[str]:
        """The text as generated; if the model said nothing at all, the configured empty_answer (a student never gets a blank)."""
        said = False
        for d in deltas:
            said = said or bool(d.strip())
            yield d
        if not said:
            meter["empty"] = True
            notes.append("the model generated no text; answered with answer.empty_answer")
            yield spec.empty_answer

    def base_model(self) -> "Answerer":
        """The same answerer with the adapter switched off: the base model, prompted identically (an adapter folder only)."""
        g = self.generator
        if not isinstance(g, LocalGenerator) or not is_adapter(self.folder):
            raise ValueError("the base model is only reachable from an adapter loaded in this process")
        base = LocalGenerator(g.model, g.tokenizer, g.name + ":base", without_adapter=True, lock=g.lock)
        return Answerer(self.folder, base, self.tokenizer, self.card, retriever=self.retriever, spec=self.spec, index_dir=self.index_dir)

    def answer(self, question: str, history: list[tuple[str, str]] = (), *, retrieval: bool = True, spec: AnswerConfig | None = None) -> Reply:
        return self.counted(self.reply(question, history, retrieval=retrieval, spec=spec).finish())

    def counted(self, r: Reply) -> Reply:
        """A finished reply with the tokens of its answer counted (the API's usage): the local model's own count of what
        it generated; else the tokens of the text given (a refusal, the empty-answer notice, a remote server's text)."""
        if "tokens" in r.meter and not r.refused and not r.empty:
            r.tokens = r.meter["tokens"]
        else:
            r.tokens = self.generator.count_tokens(r.text)
        return r

    def prompt_tokens(self, r: Reply) -> int:
        """Tokens of the prompt; of the question for a refusal (no prompt was rendered, the question was still read)."""
        return self.generator.count_tokens(r.prompt or r.question)
