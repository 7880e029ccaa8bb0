"""Searching an index folder: Korean BM25 over morphemes, question keys, optional dense vectors, fused by rank.

- Lexical: kiwipiepy morphemes (its model ships inside the package) scored with bm25s. Whitespace tokens fail
  in Korean (장학금은 / 장학금을 / 장학금 are one word); morphemes do not.
- Question keys: questions that name a passage (a document's title questions, the train split's generated QA
  instructions), searched the same way; a hit on a key is a hit on its passage.
- Dense (optional): embeddings (tasks/embeddings.py) stored in LanceDB, an embedded vector store kept as files
  inside the index folder; it never embeds anything itself, so it never downloads a model. A Retriever holds
  the vectors in memory and searches them exactly (load_vectors).
- Fusion: reciprocal-rank fusion, score = sum of weight / (rrf_k + rank) over the rankings (weights in config).

The index folder: passages.jsonl, lexical/, keys.jsonl, keys_lexical/, dense/ (when dense), gold.jsonl, index.json.
"""
from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from culbot.pipeline_config.schema import RagConfig

from . import _store
from .contracts import Contract, Hit, Passage, RetrievalMetrics

log = logging.getLogger("culbot.retrieval")

# Morphemes that carry content: nouns, numerals, verb and adjective stems, roots, foreign words, numbers, serials;
# less the generic verbs and bound nouns of any question (있다, 하다, 되다, 알려 주다, 수, 것), which match everything.
_CONTENT_TAGS = ("NN", "NR", "VV", "VA", "XR", "SL", "SH", "SN", "W_")
_STOP = {"있", "없", "하", "되", "알리", "주", "수", "것", "어떻", "같", "보", "때", "좀"}
CANDIDATES = 50   # depth of each ranking before fusion


class IndexInfo(Contract):
    """``index.json``: what an index folder holds and how it was built."""

    passages: int
    documents: int
    keys: int
    dense: str | None = None   # the embedder (backend:model) of the vectors, when there are any
    dim: int | None = None
    settings: dict = {}


@lru_cache(maxsize=1)
def _kiwi():
    from kiwipiepy import Kiwi

    return Kiwi()


def morphemes(texts: list[str]) -> list[list[str]]:
    """Content morphemes of each text, lower-cased: 장학금은 언제 신청해요? -> 장학금, 언제?, 신청 (particles and endings dropped)."""
    return [[t.form.lower() for t in tokens if t.tag.startswith(_CONTENT_TAGS) and t.form not in _STOP] for tokens in _kiwi().tokenize(texts)]


def _bm25s():
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)   # bm25s sets DEBUG on import: a line per index built
    return bm25s


