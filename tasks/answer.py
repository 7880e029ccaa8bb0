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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

from culbot.pipeline_config.train_schema import AnswerSpec

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
    _t0: float = field(default_factory=time.monotonic)

    @property
    def empty(self) -> bool:
        """The model generated no text (the answer is answer.empty_answer)."""
        return bool(self.meter.get("empty"))

    def __iter__(self) -> Iterator[str]:
        for d in self.deltas:
            if self.first_token_s is None:
                self.first_token_s = time.monotonic() - self._t0
            self.text += d
            yield d
        self.seconds = time.monotonic() - self._t0
        self.text = self.text.strip()

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

    def stream(self, prompt: str, spec: AnswerSpec, stops: list[str], meter: dict, tokens: SpecialTokens | None = None,
               chat: bool = False) -> Iterator[str]:
        """``tokens``: the run's special tokens (BOS before an alpaca-style prompt, the stop ids); ``chat``: the prompt
        came from a chat template, which writes its own BOS."""

    def count_tokens(self, text: str) -> int: ...


def stop_strings(t: Template) -> list[str]:
    """Where an answer ends besides EOS: the template's section headers (a model that starts a new section is done)."""
    heads = re.findall(r"###\s*[^\n:#]+:", t.prompt_input + "\n" + t.prompt_no_input)
    return sorted(set(heads), key=heads.index)


def cut_at_stops(deltas: Iterator[str], stops: list[str]) -> Iterator[str]:
    """Pass text through, holding back only what could be the start of a stop string; end at the first stop."""
    hold = max((len(s) for s in stops), default=1) - 1
    buf = ""
    for d in deltas:
        buf += d
        hit = min((i for i in (buf.find(s) for s in stops) if i >= 0), default=-1)
        if hit >= 0:
            if buf[:hit]:
                yield buf[:hit]
            return
        if len(buf) > hold:
            yield buf[:len(buf) - hold]
            buf = buf[len(buf) - hold:]
    if buf:
        yield buf


class LocalGenerator:
    """transformers generate() in a thread, streamed through TextIteratorStreamer; one generation at a time."""

    def __init__(self, model, tokenizer, name: str, *, without_adapter: bool = False, lock: threading.Lock | None = None):
        """``without_adapter``: generate with a PEFT model's adapter switched off (the base model, as a baseline)."""
        self.model, self.tokenizer, self.name, self.without_adapter = model, tokenizer, name, without_adapter
        self.lock = lock or threading.Lock()

    def stream(self, prompt: str, spec: AnswerSpec, stops: list[str], meter: dict, tokens: SpecialTokens | None = None,
               chat: bool = False) -> Iterator[str]:
        """Text as it is generated; ``meter["tokens"]``: how many tokens were generated, once done."""
        import torch
        from transformers import TextIteratorStreamer

        from transformers import StoppingCriteria, StoppingCriteriaList

        tok = self.tokenizer
        ids = (list(tokens.bos) if tokens and not chat else []) + tok(prompt, add_special_tokens=False)["input_ids"]   # as in training
        enc = {"input_ids": torch.tensor([ids], device=self.model.device), "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=self.model.device)}
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
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


class RemoteGenerator:
    """An OpenAI-compatible /v1/completions server (vLLM, TGI, another `culbot serve`) given the rendered prompt."""

    def __init__(self, base_url: str, model: str, tokenizer=None, api_key_env: str = "CULBOT_UPSTREAM_API_KEY"):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "none", max_retries=1)
        self.name, self.tokenizer = model, tokenizer

    def stream(self, prompt: str, spec: AnswerSpec, stops: list[str], meter: dict, tokens: SpecialTokens | None = None,
               chat: bool = False) -> Iterator[str]:
        extra = {"repetition_penalty": spec.repetition_penalty} if spec.repetition_penalty != 1 else {}
        if chat:
            extra["add_special_tokens"] = False   # vLLM: the chat template's text holds its BOS already
        chunks = self.client.completions.create(model=self.name, prompt=prompt, max_tokens=spec.max_new_tokens, stream=True,
                                                temperature=spec.temperature if spec.do_sample else 0.0,
                                                top_p=spec.top_p if spec.do_sample else 1.0,
                                                stop=stops[:4] or None, extra_body=extra or None)
        for c in chunks:
            if c.choices and c.choices[0].text:
                yield c.choices[0].text

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if self.tokenizer else len(text.split())


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


def office_for(question: str, spec: AnswerSpec) -> tuple[str, str]:
    fallback = next((o for o in spec.offices if not o.topics), None)
    chosen = next((o for o in spec.offices if any(t in question for t in o.topics)), fallback)
    return (chosen.name, chosen.contact) if chosen else ("학교 담당 부서", "")


