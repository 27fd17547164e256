"""GPU check: every engine this machine can run vs the ONNX Runtime CPU reference, then speed.

    python scripts/gpu_check.py            # < 5 minutes; prints a table

Model: the digits MLP from examples/ (the same weights in every engine: the PyTorch module is
built from the ONNX file's initializers). For each engine: the largest difference from ONNX
Runtime on the CPU over the 360 held-out images, relative to the largest logit, and
samples/s at batch 1, 8 and 64.
Engines that cannot run here are listed with the reason. TensorRT's wheels are too large for
the lent GPU machines, so there the TensorRT row says "not installed"; the CUDA buffer
handling it relies on is checked on its own (cuda-python: pinned and device memory, copies).
Where TensorRT runs, two instances sharing one plan (a profile and context each) are run at
once and compared too. Last, the torch engine served through the bus (an embedded nats-server
and a worker in this process) against the same engine called in-process, at the same batch:
the target is at least 0.8x.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import inferbus
from inferbus.engines import Engine, create_engine

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 8, 64)
Run = Callable[[np.ndarray], np.ndarray]


def held_out() -> np.ndarray:
    with np.load(ROOT / "examples/data/digits_heldout.npz") as data:
        return np.ascontiguousarray(data["images"].reshape(-1, 64).astype(np.float32) / 16.0)


def digits_config() -> inferbus.ModelConfig:
    return inferbus.load_model_config(ROOT / "examples/models/digits")


def onnxruntime_run(providers: list[str]) -> Run:
    import onnxruntime as ort

    session = ort.InferenceSession(str(digits_config().path), providers=providers)
    return lambda x: np.asarray(session.run(["logits"], {"pixels": x})[0])


def export_digits_torch(folder: Path) -> inferbus.ModelConfig:
    """The digits MLP as a ``torch.export`` program in ``folder`` (its weights read from the ONNX
    file's initializers), and a config that serves it with ``engine = "torch"``."""
    import onnx
    import torch
    from onnx import numpy_helper

    config = digits_config()
    weights = [numpy_helper.to_array(t) for t in onnx.load(config.path).graph.initializer]
    matrices = [w for w in weights if w.ndim == 2]
    biases = [w for w in weights if w.ndim == 1]
    layers: list[Any] = []
    for index, (matrix, bias) in enumerate(zip(matrices, biases, strict=True)):
        linear = torch.nn.Linear(*matrix.shape)
        linear.weight.data = torch.from_numpy(matrix.T.copy())
        linear.bias.data = torch.from_numpy(bias.copy())
        layers += [linear] + ([torch.nn.ReLU()] if index < len(matrices) - 1 else [])
    module = torch.nn.Sequential(*layers).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    example = torch.zeros(2, matrices[0].shape[0])
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "model.pt2"))
    inputs = ({"name": "pixels", "datatype": "FP32", "shape": [-1, matrices[0].shape[0]]},)
    outputs = ({"name": "logits", "datatype": "FP32", "shape": [-1, matrices[-1].shape[1]]},)
    return dataclasses.replace(
        config, engine="torch", file="model.pt2", directory=folder, inputs=inputs, outputs=outputs
    )


def torch_engine() -> Engine:
    """A loaded TorchEngine (made by ``create_engine``) serving the digits MLP: on CUDA when
    there is a GPU, else the CPU, as the engine itself decides."""
    folder = Path(tempfile.mkdtemp(prefix="inferbus-gpu-check-torch-"))
    engine = create_engine(export_digits_torch(folder))
    engine.load()
    return engine


def torch_run() -> Run:
    engine = torch_engine()
    return lambda x: np.asarray(engine({"pixels": x})["logits"])


def tensorrt_run() -> Run:
    config = digits_config()
    folder = Path(tempfile.mkdtemp(prefix="inferbus-gpu-check-"))
    (folder / "model.onnx").write_bytes(config.path.read_bytes())
    engine = create_engine(dataclasses.replace(config, engine="tensorrt", directory=folder))
    engine.load()
    return lambda x: np.asarray(engine({"pixels": x})["logits"])


