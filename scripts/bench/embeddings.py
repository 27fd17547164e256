"""Sentence embeddings (examples/embeddings) through the bus vs the same pipeline in-process.

    python -m scripts.bench.embeddings            # prints a Markdown table

The sentences are the example's corpus twice over (302, mostly 9-16 word pieces). The app
end is the example's own: tokenise, shortest first, ``SentenceEncoder.map`` with ``pack=B``
on ``inferbus.sync``, against a worker process serving ``minilm``. The baseline runs the same
tokenisation and the same groups of B (mapping.pack_items, as ``map`` packs) through the same
ONNX file, loaded in this process with the same thread count. Rounds alternate, so drift on a
shared machine hits both. Also: bytes on the wire per sentence with pooling in the graph vs
token vectors pooled on the app end, one worker vs two, and where the CPU goes.

What limits it here is the CPU: ONNX Runtime keeps both cores busy, and the app end,
nats-server and the worker's own I/O run on the same two. Their cost per request comes out of
the model's time (most visible at one sentence a request); a second worker adds no cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

import inferbus
from examples.embeddings import app, build_repo
from inferbus import sync
from inferbus.engines import Engine, create_engine
from inferbus.pipeline.mapping import pack_items
from scripts.bench import harness
from scripts.bench.models import Figure, table

Run = Callable[[], int]  # embeds the sentences, returns how many
TOKENS_MODEL = "minilm_tokens"  # the wheel's graph as shipped: token vectors out
CONCURRENCY = 16  # Model.map's default: what the example app sends with


def bench_repository(folder: Path, built: build_repo.Built) -> Path:
    """The example's model, and beside it the unpooled graph, for the pooling comparison."""
    (folder / app.SentenceEncoder.name).symlink_to(built.model_dir, target_is_directory=True)
    tokens = folder / TOKENS_MODEL
    tokens.mkdir()
    (tokens / "model.onnx").write_bytes(build_repo.source_model(built.wheels.parent))
    (tokens / "config.toml").write_text(
        'max_batch_size = 64\nexecution = "thread"\n', encoding="utf-8"
    )
    return folder


def embed_bus(
    client: sync.SyncClient, tokenizer: Tokenizer, sentences: list[str], pack: int, in_flight: int
) -> int:
    """The example app's path; returns the rows computed."""
    return len(app.embed_all(client, tokenizer, sentences, pack=pack, concurrency=in_flight))


def embed_in_process(engine: Engine, tokenizer: Tokenizer, sentences: list[str], batch: int) -> int:
    """The app's pipeline with the engine in this process; returns the rows computed."""
    order = app.shortest_first(tokenizer, sentences)
    items = (app.tokenize(tokenizer, [sentences[i]]) for i in order)
    rows = 0
    for chunk in pack_items(items, batch, batch):
        rows += len(engine(chunk.inputs)["sentence_embedding"])
    return rows


def embed_token_vectors(client: sync.SyncClient, tokenizer: Tokenizer, sentences: list[str]) -> int:
    """The alternative: hidden states over the wire, mean-pooled and normalised here."""
    order = app.shortest_first(tokenizer, sentences)
    items = [app.tokenize(tokenizer, [sentences[i]]) for i in order]
    results = client.map(TOKENS_MODEL, items, pack=32, concurrency=2, timeout=60, progress=False)
    rows = 0
    for item, result in zip(items, results, strict=True):
        mask = item["attention_mask"][..., None].astype(np.float32)
        mean = (result["last_hidden_state"] * mask).sum(axis=1) / mask.sum(axis=1)
        vectors = mean / np.linalg.norm(mean, axis=1, keepdims=True)
        rows += len(vectors)
    return rows


def rate(run: Run) -> float:
    """Sentences per second of one run."""
    started = time.perf_counter()
    done = run()
    return done / (time.perf_counter() - started)


def alternate(first: Run, second: Run, rounds: int) -> tuple[float, float]:
    """Median rates of two runs measured in alternating rounds: other work on a shared
    machine comes in bursts of seconds, so short rounds, many, and the median."""
    a, b = [], []
    for _ in range(rounds):
        a.append(rate(first))
        b.append(rate(second))
    return float(np.median(a)), float(np.median(b))


def wire_bytes(client: sync.SyncClient, run: Run) -> tuple[float, float]:
    """Request and reply bytes per sentence, as this connection counts them."""
    stats = client.client.nats.stats
    sent, received = stats["out_bytes"], stats["in_bytes"]
    done = run()
    return (stats["out_bytes"] - sent) / done, (stats["in_bytes"] - received) / done