def refusal_text(question: str, spec: AnswerSpec) -> str:
    name, contact = office_for(question, spec)
    return spec.refusal.replace("{office}", name).replace("{contact}", contact).replace("()", "")


# ----- the core ---------------------------------------------------------------------------------------

class Answerer:
    """A model folder (and optionally an index) ready to answer. ``spec`` None: the answer settings the model was
    evaluated with (eval.json), else the defaults."""

    def __init__(self, folder: Path, generator: Generator, tokenizer, card: RunCard, *, retriever=None,
                 spec: AnswerSpec | None = None, index_dir: Path | None = None):
        self.folder, self.generator, self.tokenizer, self.card, self.retriever = Path(folder), generator, tokenizer, card, retriever
        self.evaluation = eval_report_of(self.folder, card)
        self.spec = spec or (self.evaluation.answer if self.evaluation and self.evaluation.answer else AnswerSpec())
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
    def load(cls, folder: Path, index: Path | None = None, *, spec: AnswerSpec | None = None, upstream: str | None = None,
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

    def history_for_prompt(self, history: list[tuple[str, str]], notes: list[str]) -> list[tuple[str, str]]:
        if not history:
            return []
        if self.template.kind != "chat":
            notes.append(f"template {self.template.name!r} has no conversation form; only the last question is in the prompt")
            return []
        return list(history)[-self.spec.history_turns:] if self.spec.history_turns else []

    def reply(self, question: str, history: list[tuple[str, str]] = (), *, retrieval: bool = True, spec: AnswerSpec | None = None) -> Reply:
        """Retrieve, render and start generating; iterate the Reply for the text (or call .finish()).
        ``spec``: this request's generation settings (the API's max_tokens, temperature), else the model's."""
        spec = spec or self.spec
        question = question.strip()
        notes: list[str] = []
        sources: list[Source] = []
        confidence = None
        context = ""
        if self.retriever is not None and retrieval:
            k = self.spec.context_k or self.context_format.k
            res = self.retriever.search(question, k=k)
            confidence = res.confidence
            if self.threshold is not None and confidence < self.threshold:
                text = refusal_text(question, self.spec)
                notes.append(f"retrieval confidence {confidence} < no-answer threshold {self.threshold}: refused")
                return Reply(question, prompt="", template=self.template.name, sources=[], refused=True,
                             confidence=confidence, notes=notes, deltas=iter([text]))
            # One source per document: the passages of a page are one page to the student.
            by_doc: dict[str, Source] = {}
            for h in res.hits:
                by_doc.setdefault(h.doc, Source(title=h.title, url=h.url, doc=h.doc, score=h.score))
            sources = list(by_doc.values())
            context = render_context([(h.title, h.passage) for h in res.hits], self.context_format)
            if self.card.templates.context is None:
                notes.append("this model was trained without retrieved context; the passages are given in the training input format anyway")
        elif self.retriever is None:
            notes.append("no index: answering without retrieval")
        turns = self.history_for_prompt(list(history), notes)
        prompt = render_prompt(self.template, question, context, self.tokenizer, history=turns)
        meter: dict = {}
        deltas = self.never_blank(cut_at_stops(self.generator.stream(prompt, spec, self.stops, meter, self.card.special_tokens, self.template.kind == "chat"), self.stops), spec, notes, meter)
        return Reply(question, prompt=prompt, template=self.template.name, sources=sources, refused=False,
                     confidence=confidence, notes=notes, deltas=deltas, context=context, meter=meter)

    @staticmethod
    def never_blank(deltas: Iterator[str], spec: AnswerSpec, notes: list[str], meter: dict) -> Iterator[str]:
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

    def answer(self, question: str, history: list[tuple[str, str]] = (), *, retrieval: bool = True, spec: AnswerSpec | None = None) -> Reply:
        return self.counted(self.reply(question, history, retrieval=retrieval, spec=spec).finish())

    def counted(self, r: Reply) -> Reply:
        """A finished reply with its generated tokens counted (for usage and tokens/s)."""
        if r.refused:
            r.tokens = 0
        elif "tokens" in r.meter:   # the local model's own count
            r.tokens = r.meter["tokens"]
        else:                       # a remote server's text, minus the empty-answer notice
            r.tokens = 0 if r.empty else self.generator.count_tokens(r.text)
        return r

    def prompt_tokens(self, r: Reply) -> int:
        return self.generator.count_tokens(r.prompt) if r.prompt else 0