def tensorrt_shared_instances(x: np.ndarray) -> str:
    """Two instances of one TensorRT model in this process: one plan, a profile each, run at
    the same time on two threads; both must match one instance run alone."""
    from concurrent.futures import ThreadPoolExecutor

    from inferbus.engines.tensorrt.engine import PLANS

    config = digits_config()
    folder = Path(tempfile.mkdtemp(prefix="inferbus-gpu-check-shared-"))
    (folder / "model.onnx").write_bytes(config.path.read_bytes())
    shared = dataclasses.replace(config, engine="tensorrt", directory=folder, instances=2)
    engines = [create_engine(shared) for _ in range(2)]
    for engine in engines:
        engine.load()
    try:
        leases = [n for counts in PLANS.held().values() for n in counts]
        part = x[: shared.max_batch_size]
        alone = np.asarray(engines[0]({"pixels": part})["logits"])

        def repeat(engine: Engine) -> list[inferbus.Tensors]:
            return [engine({"pixels": part}) for _ in range(200)]

        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(repeat, engines))
        same = all(np.array_equal(r["logits"], alone) for result in results for r in result)
    finally:
        for engine in engines:
            engine.close()
    verdict = "ok" if same and leases == [2] else "MISMATCH"
    return f"{verdict}: leases per loaded plan {leases}, 2 x 200 concurrent calls equal"


def bus_against_in_process(batch: int, seconds: float) -> str:
    """samples/s of the torch engine through the bus (one client, 4 requests in flight) over
    samples/s of the same engine called in-process, at the same batch."""
    folder = Path(tempfile.mkdtemp(prefix="inferbus-gpu-check-bus-"))
    config = export_digits_torch(folder)
    engine = create_engine(config)
    engine.load()
    x = np.ascontiguousarray(np.resize(held_out(), (batch, 64)))
    local = speed(lambda chunk: np.asarray(engine({"pixels": chunk})["logits"]), x, batch,
                  seconds)  # fmt: skip
    engine.close()
    remote = asyncio.run(_bus_rate(config, x, seconds))
    ratio = remote / local
    verdict = "ok" if ratio >= 0.8 else "BELOW 0.8x"
    return (f"{verdict}: batch {batch}: bus {remote:,.0f} samples/s, in-process "
            f"{local:,.0f} samples/s, ratio {ratio:.2f}x")  # fmt: skip


async def _bus_rate(config: inferbus.ModelConfig, x: np.ndarray, seconds: float) -> float:
    with inferbus.EmbeddedServer() as server:
        options = inferbus.ConnectOptions(servers=[server.url])
        async with inferbus.Worker([config], options), inferbus.connect(server.url) as client:
            await client.infer(config.name, x)
            done, started = 0, time.perf_counter()

            async def caller() -> None:
                nonlocal done
                while time.perf_counter() - started < seconds:
                    await client.infer(config.name, x)
                    done += len(x)

            async with asyncio.TaskGroup() as group:
                for _ in range(4):
                    group.create_task(caller())
            return done / (time.perf_counter() - started)


def cuda_buffers() -> str:
    """cudaMallocHost / cudaMalloc / async copies both ways / synchronize, checked."""
    import ctypes

    from inferbus.engines.tensorrt.cuda import check, cudart

    cuda = cudart()
    size = 1 << 20
    stream = check(cuda.cudaStreamCreate(), "cudaStreamCreate")
    host = check(cuda.cudaMallocHost(size), "cudaMallocHost")
    device = check(cuda.cudaMalloc(size), "cudaMalloc")
    view = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(host))
    view[:] = np.arange(size) % 251
    kind = cuda.cudaMemcpyKind
    check(cuda.cudaMemcpyAsync(device, host, size, kind.cudaMemcpyHostToDevice, stream), "h2d")
    view[:] = 0
    check(cuda.cudaMemcpyAsync(host, device, size, kind.cudaMemcpyDeviceToHost, stream), "d2h")
    check(cuda.cudaStreamSynchronize(stream), "sync")
    ok = bool((view == np.arange(size) % 251).all())
    check(cuda.cudaFree(device), "cudaFree")
    check(cuda.cudaFreeHost(host), "cudaFreeHost")
    check(cuda.cudaStreamDestroy(stream), "cudaStreamDestroy")
    return "ok: 1 MiB round trip through pinned and device memory" if ok else "MISMATCH"


