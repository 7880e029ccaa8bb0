"""What passes between stages, and what a folder says about itself: one definition of each.

Writers build these types and readers validate them; no module reads another's JSON by
string keys. The files on disk are these models dumped as JSON. Versioned files carry a
``version`` field, and a reader refuses a version it does not know, with the file named.

- stage hand-offs: :class:`StageRef` / :class:`RunRef` (a task's input), :class:`StageOutput` and
  its kinds :class:`RunOutput`, :class:`EvalOutput`, :class:`PublishOutput` (a task's result), and
  what the flows return (:class:`DataRefreshResult`, :class:`ChainResult`);
- ``manifest.json`` of every stage folder: :class:`Manifest`, with its :class:`Lineage`;
- a training run folder: ``config.json`` (:class:`RunConfig`, validated by the training
  entrypoint), ``train_result.json`` (:class:`TrainResult`), ``eval/eval.json``
  (:class:`EvalReport`), and the run card ``culbot.json`` (:class:`RunCard`) that travels
  with the adapter and the merged model;
- ``templates.json`` saved with formatted data, tokenized data and models: :class:`TemplateSet`.

Pure types: no I/O here (``_store.read_model`` / ``write_model`` do that), no Prefect.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from culbot.pipeline_config.train_schema import AnswerConfig, LoraConfig, ModelConfig, Schedule, TokenizeConfig, TrainProfile

SHORT_HASH_LEN = 12

# The files these types live in.
MANIFEST_FILE = "manifest.json"
TEMPLATES_FILE = "templates.json"      # TemplateSet: formatted data, tokenized data, merged models
RUN_CONFIG_FILE = "config.json"        # RunConfig, in the run folder
TRAIN_RESULT_FILE = "train_result.json"  # TrainResult, in the run folder
RUN_CARD_FILE = "culbot.json"          # RunCard, in the adapter and merged-model folders
EVAL_REPORT_FILE = "eval.json"         # EvalReport, in <run>/eval/


@dataclass(frozen=True)
class Stage:
    """A stage, declared once in its module as ``STAGE``, above its task.

    Its Prefect task takes the name, the description and the cache policy from it (``_prefect.stage_task``); the flows
    and the chain record key stage outputs by the name; the CLI command, the deployment and ``to_stage`` of the same
    name are checked against it (tests/test_layout.py). The typed inputs and the output contract are the task
    function's signature; ``key`` is the module's ``cache_key``: the inputs' values do not show everything the
    output depends on (a crawl's time window, a folder's content), and adding such an input means editing that
    function alone.
    """

    name: str                                   # "crawl-univ100": the command, the task, the deployment, to_stage
    module: str                                 # its module, named as the stage (``__name__``)
    profile: Literal["data", "train"]           # the profile it is configured by
    section: str                                # the profile's field it reads (``rag`` for index, ``tokenize`` ...)
    key: Callable[..., Any] | None = None       # the module's cache_key, or None when the inputs say it all

    def __post_init__(self):
        if self.module.rsplit(".", 1)[-1] != self.name.replace("-", "_"):
            raise ValueError(f"stage {self.name!r} is declared in {self.module}: a stage's module is named as the stage")


def short_hash(content_hash: str) -> str:
    """The one short form of a content hash: folder names, run names, log lines."""
    return content_hash[:SHORT_HASH_LEN]


class Contract(BaseModel):
    # NaN (a diverged loss) is written as the string "NaN": valid JSON that reads back as a float.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="strings")


class Versioned(Contract):
    """A file format with a version; a reader refuses any other version."""

    SCHEMA_VERSION: ClassVar[int] = 1
    version: int = 0  # 0: filled with SCHEMA_VERSION when built in code

    @model_validator(mode="before")
    @classmethod
    def _check_version(cls, data: Any) -> Any:
        if isinstance(data, dict):
            v = data.get("version", 0)
            if v in (0, None):
                data = {**data, "version": cls.SCHEMA_VERSION}
            elif v != cls.SCHEMA_VERSION:
                raise ValueError(f"{cls.__name__} version {v} is not the version {cls.SCHEMA_VERSION} this culbot reads "
                                 f"(written by another culbot release); rebuild it")
        return data


# ----- hand-offs between stages ----------------------------------------------------

class Lineage(Contract):
    """Content hashes of the data a folder was made from, carried forward so no stage reads two hops back."""

    dataset: str | None = None
    formatted: str | None = None
    tokenized: str | None = None

    def then(self, **hashes: str) -> "Lineage":
        return self.model_copy(update=hashes)


class StageRef(Contract):
    """A finished stage folder: what a task takes as input (its hash makes the cache key)."""

    path: Path
    content_hash: str


class StageOutput(StageRef):
    """What a stage task returns: the folder, its content hash, and counts for people."""

    stage: str
    counts: dict[str, Any] = {}

    def ref(self) -> StageRef:
        return StageRef(path=self.path, content_hash=self.content_hash)

    @classmethod
    def of(cls, folder: Path, manifest: "Manifest", **fields: Any) -> "StageOutput":
        return cls(path=Path(folder).resolve(), content_hash=manifest.content_hash, stage=manifest.stage,
                   counts=manifest.counts, **fields)


class PackingStats(Contract):
    examples: int
    rows: int
    max_len: int
    tokens: int
    real_token_share: float
    examples_per_row: float


class RunRef(StageRef):
    """A finished training run: ``path`` is the adapter folder, ``run_dir`` the run around it."""

    run_dir: Path


class RunOutput(StageOutput):
    """The train stage's output: ``path`` is the adapter folder, ``run_dir`` the run around it."""

    run_dir: Path
    global_step: int
    packing: PackingStats | None = None

    def ref(self) -> RunRef:
        return RunRef(path=self.path, content_hash=self.content_hash, run_dir=self.run_dir)


