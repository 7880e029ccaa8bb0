"""Retrieval: quality on the shipped pages (lexical, question keys, dense) and scale on synthetic Korean passages.

Run as: python bench/bench_retrieval.py [--sizes 1000 10000 100000] [--queries 200] [--dim 384]
                                        [--embedder bigram|local:MODEL|openai:MODEL@BASE_URL] [--out bench/results/retrieval.json]

Quality: the sample pages go through the real stages (crawl-cbnu from the folder, generate-qa replayed,
merge-data), then each retrieval setting is scored on the hand-written questions (raw/samples/rag_questions.jsonl)
and on the validation split's generated questions. Dense rows need an embedder: ``bigram`` hashes character
pairs into 1,024 dimensions (no model, no network: a check of the hybrid path, not a semantic model);
``local:`` and ``openai:`` are the pipeline's own backends for a machine that has a model or a key.

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


def make_bench_embedder(spec: str | None):
    if not spec:
        return None
    if spec == "bigram":
        return BigramEmbedder()
    from culbot.pipeline_config.schema import RagConfig
    from culbot.tasks.embeddings import make_embedder

    backend, _, model = spec.partition(":")
    model, _, base = model.partition("@")
    return make_embedder(RagConfig(dense=backend, embedding_model=model, embedding_base_url=base or None))


def sample_stages(tmp: Path) -> tuple[Path, Path, Path]:
    """(pages, qa, dataset) of the shipped samples, through the real stages (no Prefect, no network)."""
    from culbot.pipeline_config.schema import load_data_profile
    from culbot.tasks.crawl_cbnu import run_crawl
    from culbot.tasks.generate_qa import run_generate
    from culbot.tasks.merge_data import run_merge

    dp = load_data_profile("sample", [f"qa.cache_dir={tmp / 'qa_cache'}"])
    pages = run_crawl(dp.cbnu, tmp / "cbnu").path
    qa = run_generate(dp.qa, pages, tmp / "qa").path
    dataset = run_merge({"cbnu": qa}, dp.merge_data, tmp / "datasets").path
    return pages, qa, dataset


def quality(embedder_spec: str | None, tmp: Path) -> list[dict]:
    from culbot.pipeline_config.schema import RagConfig
    from culbot.tasks.index import build_index
    from culbot.tasks.retrieval import Retriever, evaluate, read_questions, validation_questions

    pages, qa, dataset = sample_stages(tmp)
    hand = read_questions(SAMPLES / "rag_questions.jsonl")
    embedder = make_bench_embedder(embedder_spec)
    settings = [("lexical (BM25 over morphemes)", dict(question_keys=False), {"lexical": 1.0}),
                ("lexical + title questions", dict(question_keys=True), {"lexical": 1.0, "keys": 0.5}),
                ("lexical + title + QA questions (train split)", dict(question_keys=True, qa=True), {"lexical": 1.0, "keys": 0.5})]
    if embedder is not None:
        settings += [(f"dense only ({embedder.name})", dict(question_keys=False, dense=True), {"dense": 1.0}),
                     (f"hybrid: lexical + dense ({embedder.name})", dict(question_keys=False, dense=True), {"lexical": 1.0, "dense": 1.0}),
                     (f"hybrid: lexical + keys + dense ({embedder.name})", dict(question_keys=True, qa=True, dense=True),
                      {"lexical": 1.0, "keys": 0.5, "dense": 1.0})]
    rows = []
    for name, how, weights in settings:
        rag = RagConfig(question_keys=how["question_keys"], weights={"lexical": 0.0, "keys": 0.0, "dense": 0.0, **weights})
        idx = build_index(pages, rag, tmp / "indexes", qa=qa if how.get("qa") else None, dataset=dataset if how.get("qa") else None,
                          embedder=embedder if how.get("dense") else None).path
        retriever = Retriever(idx, rag, embedder=embedder if how.get("dense") else None)
        h = evaluate(retriever, hand)
        v = evaluate(retriever, validation_questions(Path(build_index(pages, RagConfig(), tmp / "indexes", qa=qa, dataset=dataset).path)))
        rows.append({"setting": name, "hand_written": h.model_dump(), "validation_qa": v.model_dump()})
    return rows


def print_quality(rows: list[dict]) -> None:
    h0 = rows[0]["hand_written"]
    print(f"\nretrieval quality: {h0['questions'] - h0['unanswerable']} answerable hand-written questions "
          f"(+{h0['unanswerable']} unanswerable), {rows[0]['validation_qa']['questions']} validation-split generated questions")
    print("\n| setting | R@1 | R@5 | MRR | paraphrase R@1 | near-duplicate R@1 | no-answer acc. | validation QA R@1 |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        h, v = r["hand_written"], r["validation_qa"]
        print(f"| {r['setting']} | {h['recall_at_1']:.3f} | {h['recall_at_5']:.3f} | {h['mrr']:.3f} | "
              f"{h['by_set']['paraphrase']['recall_at_1']:.3f} | {h['by_set']['near-duplicate']['recall_at_1']:.3f} | "
              f"{h['threshold_accuracy']} | {v['recall_at_1']:.3f} |")


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
    ap.add_argument("--embedder", default="bigram", help="dense rows of the quality table: bigram, local:MODEL, openai:MODEL@URL, or '' for none")
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
