"""The contract types: one short-hash length, versions refused by name, portable base models, the template rule."""
import json
from pathlib import Path

import pytest

from culbot.tasks import _store
from culbot.tasks.contracts import (
    SHORT_HASH_LEN, BaseModelRef, EvalReport, Manifest, RunOutput, RunRef, StageOutput, StageRef, Template, TemplateSet, short_hash,
)


def test_one_short_hash_length():
    assert SHORT_HASH_LEN == 12 and short_hash("0123456789abcdef" * 4) == "0123456789ab"


def test_a_version_is_filled_when_built_and_refused_when_unknown(tmp_path):
    m = Manifest(stage="t", content_hash="h")
    assert m.version == Manifest.SCHEMA_VERSION == 2
    _store.write_model(tmp_path / "m.json", m)
    assert _store.read_model(tmp_path / "m.json", Manifest) == m
    (tmp_path / "m.json").write_text(json.dumps({**m.model_dump(mode="json"), "version": 1}))
    with pytest.raises(ValueError, match=r"m.json: not a valid Manifest: .*Manifest version 1 is not the version 2 this culbot reads"):
        _store.read_model(tmp_path / "m.json", Manifest)
    (tmp_path / "r.json").write_text('{"run": "x", "status": "passed"}')
    with pytest.raises(ValueError, match=r"r.json: not a valid EvalReport \(field 'reason'\): Field required"):
        _store.read_model(tmp_path / "r.json", EvalReport)


def test_a_local_base_is_stored_relative_to_the_file_that_names_it(tmp_path):
    base = BaseModelRef(name="culbot:tiny", path=str(tmp_path / "artifacts/models/tiny"))
    in_run = base.relocated(Path("/anywhere"), tmp_path / "artifacts/runs/r1")   # an absolute path: the old holder does not matter
    assert in_run.path == "../../models/tiny"
    in_adapter = in_run.relocated(tmp_path / "artifacts/runs/r1", tmp_path / "artifacts/runs/r1/adapter")
    assert in_adapter.path == "../../../models/tiny"
    assert in_adapter.location(tmp_path / "artifacts/runs/r1/adapter") == str(tmp_path / "artifacts/models/tiny")
    hub = BaseModelRef(name="EleutherAI/polyglot-ko-12.8b", revision="a" * 40)
    assert hub.relocated(tmp_path, tmp_path / "x") == hub and hub.location(tmp_path) == "EleutherAI/polyglot-ko-12.8b"


def test_the_template_for_a_source_is_chosen_in_one_place():
    t = {n: Template(name=n, prompt_input="{instruction}{input}", prompt_no_input="{instruction}") for n in ("kullm", "cbnu2")}
    ts = TemplateSet(map={"cbnu": "cbnu2"}, default="kullm", templates=t)
    assert ts.for_source("cbnu").name == "cbnu2" and ts.for_source("univ100").name == "kullm"


def test_refs_carry_no_counts_so_cache_keys_see_only_content():
    out = StageOutput(path=Path("/a"), content_hash="h", stage="crawl-univ100", counts={"new": 3})
    assert out.ref() == StageRef(path=Path("/a"), content_hash="h")
    run = RunOutput(path=Path("/r/adapter"), content_hash="h", stage="train", run_dir=Path("/r"), global_step=4)
    assert run.ref() == RunRef(path=Path("/r/adapter"), content_hash="h", run_dir=Path("/r"))
