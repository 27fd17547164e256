"""Semantic search over a small corpus, with sentence embeddings computed through inferbus.

    python examples/embeddings/app.py "how do plants make their food"
    python examples/embeddings/app.py "how do plants make their food" --servers nats://host:4222

The worker serves all-MiniLM-L6-v2 with the pooling in its graph (model ``minilm``, written
by build_repo.py); this app end tokenises (the ``tokenizers`` library), sends the corpus
packed many sentences to a request, and ranks by cosine similarity. It is a plain script on
the blocking facade, ``inferbus.sync``. Without ``--servers`` (or ``$INFERBUS_SERVERS``) it
builds the repository if needed and starts a nats-server and a worker in this process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

import inferbus
from inferbus import sync

HERE = Path(__file__).resolve().parent
FETCHED = HERE / "fetched"  # build_repo.py's layout; a test holds the two files to it
REPO = FETCHED / "models"
TOKENIZER = FETCHED / "tokenizer.json"
CORPUS = HERE / "corpus.txt"

MAX_TOKENS = 256  # the longest input all-MiniLM-L6-v2 was trained on, in word pieces
# Each sentence is padded to a multiple of this many tokens: sentences of similar length then
# share a shape, so `map` can pack them into one request; pooling ignores the padding.
BUCKET = 8


def load_tokenizer(path: Path = TOKENIZER) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(path))
    # The shipped tokenizer.json pads everything to 128 tokens; pad to the bucket instead.
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", pad_to_multiple_of=BUCKET)
    tokenizer.enable_truncation(MAX_TOKENS)
    return tokenizer


def tokenize(tokenizer: Tokenizer, sentences: Sequence[str]) -> dict[str, np.ndarray]:
    """The model's three inputs for ``sentences``, padded to a common length."""
    encodings = tokenizer.encode_batch(list(sentences))
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


class SentenceEncoder(inferbus.Model[str, np.ndarray]):
    """A sentence in, its embedding out: 384 floats of unit length (pooled in the graph)."""

    name = "minilm"

    def __init__(
        self, client: inferbus.Client, *, tokenizer: Tokenizer | None = None, timeout: float = 30.0
    ) -> None:
        super().__init__(client, timeout=timeout)
        self.tokenizer = tokenizer or load_tokenizer()

    def preprocess(self, sentence: str) -> dict[str, np.ndarray]:
        return tokenize(self.tokenizer, [sentence])

    def postprocess(self, outputs: inferbus.InferResult) -> np.ndarray:
        return np.asarray(outputs["sentence_embedding"][0])


def shortest_first(tokenizer: Tokenizer, sentences: Sequence[str]) -> np.ndarray:
    """The order to send ``sentences`` in. ``map`` packs only consecutive items of one shape:
    sorted by length, those that pad to the same length follow each other and share requests."""
    tokens = [sum(e.attention_mask) for e in tokenizer.encode_batch(list(sentences))]
    return np.argsort(tokens, kind="stable")


def embed_all(
    client: sync.SyncClient,
    tokenizer: Tokenizer,
    sentences: Sequence[str],
    *,
    pack: int = 32,
    concurrency: int = 16,
) -> np.ndarray:
    """Every sentence's embedding, one row each, in the order given; ``pack`` sentences to a
    request, ``concurrency`` requests in flight."""
    order = shortest_first(tokenizer, sentences)
    encoder = client.model(SentenceEncoder, tokenizer=tokenizer)
    ordered = [sentences[i] for i in order]
    vectors = np.stack(list(encoder.map(ordered, pack=pack, concurrency=concurrency)))
    in_place = np.empty_like(vectors)
    in_place[order] = vectors
    return in_place


@dataclass(frozen=True, slots=True)
class Hit:
    score: float  # cosine similarity, -1..1
    sentence: str


@dataclass(frozen=True, slots=True)
class Index:
    """A corpus and its embeddings; vectors are unit length, so a dot product is a cosine."""

    sentences: tuple[str, ...]
    vectors: np.ndarray

    def search(self, query: np.ndarray, k: int = 5) -> list[Hit]:
        scores = self.vectors @ query
        best = np.argsort(-scores, kind="stable")[:k]
        return [Hit(float(scores[i]), self.sentences[i]) for i in best]


def read_corpus(path: Path = CORPUS) -> tuple[str, ...]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return tuple(line for line in lines if line)


def ensure_built() -> None:
    """Run build_repo.py unless its outputs are here (a script of its own: it needs onnx,
    which this app end does not)."""
    if not (TOKENIZER.is_file() and (REPO / SentenceEncoder.name / "config.toml").is_file()):
        print("building the model repository (build_repo.py)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, str(HERE / "build_repo.py")], check=True, stdout=sys.stderr)


@contextlib.contextmanager
def in_process_cluster(repo: Path = REPO) -> Iterator[str]:
    """A nats-server and a worker serving ``repo``, both in this process; yields the URL.
    The worker runs on an event loop of its own, as the blocking client does."""
    with inferbus.EmbeddedServer() as server:
        options = inferbus.ConnectOptions(servers=[server.url], name="embeddings-worker")
        worker = inferbus.Worker(inferbus.load_repository(repo), options)
        loop = sync.BackgroundLoop()
        try:
            loop.run(worker.start())
            started = f"started nats-server at {server.url} and a worker for {repo}"
            print(f"{started} in this process", file=sys.stderr, flush=True)
            yield server.url
        finally:
            try:
                loop.run(worker.stop())  # drains: answers what it has taken
            finally:
                loop.close()


@contextlib.contextmanager
def cluster(servers: str | None) -> Iterator[str]:
    """The given servers, or a cluster of this process's own when none are given."""
    if servers:
        yield servers
        return
    print("no --servers: serving the model here", file=sys.stderr, flush=True)
    with in_process_cluster() as url:
        yield url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("query", help="what to look for in the corpus")
    parser.add_argument(
        "--servers",
        default=os.environ.get("INFERBUS_SERVERS"),
        help="NATS server URL(s); default: a nats-server and a worker in this process",
    )
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="one sentence a line")
    parser.add_argument("-k", "--top", type=int, default=5, help="how many results to print")
    parser.add_argument("--pack", type=int, default=32, help="sentences per request")
    args = parser.parse_args(argv)
    ensure_built()
    tokenizer = load_tokenizer()
    corpus = read_corpus(args.corpus)
    with cluster(args.servers) as url, sync.connect(url) as client:
        started = time.perf_counter()
        index = Index(corpus, embed_all(client, tokenizer, corpus, pack=args.pack))
        elapsed = time.perf_counter() - started
        query = client.model(SentenceEncoder, tokenizer=tokenizer)(args.query)
    print(f"embedded {len(corpus)} sentences in {elapsed:.2f} s through {url}", file=sys.stderr)
    print(f"query: {args.query}")
    for rank, hit in enumerate(index.search(query, args.top), start=1):
        print(f"{rank:>2}. {hit.score:.3f}  {hit.sentence}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