@contextlib.contextmanager
def workers(url: str, repo: Path, count: int) -> Iterator[list[int]]:
    """``count`` worker processes serving ``repo``; yields their pids."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(harness.worker(url, repo)).pid for _ in range(count)]


def wait_for(url: str, count: int) -> None:
    names = {app.SentenceEncoder.name, TOKENS_MODEL}
    asyncio.run(harness.wait_for_models(url, names, workers=count))


# (pack, requests in flight): 2 in flight keeps one worker busy while a reply travels and
# lets it merge little, so the batches match the baseline's; 16 is Model.map's default, where
# the worker also batches concurrent requests (more than the baseline's batch of 1 gets).
CASES = ((1, 2), (1, CONCURRENCY), (32, 2), (32, CONCURRENCY), (64, 2))


def throughput_figures(
    client: sync.SyncClient, engine: Engine, tokenizer: Tokenizer, sentences: list[str],
    rounds: int,
) -> list[Figure]:  # fmt: skip
    figures = []
    for pack, in_flight in CASES:
        ours, base = alternate(
            functools.partial(embed_bus, client, tokenizer, sentences, pack, in_flight),
            functools.partial(embed_in_process, engine, tokenizer, sentences, pack),
            rounds,
        )
        figures.append(Figure(
            f"sentences/s, pack={pack}, {in_flight} requests in flight",
            f"{ours:,.0f}/s", f"{base:,.0f}/s in-process, batches of {pack}",
            ours / base, ">= 0.9x", ours / base >= 0.9,
        ))  # fmt: skip
    return figures


def pooling_figures(
    client: sync.SyncClient, tokenizer: Tokenizer, sentences: list[str], rounds: int
) -> list[Figure]:
    pooled_run = functools.partial(embed_bus, client, tokenizer, sentences, 32, 2)
    tokens_run = functools.partial(embed_token_vectors, client, tokenizer, sentences)
    pooled_bytes = wire_bytes(client, pooled_run)
    token_bytes = wire_bytes(client, tokens_run)
    pooled, tokens = alternate(pooled_run, tokens_run, rounds)
    fewer = token_bytes[1] / pooled_bytes[1]
    speed = pooled / tokens
    return [
        Figure("reply bytes per sentence, pooled in the graph (pack=32, 2 in flight)",
               f"{pooled_bytes[1]:,.0f} B (request {pooled_bytes[0]:,.0f} B)",
               f"{token_bytes[1]:,.0f} B as token vectors", fewer, ">= 10x fewer", fewer >= 10),
        Figure("sentences/s, same: pooled in the graph vs token vectors pooled on the app end",
               f"{pooled:,.0f}/s", f"{tokens:,.0f}/s", speed, ">= 0.9x",
               speed >= 0.9),
    ]  # fmt: skip


def worker_figures(
    url: str, repo: Path, tokenizer: Tokenizer, sentences: list[str], rounds: int
) -> list[Figure]:
    """One worker process, then two, each with ONNX Runtime on every core; started afresh
    each round, so that the two alternate."""
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(rounds):
        for count in (1, 2):
            with workers(url, repo, count), sync.connect(url) as client:
                wait_for(url, count)
                app.embed_all(client, tokenizer, sentences[:64])  # warm
                run = functools.partial(embed_bus, client, tokenizer, sentences, 32, 2 * count)
                rates[count].append(rate(run))
    two, one = float(np.median(rates[2])), float(np.median(rates[1]))
    return [Figure(
        "sentences/s, pack=32, 2 in flight per worker: two worker processes vs one",
        f"{two:,.0f}/s", f"{one:,.0f}/s", two / one, "none (2 cores)", True,
    )]  # fmt: skip


def cpu_note(
    client: sync.SyncClient, pids: dict[str, int], tokenizer: Tokenizer, sentences: list[str]
) -> str:
    """Where the CPU goes. ONNX Runtime takes both cores, so what the app end and nats-server
    spend per request comes out of the model's time; packing spreads it over the sentences."""
    parts = []
    for pack in (1, 32):
        before = {name: harness.cpu_seconds(pid) for name, pid in pids.items()}
        done = embed_bus(client, tokenizer, sentences, pack, 2)
        spent = {
            name: (harness.cpu_seconds(pid) - before[name]) / done * 1e3
            for name, pid in pids.items()
        }
        parts.append(f"pack={pack}: " + ", ".join(f"{n} {t:.2f}" for n, t in spent.items()))
    return "CPU ms per sentence, 2 in flight: " + "; ".join(parts)


def run(rounds: int, copies: int) -> tuple[list[Figure], str]:
    built = build_repo.build()
    tokenizer = app.load_tokenizer(built.tokenizer)
    sentences = list(app.read_corpus()) * copies
    engine = create_engine(inferbus.load_model_config(built.model_dir))
    engine.load()
    with tempfile.TemporaryDirectory(prefix="inferbus-embeddings-") as scratch:
        repo = bench_repository(Path(scratch), built)
        with inferbus.EmbeddedServer() as server:
            with workers(server.url, repo, 1) as (pid,), sync.connect(server.url) as client:
                wait_for(server.url, 1)
                app.embed_all(client, tokenizer, sentences[:64])  # discovery, warm-up
                embed_token_vectors(client, tokenizer, sentences[:64])
                figures = throughput_figures(client, engine, tokenizer, sentences, rounds)
                figures += pooling_figures(client, tokenizer, sentences, rounds)
                pids = {"app end": os.getpid(), "nats-server": server.pid or 0, "worker": pid}
                note = cpu_note(client, pids, tokenizer, sentences)
            # Each of these rounds starts the workers afresh, which takes seconds: fewer.
            figures += worker_figures(server.url, repo, tokenizer, sentences, min(rounds, 3))
    return figures, note


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per figure")
    parser.add_argument("--copies", type=int, default=2, help="of the corpus, per run")
    args = parser.parse_args()
    figures, note = run(args.rounds, args.copies)
    print(f"machine: {harness.machine()}")
    print(table(figures))
    print(f"\n{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
