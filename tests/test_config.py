"""Config: every shipped YAML loads, errors name the file and the field, --data-set works."""

import pytest
import yaml
from pydantic import BaseModel

from culbot.pipeline_config import schema
from culbot.pipeline_config.schema import ConfigError, DataProfile, load_data_profile, data_profiles


@pytest.mark.parametrize("path", data_profiles(), ids=lambda p: p.name)
def test_every_shipped_profile_loads(path):
    prof = load_data_profile(path)
    assert prof.name == path.stem


def test_the_shipped_planner_config_loads_and_covers_every_profile_gpu():
    from culbot.pipeline_config.planner_schema import load_planner
    from culbot.pipeline_config.train_schema import load_train_profile, train_profiles

    planner = load_planner()
    for p in train_profiles():
        assert load_train_profile(p.stem).hardware.gpu_name in planner.gpus


def test_a_planner_error_names_the_file_and_field(tmp_path):
    from culbot.pipeline_config.planner_schema import PLANNER_FILE, load_planner

    with pytest.raises(ConfigError, match=r"(?s)planner.yaml.*field 'memory.usable_fraction'"):
        load_planner(PLANNER_FILE, ["memory.usable_fraction=2"])


def test_data_profiles_are_sample_and_production():
    assert {p.stem for p in data_profiles()} >= {"sample", "production"}


def test_sample_profile_is_offline():
    prof = load_data_profile("sample")
    assert prof.univ100.source == "snapshot"
    assert prof.cbnu.source == "directory"
    assert prof.qa.backend == "replay"
    assert [d.file is not None for d in prof.datasets] == [True]


def _walk(model: type[BaseModel], prefix=""):
    for name, f in model.model_fields.items():
        yield prefix + name, f
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _walk(ann, prefix + name + ".")


def test_every_field_is_documented_once_where_declared():
    undocumented = [n for n, f in _walk(DataProfile) if not (f.description or "").strip()]
    assert undocumented == []


def test_unknown_field_names_file_and_field(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"qa": {"modle": "gpt-4"}}))
    with pytest.raises(ConfigError) as e:
        load_data_profile(p)
    msg = str(e.value)
    assert str(p) in msg and "qa.modle" in msg and "unknown field" in msg


