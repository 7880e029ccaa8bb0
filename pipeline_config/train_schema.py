"""Typed configuration of a training profile: hardware, model, LoRA, data, schedule and guards.

Profiles live in pipeline_config/profiles/<name>.yaml; DeepSpeed configs in
pipeline_config/deepspeed/. Load one with :func:`load_train_profile`; the batch
arithmetic (micro × accumulation × world = global) is checked here, at load.
Every field is documented here, once (`culbot config docs --train`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .loader import PACKAGE_DIR, ConfigError, Section, find_config, load_config

PROFILE_DIR = PACKAGE_DIR / "profiles"
DEEPSPEED_DIR = PACKAGE_DIR / "deepspeed"
TINY = "culbot:tiny"
TINY_FAMILIES = {TINY: "gpt_neox", "culbot:tiny-llama": "llama", "culbot:tiny-qwen2": "qwen2"}   # built in-process (tasks/tiny_model.py)


class Hardware(Section):
    gpus: int = Field(1, ge=1, description="Processes to launch on the host (one per GPU); the world size.")
    gpu_name: str = Field("cpu", description="GPU kind, a key of 'gpus' in pipeline_config/planner/planner.yaml (memory, peak TFLOP/s, price); also in the model card.")
    gpu_memory_gb: float | None = Field(None, gt=0, description="Memory per GPU in GB, overriding the GPU kind's (None: the kind's).")
    launcher: Literal["python", "torchrun", "deepspeed"] = Field("torchrun", description="How the training entrypoint is started.")
    use_cpu: bool = Field(False, description="Train on CPU (CI and laptops without a GPU).")
    work_pool: str = Field("cpu", description="Prefect work pool whose workers run on this hardware.")
    hourly_usd: float | None = Field(None, ge=0, description="Price per hour of the whole host, overriding the GPU kind's price × gpus (None: that).")
    cuda_visible_devices: str | None = Field(None, description="CUDA_VISIBLE_DEVICES for the training run on this host (e.g. '0,1,2,3'); None leaves the worker's.")
    hf_home: str | None = Field(None, description="HF_HOME (Hub cache) on this host, e.g. a large local disk; None leaves the worker's.")
    plan_check: bool = Field(True, description="Refuse to launch when `culbot plan` estimates the profile does not fit in GPU memory.")


class ModelConfig(Section):
    base: str = Field(description=f"Base model: a Hub id (e.g. EleutherAI/polyglot-ko-12.8b, beomi/Llama-3-Open-Ko-8B-Instruct-preview), a local path, or a built-in tiny model: {', '.join(TINY_FAMILIES)} (GPT-NeoX, Llama-3-style, Qwen2).")
    revision: str = Field("main", description="Hub revision; resolved to its commit sha and recorded with the adapter.")
    dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Dtype of the base weights and of mixed-precision training.")
    quantization: Literal["none", "8bit", "4bit"] = Field("none", description="bitsandbytes quantisation of the frozen base (QLoRA for 4bit).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantise the 4-bit quantisation constants too.")
    bnb_4bit_compute_dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Compute dtype of 4-bit layers.")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = Field("sdpa", description="Attention kernel.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")


class LoraConfig(Section):
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] | None = Field(None, description="Linear layers to adapt (names as in the model, e.g. query_key_value for GPT-NeoX, q_proj/v_proj for Llama and Qwen2, checked against the model's modules), 'all-linear' (peft's: every linear layer but the output head), or None: the architecture's default in pipeline_config/models/families.yaml.")


class TokenizeConfig(Section):
    cutoff_len: int = Field(1024, ge=8, description="Longest sequence in tokens.")
    train_on_inputs: bool = Field(False, description="Also learn the prompt tokens (else their labels are -100).")
    overlength: Literal["truncate", "drop"] = Field("truncate", description="What to do with rows longer than cutoff_len (counted either way).")
    packing: bool = Field(False, description="Pack examples into rows of up to cutoff_len tokens (best-fit, position_ids restart per example, no cross-attention); micro and global batch sizes then count rows. 99% real tokens at cutoff 1024 (bench/bench_prep.py).")
    template: str | None = Field(None, description="Render every row with this template (pipeline_config/templates/<name>.json), e.g. 'persona' for a chat model with a system persona; None: the data profile's per-source templates (format.template_map).")
    group_by_length: bool = Field(False, description="Batch examples of similar length (transformers' LengthGroupedSampler): 97% real tokens vs 43% for random batches at micro 8, cutoff 1024 (bench/bench_prep.py). Not with packing.")

    @model_validator(mode="after")
    def _one_batching_strategy(self):
        if self.packing and self.group_by_length:
            raise ValueError("packing and group_by_length are exclusive: packed rows are already all about cutoff_len long")
        return self


class Schedule(Section):
    micro_batch_size: int = Field(1, ge=1, description="Examples (packed rows with tokenize.packing) per GPU per forward pass.")
    global_batch_size: int = Field(1, ge=1, description="Examples (packed rows with tokenize.packing) per optimizer step over all GPUs.")
    gradient_accumulation_steps: int | None = Field(None, ge=1, description="None: global / (micro × world). If set, must make the product exact.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training split.")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps (-1: use epochs).")
    learning_rate: float = Field(3e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field("linear", description="Learning-rate schedule.")
    warmup_steps: float = Field(100, ge=0, description="Warm-up steps (a value below 1 is a ratio of all steps).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optim: str = Field("adamw_torch_fused", description="transformers optimizer name, e.g. adamw_torch_fused, paged_adamw_8bit.")
    seed: int = Field(42, description="Training seed.")
    logging_steps: int = Field(10, ge=1, description="Log loss every N optimizer steps.")
    eval_steps: int = Field(200, ge=1, description="Evaluate every N optimizer steps.")
    save_steps: int = Field(200, ge=1, description="Save a full checkpoint (adapter, optimizer, scheduler, RNG) every N steps.")
    save_total_limit: int = Field(3, ge=1, description="Checkpoints kept; older ones are deleted.")
    dataloader_num_workers: int = Field(2, ge=0, description="Data loader worker processes.")
    torch_compile: bool = Field(False, description="torch.compile the model (measure before enabling).")
    report_to: Literal["auto", "none", "wandb"] = Field("auto", description="'auto': W&B online when WANDB_API_KEY is set, else offline.")
    wandb_project: str = Field("culbot", description="W&B project (WANDB_PROJECT). The key itself comes only from the worker's environment.")

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, v: int) -> int:
        if v == 0:
            raise ValueError("0 steps trains nothing: give a positive number of steps, or -1 to train for `epochs`")
        return v


class Guards(Section):
    collapse_below: float = Field(0.02, ge=0, description="A logged loss under this counts towards collapse.")
    collapse_logs: int = Field(5, ge=1, description="Stop when this many consecutive logged losses are under collapse_below.")
    grad_norm_limit: float = Field(1e4, gt=0, description="Stop when the logged grad norm exceeds this (explosion).")


DEFAULT_PROBES = [
    "충북대학교 중앙도서관의 평일 운영 시간은 어떻게 되나요?",
    "수강신청은 어디에서 하나요?",
    "생활관 입사 신청은 언제 하나요?",
    "성적장학금을 받으려면 어떤 조건이 필요한가요?",
    "소프트웨어학과는 어느 단과대학 소속인가요?",
]


class EvalConfig(Section):
    probes: list[str] = Field(default_factory=lambda: list(DEFAULT_PROBES), description="Korean CBNU questions answered by the model in the eval report.")
    probe_source: str = Field("cbnu", description="Rows of this source's template format the probes, exactly as in training.")
    max_new_tokens: int = Field(64, ge=1, description="Generation length for probes.")
    max_eval_loss: float | None = Field(None, gt=0, description="Eval gate: a higher validation loss fails the run (None: only finite).")
    retrieval_questions: Path | None = Field(Path("raw/samples/rag_questions.jsonl"), description="Hand-written questions with gold documents (JSONL: id, question, gold; gold [] for unanswerable), scored against the index with the validation split's CBNU questions.")
    min_recall_at_5: float | None = Field(None, ge=0, le=1, description="Eval gate: a lower retrieval recall@5 fails the run (None: reported, not gated).")
    batch_size: int = Field(8, ge=1, description="Eval batch size.")
    answer_questions: int = Field(24, ge=0, description="Answer-quality evaluation: at most this many validation questions (CBNU and univ100, spread over both) are answered with retrieval, plus every hand-written question (0: no answer-quality evaluation).")
    gate: Literal["enforce", "report"] = Field("enforce", description="'enforce': an answer-quality regression against the last published model (or the base model the first time) beyond `margins`, or a metric under `floors`, fails eval and nothing is published. 'report': the same comparison is reported and nothing is refused (the tiny model cannot meet a realistic floor).")
    margins: dict[Literal["fact_recall", "chrf", "groundedness", "refusal_rate", "false_refusal_rate"], float] = Field(
        {"fact_recall": 0.02, "chrf": 1.0, "groundedness": 0.05, "refusal_rate": 0.1, "false_refusal_rate": 0.1},
        description="Largest allowed regression per answer metric against the previous model (fact_recall, groundedness and the rates are shares in [0, 1]; chrf is 0-100; false_refusal_rate regresses upwards).")
    floors: dict[Literal["fact_recall", "chrf", "groundedness", "refusal_rate"], float] = Field(
        {}, description="Absolute minimum per answer metric (e.g. fact_recall: 0.5); empty: none.")
    grounding_min_overlap: float = Field(0.5, ge=0, le=1, description="Groundedness: the share of an answer's character pairs that must appear in its retrieved passages (with every number and date in them; tasks/grounding.py).")


class Office(Section):
    name: str = Field(description="Office name, as students know it (e.g. 학생지원과).")
    contact: str = Field("", description="How to reach it: a phone number, an e-mail or a web page.")
    topics: list[str] = Field([], description="Words in a question that send it to this office (empty: the fallback office).")


DEFAULT_OFFICES = [
    Office(name="생활관 행정실", contact="https://dorm.chungbuk.ac.kr", topics=["기숙사", "생활관", "입사", "퇴사"]),
    Office(name="학생지원과 장학 담당", contact="https://www.chungbuk.ac.kr", topics=["장학", "등록금", "학자금"]),
    Office(name="학사관리과", contact="https://www.chungbuk.ac.kr", topics=["수강", "휴학", "복학", "졸업", "학점", "성적", "학사"]),
    Office(name="중앙도서관", contact="https://cbnul.chungbuk.ac.kr", topics=["도서관", "열람실", "대출"]),
    Office(name="충북대학교 대표전화", contact="043-261-2114", topics=[]),
]


class InputLimits(Section):
    """What one request may hold; past a limit the API answers 413 (body) or 400 (the rest), chat and the demo say so."""

    max_body_bytes: int = Field(262_144, ge=1024, description="Largest request body the API reads (413 past it; `culbot serve` only).")
    max_messages: int = Field(64, ge=1, description="Most messages in one request (system, user and assistant together).")
    max_message_chars: int = Field(4000, ge=1, description="Most characters in one message, the question included.")
    max_total_chars: int = Field(32_000, ge=1, description="Most characters in all messages of a request together.")


class AnswerConfig(Section):
    source: str = Field("cbnu", description="Questions are rendered with this source's training template (the chat templates saved in the tokenizer default to it).")
    max_new_tokens: int = Field(200, ge=1, description="Most tokens per answer.")
    do_sample: bool = Field(False, description="Sample (temperature, top_p) instead of greedy decoding.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass (with do_sample).")
    repetition_penalty: float = Field(1.1, ge=1, description="Penalty on repeated tokens (1: none).")
    context_k: int | None = Field(None, ge=1, description="Retrieved passages put in the prompt (None: as many as in training, templates.json context.k).")
    no_answer_threshold: float | None = Field(None, ge=0, description="Below this retrieval confidence the answer is the refusal, not a generation (None: the index's own threshold, calibrated when it was built; no index: always generate).")
    refusal: str = Field("죄송합니다. 확인된 자료에서 이 질문의 답을 찾지 못했습니다. 정확한 내용은 {office}({contact})에 문의해 주세요.",
                         description="The answer when retrieval finds nothing relevant; {office} and {contact} come from `offices`.")
    empty_answer: str = Field("관련 자료는 찾았지만 답변을 만들지 못했습니다. 아래 출처를 확인해 주세요.",
                              description="Said when the model generates no text (it ended at once): the sources are still shown.")
    offices: list[Office] = Field(default_factory=lambda: [o.model_copy() for o in DEFAULT_OFFICES],
                                  description="Where the refusal points: the first office one of whose topics is in the question, else the one without topics. Check the contacts before a release.")
    history_turns: int = Field(3, ge=0, description="Earlier turns kept for templates with a conversation form (chat); alpaca-style templates keep the last turn only.")
    limits: InputLimits = Field(default_factory=InputLimits, description="Bounds on what a student or client may send (chat, serve, demo).")


class MergeAdapterConfig(Section):
    dtype: Literal["bf16", "fp16", "fp32"] | None = Field(None, description="Dtype of the merged model (None: the base model's training dtype; fp32 on CPU).")
    max_shard_size: str = Field("2GB", description="Safetensors shard size.")
    atol: float | None = Field(None, gt=0, description="Largest allowed logit difference between merged and base + adapter (None: 1e-4 in fp32, 5e-2 in bf16/fp16).")


class PublishConfig(Section):
    target: Literal["local", "hub"] = Field("local", description="'hub': upload with huggingface_hub. 'local': write the same folder to local_dir.")
    what: Literal["merged", "adapter", "both"] = Field("both", description="Which folders to publish.")
    repo_id: str | None = Field(None, description="Hub repo for the merged model (the adapter goes to <repo_id>-lora).")
    private: bool = Field(True, description="Create Hub repos as private.")
    tag: str | None = Field(None, description="Optional tag for the uploaded revision.")
    endpoint: str | None = Field(None, description="Hub endpoint (None: HF_ENDPOINT or huggingface.co).")
    token_secret_block: str | None = Field(None, description="Prefect Secret block with the Hub token, used when HF_TOKEN is unset.")
    local_dir: Path = Field(Path("artifacts/publish"), description="Folder for target 'local'.")
    license: str = Field("apache-2.0", description="License in the model card.")


class TrainProfile(Section):
    name: str = Field(description="Profile name.")
    description: str = Field("", description="What hardware and run this profile is for.")
    hardware: Hardware = Field(default_factory=Hardware, description="Where it runs.")
    model: ModelConfig = Field(description="Base model and how it is loaded.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter.")
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig, description="The tokenize stage: cutoff, label masking, packing, template.")
    train: Schedule = Field(default_factory=Schedule, description="Batch sizes and schedule.")
    guards: Guards = Field(default_factory=Guards, description="Stop conditions for a diverging or collapsing run.")
    artifacts_root: Path = Field(Path("artifacts"), description="Runs, tokenized data and merged models go to runs/, tokenized/ and models/ below this.")
    samples_dir: Path = Field(Path("raw/samples"), description="Shipped samples; the tiny model's tokenizer is trained on them.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation and the eval gate.")
    answer: AnswerConfig = Field(default_factory=AnswerConfig, description="How the model answers (chat, serve, demo and the answer-quality eval): template, generation, refusal.")
    merge_adapter: MergeAdapterConfig = Field(default_factory=MergeAdapterConfig, description="Merging the adapter into the base model.")
    publish: PublishConfig = Field(default_factory=PublishConfig, description="Where the model goes.")
    deepspeed: str | None = Field(None, description="DeepSpeed JSON in pipeline_config/deepspeed/ (or a path); needs launcher deepspeed or torchrun.")

    @model_validator(mode="before")
    @classmethod
    def _renamed_sections(cls, data):
        if isinstance(data, dict) and "data" in data:   # a profile written before the section took its stage's name
            raise ValueError("section 'data' is now 'tokenize' (the stage it configures): rename it in the file, "
                             "or use --train-set tokenize.FIELD=VALUE")
        return data

    @model_validator(mode="after")
    def _batch_arithmetic(self):
        t, world = self.train, self.hardware.gpus
        if t.gradient_accumulation_steps is None:
            if t.global_batch_size % (t.micro_batch_size * world):
                raise ValueError(f"global_batch_size {t.global_batch_size} is not a multiple of micro_batch_size {t.micro_batch_size} × gpus {world}")
            t.gradient_accumulation_steps = t.global_batch_size // (t.micro_batch_size * world)
        elif t.micro_batch_size * t.gradient_accumulation_steps * world != t.global_batch_size:
            raise ValueError(f"micro_batch_size {t.micro_batch_size} × gradient_accumulation_steps {t.gradient_accumulation_steps} × gpus {world} = "
                             f"{t.micro_batch_size * t.gradient_accumulation_steps * world}, not global_batch_size {t.global_batch_size}")
        if self.model.quantization != "none" and self.hardware.use_cpu and self.model.quantization == "8bit":
            raise ValueError("8-bit quantisation needs a GPU; use 4bit or none on CPU")
        if self.deepspeed and self.hardware.launcher == "python":
            raise ValueError("deepspeed needs launcher 'deepspeed' or 'torchrun'")
        return self

    @property
    def runs_root(self) -> Path:
        return Path(self.artifacts_root) / "runs"

    @property
    def models_root(self) -> Path:
        """Merged models and the tiny base models."""
        return Path(self.artifacts_root) / "models"

    @property
    def tokenized_root(self) -> Path:
        return Path(self.artifacts_root) / "tokenized"

    def run_env(self) -> dict[str, str]:
        """Environment for the training run on its host (never a secret: these show in the Prefect UI)."""
        env = {"WANDB_PROJECT": self.train.wandb_project}
        if self.hardware.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.hardware.cuda_visible_devices
        if self.hardware.hf_home is not None:
            env["HF_HOME"] = self.hardware.hf_home
        return env

    def deepspeed_path(self) -> Path | None:
        if not self.deepspeed:
            return None
        p = Path(self.deepspeed)
        return p if p.is_file() else DEEPSPEED_DIR / self.deepspeed


def train_profiles() -> list[Path]:
    return sorted(PROFILE_DIR.glob("*.yaml"))


def load_train_profile(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] | dict = (), flags: dict | None = None) -> TrainProfile:
    """A training profile by shipped name (pipeline_config/profiles/<name>.yaml) or path, with --train-set overrides and flag values."""
    path = find_config(name_or_path, PROFILE_DIR, "training profile")
    prof = load_config(TrainProfile, path, overrides, flags, defaults={"name": path.stem}, override_flag="--train-set")
    ds = prof.deepspeed_path()
    if ds is not None and not ds.is_file():
        raise ConfigError(f"{path}: field 'deepspeed': {ds} not found")
    return prof
