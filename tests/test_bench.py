"""``inferbus bench`` end to end: a short sweep, its table and its JSON/CSV (no timing asserted)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import orjson
import pytest

import inferbus
from inferbus import cli
from inferbus.bench import BenchConfig, inputs_from_file, inputs_from_signature, report, run_bench
from inferbus.contract import Signature, TensorSpec

SHORT = {"window_s": 0.2, "warmup_s": 0.1, "max_windows": 4, "stability": 0.9}


@pytest.mark.usefixtures("worker")
async def test_concurrency_sweep_reports_client_and_server_figures(
    client: inferbus.Client,
) -> None:
    config = BenchConfig(model="add", version=1, concurrency=(1, 4), **SHORT)  # type: ignore[arg-type]
    inputs = {"x": np.ones((2, 4), dtype=np.float32)}
    seen: list[inferbus.bench.LevelResult] = []
    results = await run_bench(client, config, inputs, on_level=seen.append)
    assert seen == results
    assert [r.level for r in results] == [1, 4]
    for result in results:
        assert result.requests > 0
        assert result.errors == 0
        assert result.rows_per_request == 2
        assert result.samples_per_s == pytest.approx(2 * result.throughput_rps)
        lat = result.latency_ms
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert 3 <= result.windows <= 4
        assert result.server["inferences"] > 0
        assert result.server["mean_batch_size"] >= 2
        assert result.server["compute_ms"] > 0
    assert "p99 ms" in report.table(results)


@pytest.mark.usefixtures("worker")
async def test_request_rate_mode_counts_failures(client: inferbus.Client) -> None:
    config = BenchConfig(
        model="failing",
        request_rates=(200,),
        poisson=True,
        **SHORT,  # type: ignore[arg-type]
    )
    inputs = {"x": -np.ones((1, 4), dtype=np.float32)}  # failing refuses negatives
    (result,) = await run_bench(client, config, inputs)
    assert result.mode == "rate"
    assert result.requests > 0
    assert result.errors == result.requests
    assert result.throughput_rps == 0


def test_inputs_from_signature_and_file(tmp_path: Path) -> None:
    signature = Signature(
        (TensorSpec("a", "FP32", (-1, 3)), TensorSpec("b", "BYTES", (-1,)),
         TensorSpec("c", "BOOL", (2,))),
        (),
    )  # fmt: skip
    inputs = inputs_from_signature(signature, batch=5)
    assert inputs["a"].shape == (5, 3)
    assert inputs["a"].dtype == np.float32
    assert inputs["b"].shape == (5,)
    assert inputs["c"].shape == (2,)
    signature.check_inputs(inputs)
    np.savez(tmp_path / "in.npz", a=inputs["a"], c=inputs["c"])
    with pytest.raises(inferbus.BadInput, match="the model takes"):
        inputs_from_file(tmp_path / "in.npz", signature)


@pytest.mark.usefixtures("worker")
def test_bench_command_writes_json_and_csv(
    nats_server: inferbus.EmbeddedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main([
        "bench", "add", "--servers", nats_server.url, "--concurrency", "1,2",
        "--window", "0.2", "--warmup", "0.1", "--max-windows", "3", "--stability", "90",
        "--batch-size", "3",
        "--json", str(tmp_path / "b.json"), "--csv", str(tmp_path / "b.csv"),
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "samples/s" in capsys.readouterr().out
    document = orjson.loads((tmp_path / "b.json").read_bytes())
    assert document["model"] == "add"
    assert [r["level"] for r in document["results"]] == [1, 2]
    fields = {"throughput_rps", "samples_per_s", "latency_ms", "server", "stable", "errors"}
    assert fields <= set(document["results"][0])
    assert set(document["results"][0]["latency_ms"]) >= {"p50", "p90", "p95", "p99"}
    assert {"queue_ms", "compute_ms", "mean_batch_size"} <= set(document["results"][0]["server"])
    with (tmp_path / "b.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["level"] for row in rows] == ["1.0", "2.0"]
    assert all(row["rows_per_request"] == "3" for row in rows)
