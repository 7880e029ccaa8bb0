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
import math
import re
import statistics
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from culbot.pipeline_config.schema import RagConfig

from . import _store
from .contracts import Contract, Hit, Passage, RetrievalMetrics

log = logging.getLogger("culbot.retrieval")

# Morphemes that carry content: nouns, numerals, verb and adjective stems, roots, foreign words, numbers, serials;
# less the generic verbs, bound nouns and question words of any question (있다, 하다, 되다, 알려 주다, 수, 것, 몇, 얼마),
# which match everything or nothing.
_CONTENT_TAGS = ("NN", "NR", "VV", "VA", "XR", "SL", "SH", "SN", "W_")
_STOP = {"있", "없", "하", "되", "알리", "주", "수", "것", "거", "데", "곳", "어떻", "같", "보", "때", "좀", "몇", "얼마"}
CANDIDATES = 50   # depth of each ranking before fusion
# In confidence, a verb or adjective of the question counts a quarter of a noun: students' verbs (닫다, 넣다, 가지다)
# are rarely the pages' and say little of the topic. Chosen on the sample set (served accuracy 0.956 -> 0.965, AUC
# 0.972 -> 0.977 with 몇/얼마 dropped as question words); the held-out set was not used.
VERB_WEIGHT = 0.25
_WORD = re.compile(r"[0-9a-z가-힣]+")


class IndexInfo(Contract):
    """``index.json``: what an index folder holds and how it was built."""

    passages: int
    documents: int
    keys: int
    dense: str | None = None   # the embedder (backend:model) of the vectors, when there are any
    dim: int | None = None
    settings: dict = {}
    calibration: dict = {}   # the no-answer threshold measured on this index when it was built, and how


@lru_cache(maxsize=1)
def _kiwi():
    from kiwipiepy import Kiwi

    return Kiwi()


MAX_QUERY_CHARS = 2000   # a question is a few hundred characters; the end of a longer one is where it asks


def tagged_morphemes(texts: list[str]) -> list[list[tuple[str, str]]]:
    """(form, tag) of the content morphemes of each text."""
    return [[(t.form.lower(), t.tag) for t in tokens if t.tag.startswith(_CONTENT_TAGS) and t.form not in _STOP] for tokens in _kiwi().tokenize(texts)]


def noun_phrases(texts: list[str]) -> list[list[str]]:
    """The nouns of each text, adjacent ones joined as written: 학생식당 메뉴는 어디서 봐요? -> 학생식당, 메뉴."""
    out = []
    for tokens in _kiwi().tokenize(texts):
        phrases, end = [], None
        for t in tokens:
            if t.tag.startswith("NN"):
                if phrases and t.start == end:
                    phrases[-1] += t.form
                else:
                    phrases.append(t.form)
                end = t.start + t.len
            else:
                end = None
        out.append([p for p in phrases if p not in _STOP])
    return out


def morphemes(texts: list[str]) -> list[list[str]]:
    """Content morphemes of each text, lower-cased: 장학금은 언제 신청해요? -> 장학금, 신청 (particles and endings dropped)."""
    return [[form for form, _ in text] for text in tagged_morphemes(texts)]


def _bm25s():
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)   # bm25s sets DEBUG on import: a line per index built
    return bm25s


