"""Build the retrieval index over CBNU documents: passages, Korean BM25, question keys and optional dense vectors.

Run as: culbot index --pages raw/cbnu/ --out artifacts/indexes            (a CBNU crawl folder)
    or: culbot index --pages my_documents/ --out artifacts/indexes        (any folder of .txt/.html documents)

In the flows the index is built after merge-data, so the question keys come from the train split only
and the validation split's CBNU questions stay unseen for the retrieval eval (gold.jsonl says which
document each generated question came from). The folder is addressed by the content of its inputs
and settings, with its manifest written last; a rerun over unchanged pages is a cache hit.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path


from culbot.pipeline_config.schema import RagConfig

from . import _store, _text
from ._prefect import stage_task
from .contracts import Stage, StageOutput, StageRef, short_hash
from .documents import read_directory
from .passages import doc_name, split_passages, subject
from .retrieval import IndexInfo, Lexical, Retriever, calibrate, ngrams

log = logging.getLogger("culbot.index")

# What shapes the index, and how it is meant to be searched (recorded in index.json; Retriever reads it back).
BUILD_SETTINGS = {"passage_tokens", "overlap_tokens", "pack_sections", "question_keys", "title_questions", "include_univ100", "dense", "embedding_model",
                  "embedding_base_url", "weights", "rrf_k", "fusion", "k", "synonyms"}


def _pages(source: Path | StageRef) -> tuple[list[dict], str]:
    """(pages, content hash): a finished CBNU crawl folder, or any folder of .txt/.html documents."""
    folder = Path(source.path if isinstance(source, StageRef) else source)
    if (folder / "pages.jsonl").is_file():
        folder, m = _store.read_input(source, "index input is not a finished CBNU crawl")
        return _store.read_jsonl(folder / "pages.jsonl"), m.content_hash
    pages, quarantine = read_directory(folder, min_text_chars=1)
    for q in quarantine:
        log.warning("index: %s set aside: %s", q["url"], q["reason"])
    return pages, _store.tree_hash(folder)


def best_passage(passages: list, text: str):
    """The passage that holds most of ``text`` (an answer), by shared character pairs."""
    return max(passages, key=lambda p: (_text.grounding_score(text, p.text), -p.position))


def question_keys(pages: list[dict], by_doc: dict, qa_rows: list[dict], train_ids: set[str], rag: RagConfig) -> list[dict]:
    keys = []
    for page in pages:
        doc = doc_name(page["url"])
        if by_doc.get(doc):
            keys += [{"key": t.replace("{subject}", subject(page.get("title") or doc)).replace("{title}", page.get("title") or doc),
                      "passage": by_doc[doc][0].id, "kind": "title"} for t in rag.title_questions]
    for r in qa_rows:
        doc = doc_name(r.get("url", ""))
        if r["id"] in train_ids and by_doc.get(doc):
            keys.append({"key": r["instruction"], "passage": best_passage(by_doc[doc], r["output"]).id, "kind": "qa"})
    return keys


def build_index(pages: Path | StageRef, rag: RagConfig, out_root: Path | None = None, *, qa: Path | StageRef | None = None,
                dataset: Path | StageRef | None = None, univ100: Path | StageRef | None = None, embedder=None) -> StageOutput:
    """Passages of every page, their BM25 index, question keys (train split), gold documents of the generated questions, vectors."""
    t0 = time.monotonic()
    out_root = Path(out_root or rag.out_root)
    page_list, pages_hash = _pages(pages)
    inputs = {"pages": pages_hash}
    qa_rows, train_ids, splits = [], set(), {}
    if qa is not None:
        qa_dir, qm = _store.read_input(qa, "index input is not a finished generate-qa output")
        qa_rows, inputs["qa"] = _store.read_jsonl(qa_dir / "rows.jsonl"), qm.content_hash
    if dataset is not None:
        ds_dir, dm = _store.read_input(dataset, "index input is not a finished dataset version")
        inputs["dataset"] = dm.content_hash
        for split in ("train", "validation"):
            splits.update({r["id"]: split for r in _store.read_table(ds_dir / f"{split}.parquet", ["id"])})
        train_ids = {i for i, s in splits.items() if s == "train"}
    else:
        train_ids = {r["id"] for r in qa_rows}   # no split given: every generated question may be a key
    if univ100 is not None and rag.include_univ100:
        u_dir, um = _store.read_input(univ100, "index input is not a finished univ100 crawl")
        inputs["univ100"] = um.content_hash
        page_list = page_list + [{"url": r["url"], "title": r["instruction"].split("\n")[0], "text": f"{r['instruction']}\n{r['output']}"}
                                 for r in _store.read_jsonl(u_dir / "rows.jsonl")]
    settings = rag.model_dump(mode="json", include=BUILD_SETTINGS)
    if embedder is not None:
        settings["embedder"] = embedder.name
    key = _store.hash_json({"inputs": inputs, "settings": settings})
    final = out_root / short_hash(key)
    if _store.is_complete(final):
        return StageOutput.of(final, _store.read_manifest(final))

    passages = [p for page in page_list for p in split_passages(page, rag.passage_tokens, rag.overlap_tokens, pack_sections=rag.pack_sections)]
    by_doc: dict = {}
    for p in passages:
        by_doc.setdefault(p.doc, []).append(p)
    keys = question_keys(page_list, by_doc, qa_rows, train_ids, rag) if rag.question_keys else []
    gold = [{"row": r["id"], "split": splits.get(r["id"], "unsplit"), "question": r["instruction"], "doc": doc,
             "passage": best_passage(by_doc[doc], r["output"]).id}
            for r in qa_rows for doc in [doc_name(r.get("url", ""))] if by_doc.get(doc)]
    staging = _store.new_staging_dir(out_root, short_hash(key))
    _store.atomic_write_jsonl(staging / "passages.jsonl", [p.model_dump() for p in passages])
    Lexical.build([f"{p.title}\n{p.text}" for p in passages], staging / "lexical")
    Lexical.build([f"{p.title}\n{p.text}" for p in passages], staging / "ngram", tokenize=ngrams)
    _store.atomic_write_jsonl(staging / "keys.jsonl", keys)
    if keys:
        Lexical.build([k["key"] for k in keys], staging / "keys_lexical")
    _store.atomic_write_jsonl(staging / "gold.jsonl", gold)
    dim = None
    if embedder is not None:
        import lancedb
        import pyarrow as pa

        vectors = embedder.embed([f"{p.title}\n{p.text}" for p in passages])
        dim = int(vectors.shape[1])
        lancedb.connect(str(staging / "dense")).create_table("passages", data=pa.table({
            "id": [p.id for p in passages], "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim)}))
    info = IndexInfo(passages=len(passages), documents=len(by_doc), keys=len(keys), dense=embedder.name if embedder else None, dim=dim,
                     settings=settings)
    _store.write_model(staging / "index.json", info)
    # refusal calibrated on this index (what serving and eval use), with the lexical channels: the calibration must
    # not depend on an embedder being reachable
    calibration = calibrate(Retriever(staging, rag.model_copy(update={"weights": {**rag.weights, "dense": 0.0}}), verify=False))
    info = info.model_copy(update={"calibration": calibration})
    _store.write_model(staging / "index.json", info)
    counts = {"documents": len(by_doc), "passages": len(passages), "title_keys": sum(k["kind"] == "title" for k in keys),
              "qa_keys": sum(k["kind"] == "qa" for k in keys), "gold_validation": sum(g["split"] == "validation" for g in gold),
              "dense": info.dense or "none", "no_answer_threshold": info.calibration["threshold"]}
    # named and hashed by its inputs and settings, like format and tokenize: the name is the hash culbot prints and later
    # stages record (the build is byte-identical too, so the manifest's file hashes hold on a rebuild)
    m = _store.write_manifest(staging, stage="index", inputs=inputs, config=settings, counts=counts, timings={"index": time.monotonic() - t0},
                              content_hash=key)
    _store.promote(staging, final)
    log.info("index %s: %d documents, %d passages, %d question keys, dense %s, no-answer threshold %s (%.1fs)", final.name, len(by_doc),
             len(passages), len(keys), info.dense or "none", info.calibration["threshold"], time.monotonic() - t0)
    return StageOutput.of(final, m)


STAGE = Stage(name="index", module=__name__, profile="data", section="rag")


@stage_task(STAGE)
def index_task(rag: RagConfig, pages: StageRef, qa: StageRef | None, dataset: StageRef | None, univ100: StageRef | None) -> StageOutput:
    from .embeddings import make_embedder

    return build_index(pages, rag, qa=qa, dataset=dataset, univ100=univ100, embedder=make_embedder(rag))