class EvalOutput(StageOutput):
    """The eval stage's output (``path``: <run>/eval) and the gate's verdict."""

    passed: bool
    reason: str
    eval_loss: float


class PublishOutput(StageOutput):
    """The publish stage's output (``path``: <run>/publish): what went where (a URL or a folder per kind)."""

    published: dict[str, str]


class DataRefreshResult(Contract):
    """What the data-refresh flow returns: the dataset version, its formatted form, and every stage's output."""

    dataset: StageOutput
    formatted: StageOutput
    index: StageOutput | None = None   # the retrieval index over the CBNU pages
    stages: dict[str, StageOutput]


class ChainResult(Contract):
    """What the culbot flow returns; a stage it did not reach (``to_stage``) is None."""

    data: DataRefreshResult
    tokenized: StageOutput | None = None
    run: RunOutput | None = None
    eval: EvalOutput | None = None
    model: StageOutput | None = None
    publish: PublishOutput | None = None


class Manifest(Versioned):
    """``manifest.json``, written last in every stage folder: its presence means the folder is finished."""

    SCHEMA_VERSION: ClassVar[int] = 2
    stage: str
    created_at: str = ""
    code_version: str = ""
    inputs: dict[str, str] = {}          # what was consumed: name -> content hash (or source identity)
    lineage: Lineage = Lineage()
    config: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    timings_s: dict[str, float] = {}
    files: dict[str, str] = {}           # relative path -> sha256, every file but the manifest
    content_hash: str


# ----- prompt templates --------------------------------------------------------------

class Template(Contract):
    """A named prompt template (pipeline_config/templates/<name>.json): alpaca-lora's keys, or a chat persona."""

    name: str
    description: str = ""
    kind: Literal["alpaca", "chat"] = "alpaca"  # "chat": the tokenizer's chat template renders it
    prompt_input: str = ""
    prompt_no_input: str = ""
    response_split: str | None = None
    system: str = ""


class ContextFormat(Contract):
    """How retrieved passages become a prompt's `input`, the same in training rows and in serving."""

    passage: str = "[참고 {n}] {title}\n{text}"   # {n}: 1-based position, {title}, {text}
    joiner: str = "\n\n"
    k: int = 3                   # passages in a training context: the gold one and k - 1 distractors
    no_context_share: float = 0.0  # share of rows trained without context
    sources: list[str] = []      # sources whose rows were trained with context


class TemplateSet(Contract):
    """``templates.json``: which template formats each source, with the full text of each, and the RAG context format."""

    map: dict[str, str]
    default: str
    templates: dict[str, Template]
    context: ContextFormat | None = None   # None: trained without retrieved context

    def for_source(self, source: str) -> Template:
        """The one rule that picks a template for a row's source, in training and in serving."""
        return self.templates[self.map.get(source, self.default)]


# ----- a training run ------------------------------------------------------------------