def test_bad_value_names_file_field_and_value(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("univ100:\n  http:\n    rate_per_host: -3\n")
    with pytest.raises(ConfigError) as e:
        load_data_profile(p)
    assert f"{p}: field 'univ100.http.rate_per_host'" in str(e.value)
    assert "-3" in str(e.value)


def test_cross_field_check_names_section(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("qa:\n  backend: replay\n")
    with pytest.raises(ConfigError, match=r"field 'qa'.*replay_dir"):
        load_data_profile(p)


def test_set_overrides_are_typed_and_named_in_errors():
    prof = load_data_profile("sample", ["qa.max_in_flight=8", "univ100.keep_url_domains=[a.kr, b.kr]", "merge_data.validation_size=null"])
    assert prof.qa.max_in_flight == 8
    assert prof.univ100.keep_url_domains == ["a.kr", "b.kr"]
    with pytest.raises(ConfigError, match=r"--data-set qa.max_in_flight: field 'qa.max_in_flight'"):
        load_data_profile("sample", ["qa.max_in_flight=0"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_data_profile("sample", ["qa.max_in_flight"])


def test_unknown_profile_lists_shipped_ones():
    with pytest.raises(ConfigError, match="sample"):
        load_data_profile("nope")


def test_invalid_yaml_is_named(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("qa: [unclosed\n")
    with pytest.raises(ConfigError, match=str(p)):
        load_data_profile(p)


def test_templates_and_prompts_ship_inside_the_package():
    assert (schema.PACKAGE_DIR / "templates" / "kullm.json").is_file()
    assert (schema.PACKAGE_DIR / "prompts" / "qa" / "v1" / "user.txt").is_file()


# ----- training profiles --------------------------------------------------------

from culbot.pipeline_config.train_schema import TrainProfile, load_train_profile, train_profiles  # noqa: E402


@pytest.mark.parametrize("path", train_profiles(), ids=lambda p: p.name)
def test_every_training_profile_loads_with_exact_batch_arithmetic(path):
    t = load_train_profile(path)
    assert t.train.micro_batch_size * t.train.gradient_accumulation_steps * t.hardware.gpus == t.train.global_batch_size


def test_shipped_training_profiles_match_the_upstream_targets():
    assert {p.stem for p in train_profiles()} == {"a6000x4", "runpod-a100x2", "gcp-l4", "cpu-tiny", "runpod-a100x2-llama3", "laptop-6gb",
                                                  "cpu-tiny-llama"}
    a = load_train_profile("a6000x4")
    # upstream: 128 examples per step; packed rows hold ~3.5 examples, so 32 rows per step
    assert (a.hardware.gpus, a.train.micro_batch_size, a.tokenize.cutoff_len, a.train.global_batch_size, a.tokenize.packing) == (4, 8, 1024, 32, True)
    assert (a.lora.r, a.lora.alpha, a.lora.dropout, a.lora.target_modules) == (8, 16, 0.05, ["query_key_value"])
    assert (a.train.learning_rate, a.train.lr_scheduler, a.train.warmup_steps, a.train.gradient_accumulation_steps) == (3e-4, "linear", 100, 1)
    r = load_train_profile("runpod-a100x2")
    assert r.deepspeed_path().name == "zero3.json" and r.model.dtype == "bf16" and r.hardware.gpus == 2
    g = load_train_profile("gcp-l4")
    assert (g.model.quantization, g.model.bnb_4bit_quant_type, g.train.micro_batch_size, g.model.gradient_checkpointing, g.train.optim) == \
        ("4bit", "nf4", 2, True, "paged_adamw_8bit")
    # the persona chat model: Llama-3-Open-Ko-8B-Instruct, persona chat template, ZeRO-3, all linear layers, cosine, bf16
    c = load_train_profile("runpod-a100x2-llama3")
    assert (c.model.base, c.tokenize.template, c.deepspeed_path().name, c.lora.target_modules, c.train.lr_scheduler, c.model.dtype,
            c.hardware.gpus, c.hardware.work_pool) == ("beomi/Llama-3-Open-Ko-8B-Instruct-preview", "persona", "zero3.json", "all-linear",
                                                      "cosine", "bf16", 2, "runpod-a100x2")
    lap = load_train_profile("laptop-6gb")   # the laptop QLoRA: polyglot-ko-1.3b, nf4 + double quant, checkpointing, paged 8-bit AdamW
    assert (lap.model.base, lap.model.quantization, lap.model.bnb_4bit_quant_type, lap.model.bnb_4bit_use_double_quant,
            lap.model.gradient_checkpointing, lap.train.optim) == ("EleutherAI/polyglot-ko-1.3b", "4bit", "nf4", True, True, "paged_adamw_8bit")


def test_upstream_batch_bug_is_an_error_at_load(tmp_path):
    # upstream: 128 // 12 // 4 = 2 accumulation steps with micro 12 on 4 GPUs -> an effective batch of 96, not 128
    with pytest.raises(ConfigError, match=r"micro_batch_size 12 × gradient_accumulation_steps 2 × gpus 4 = 96, not global_batch_size 128"):
        load_train_profile("a6000x4", ["train.global_batch_size=128", "train.micro_batch_size=12", "train.gradient_accumulation_steps=2"])
    with pytest.raises(ConfigError, match="not a multiple"):
        load_train_profile("a6000x4", ["train.global_batch_size=128", "train.micro_batch_size=12"])


def test_packing_and_length_grouping_are_exclusive():
    with pytest.raises(ConfigError, match=r"field 'tokenize'.*packing and group_by_length are exclusive"):
        load_train_profile("a6000x4", ["tokenize.group_by_length=true"])
    assert load_train_profile("a6000x4", ["tokenize.packing=false", "tokenize.group_by_length=true"]).tokenize.group_by_length


def test_training_profile_fields_are_documented():
    assert [n for n, f in _walk(TrainProfile) if not (f.description or "").strip()] == []


def test_one_loader_names_the_flag_that_set_a_bad_value():
    with pytest.raises(ConfigError, match=r"--campus: field 'univ100.campus_id'"):
        load_data_profile("sample", flags={"univ100.campus_id": ("--campus", "twelve")})
    with pytest.raises(ConfigError, match=r"--train-set train.micro_batch_size: field 'train.micro_batch_size'"):
        load_train_profile("cpu-tiny", ["train.micro_batch_size=0"])
    from culbot.flows.cli import build_parser, load_profile_for

    a = build_parser().parse_args(["format", "--dataset", "d", "--template", "univ100=koalpaca"])
    prof = load_profile_for(a.command_spec, a)
    assert prof.format.template_map == {"kullm": "kullm", "cbnu": "cbnu2", "univ100": "koalpaca", "feedback": "cbnu2"}   # merged into the mapping


@pytest.mark.parametrize("override, says", [
    ("train.learning_rate=.inf", "finite number"), ("train.epochs=.inf", "finite number"), ("train.learning_rate=.nan", "finite number"),
    ("train.max_steps=-5", "greater than or equal to -1"), ("train.max_steps=0", "0 steps trains nothing"),
    ("train..epochs=3", "is not a field name"), (".train.epochs=3", "is not a field name"), ("train.epochs.=3", "is not a field name"),
    ("train.epochs = 3", "is not a field name"),
])
def test_non_finite_out_of_range_and_malformed_overrides_exit_2(override, says, capsys):
    """Issue 22: .inf passed validation and crashed training; -5 steps and malformed keys were applied silently."""
    from culbot.flows.cli import main

    assert main(["plan", "--train-profile", "cpu-tiny", "--train-set", override]) == 2
    assert says in capsys.readouterr().err


def test_a_flow_override_with_a_malformed_field_name_is_refused():
    from culbot.pipeline_config.loader import ConfigError
    from culbot.pipeline_config.train_schema import load_train_profile

    with pytest.raises(ConfigError, match="'train..epochs' is not a field name"):
        load_train_profile("cpu-tiny", {"train..epochs": 3})


def test_one_override_flag_per_profile_kind_on_every_command(capsys):
    """Issue 25: --set meant data fields on some commands and training fields on others. Now --data-set is a data-profile
    field and --train-set a training-profile field wherever a command reads that profile; --set says which to use."""
    from culbot.flows.cli import COMMANDS, build_parser, load_profile_for

    parser = build_parser()
    for cmd in [c for c in COMMANDS if c.profile]:
        flag, field = ("--data-set", "qa.max_in_flight=3") if cmd.profile == "data" else ("--train-set", "train.max_steps=3")
        argv = [*cmd.name.split(), *(["full"] if cmd.name == "run" else []), flag, field,
                *[x for a in cmd.args if a.kwargs.get("required") for x in (a.flag.split()[0], "somewhere")]]
        a = parser.parse_args(argv)
        profile = load_profile_for(a.command_spec, a)
        assert (profile.qa.max_in_flight if cmd.profile == "data" else profile.train.max_steps) == 3, cmd.name
        with pytest.raises(SystemExit) as e:
            parser.parse_args([*cmd.name.split(), "--set", field])
        assert e.value.code == 2 and "use --data-set for a data-profile field or --train-set" in capsys.readouterr().err
    a = parser.parse_args(["run", "full", "--data-set", "qa.max_in_flight=3", "--train-set", "train.max_steps=3"])
    assert a.data_overrides == ["qa.max_in_flight=3"] and a.train_overrides == ["train.max_steps=3"]
    for argv in (["plan", "--train-set", "train.max_steps=3"], ["config", "show", "--data-set", "qa.max_in_flight=3"]):
        parser.parse_args(argv)