class Lexical:
    """BM25 over morphemes, saved in a folder (bm25s)."""

    def __init__(self, model):
        self.model = model

    @classmethod
    def build(cls, texts: list[str], folder: Path, tokenize=None) -> "Lexical":
        """Index ``texts`` and save the index; the same texts give the same bytes in every process (the vocabulary is
        sorted: bm25s numbers the words of a token list in set order, which changes with PYTHONHASHSEED)."""
        docs = (tokenize or morphemes)(texts) if texts else [[]]
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
        tokens = [t for t in tokens if t in self.model.vocab_dict]
        if not tokens:
            return []
        n = self.model.scores["num_docs"]
        docs, scores = self.model.retrieve([tokens], k=min(k, n), show_progress=False)
        return [(int(d), float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]

    @property
    def rows(self) -> int:
        return int(self.model.scores["num_docs"])

    def postings(self, token: str):
        """Rows that hold ``token`` (from the index's own sparse matrix: nothing is re-read)."""
        col = self.model.vocab_dict.get(token)
        if col is None:
            return ()
        ptr = self.model.scores["indptr"]
        return self.model.scores["indices"][ptr[col]:ptr[col + 1]]

    def idf(self, token: str) -> float:
        """BM25's idf of ``token`` over these rows; a word no row holds gets the highest, that of a word held by none."""
        n, df = self.rows, len(self.postings(token))
        return math.log(1 + (n - df + 0.5) / (df + 0.5))


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


def nearest_scored(vectors, ids: list[str], query, k: int) -> list[tuple[str, float]]:
    """(id, cosine similarity) of the k rows most similar to ``query`` (rows and query are unit vectors), best first."""
    import numpy as np

    scores = vectors @ np.asarray(query, dtype=np.float32)
    top = np.argpartition(-scores, k - 1)[:k] if len(ids) > k else np.arange(len(ids))
    return [(ids[i], float(scores[i])) for i in top[np.argsort(-scores[top], kind="stable")]]


def nearest(vectors, ids: list[str], query, k: int) -> list[str]:
    """Ids of the k rows with the highest cosine similarity."""
    return [pid for pid, _ in nearest_scored(vectors, ids, query, k)]


@dataclass
class SearchResult:
    hits: list[Hit]
    confidence: float     # how sure retrieval is that the index answers the question (compare with the index's threshold)
    rankings: dict[str, list[str]]
    lexical_score: float = 0.0   # the best BM25 score of the question's morphemes over the passages
    coverage: float = 0.0        # idf-weighted share of the question's words (a synonym counts) found in the top document
    channels: dict[str, float] | None = None   # each channel's top score, for `culbot retrieve --json`

    def parts(self) -> dict:
        return {"confidence": self.confidence, "lexical_score": self.lexical_score, "coverage": self.coverage}


def ngrams(texts: list[str]) -> list[list[str]]:
    """Character pairs inside each word, lower-cased (장학금은 -> 장학, 학금, 금은): a student's 수강신청했는데 and the page's
    수강 신청 share 수강, 신청; two words that share a stem (등록, 등록금) share its pairs. No model, no download."""
    out = []
    for t in texts:
        grams = []
        for w in _WORD.findall(t.lower()):
            grams += [w[i:i + 2] for i in range(len(w) - 1)] if len(w) > 1 else [w]
        out.append(grams)
    return out


class Retriever:
    """An index folder, loaded for searching. ``rag`` sets k, the fusion weights and the dense query embedder;
    None: the settings the index was built with (index.json)."""

    def __init__(self, folder: Path, rag: RagConfig | None = None, embedder=None, verify: bool = True):
        self.folder = Path(folder)
        problems = _store.verify(self.folder) if verify else []
        if problems:
            raise RuntimeError(f"{self.folder}: not a finished index ({problems[0]}); build one with `culbot index`")
        self.info = _store.read_model(self.folder / "index.json", IndexInfo)
        self.rag = rag or RagConfig.model_validate({k: v for k, v in self.info.settings.items() if k in RagConfig.model_fields})
        self.passages = [Passage.model_validate(r) for r in _store.read_jsonl(self.folder / "passages.jsonl")]
        self.by_id = {p.id: p for p in self.passages}
        self.row_doc = [p.doc for p in self.passages]
        self.row_by_id = {p.id: i for i, p in enumerate(self.passages)}
        self.doc_rows: dict[str, list[int]] = {}
        for i, p in enumerate(self.passages):
            self.doc_rows.setdefault(p.doc, []).append(i)
        self.lexical = Lexical.load(self.folder / "lexical")
        self.ngram = Lexical.load(self.folder / "ngram") if (self.folder / "ngram").is_dir() else None
        self.keys = _store.read_jsonl(self.folder / "keys.jsonl")
        self.keys_lexical = Lexical.load(self.folder / "keys_lexical") if self.keys else None
        self.vectors = None
        self.embedder = embedder
        if self.info.dense and self.rag.weights.get("dense", 0) > 0:
            self.dense_ids, self.vectors = load_vectors(self.folder / "dense")
            if self.embedder is None:
                from .embeddings import make_embedder

                self.embedder = make_embedder(self.rag.model_copy(update={"dense": self.info.dense.split(":", 1)[0],
                                                                           "embedding_model": self.info.dense.split(":", 1)[1]}))

    @property
    def threshold(self) -> float | None:
        """The no-answer threshold calibrated for this index when it was built (index.json), if any."""
        return self.info.calibration.get("threshold") if self.info.calibration else None

    def expand(self, tokens: list[str]) -> list[str]:
        """The query's morphemes and those of the configured synonyms of each (기숙사 -> 생활관)."""
        extra = [m for t in tokens for syn in self.rag.synonyms.get(t, ()) for m in morphemes([syn])[0]]
        return tokens + [m for m in extra if m not in tokens]

    def groups(self, asked: list[str], tags: dict[str, str] | None = None) -> list[tuple[set[str], float]]:
        """Each distinct word of the question with its synonyms' morphemes, and its weight: the idf of the word (the
        lowest of the group: a synonym the pages use is a common word there)."""
        out = []
        for t in dict.fromkeys(asked):
            g = {t, *(m for syn in self.rag.synonyms.get(t, ()) for m in morphemes([syn])[0])}
            w = min(self.lexical.idf(x) for x in g)
            if tags and tags.get(t, "").startswith(("VV", "VA")):
                w *= VERB_WEIGHT
            out.append((g, w))
        return out

    def coverage_of(self, groups: list[tuple[set[str], float]], index: Lexical, rows: set[int]) -> float:
        """Idf-weighted share of the question's word groups that any of ``rows`` of ``index`` holds."""
        total = sum(w for _, w in groups)
        if not total:
            return 0.0
        held = sum(w for g, w in groups if any(rows.intersection(index.postings(t)) for t in g))
        return held / total

    def search(self, query: str, k: int | None = None, query_vector=None) -> SearchResult:
        """The best passages for ``query``; only its last MAX_QUERY_CHARS characters are analysed (Kiwi's time grows
        faster than the text: 20k characters without spaces take over a second)."""
        k = k or self.rag.k
        if len(query) > MAX_QUERY_CHARS:   # from the first whole word of the tail: a cut word would be a word never asked
            tail = query[-MAX_QUERY_CHARS:]
            query = tail.split(None, 1)[-1] if not query[-MAX_QUERY_CHARS - 1].isspace() else tail
        w = self.rag.weights
        tagged = tagged_morphemes([query])[0]
        asked = [form for form, _ in tagged]
        tokens = self.expand(asked)
        groups = self.groups(asked, dict(tagged))
        scores: dict[str, dict[int, float]] = {}   # channel -> passage row -> score
        scores["lexical"] = dict(self.lexical.search(tokens, CANDIDATES))
        if self.ngram is not None and w.get("ngram", 0) > 0:
            scores["ngram"] = dict(self.ngram.search(ngrams([query])[0], CANDIDATES))
        key_evidence: dict[int, float] = {}   # passage row -> the best coverage of the question by a key that names it
        if self.keys_lexical is not None and w.get("keys", 0) > 0:
            candidates = {r for ch in scores.values() for r in ch}
            for i, _ in self.keys_lexical.search(tokens, CANDIDATES):
                key = self.keys[i]
                cov = self.coverage_of(groups, self.keys_lexical, {i})
                target = self.row_of(key["passage"])
                # a title question names a document, not a passage: it lifts the passages of that document that the
                # other channels found (the first passage only when none was found)
                rows = [target] if key.get("kind") != "title" else ([r for r in self.doc_rows[self.row_doc[target]] if r in candidates] or [target])
                for r in rows:
                    key_evidence[r] = max(key_evidence.get(r, 0.0), cov)
            scores["keys"] = key_evidence
        if self.vectors is not None:
            vec = query_vector if query_vector is not None else self.embedder.embed([query])[0]
            scores["dense"] = {self.row_of(pid): s for pid, s in nearest_scored(self.vectors, self.dense_ids, vec, CANDIDATES)}
        rankings = {name: [self.passages[r].id for r, _ in sorted(ch.items(), key=lambda x: (-x[1], x[0]))] for name, ch in scores.items()}
        if self.rag.fusion == "rrf":
            fused = [(self.row_of(pid), s) for pid, s in fuse(rankings, w, self.rag.rrf_k)]
        else:
            fused = self.fuse_scores(scores)
        fused = fused[:k]
        hits = [Hit(doc=p.doc, title=p.title, url=p.url, passage=p.text, score=round(s, 6), passage_id=p.id)
                for r, s in fused for p in [self.passages[r]]]
        lexical_score = max(scores["lexical"].values(), default=0.0)
        coverage = self.coverage_of(groups, self.lexical, set(self.doc_rows[hits[0].doc])) if hits else 0.0
        confidence = self.confidence_of(lexical_score, coverage)
        return SearchResult(hits, round(confidence, 4), rankings, round(lexical_score, 4), round(coverage, 4),
                            {name: round(max(ch.values(), default=0.0), 4) for name, ch in scores.items()})

    def confidence_of(self, lexical_score: float, coverage: float) -> float:
        """The idf-weighted share of the question found in the top document: between 0 and 1 on every index, unlike a
        BM25 score, whose scale changes with the corpus (a threshold measured on one index refused half of another's)."""
        return coverage if lexical_score > 0 else 0.0

    def row_of(self, pid: str) -> int:
        return self.row_by_id[pid]

    def fuse_scores(self, scores: dict[str, dict[int, float]]) -> list[tuple[int, float]]:
        """Score fusion: each ranked channel's scores over its best (1.0 for the top passage), the keys' coverage as it is
        (a key that shares one common word with the question adds little), weighted and summed. Unlike rank fusion, a
        channel's weak top match cannot outrank a strong lexical one."""
        w = self.rag.weights
        fused: dict[int, float] = {}
        for name, ch in scores.items():
            if not ch or not w.get(name, 0):
                continue
            top = max(ch.values()) if name != "keys" else 1.0
            for r, s in ch.items():
                fused[r] = fused.get(r, 0.0) + w[name] * s / top
        return sorted(fused.items(), key=lambda x: (-x[1], x[0]))


# ----- calibrating refusal on a new index --------------------------------------------------------------

OFF_TOPIC = Path(__file__).resolve().parent.parent / "pipeline_config" / "retrieval" / "off_topic_questions.txt"
# Refuse below what 85% of the off-topic questions reach on the index: chosen on the sample set (0.80-0.95 gave balanced
# accuracy 0.865-0.956 there, 0.85 the best); the held-out set was not used (README: retrieval).
OFF_TOPIC_QUANTILE = 0.85


def off_topic_questions() -> list[str]:
    return [q for q in OFF_TOPIC.read_text(encoding="utf-8").splitlines() if q.strip() and not q.startswith("#")]


def pseudo_questions(passages: list[Passage], n: int = 100) -> list[str]:
    """Questions an index can answer, made from its own passages (evenly spread, deterministic): the two rarest-looking
    (longest) content words of a line and one other, as a student types them."""
    step = max(1, len(passages) // n)
    lines = []
    for p in passages[::step][:n]:
        body = [line for line in p.text.split("\n") if len(line) > 10] or [p.text]
        lines.append(body[len(body) // 2])
    out = []
    for words in morphemes(lines):
        words = list(dict.fromkeys(words))
        if len(words) >= 2:
            picked = sorted(words, key=lambda w: (-len(w), w))[:2] + words[:1]
            out.append(" ".join(dict.fromkeys(picked)) + " 알려주세요")
    return out


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def calibrate(retriever: Retriever) -> dict:
    """The no-answer threshold of this index: above 85% of the shipped off-topic questions' confidence on it (a big index
    matches more of their words by chance), and at most what 95% of its own pseudo-questions reach."""
    off = [retriever.search(q).confidence for q in off_topic_questions()]
    own = [retriever.search(q).confidence for q in pseudo_questions(retriever.passages)]
    t_off = quantile(off, OFF_TOPIC_QUANTILE) + 0.01 if off else 0.0
    t_own = quantile(own, 0.05) if own else 1.0
    return {"threshold": round(min(t_off, t_own), 4), "off_topic_quantile": OFF_TOPIC_QUANTILE, "off_topic_at_quantile": round(t_off - 0.01, 4), "pseudo_q05": round(t_own, 4),
            "off_topic_questions": len(off), "pseudo_questions": len(own), "confidence": "idf-weighted coverage of the question by the top document"}


# ----- measuring it ---------------------------------------------------------------------------

def _flat(text: str) -> str:
    return " ".join(text.split())


def auc(positive: list[float], negative: list[float]) -> float | None:
    """Probability that an answerable question's confidence is above an unanswerable one's (ties count half)."""
    if not positive or not negative:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def balanced_accuracy(yes: list[float], no: list[float], threshold: float) -> float:
    """Mean of the share of answerable questions at or above ``threshold`` and the share of the others below it."""
    return (sum(c >= threshold for c in yes) / len(yes) + sum(c < threshold for c in no) / len(no)) / 2


def evaluate(retriever: Retriever, questions: list[dict], k: int = 5, context_k: int | None = None,
             threshold: float | None = None) -> RetrievalMetrics:
    """recall@1, recall@k and MRR over answerable questions (gold: documents); context fact recall: the share of those
    with ``answer_facts`` whose facts all appear in the first ``context_k`` passages (what the model is given); how
    well confidence separates answerable from unanswerable questions (gold []): AUC, the balanced accuracy of
    ``threshold`` (None: the index's own, the one serving uses) and the best threshold on these questions.
    A question may carry a ``set`` name (its kind) for per-set figures."""
    context_k = context_k or retriever.rag.context_k
    threshold = retriever.threshold if threshold is None else threshold
    ranks: list[int | None] = []
    by_set: dict[str, dict[str, list]] = {}
    conf_yes, conf_no = [], []
    for q in questions:
        res = retriever.search(q["question"], k=max(k, 10, context_k))
        kind = by_set.setdefault(q.get("set", "all"), {"ranks": [], "facts": [], "yes": [], "no": []})
        if not q["gold"]:
            conf_no.append(res.confidence)
            kind["no"].append(res.confidence)
            continue
        conf_yes.append(res.confidence)
        kind["yes"].append(res.confidence)
        docs = [h.doc for h in res.hits]
        rank = next((i + 1 for i, d in enumerate(docs) if d in q["gold"]), None)
        ranks.append(rank)
        kind["ranks"].append(rank)
        if q.get("answer_facts"):
            context = _flat("\n".join(h.passage for h in res.hits[:context_k]))
            kind["facts"].append(all(_flat(f) in context for f in q["answer_facts"]))

    def figures(rs: list[int | None], facts: list[bool], yes: list[float], no: list[float]) -> dict[str, float]:
        n = max(len(rs), 1)
        out = {"questions": len(rs) + len(no)}
        if rs:
            out.update({"recall_at_1": round(sum(r == 1 for r in rs) / n, 3),
                        f"recall_at_{k}": round(sum(r is not None and r <= k for r in rs) / n, 3),
                        "mrr": round(sum(1 / r for r in rs if r) / n, 3)})
        if facts:
            out["context_fact_recall"] = round(sum(facts) / len(facts), 3)
        if threshold is not None:   # per kind: the share answered (answerable kinds) or refused (unanswerable)
            out["answered" if yes else "refused"] = round(sum(c >= threshold for c in yes) / len(yes) if yes else sum(c < threshold for c in no) / max(len(no), 1), 3)
        return out

    all_facts = [f for kind in by_set.values() for f in kind["facts"]]
    overall = figures(ranks, all_facts, conf_yes, conf_no)
    best = best_accuracy = served_accuracy = None
    if conf_yes and conf_no:   # balanced accuracy: answerable questions outnumber the others
        best = max(sorted(set(conf_yes + conf_no)), key=lambda t: (balanced_accuracy(conf_yes, conf_no, t), -t))
        best_accuracy = round(balanced_accuracy(conf_yes, conf_no, best), 3)
        if threshold is not None:
            served_accuracy = round(balanced_accuracy(conf_yes, conf_no, threshold), 3)
    return RetrievalMetrics(questions=len(questions), unanswerable=len(conf_no), recall_at_1=overall.get("recall_at_1", 0.0),
                            recall_at_5=overall.get(f"recall_at_{k}", 0.0), mrr=overall.get("mrr", 0.0),
                            context_k=context_k, context_fact_recall=overall.get("context_fact_recall"),
                            answerable_top_score_median=round(statistics.median(conf_yes), 4) if conf_yes else None,
                            unanswerable_top_score_median=round(statistics.median(conf_no), 4) if conf_no else None,
                            confidence_auc=round(auc(conf_yes, conf_no), 3) if conf_yes and conf_no else None,
                            served_threshold=threshold, served_accuracy=served_accuracy,
                            no_answer_threshold=round(best, 4) if best is not None else None, threshold_accuracy=best_accuracy,
                            by_set={name: figures(v["ranks"], v["facts"], v["yes"], v["no"]) for name, v in sorted(by_set.items())})


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


def answerable(confidence: float, threshold: float | None) -> bool | None:
    """Whether serving would answer (confidence at or above the index's threshold); None when there is no threshold."""
    return None if threshold is None else confidence >= threshold


def hits_json(hits: list[Hit]) -> list[dict]:
    return [json.loads(h.model_dump_json(exclude={"passage_id"})) for h in hits]