class BaseModelRef(Contract):
    """The base model: a Hub id at a commit, or a local folder (the built-in tiny model, or a path the user gave).

    ``path`` of a local base is relative to the folder holding the file, so a run folder can be
    read from anywhere and holds no path of the machine it was built on.
    """

    name: str
    revision: str | None = None
    path: str | None = None

    def location(self, holder: Path) -> str:
        """What ``from_pretrained`` takes: the Hub id, or the local folder resolved against ``holder``."""
        return str((Path(holder) / self.path).resolve()) if self.path is not None else self.name

    def relocated(self, old_holder: Path, new_holder: Path) -> "BaseModelRef":
        """The same base as seen from a file saved in ``new_holder``."""
        if self.path is None:
            return self
        return self.model_copy(update={"path": os.path.relpath(Path(old_holder) / self.path, Path(new_holder))})


class SplitCounts(Contract):
    """What tokenize did to one split (in the tokenized manifest's counts and the run card)."""

    rows: int
    kept: int
    truncated: int
    over_cutoff: int
    prompt_fills_cutoff: int
    tokens: int
    label_tokens: int
    by_source: dict[str, int] = {}


class TokenCounts(Contract):
    train: SplitCounts
    validation: SplitCounts


class SpecialTokens(Contract):
    """The special tokens a run trained with and answers with (tasks/special_tokens.py)."""

    bos: list[int] = []          # put before every prompt (alpaca-style templates; chat templates write their own)
    end_id: int                  # learned at the end of every answer
    end_token: str
    stop_ids: list[int]          # generation stops on these (the end token first)
    pad_id: int
    pad_token: str
    pad_from: Literal["tokenizer", "family", "eos"] = "tokenizer"


class Hyperparameters(Contract):
    lora: LoraConfig
    train: Schedule
    tokenize: TokenizeConfig = Field(validation_alias=AliasChoices("tokenize", "data"))   # "data" in cards written before the rename
    model: ModelConfig


class ProbeAnswer(Contract):
    question: str
    prompt: str
    answer: str


class EvalReport(Versioned):
    """``<run>/eval/eval.json``: validation loss, the gate's verdict and the probe answers."""

    run: str
    status: Literal["passed", "failed"]
    reason: str
    eval_loss: float
    perplexity: float
    label_tokens: int
    template: str
    probes: list[ProbeAnswer]
    seconds: float
    retrieval: RetrievalMetrics | None = None
    answer: AnswerConfig | None = None        # how the model answered (chat, serve and demo answer the same way)
    answers: AnswerQuality | None = None    # answer quality, against the previous model
    index: str | None = None                # content hash of the index it was evaluated with
    index_name: str | None = None           # and its folder's name (artifacts/indexes/<name>)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    # How long eval took and how fast it generated: they change on every rerun and say nothing about the model.
    TIMINGS: ClassVar[frozenset[str]] = frozenset({"seconds", "first_token_s", "tokens_per_s"})

    def verdict(self) -> dict:
        """The report without its timings: what it says about the model. A merged model is keyed by this, so an eval
        rerun that only took another time merges to the same folder."""
        def drop(value):
            if isinstance(value, dict):
                return {k: drop(v) for k, v in value.items() if k not in self.TIMINGS}
            return [drop(v) for v in value] if isinstance(value, list) else value
        return drop(self.model_dump(mode="json"))


# Answer metrics: higher is better, except false_refusal_rate.
LOWER_IS_BETTER = {"false_refusal_rate"}


class AnswerMetrics(Contract):
    """Answer quality over a question set (None: no question of that kind)."""

    questions: int
    answerable: int
    unanswerable: int
    fact_recall: float | None = None        # share of the reference's numbers, dates, contacts and names in the answer
    chrf: float | None = None               # chrF (0-100) against the reference answers
    groundedness: float | None = None       # share of answers supported by their retrieved passages (tasks/grounding.py)
    refusal_rate: float | None = None       # share of unanswerable questions answered "I don't know"
    false_refusal_rate: float | None = None  # share of answerable questions refused
    first_token_s: float | None = None      # median seconds to the first token
    tokens_per_s: float | None = None       # generated tokens per second, overall

    def gated(self) -> dict[str, float]:
        return {k: v for k in ("fact_recall", "chrf", "groundedness", "refusal_rate", "false_refusal_rate")
                if (v := getattr(self, k)) is not None}


class AnswerExample(Contract):
    id: str
    set: str
    question: str
    reference: str = ""
    answer: str
    refused: bool
    sources: list[str] = []
    grounded: bool | None = None
    fact_recall: float | None = None


class MetricChange(Contract):
    metric: str
    previous: float
    current: float
    delta: float
    margin: float | None
    regressed: bool


