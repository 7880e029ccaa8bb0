"""The culbot command: fast help, clear config errors, each stage alone against a URL."""
import json
import os
import subprocess
import sys

from culbot.tasks import _store
from tests.servers.base import serve
from tests.servers.openai_api import OpenAIApp, OpenAIHandler, Reply, items_json
from tests.servers.univ100 import Univ100App, Univ100Handler, make_questions


def culbot(*args, env=None, cwd=None):
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "culbot.flows.cli", *args], capture_output=True, text=True, env=e, cwd=cwd, timeout=300)


def test_help_does_not_import_heavy_libraries():
    out = subprocess.run([sys.executable, "-c", "import sys; from culbot.flows.cli import build_parser; build_parser().format_help(); "
                          "print(sorted(m for m in ('prefect','datasets','openai','transformers','torch') if m in sys.modules))"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]"
    r = culbot("--help")
    assert r.returncode == 0 and "crawl" in r.stdout and "generate-qa" in r.stdout and "run" in r.stdout


def test_config_error_exits_2_naming_field():
    r = culbot("config", "show", "--set", "qa.max_in_flight=0")
    assert r.returncode == 2
    assert "sample.yaml" in r.stderr and "--set qa.max_in_flight: field 'qa.max_in_flight'" in r.stderr


def test_crawl_univ100_stage_alone_against_a_url(tmp_path):
    qs, ans = make_questions(25)
    app = Univ100App(questions=qs, answers=ans)
    with serve(Univ100Handler, app) as base:
        r = culbot("crawl", "univ100", "--base-url", base, "--campus", "122", "--out", str(tmp_path / "u"),
                   "--set", "univ100.http.rate_per_host=100")
    assert r.returncode == 0, r.stderr
    assert '"new": 25' in r.stdout and '"rows": 25' in r.stdout
    assert _store.is_complete(tmp_path / "u")


def test_generate_qa_stage_alone_against_a_url(tmp_path):
    pages = tmp_path / "pages"
    text = "충북대학교 중앙도서관은 평일 오전 9시부터 오후 10시까지 운영합니다."
    _store.atomic_write_jsonl(pages / "pages.jsonl", [{"url": "u", "title": "도서관", "text": text, "content_hash": "h"}])
    _store.write_manifest(pages, stage="crawl_cbnu", inputs={}, config={}, counts={})
    app = OpenAIApp(script={"도서관": [Reply(content=items_json([("도서관 운영 시간은?", "", "중앙도서관은 평일 오전 9시부터 오후 10시까지 운영합니다.")]))]})
    with serve(OpenAIHandler, app) as base:
        r = culbot("generate-qa", "--pages", str(pages), "--out", str(tmp_path / "qa"), "--backend", "openai", "--base-url", base + "/v1",
                   "--set", f"qa.cache_dir={tmp_path / 'cache'}", env={"OPENAI_API_KEY": "sk-cli-test"})
    assert r.returncode == 0, r.stderr
    assert "API requests          1" in r.stderr  # the ledger is printed at the end
    assert "sk-cli-test" not in r.stdout + r.stderr
    assert len(_store.read_jsonl(tmp_path / "qa" / "rows.jsonl")) == 1


def test_stage_chain_merge_and_format_from_the_cli(tmp_path):
    from tests.conftest import REPO

    for args in (["crawl", "univ100", "--out", str(tmp_path / "u")],
                 ["load-kullm", "--out", str(tmp_path / "k")],
                 ["merge", "--univ100", str(tmp_path / "u"), "--kullm", str(tmp_path / "k"), "--out", str(tmp_path / "ds")]):
        r = culbot(*args, cwd=REPO)
        assert r.returncode == 0, r.stderr
    version = (tmp_path / "ds" / "LATEST").read_text().strip()
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
                   "--set", "cbnu.http.rate_per_host=100")
    assert r.returncode == 0, r.stderr
    assert '"pages": 2' in r.stdout and _store.is_complete(tmp_path / "c")
