"""The culbot command: fast help declared from one table, clear config errors, each stage alone against a URL."""
import json
import os
import subprocess
import re
import sys
from pathlib import Path

import pytest

from culbot.tasks import _store
from tests.servers.base import serve
from tests.servers.openai_api import OpenAIApp, OpenAIHandler, Reply, items_json
from tests.servers.univ100 import Univ100App, Univ100Handler, make_questions


def culbot(*args, env=None, cwd=None):
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "culbot.flows.cli", *args], capture_output=True, text=True, env=e, cwd=cwd, timeout=300)


def test_help_does_not_import_heavy_libraries():
    out = subprocess.run([sys.executable, "-c", "import sys; from culbot.flows.cli import build_parser; build_parser().format_help(); "
                          "print(sorted(m for m in ('prefect','datasets','openai','transformers','torch','kiwipiepy','bm25s','lancedb','sentence_transformers') if m in sys.modules))"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]"
    r = culbot("--help")
    assert r.returncode == 0 and "crawl" in r.stdout and "generate-qa" in r.stdout and "run" in r.stdout


def test_every_subcommand_help_starts_with_what_it_does_and_flags_carry_the_field_docs():
    from culbot.flows.cli import COMMANDS, build_parser
    from culbot.pipeline_config.loader import field_doc
    from culbot.pipeline_config.schema import DataProfile

    build_parser()   # the table builds
    for cmd in COMMANDS:
        helptext = subprocess.run([sys.executable, "-m", "culbot.flows.cli", *cmd.name.split(), "--help"], capture_output=True, text=True,
                                  timeout=60, env={**os.environ, "COLUMNS": "1000"}).stdout
        description = " ".join(helptext.split("\n\n")[1].split())   # the paragraph under the usage line
        assert description == cmd.help, (cmd.name, description)
    generate = subprocess.run([sys.executable, "-m", "culbot.flows.cli", "generate-qa", "--help"], capture_output=True, text=True, timeout=60).stdout
    assert " ".join(field_doc(DataProfile, "qa.backend").split()) in " ".join(generate.split()) and "[qa.backend]" in generate
    assert "{openai,replay}" in generate   # choices from the field's Literal type
    assert "--data-profile" in generate and "--train-profile" in subprocess.run(
        [sys.executable, "-m", "culbot.flows.cli", "eval", "--help"], capture_output=True, text=True, timeout=60).stdout


def test_config_docs_and_show_cover_training_profiles_too():
    docs = culbot("config", "docs")
    assert docs.returncode == 0
    for line in ("qa.max_in_flight = 4", "merge_data.validation_fraction = 0.05", "train.micro_batch_size = 1",
                 "merge_adapter.max_shard_size = \"2GB\"", "memory.usable_fraction = 0.94"):
        assert line in docs.stdout, line
    show = culbot("config", "show", "--train-profile", "gcp-l4", "--train-set", "train.micro_batch_size=1")
    assert show.returncode == 0 and json.loads(show.stdout)["train"]["micro_batch_size"] == 1
    assert json.loads(show.stdout)["model"]["quantization"] == "4bit"
    bad = culbot("crawl", "univ100", "--campus", "3", "--data-set", "univ100.page_size=0")
    assert bad.returncode == 2 and "--data-set univ100.page_size: field 'univ100.page_size'" in bad.stderr


def test_config_error_exits_2_naming_field():
    r = culbot("config", "show", "--data-set", "qa.max_in_flight=0")
    assert r.returncode == 2
    assert "sample.yaml" in r.stderr and "--data-set qa.max_in_flight: field 'qa.max_in_flight'" in r.stderr


def test_crawl_univ100_stage_alone_against_a_url(tmp_path):
    qs, ans = make_questions(25)
    app = Univ100App(questions=qs, answers=ans)
    with serve(Univ100Handler, app) as base:
        r = culbot("crawl", "univ100", "--base-url", base, "--campus", "122", "--out", str(tmp_path / "u"),
                   "--data-set", "univ100.http.rate_per_host=100")
    assert r.returncode == 0, r.stderr
    assert '"new": 25' in r.stdout and '"rows": 25' in r.stdout
    assert _store.is_complete(tmp_path / "u")


def test_generate_qa_stage_alone_against_a_url(tmp_path):
    pages = tmp_path / "pages"
    text = "충북대학교 중앙도서관은 평일 오전 9시부터 오후 10시까지 운영합니다."
    _store.atomic_write_jsonl(pages / "pages.jsonl", [{"url": "u", "title": "도서관", "text": text, "content_hash": "h"}])
    _store.write_manifest(pages, stage="crawl-cbnu", inputs={}, config={}, counts={})
    app = OpenAIApp(script={"도서관": [Reply(content=items_json([("도서관 운영 시간은?", "", "중앙도서관은 평일 오전 9시부터 오후 10시까지 운영합니다.")]))]})
    with serve(OpenAIHandler, app) as base:
        r = culbot("generate-qa", "--pages", str(pages), "--out", str(tmp_path / "qa"), "--backend", "openai", "--base-url", base + "/v1",
                   "--data-set", f"qa.cache_dir={tmp_path / 'cache'}", env={"OPENAI_API_KEY": "sk-cli-test"})
    assert r.returncode == 0, r.stderr
    assert re.search(r"API requests +1\n", r.stderr)  # the ledger is printed at the end
    assert "sk-cli-test" not in r.stdout + r.stderr
    assert len(_store.read_jsonl(tmp_path / "qa" / "rows.jsonl")) == 1


def test_stage_chain_merge_and_format_from_the_cli(tmp_path):
    from tests.conftest import REPO

    for args in (["crawl", "univ100", "--out", str(tmp_path / "u")],
                 ["load-dataset", "--name", "kullm", "--out", str(tmp_path / "k")],
                 ["merge-data", "--univ100", str(tmp_path / "u"), "--source", f"kullm={tmp_path / 'k'}", "--out", str(tmp_path / "ds")]):
        r = culbot(*args, cwd=REPO)
        assert r.returncode == 0, r.stderr
    version = (tmp_path / "ds" / "LATEST").read_text().strip()
    r = culbot("export-dataset", "--dataset", str(tmp_path / "ds" / version), "--format", "alpaca", "--out", str(tmp_path / "export"), cwd=REPO)
    assert r.returncode == 0 and "exported" in r.stdout, r.stderr
    assert {p.name for p in (tmp_path / "export").iterdir()} == {"train.jsonl", "validation.jsonl", "dataset_info.json", "README.md"}
    r = culbot("load-dataset", "--name", "nope", cwd=REPO)
    assert r.returncode == 2 and "has no dataset 'nope' (its datasets: kullm)" in r.stderr
    r = culbot("format", "--dataset", str(tmp_path / "ds" / version), "--out", str(tmp_path / "fmt"), "--template", "univ100=koalpaca", cwd=REPO)
    assert r.returncode == 0, r.stderr
    folder = r.stdout.split("done: ")[1].split("\n")[0]
    assert json.loads((tmp_path / "fmt" / folder.rsplit("/", 1)[1] / "templates.json").read_text())["map"]["univ100"] == "koalpaca"


def test_runtime_error_is_one_clear_line(tmp_path):
    r = culbot("generate-qa", "--pages", str(tmp_path / "missing"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: FileNotFoundError:") and "Traceback" not in r.stderr


def test_crawl_cbnu_stage_alone_against_a_url(tmp_path):
    from tests.servers.cbnu_site import SiteApp, SiteHandler, page

    body = "<p>" + "충북대학교 학생생활관은 매 학기 입사 신청을 받습니다. " * 5 + "</p>"
    app = SiteApp(pages={"/www/index.do": (page("생활관", body, ["/www/b.do"]), "text/html", "utf-8"),
                         "/www/b.do": (page("두 번째", body), "text/html", "utf-8")})
    with serve(SiteHandler, app) as base:
        r = culbot("crawl", "cbnu", "--seed", base + "/www/index.do", "--allow-domain", "127.0.0.1", "--out", str(tmp_path / "c"),
                   "--data-set", "cbnu.http.rate_per_host=100")
    assert r.returncode == 0, r.stderr
    assert '"pages": 2' in r.stdout and _store.is_complete(tmp_path / "c")


def _work(tmp_path, name):
    from tests.conftest import SAMPLES

    w = tmp_path / name
    (w / "raw").mkdir(parents=True)
    os.symlink(SAMPLES, w / "raw" / "samples")
    return w


@pytest.mark.slow
def test_a_run_is_read_from_any_folder_and_ships_no_path_of_its_machine(tmp_path, sample_formatted):
    """The README's layout (relative artifacts/ under the working folder): train there, evaluate from elsewhere."""
    work = _work(tmp_path, "work")
    r = culbot("train", "--data", str(sample_formatted), "--train-set", "train.max_steps=2", "--train-set", "train.save_steps=2", cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    run = next((work / "artifacts" / "runs").iterdir())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    e = culbot("eval", "--run", str(run), "--train-set", "eval.max_new_tokens=2", cwd=elsewhere)
    assert e.returncode == 0, e.stderr[-2000:]
    report = Path(e.stdout.split("report ")[1].strip())
    assert report == run / "eval" / "eval.md" and report.is_file()
    m = culbot("merge-adapter", "--run", str(run), cwd=elsewhere)
    assert m.returncode == 0, m.stderr[-2000:]
    from culbot.tasks import _store

    assert _store.is_complete(m.stdout.split("done: ")[1].split("\n")[0])   # written under this folder's artifacts/, like every output
    shipped = [p for p in (work / "artifacts").rglob("*") if p.is_file() and "checkpoints" not in p.parts]   # checkpoints stay on the host
    assert len(shipped) > 20
    leaks = [str(p.relative_to(work)) for p in shipped if str(work).encode() in p.read_bytes()]
    assert leaks == []


def test_a_crawl_that_missed_a_list_page_exits_non_zero_naming_the_offset(tmp_path):
    qs, ans = make_questions(45)
    app = Univ100App(questions=qs, answers=ans, report_total=True)
    app.faults["list:20"] = ["cut"] * 20
    with serve(Univ100Handler, app) as base:
        r = culbot("crawl", "univ100", "--base-url", base, "--out", str(tmp_path / "u"),
                   "--data-set", "univ100.http.rate_per_host=100", "--data-set", "univ100.http.backoff_base_s=0.01")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: CrawlIncomplete:") and "offset 20" in last and "listed 25 of 45" in last


def _train_until_step(tmp_path, tokenized, name):
    """`culbot train` in its own session, trained until its log shows step 3; returns (process, its working folder)."""
    work = _work(tmp_path, name)
    cmd = [sys.executable, "-m", "culbot.flows.cli", "train", "--data", str(tokenized), "--train-set", "train.max_steps=400",
           "--train-set", "train.save_steps=1000", "--train-set", "train.logging_steps=1", "--train-set", "train.eval_steps=1000"]
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if "step 3/400" in line:
            return proc, work
    raise AssertionError(f"training never reached step 3 (exit {proc.wait()})")


@pytest.mark.slow
@pytest.mark.parametrize("to", ["culbot", "group", "trainer"])
def test_sigterm_to_culbot_train_checkpoints_and_exits_75(tmp_path, sample_tokenized, to):
    import signal

    from culbot.tasks.contracts import TrainResult
    from culbot.tasks.train_entry import newest_complete_checkpoint

    proc, work = _train_until_step(tmp_path, sample_tokenized, to)
    if to == "culbot":
        proc.send_signal(signal.SIGTERM)                     # the CLI alone, as `kill <pid>` does
    elif to == "group":
        os.killpg(proc.pid, signal.SIGTERM)                  # the whole process group, as a container stop does
    else:
        trainer = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        os.kill(int(trainer[0]), signal.SIGTERM)             # the trainer alone, as a spot reclaim may
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 75, rest[-2000:]
    run = next((work / "artifacts" / "runs").iterdir())
    assert _store.read_model(run / "train_result.json", TrainResult).status == "preempted"
    assert newest_complete_checkpoint(run / "checkpoints") is not None
    assert "preempted" in rest.strip().splitlines()[-1] and "resum" in rest.strip().splitlines()[-1]


def test_rough_edges_found_operating_from_the_ui(tmp_path):
    from culbot.tasks import _store

    # a reader that stops early (`culbot config docs | head`): exit 0, no BrokenPipeError
    p = subprocess.Popen([sys.executable, "-m", "culbot.flows.cli", "config", "docs"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(100)
    p.stdout.close()
    assert p.wait(timeout=120) == 0 and b"BrokenPipe" not in p.stderr.read()
    r = culbot("crawl", "univ100", "--help")
    assert "None" not in r.stdout and "(unset: until an empty" in r.stdout
    r = culbot("plan", "--train-profile", "a6000x4", "--train-set", "train.global_batch_size=30")
    assert r.returncode == 2 and "field ''" not in r.stderr and "Value error" not in r.stderr
    assert "global_batch_size 30 is not a multiple of micro_batch_size 8 × gpus 4" in r.stderr
    r = culbot("plan", "--profile", "a6000x4")
    assert r.returncode == 0 and "time: 8 epoch(s) × " in r.stdout and "× 4 GPU(s)" in r.stdout and "h in all" in r.stdout
    r = culbot("eval", "--run", str(tmp_path / "no-such-run"))
    assert r.returncode == 1 and "not a run folder (a run folder is artifacts/runs/<profile>-<id>/" in r.stderr
    _store.write_manifest(tmp_path / "formatted" / "abc123", stage="format", inputs={}, config={}, counts={})
    r = culbot("tokenize", "--data", str(tmp_path / "formatted"))
    assert r.returncode == 1 and f"it holds finished outputs, e.g. {tmp_path / 'formatted' / 'abc123'}" in r.stderr
    # train --dry-run of a GPU profile works offline: nothing resolved on the Hub, nothing tokenized
    r = culbot("train", "--train-profile", "runpod-a100x2-llama3", "--data", str(tmp_path / "not-tokenized-yet"), "--dry-run",
               env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0 and "fits: " in r.stdout and "deepspeed --num_gpus 2" in r.stdout, r.stderr


def test_nothing_to_reparse_and_a_missing_model_folder_are_said_plainly(tmp_path):
    """Issue 22: a reparse with nothing to read printed "done" with 0 records and exit 0; a model path that does not exist
    got a Hub repo-id error."""
    (tmp_path / "univ100").mkdir()
    (tmp_path / "univ100" / "records.jsonl").write_text('{"id": "1"}\n')
    r = culbot("crawl", "univ100", "--reparse", "--out", str(tmp_path / "univ100"))
    assert r.returncode == 1 and "nothing to reparse" in r.stderr and "done" not in r.stdout, (r.stdout, r.stderr)
    assert (tmp_path / "univ100" / "records.jsonl").read_text() == '{"id": "1"}\n'   # left as it was
    r = culbot("chat", "--model", "artifacts/models/nope", "--once", "기숙사 신청은 언제 해요?", cwd=tmp_path)
    assert r.returncode == 1 and "artifacts/models/nope: no such model folder" in r.stderr and "repo" not in r.stderr.lower(), r.stderr


def test_a_runs_later_stages_take_its_training_profile_and_refuse_another(trained_run, prefect_harness):
    """Issue 22: merge-adapter with cpu-tiny-llama on a cpu-tiny run "completed"."""
    from culbot.flows.stages import merge_adapter_stage
    from culbot.tasks.run_folder import ProfileMismatch

    r = culbot("merge-adapter", "--run", str(trained_run), "--train-profile", "cpu-tiny-llama")
    assert r.returncode == 2 and f"run {trained_run.name} was trained with training profile 'cpu-tiny', not 'cpu-tiny-llama'" in r.stderr, r.stderr
    with pytest.raises(ProfileMismatch, match="give train_profile cpu-tiny"):
        merge_adapter_stage(run_dir=str(trained_run), train_profile="cpu-tiny-llama")
    from culbot.flows.cli import build_parser, train_profile_of

    assert train_profile_of(build_parser().parse_args(["merge-adapter", "--run", str(trained_run)])) == "cpu-tiny"
