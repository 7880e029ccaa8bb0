"""flows/runner.run_stage, the one place of orchestration: a cached stage is served only while its folder verifies;
an altered one is rebuilt; one missing here is pulled from the artifact root (pushed there when it was made);
--force rebuilds. A real Prefect task with culbot's stage cache policy, under the test harness."""
from __future__ import annotations

from pathlib import Path

import pytest
from prefect import flow, task

from culbot.tasks import _store
from culbot.tasks._prefect import stage_cache
from culbot.tasks.contracts import StageOutput

MADE: list[str] = []   # what the stage's body was run for (a cache hit does not run it)


@task(name="runner-test-stage", cache_policy=stage_cache(__name__), persist_result=True)
def make_stage(text: str, out: str) -> StageOutput:
    MADE.append(text)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    _store.atomic_write_text(folder / "data.txt", text)
    return StageOutput.of(folder, _store.write_manifest(folder, stage="runner-test-stage", inputs={}, config={"text": text},
                                                        counts={"chars": len(text)}))


@flow
def one_stage(text: str, out: str, root: str = "", force: bool = False) -> StageOutput:
    from culbot.flows.runner import run_stage

    return run_stage(make_stage, force=force, root=root or None, text=text, out=out)


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # relative outputs and the artifact root's keys resolve against the working folder
    MADE.clear()
    return tmp_path


def test_a_cached_stage_is_served_only_while_its_folder_verifies(here, prefect_harness):
    out = "artifacts/stage-a"
    first = one_stage("생활관 입사 안내", out)
    assert MADE == ["생활관 입사 안내"] and _store.is_complete(first.path)
    assert one_stage("생활관 입사 안내", out).content_hash == first.content_hash and MADE == ["생활관 입사 안내"]   # cached
    (here / out / "data.txt").write_text("변조된 내용", encoding="utf-8")
    rebuilt = one_stage("생활관 입사 안내", out)
    assert len(MADE) == 2 and rebuilt.content_hash == first.content_hash and (here / out / "data.txt").read_text(encoding="utf-8") == "생활관 입사 안내"
    one_stage("생활관 입사 안내", out, force=True)
    assert len(MADE) == 3


def test_a_stage_missing_here_is_pulled_from_the_artifact_root(here, prefect_harness):
    import shutil

    root = str(here / "shared-root")
    out = "artifacts/stage-b"
    made = one_stage("중앙도서관 운영 시간", out, root=root)   # pushed when made
    assert MADE == ["중앙도서관 운영 시간"] and list(Path(root).rglob("manifest.json"))
    shutil.rmtree(here / out)   # another host: the cache says done, the folder is not here
    pulled = one_stage("중앙도서관 운영 시간", out, root=root)
    assert MADE == ["중앙도서관 운영 시간"] and pulled.content_hash == made.content_hash and _store.is_complete(here / out)
