"""Dense retrieval for real: the openai client against a local /v1/embeddings server, vectors in LanceDB, fused with BM25;
and a sentence-transformers model (a tiny BERT built here, loaded from its folder)."""
import numpy as np
import pytest

from culbot.pipeline_config.schema import ConfigError, RagConfig
from culbot.pipeline_config.schema import RetryPolicy
from culbot.tasks.embeddings import LocalEmbedder, OpenAIEmbedder, make_embedder
from culbot.tasks.index import build_index
from culbot.tasks.retrieval import Retriever
from tests.conftest import SAMPLES
from tests.servers.base import serve
from tests.servers.openai_api import OpenAIApp, OpenAIHandler, bigram_vector

FAST = RetryPolicy(max_retries=3, backoff_base_s=0.01, backoff_max_s=0.05, retry_after_max_s=1.0)


def test_openai_embeddings_are_batched_normalised_and_carry_the_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("CULBOT_TEST_EMBED_KEY", "sk-embed-test")
    app = OpenAIApp(script={}, embedding_errors=[429, 503])
    with serve(OpenAIHandler, app) as base:
        e = OpenAIEmbedder("text-embedding-3-small", f"{base}/v1", "CULBOT_TEST_EMBED_KEY", batch=4, rule=FAST)
        texts = [f"{i}번 셔틀버스는 정문에서 출발합니다." for i in range(10)]
        v = e.embed(texts)
    assert v.shape == (10, 64) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    expected = np.asarray(bigram_vector(texts[3]), np.float32)
    assert np.allclose(v[3], expected / np.linalg.norm(expected), atol=1e-5)   # rows stay in input order
    assert sorted(app.embedding_inputs) == [2, 4, 4]   # batches of 4; the 429 and 503 were retried
    assert app.auth == {"Bearer sk-embed-test"} and app.bodies[0]["model"] == "text-embedding-3-small"


def test_a_missing_key_names_the_setting_and_a_server_that_keeps_failing_says_so(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ConfigError, match="rag.api_key_env: environment variable OPENAI_API_KEY is not set"):
        make_embedder(RagConfig(dense="openai"))
    app = OpenAIApp(script={}, embedding_errors=[500] * 10)
    with serve(OpenAIHandler, app) as base:
        with pytest.raises(RuntimeError, match="embeddings request failed: .*HTTP 500"):
            OpenAIEmbedder("m", f"{base}/v1", "OPENAI_API_KEY", batch=8, rule=FAST).embed(["가나다"])


def test_a_hybrid_index_stores_vectors_in_lancedb_and_fuses_them_with_bm25(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-embed-test")
    app = OpenAIApp(script={})
    with serve(OpenAIHandler, app) as base:
        rag = RagConfig(dense="openai", embedding_base_url=f"{base}/v1", embed_batch=16)
        out = build_index(SAMPLES / "cbnu_pages", rag, tmp_path, embedder=make_embedder(rag))
        info = (out.path / "index.json").read_text()
        assert '"dense": "openai:text-embedding-3-small"' in info and '"dim": 64' in info
        assert (out.path / "dense").is_dir() and out.counts["dense"] == "openai:text-embedding-3-small"
        passages = out.counts["passages"]
        assert sum(app.embedding_inputs) == passages and max(app.embedding_inputs) <= 16

        r = Retriever(out.path)   # the query embedder comes back from index.json: same model, same server
        res = r.search("휴학은 몇 년까지 가능해요?")
        assert set(res.rankings) == {"lexical", "ngram", "keys", "dense"} and len(res.rankings["dense"]) > 0
        assert res.hits[0].doc == "휴학 및 복학 안내"
        assert sum(app.embedding_inputs) == passages + 1   # one query, one vector

        # a query vector handed in (e.g. computed in a batch) is used as is; the server is not asked again
        vec = np.asarray(bigram_vector("셔틀버스 시간표"), np.float32)
        r.search("셔틀버스 시간표", query_vector=vec / np.linalg.norm(vec))
        assert sum(app.embedding_inputs) == passages + 1

        # the same pages and settings: a cache hit, nothing embedded again
        again = build_index(SAMPLES / "cbnu_pages", rag, tmp_path, embedder=make_embedder(rag))
        assert again.path == out.path and sum(app.embedding_inputs) == passages + 1
    # with the dense weight at 0 the index is searched without the embeddings server
    lexical_only = Retriever(out.path, rag.model_copy(update={"weights": {"lexical": 1.0, "keys": 0.5, "dense": 0.0}}))
    assert set(lexical_only.search("휴학 기간").rankings) == {"lexical", "keys"}


def _tiny_sentence_model(folder) -> str:
    """A 2-layer BERT with a WordPiece vocabulary trained on the sample pages, saved as a sentence-transformers folder."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertModel, BertTokenizerFast

    texts = [p.read_text(encoding="utf-8", errors="ignore") for p in sorted((SAMPLES / "cbnu_pages").glob("*.txt"))]
    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=600, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    bert_dir = folder / "bert"
    BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                      mask_token="[MASK]").save_pretrained(bert_dir)
    import torch

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=256)).save_pretrained(bert_dir)
    word = Transformer(str(bert_dir), max_seq_length=128)
    st_dir = folder / "st"
    SentenceTransformer(modules=[word, Pooling(word.get_embedding_dimension(), "mean")]).save(str(st_dir))
    return str(st_dir)


def test_a_local_sentence_transformers_model_builds_and_searches_a_hybrid_index(tmp_path):
    model = _tiny_sentence_model(tmp_path)
    e = LocalEmbedder(model, batch=8)
    v = e.embed(["중앙도서관 운영 시간", "중앙도서관 운영 시간", "학생식당 메뉴"])
    assert v.shape == (3, 32) and np.allclose(v[0], v[1]) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    rag = RagConfig(dense="local", embedding_model=model)
    out = build_index(SAMPLES / "cbnu_pages", rag, tmp_path / "idx", embedder=e)
    assert f'"dense": "local:{model}"' in (out.path / "index.json").read_text()
    res = Retriever(out.path).search("휴학은 몇 년까지 가능해요?")   # the model is loaded again from the folder named in index.json
    assert "dense" in res.rankings and len(res.rankings["dense"]) > 0 and res.hits[0].doc == "휴학 및 복학 안내"