class AnswerQuality(Contract):
    """The answer-quality evaluation: this model's metrics and answers, and the comparison with the baseline."""

    metrics: AnswerMetrics
    baseline: str                              # what it was compared with: "published <run>" or "base model <name>"
    baseline_metrics: AnswerMetrics | None = None
    changes: list[MetricChange] = []
    floors_missed: list[str] = []
    examples: list[AnswerExample]
    baseline_answers: dict[str, str] = {}      # question id -> the baseline's answer, for side-by-side examples


class Release(Contract):
    """One published model in the registry (<publish.local_dir>/registry.json, and culbot_release.json on the Hub)."""

    run: str
    at: str
    target: str
    where: dict[str, str]
    dataset: str | None = None
    index: str | None = None                   # content hash of the index it was evaluated with
    metrics: AnswerMetrics | None = None
    answers: dict[str, str] = {}               # question id -> answer


class Registry(Versioned):
    releases: list[Release] = []


class Passage(Contract):
    """One retrievable passage of a document (``passages.jsonl`` of an index)."""

    id: str
    doc: str          # the document's file name without extension, or its URL
    title: str
    url: str
    position: int     # its place in the document, from 0
    heading: str = ""
    text: str


class Hit(Contract):
    """A retrieved passage, as `culbot retrieve` prints it."""

    doc: str
    title: str
    url: str
    passage: str
    score: float
    passage_id: str = ""


class RetrievalMetrics(Contract):
    """Retrieval quality on questions with gold documents, and how well the top score tells answerable from not."""

    questions: int
    unanswerable: int
    recall_at_1: float
    recall_at_5: float
    mrr: float
    context_k: int | None = None                  # passages the model is given
    context_fact_recall: float | None = None      # share of answerable questions whose answer facts are all in them
    answerable_top_score_median: float | None = None   # confidence, median
    unanswerable_top_score_median: float | None = None
    confidence_auc: float | None = None           # how well confidence tells answerable from unanswerable (1: always)
    served_threshold: float | None = None         # the threshold serving uses: the index's own, calibrated when it was built
    served_accuracy: float | None = None          # balanced accuracy of answer/refuse at that threshold
    no_answer_threshold: float | None = None   # the best threshold on these questions (for reference: tuned on them)
    threshold_accuracy: float | None = None   # balanced accuracy of that threshold
    by_set: dict[str, dict[str, float]] = {}


class MergeInfo(Contract):
    dtype: str
    max_logit_diff: float
    saved_max_logit_diff: float
    run: str


class RunCard(Versioned):
    """``culbot.json``: what an adapter (and the merged model made from it) says about itself.

    Merge, eval, publish and serving read it instead of taking fresh arguments.
    """

    base: BaseModelRef
    lineage: Lineage
    templates: TemplateSet
    profile: str
    hyperparameters: Hyperparameters
    token_counts: TokenCounts
    lora_targets: list[str] = []
    model_type: str | None = None           # the base's config.json model_type (gpt_neox, llama, qwen2)
    special_tokens: SpecialTokens | None = None
    prompt_example: str = ""                # the serving template's rendered prompt for an example question
    global_step: int | None = None
    train_metrics: dict[str, Any] = {}
    resumed_from: str | None = None
    eval: EvalReport | None = None          # in a merged model: the eval it passed
    merge: MergeInfo | None = None          # in a merged model: how it was merged

    def template_for(self, source: str) -> Template:
        return self.templates.for_source(source)

    @property
    def data_mix(self) -> dict[str, dict[str, int]]:
        """split -> source -> examples trained on (after tokenize's cutoff)."""
        return {"train": self.token_counts.train.by_source, "validation": self.token_counts.validation.by_source}


class TrainResult(Versioned):
    """``<run>/train_result.json``, written by the training entrypoint when it stops."""

    status: Literal["completed", "failed_guard", "preempted"]
    global_step: int
    metrics: dict[str, Any] = {}
    seconds: float | None = None
    packing: PackingStats | None = None
    log_history: list[dict[str, Any]] = []
    reason: str | None = None
    resumed_from: str | None = None


class RunConfig(Versioned):
    """``<run>/config.json``: everything the training entrypoint needs, validated on entry.

    Paths are relative to the run folder, so the run can be read (eval, merge, publish) from any
    working directory and on any host that has the same folders.
    """

    run_name: str
    profile: TrainProfile
    data: str                    # the tokenized folder
    deepspeed: str | None = None  # the DeepSpeed JSON, copied into the run folder
    card: RunCard                # what the adapter's culbot.json says, before metrics

    def data_dir(self, run_dir: Path) -> Path:
        return (Path(run_dir) / self.data).resolve()

    def base_location(self, run_dir: Path) -> str:
        return self.card.base.location(run_dir)