def candidates() -> list[tuple[str, Callable[[], Run]]]:
    found: list[tuple[str, Callable[[], Run]]] = [
        ("onnxruntime cpu", lambda: onnxruntime_run(["CPUExecutionProvider"]))
    ]
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            found.append(("onnxruntime cuda", lambda: onnxruntime_run(["CUDAExecutionProvider"])))
    except ImportError:
        pass
    found.append((f"torch {torch_device()}", torch_run))
    found.append(("tensorrt", tensorrt_run))
    return found


def torch_device() -> str:
    try:
        import torch
    except ImportError:
        return "(not installed)"
    return "cuda" if torch.cuda.is_available() else "cpu"


def batch_slices(rows: int, max_batch: int) -> list[slice]:
    """Consecutive slices covering ``range(rows)`` once each, none longer than ``max_batch``."""
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    return [slice(start, min(start + max_batch, rows)) for start in range(0, rows, max_batch)]


def run_in_batches(run: Run, x: np.ndarray, max_batch: int) -> np.ndarray:
    """``run`` over every row of ``x``, at most ``max_batch`` rows a call (an engine's profile
    or config accepts no more), the outputs concatenated in order."""
    return np.concatenate([run(x[part]) for part in batch_slices(len(x), max_batch)])


def speed(run: Run, x: np.ndarray, batch: int, seconds: float = 2.0) -> float:
    chunk = np.ascontiguousarray(np.resize(x, (batch, x.shape[1])))
    run(chunk)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run(chunk)
        done += batch
    return done / (time.perf_counter() - started)


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except ImportError:
        pass
    return f"no CUDA device ({platform.processor() or platform.machine()})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per batch size")
    args = parser.parse_args()
    x = held_out()
    max_batch = digits_config().max_batch_size  # engines (TensorRT's profile) take no more
    reference = onnxruntime_run(["CPUExecutionProvider"])(x)
    print(f"device: {device_name()}")
    header = (
        "engine".ljust(18)
        + "max rel err".rjust(12)
        + "".join(f"b={b} samples/s".rjust(18) for b in BATCHES)
    )
    print(header)
    for name, make in candidates():
        try:
            run = make()
            outputs = run_in_batches(run, x, max_batch)
        except Exception as exc:  # a missing package or device: say so and go on
            print(f"{name.ljust(18)}  not available: {type(exc).__name__}: {exc}"[:160])
            continue
        # Largest difference relative to the largest logit: robust where logits cross zero.
        error = float(np.max(np.abs(outputs - reference)) / np.max(np.abs(reference)))
        rates = "".join(f"{speed(run, x, b, args.seconds):>18,.0f}" for b in BATCHES)
        print(f"{name.ljust(18)}{error:>12.2e}{rates}", flush=True)
    checks: list[tuple[str, Callable[[], str]]] = [
        ("cuda buffers", cuda_buffers),
        ("tensorrt shared instances", lambda: tensorrt_shared_instances(x)),
        ("torch bus vs in-process", lambda: bus_against_in_process(max_batch, args.seconds)),
    ]
    for name, check in checks:
        try:
            print(f"{name}: {check()}", flush=True)
        except Exception as exc:  # a missing package or device: say so and go on
            print(f"{name}: not available: {type(exc).__name__}: {exc}"[:160], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