class Lexical:
    """BM25 over morphemes, saved in a folder (bm25s)."""

    def __init__(self, model):
        self.model = model

    @classmethod
    def build(cls, texts: list[str], folder: Path) -> "Lexical":
        """Index ``texts`` and save the index; the same texts give the same bytes in every process (the vocabulary is
        sorted: bm25s numbers the words of a token list in set order, which changes with PYTHONHASHSEED)."""
        docs = morphemes(texts) if texts else [[]]
        vocab = {word: i for i, word in enumerate(sorted({w for doc in docs for w in doc} | {""}))}   # "": bm25s's empty token
        model = _bm25s().BM25()
        model.index(([[vocab[w] for w in doc] for doc in docs], vocab), show_progress=False)
        model.save(str(folder))
        return cls(model)

    @classmethod
    def load(cls, folder: Path) -> "Lexical":
        return cls(_bm25s().BM25.load(str(folder)))

    def search(self, tokens: list[str], k: int) -> list[tuple[int, float]]:
        """(row, score) of the best rows with a positive score."""
        if not tokens:
            return []
        n = self.model.scores["num_docs"]
        docs, scores = self.model.retrieve([tokens], k=min(k, n), show_progress=False)
        return [(int(d), float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]


def fuse(rankings: dict[str, list[str]], weights: dict[str, float], rrf_k: int) -> list[tuple[str, float]]:
    """Reciprocal-rank fusion of ranked id lists: sum of weight / (rrf_k + rank), rank from 1."""
    scores: dict[str, float] = {}
    for name, ids in rankings.items():
        w = weights.get(name, 1.0)
        for rank, pid in enumerate(ids, 1):
            scores[pid] = scores.get(pid, 0.0) + w / (rrf_k + rank)
    return sorted(scores.items(), key=lambda x: (-x[1], x[0]))


def load_vectors(folder: Path):
    """(ids, unit vectors as one float32 matrix) of the LanceDB table, held in memory for exact search:
    100k x 384 is 150 MB and a query is one matrix product (about 10 ms on 2 cores, against about 250 ms for
    LanceDB's flat scan from disk; its ANN indexes lost a quarter or more of the true top 10 on our benchmark)."""
    import lancedb
    import numpy as np

    table = lancedb.connect(str(folder)).open_table("passages").to_arrow()
    vectors = table["vector"].combine_chunks()
    return table["id"].to_pylist(), vectors.flatten().to_numpy().astype(np.float32).reshape(len(vectors), -1)


def nearest(vectors, ids: list[str], query, k: int) -> list[str]:
    """Ids of the k rows with the highest cosine similarity (rows and query are unit vectors)."""
    import numpy as np

    scores = vectors @ np.asarray(query, dtype=np.float32)
    top = np.argpartition(-scores, k - 1)[:k] if len(ids) > k else np.arange(len(ids))
    return [ids[i] for i in top[np.argsort(-scores[top], kind="stable")]]


@dataclass
class SearchResult:
    hits: list[Hit]
    confidence: float     # best lexical score x coverage (below): low means nothing answers it
    rankings: dict[str, list[str]]
    lexical_score: float = 0.0   # the best lexical score of the passage or key rankings
    coverage: float = 0.0        # share of the question's words (a synonym counts) found in the top document


class Retriever:
    """An index folder, loaded for searching. ``rag`` sets k, the fusion weights and the dense query embedder;
    None: the settings the index was built with (index.json)."""

    def __init__(self, folder: Path, rag: RagConfig | None = None, embedder=None):
        self.folder = Path(folder)
        problems = _store.verify(self.folder)
        if problems:
            raise RuntimeError(f"{self.folder}: not a finished index ({problems[0]}); build one with `culbot index`")
        self.info = _store.read_model(self.folder / "index.json", IndexInfo)
        self.rag = rag or RagConfig.model_validate({k: v for k, v in self.info.settings.items() if k in RagConfig.model_fields})
        self.passages = [Passage.model_validate(r) for r in _store.read_jsonl(self.folder / "passages.jsonl")]
        self.by_id = {p.id: p for p in self.passages}
        self.lexical = Lexical.load(self.folder / "lexical")
        self.keys = _store.read_jsonl(self.folder / "keys.jsonl")
        self.keys_lexical = Lexical.load(self.folder / "keys_lexical") if self.keys else None
        self.vectors = None
        self.embedder = embedder
        self._doc_words: dict[str, set[str]] = {}
        self._doc_texts: dict[str, list[str]] = {}   # title + text of each passage, then the question keys, per document
        for p in self.passages:
            self._doc_texts.setdefault(p.doc, []).append(f"{p.title}\n{p.text}")
        for key in self.keys:
            self._doc_texts[self.by_id[key["passage"]].doc].append(key["key"])
        if self.info.dense and self.rag.weights.get("dense", 0) > 0:
            self.dense_ids, self.vectors = load_vectors(self.folder / "dense")
            if self.embedder is None:
                from .embeddings import make_embedder

                self.embedder = make_embedder(self.rag.model_copy(update={"dense": self.info.dense.split(":", 1)[0],
                                                                           "embedding_model": self.info.dense.split(":", 1)[1]}))

    def expand(self, tokens: list[str]) -> list[str]:
        """The query's morphemes and those of the configured synonyms of each (기숙사 -> 생활관)."""
        extra = [m for t in tokens for syn in self.rag.synonyms.get(t, ()) for m in morphemes([syn])[0]]
        return tokens + [m for m in extra if m not in tokens]

    def search(self, query: str, k: int | None = None, query_vector=None) -> SearchResult:
        k = k or self.rag.k
        asked = morphemes([query])[0]
        tokens = self.expand(asked)
        lexical = [(self.passages[i].id, s) for i, s in self.lexical.search(tokens, CANDIDATES)]
        rankings = {"lexical": [pid for pid, _ in lexical]}
        confidence = lexical[0][1] if lexical else 0.0
        if self.keys_lexical is not None and self.rag.weights.get("keys", 0) > 0:
            seen: dict[str, float] = {}
            for i, s in self.keys_lexical.search(tokens, CANDIDATES):
                seen.setdefault(self.keys[i]["passage"], s)
            rankings["keys"] = list(seen)
            confidence = max([confidence, *seen.values()])
        if self.vectors is not None:
            vec = query_vector if query_vector is not None else self.embedder.embed([query])[0]
            rankings["dense"] = nearest(self.vectors, self.dense_ids, vec, CANDIDATES)
        fused = fuse(rankings, self.rag.weights, self.rag.rrf_k)[:k]
        hits = [Hit(doc=p.doc, title=p.title, url=p.url, passage=p.text, score=round(s, 6), passage_id=pid)
                for pid, s in fused for p in [self.by_id[pid]]]
        coverage = self.coverage(asked, hits[0].doc) if hits else 0.0
        return SearchResult(hits, round(confidence * coverage, 4), rankings, round(confidence, 4), round(coverage, 4))

    def doc_words(self, doc: str) -> set[str]:
        """Content morphemes of a document (every passage, title and question key), computed when first asked."""
        if doc not in self._doc_words:
            self._doc_words[doc] = {m for ms in morphemes(self._doc_texts.get(doc, [])) for m in ms}
        return self._doc_words[doc]

    def coverage(self, tokens: list[str], doc: str) -> float:
        """Share of the question's words found in ``doc``, a word or one of its synonyms: a question that shares one
        common word with a page (청주 시내버스 환승 요금 ~ 셔틀버스 요금) covers little of it; one about the page covers it all."""
        if not tokens:
            return 0.0
        words = self.doc_words(doc)
        groups = [{t, *(m for syn in self.rag.synonyms.get(t, ()) for m in morphemes([syn])[0])} for t in dict.fromkeys(tokens)]
        return sum(bool(g & words) for g in groups) / len(groups)


# ----- measuring it ---------------------------------------------------------------------------

def evaluate(retriever: Retriever, questions: list[dict], k: int = 5) -> RetrievalMetrics:
    """recall@1, recall@k and MRR over answerable questions (gold: documents), and the confidence threshold that best
    separates answerable from unanswerable ones (gold []). A question may carry a ``set`` name for per-set figures."""
    ranks: list[int | None] = []
    by_set: dict[str, list[int | None]] = {}
    conf_yes, conf_no = [], []
    for q in questions:
        res = retriever.search(q["question"], k=max(k, 10))
        if not q["gold"]:
            conf_no.append(res.confidence)
            continue
        conf_yes.append(res.confidence)
        docs = [h.doc for h in res.hits]
        rank = next((i + 1 for i, d in enumerate(docs) if d in q["gold"]), None)
        ranks.append(rank)
        by_set.setdefault(q.get("set", "all"), []).append(rank)

    def figures(rs: list[int | None]) -> dict[str, float]:
        n = max(len(rs), 1)
        return {"questions": len(rs), "recall_at_1": round(sum(r == 1 for r in rs) / n, 3),
                f"recall_at_{k}": round(sum(r is not None and r <= k for r in rs) / n, 3),
                "mrr": round(sum(1 / r for r in rs if r) / n, 3)}

    overall = figures(ranks)
    threshold = accuracy = None
    if conf_yes and conf_no:   # balanced accuracy: answerable questions outnumber the others
        def balanced(t: float) -> float:
            return (sum(c >= t for c in conf_yes) / len(conf_yes) + sum(c < t for c in conf_no) / len(conf_no)) / 2

        best = max(sorted(set(conf_yes + conf_no)), key=lambda t: (balanced(t), -t))
        threshold, accuracy = round(best, 4), round(balanced(best), 3)
    return RetrievalMetrics(questions=len(questions), unanswerable=len(conf_no), recall_at_1=overall["recall_at_1"],
                            recall_at_5=overall[f"recall_at_{k}"], mrr=overall["mrr"],
                            answerable_top_score_median=round(statistics.median(conf_yes), 4) if conf_yes else None,
                            unanswerable_top_score_median=round(statistics.median(conf_no), 4) if conf_no else None,
                            no_answer_threshold=threshold, threshold_accuracy=accuracy,
                            by_set={name: figures(rs) for name, rs in sorted(by_set.items())})


def validation_questions(index_folder: Path) -> list[dict]:
    """The validation split's generated CBNU questions, with the document their answer came from."""
    return [{"id": g["row"], "question": g["question"], "gold": [g["doc"]], "set": "validation QA"}
            for g in _store.read_jsonl(Path(index_folder) / "gold.jsonl") if g["split"] == "validation"]


def read_questions(path: Path) -> list[dict]:
    """A question file (JSONL: id, question, gold [documents; [] when it cannot be answered], optional set)."""
    rows = _store.read_jsonl(path)
    for n, r in enumerate(rows, 1):
        if not isinstance(r.get("question"), str) or not isinstance(r.get("gold", []), list):
            raise ValueError(f"{path}:{n}: expected an object with 'question' (text) and 'gold' (a list of documents)")
        r.setdefault("gold", [])
        r.setdefault("id", str(n))
    return rows


def hits_json(hits: list[Hit]) -> list[dict]:
    return [json.loads(h.model_dump_json(exclude={"passage_id"})) for h in hits]
