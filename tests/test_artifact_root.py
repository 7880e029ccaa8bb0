"""The artifact root: folders pushed to and pulled from an fsspec URL, manifest last, verified on the way in."""
import json
import os

import pytest

from culbot.tasks import _store
from culbot.tasks import artifact_root as ar
from culbot.tasks.contracts import (
    BaseModelRef, Hyperparameters, Lineage, RunCard, RunConfig, SplitCounts, TemplateSet, TokenCounts, TrainResult,
)


def _stage_folder(home, rel="artifacts/formatted/abc123", text="안녕하세요"):
    folder = home / rel
    (folder / "sub").mkdir(parents=True)
    (folder / "train.jsonl").write_text(json.dumps({"instruction": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "sub" / "b.bin").write_bytes(bytes(range(256)) * 40)
    m = _store.write_manifest(folder, stage="format", inputs={}, config={}, counts={"rows": 1})
    return folder, m


@pytest.mark.parametrize("scheme", ["path", "file"])
def test_push_then_pull_on_a_host_without_the_folder(tmp_path, monkeypatch, scheme):
    home, remote = tmp_path / "home", tmp_path / "remote"
    home.mkdir()
    monkeypatch.chdir(home)
    root = str(remote) if scheme == "path" else f"file://{remote}"
    folder, m = _stage_folder(home)

    url = ar.push(folder, root)
    assert url == f"{root}/artifacts/formatted/abc123"
    there = json.loads((remote / "artifacts/formatted/abc123/manifest.json").read_text())
    assert there["content_hash"] == m.content_hash

    import shutil
    shutil.rmtree(home / "artifacts")  # the other host: nothing local
    assert ar.pull(folder, root) is True
    assert _store.is_complete(folder) and _store.read_manifest(folder).content_hash == m.content_hash
    assert (folder / "train.jsonl").read_text(encoding="utf-8").startswith('{"instruction": "안녕하세요"}')
    assert ar.pull(folder, root) is False  # already here and verified: nothing fetched


def test_push_is_a_no_op_when_the_same_content_is_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder, _ = _stage_folder(tmp_path)
    root = str(tmp_path / "remote")
    ar.push(folder, root)
    remote_file = tmp_path / "remote/artifacts/formatted/abc123/train.jsonl"
    before = remote_file.stat().st_mtime_ns
    ar.push(folder, root)
    assert remote_file.stat().st_mtime_ns == before


def test_an_unfinished_push_is_never_pulled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder, _ = _stage_folder(tmp_path)
    root = str(tmp_path / "remote")
    ar.push(folder, root)
    (tmp_path / "remote/artifacts/formatted/abc123/manifest.json").unlink()  # as if the push died before its last write
    import shutil
    shutil.rmtree(folder)
    with pytest.raises(ar.TransferError, match="no manifest.json there"):
        ar.pull(folder, root)
    assert not folder.exists()


def test_a_corrupt_remote_file_is_detected_and_nothing_is_installed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder, _ = _stage_folder(tmp_path)
    root = str(tmp_path / "remote")
    ar.push(folder, root)
    (tmp_path / "remote/artifacts/formatted/abc123/sub/b.bin").write_bytes(b"bit rot")
    import shutil
    shutil.rmtree(folder)
    with pytest.raises(ar.TransferError, match="content hash mismatch"):
        ar.pull(folder, root)
    assert not folder.exists() and not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]


def test_a_corrupt_local_folder_is_not_pushed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder, _ = _stage_folder(tmp_path)
    (folder / "train.jsonl").write_text("changed after the manifest\n")
    with pytest.raises(ar.TransferError, match="does not match its own manifest"):
        ar.push(folder, str(tmp_path / "remote"))


def test_a_folder_outside_the_working_directory_is_refused_with_a_reason(tmp_path, monkeypatch):
    folder, _ = _stage_folder(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(ar.TransferError, match="outside the working directory"):
        ar.push(folder, str(tmp_path / "remote"))


def _run_config(run, tokenized, base) -> RunConfig:
    """A run config whose data and local base model are the given folders, stored relative to the run."""
    from culbot.pipeline_config.train_schema import load_train_profile
    from culbot.tasks.templates import load_template

    tp = load_train_profile("cpu-tiny")
    zero = SplitCounts(rows=0, kept=0, truncated=0, over_cutoff=0, prompt_fills_cutoff=0, tokens=0, label_tokens=0)
    card = RunCard(base=BaseModelRef(name="culbot:tiny", path=os.path.relpath(base, run)), lineage=Lineage(),
                   templates=TemplateSet(map={}, default="kullm", templates={"kullm": load_template("kullm")}), profile=tp.name,
                   hyperparameters=Hyperparameters(lora=tp.lora, train=tp.train, data=tp.tokenize, model=tp.model),
                   token_counts=TokenCounts(train=zero, validation=zero))
    return RunConfig(run_name="r1", profile=tp, data=os.path.relpath(tokenized, run), card=card)


def test_a_run_travels_with_its_tokenized_data_but_not_its_checkpoints(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(home)
    tok, _ = _stage_folder(home, "artifacts/tokenized/t1")
    base, _ = _stage_folder(home, "artifacts/models/tiny")
    run = home / "artifacts/runs/cpu-tiny-r1"
    adapter, _ = _stage_folder(home, "artifacts/runs/cpu-tiny-r1/adapter")
    _store.write_model(run / "config.json", _run_config(run, tok, base))
    _store.write_model(run / "train_result.json", TrainResult(status="completed", global_step=1))
    (run / "checkpoints/checkpoint-4").mkdir(parents=True)
    (run / "checkpoints/checkpoint-4/optimizer.pt").write_bytes(b"x" * 1000)
    root = str(tmp_path / "remote")

    ar.push_run(run, root)
    assert not (tmp_path / "remote/artifacts/runs/cpu-tiny-r1/checkpoints").exists()
    import shutil
    shutil.rmtree(home / "artifacts")
    assert ar.pull_run(run, root) is True
    assert _store.is_complete(run / "adapter") and _store.is_complete(tok) and _store.is_complete(base)
    assert _store.read_model(run / "train_result.json", TrainResult).status == "completed"

    # The run grows on this host (an eval report); pushing again sends the new files too.
    _stage_folder(home, "artifacts/runs/cpu-tiny-r1/eval")
    ar.push_run(run, root)
    assert (tmp_path / "remote/artifacts/runs/cpu-tiny-r1/eval/manifest.json").is_file()


def test_any_fsspec_protocol_works(tmp_path, monkeypatch):
    """memory:// stands in for s3://, gs:// and hf://: the same code path, a different fsspec filesystem."""
    monkeypatch.chdir(tmp_path)
    folder, m = _stage_folder(tmp_path)
    ar.push(folder, "memory://culbot-test")
    import shutil
    shutil.rmtree(folder)
    assert ar.pull(folder, "memory://culbot-test/") is True
    assert _store.read_manifest(folder).content_hash == m.content_hash


def test_the_root_comes_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.delenv(ar.ENV, raising=False)
    assert ar.configured(None) is None and ar.configured("") is None
    monkeypatch.setenv(ar.ENV, "s3://lab-bucket/culbot/")
    assert ar.configured(None) == "s3://lab-bucket/culbot"
    assert ar.configured("gs://other") == "gs://other"
