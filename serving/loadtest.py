"""A small, bounded load test of a served localizer over loopback: concurrent clients, latency percentiles.

Against a running server (``tensorflow_model_server`` or ``mdgru-localize serve``)::

    python -m serving.loadtest --server 127.0.0.1:8500 --model mdgru --clients 8 --requests 50

or against an in-process server started on a SavedModel for the occasion::

    python -m serving.loadtest --saved-model export/mdgru --clients 8 --requests 50 --shape 64 64 64

Each client has its own connection and sends ``--requests`` random scans one after another; the latency of
every call (client side, serialization included) goes into the p50/p99. ``--server`` must be a loopback
address (this is a test tool, not a way to load someone else's server), and clients/requests are capped.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mdgru_keras.serving import DEFAULT_MODEL_NAME, ServingError, connect

MAX_CLIENTS = 64
MAX_REQUESTS_PER_CLIENT = 10_000
MAX_SHAPE = 512


@dataclass
class LoadTestResult:
    """Latencies in milliseconds of the successful calls, and one line per failed call."""

    server: str
    clients: int
    requests_per_client: int
    shape: tuple[int, int, int]
    wall_s: float
    latencies_ms: list[float] = field(repr=False)
    errors: list[str]

    @property
    def completed(self) -> int:
        return len(self.latencies_ms)

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self) -> dict[str, object]:
        data = asdict(self)
        del data["latencies_ms"]
        data["errors"] = len(self.errors)
        data.update(
            completed=self.completed,
            p50_ms=round(self.percentile_ms(50), 3),
            p99_ms=round(self.percentile_ms(99), 3),
            max_ms=round(max(self.latencies_ms, default=float("nan")), 3),
            requests_per_s=round(self.completed / self.wall_s, 1) if self.wall_s > 0 else None,
        )
        return data

    def line(self) -> str:
        return (
            f"{self.completed}/{self.clients * self.requests_per_client} requests ({self.clients} clients x "
            f"{self.requests_per_client}, volume {'x'.join(map(str, self.shape))}) to {self.server}: "
            f"{len(self.errors)} errors, p50 {self.percentile_ms(50):.1f} ms, p99 {self.percentile_ms(99):.1f} ms, "
            f"{self.completed / self.wall_s:.0f} requests/s"
        )


def check_loopback_server(server: str) -> None:
    """``ValueError`` unless ``server`` (``HOST:PORT``, ``grpc://`` or ``http://``) names a loopback host."""
    address = server.split("://", 1)[-1].rstrip("/")
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"--server {server!r}: the load test only targets loopback servers (127.0.0.1 or localhost)")


def run_load_test(
    server: str,
    model_name: str = DEFAULT_MODEL_NAME,
    *,
    clients: int = 8,
    requests_per_client: int = 50,
    shape: Sequence[int] = (32, 32, 32),
    timeout_s: float = 60.0,
    int16: bool = False,
    warmup: int = 1,
    seed: int = 0,
) -> LoadTestResult:
    """``clients`` threads, each with its own client, each sending ``requests_per_client`` scans.

    Each client first sends ``warmup`` untimed requests (connection set-up, the server's first-call work);
    then all start together and every call is timed.
    """
    check_loopback_server(server)
    if not 1 <= clients <= MAX_CLIENTS or not 1 <= requests_per_client <= MAX_REQUESTS_PER_CLIENT:
        raise ValueError(f"clients must be in [1, {MAX_CLIENTS}] and requests in [1, {MAX_REQUESTS_PER_CLIENT}]")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or not all(1 <= n <= MAX_SHAPE for n in shape):
        raise ValueError(f"shape must be 3 sizes in [1, {MAX_SHAPE}], got {shape}")
    voxel_to_world = np.diag([1.0, 1.0, 1.0, 1.0])
    voxel_to_world[:3, 3] = -np.asarray(shape) / 2
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[list[str]] = [[] for _ in range(clients)]
    start_line = threading.Barrier(clients + 1, timeout=120)

    def work(index: int) -> None:
        rng = np.random.default_rng(seed + index)
        volumes = [rng.normal(size=shape).astype(np.float32) for _ in range(min(4, requests_per_client))]
        if int16:
            volumes = [np.round(v * 1000).astype(np.int16) for v in volumes]
        with connect(server, model_name, timeout_s=timeout_s) as client:
            for volume in volumes[:warmup]:  # connection set-up and the server's first-call work, untimed
                try:
                    client.localize(volume, voxel_to_world)
                except Exception as error:
                    errors[index].append(f"warm-up: {error}")
            start_line.wait()
            for i in range(requests_per_client):
                tic = time.perf_counter()
                try:
                    client.localize(volumes[i % len(volumes)], voxel_to_world)
                except ServingError as error:
                    errors[index].append(str(error))
                    continue
                except Exception as error:  # a client-side bug still counts, and must not hang the run
                    errors[index].append(f"{type(error).__name__}: {error}")
                    continue
                latencies[index].append((time.perf_counter() - tic) * 1000)

    threads = [threading.Thread(target=work, args=(i,), name=f"loadtest-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    start_line.wait()
    tic = time.perf_counter()
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - tic
    return LoadTestResult(
        server=server,
        clients=clients,
        requests_per_client=requests_per_client,
        shape=shape,  # type: ignore[arg-type]
        wall_s=wall_s,
        latencies_ms=[x for per_client in latencies for x in per_client],
        errors=[x for per_client in errors for x in per_client],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.loadtest",
        description="Concurrent clients against a loopback TF-Serving-API server; prints p50/p99 latency.",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--server", help="127.0.0.1:PORT (gRPC) or http://127.0.0.1:PORT (REST)")
    target.add_argument("--saved-model", type=Path, help="start an in-process gRPC server on this SavedModel")
    parser.add_argument("--model", default=DEFAULT_MODEL_NAME, help="model name on the server (default: mdgru)")
    parser.add_argument("--clients", type=int, default=8, help=f"concurrent clients, 1-{MAX_CLIENTS} (default: 8)")
    parser.add_argument("--requests", type=int, default=50, help="requests per client (default: 50)")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=(32, 32, 32),
        metavar=("X", "Y", "Z"),
        help="volume shape (default: 32 32 32)",
    )
    parser.add_argument("--int16", action="store_true", help="send int16 volumes (localize_int16)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-call timeout in seconds (default: 60)")
    parser.add_argument("--json", type=Path, help="also write the summary as JSON to this file")
    args = parser.parse_args(argv)

    server_process = None
    try:
        if args.saved_model is not None:
            from mdgru_keras.serving.grpc_server import GrpcServer

            server_process = GrpcServer(args.saved_model, args.model).start()
            server = server_process.address
        else:
            server = args.server
        result = run_load_test(
            server,
            args.model,
            clients=args.clients,
            requests_per_client=args.requests,
            shape=args.shape,
            timeout_s=args.timeout,
            int16=args.int16,
        )
    except ValueError as error:
        parser.error(str(error))
    finally:
        if server_process is not None:
            server_process.stop()
    print(result.line())
    for message in sorted(set(result.errors))[:5]:
        print(f"  error: {message}")
    if args.json is not None:
        temporary = args.json.with_name(f".{args.json.name}.tmp")
        temporary.write_text(json.dumps(result.summary(), indent=2) + "\n")
        os.replace(temporary, args.json)
        print(f"wrote {args.json}")
    return 1 if result.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
