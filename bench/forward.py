"""End to end through radgate against a direct send, measured in the same run.

The destination is a DCMTK `storescp`. Reference: N one-image studies sent straight to it
with `storescu` over one association. radgate: the same number of new studies sent to
`radgate serve` (real model, every study routed to the destination with its tagged
original, Grad-CAM capture and report), timed from the start of the send until every
forward job is delivered. Latency: for one-image studies, from the end of the send (the
last C-STORE response and the release) to the job's delivery.

    .venv/bin/python bench/forward.py --model models/chest-abd [--count 200] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from sqlalchemy import func, select

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import ingest  # noqa: E402

from db.models import ForwardJob, ForwardJobState  # noqa: E402
from db.session import make_engine, session_factory  # noqa: E402

DELIVERY_TIMEOUT_S = 1800.0


@contextmanager
def radgate_to(
    folder: Path, model: Path, destination: ingest.Server, quiet_period_s: float
) -> Iterator[ingest.Server]:
    folder.mkdir(parents=True, exist_ok=True)
    port = ingest.free_port()
    database_url = f"sqlite:///{folder / 'radgate.db'}"
    config = {
        "ae": {"title": ingest.RADGATE_AET, "host": ingest.HOST, "port": port},
        "storage": {"spool_dir": str(folder / "spool"), "database_url": database_url},
        "model": {"dir": str(model.resolve()), "device": "auto"},
        "study": {"quiet_period_s": quiet_period_s},
        "destinations": [
            {"name": "dest", "ae_title": destination.called_aet, "host": ingest.HOST,
             "port": destination.port, "backoff_s": [1]}
        ],
        "routes": [{"name": "all", "when": {}, "forward_to": ["dest"]}],
    }  # fmt: skip
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    log = folder / "radgate.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_path)],
            cwd=BENCH.parent,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    engine = make_engine(database_url)
    server = ingest.Server(
        "radgate", port, ingest.RADGATE_AET, process, log, session_factory(engine, read_only=True)
    )
    try:
        ingest.wait_for_echo(port, ingest.RADGATE_AET, server.alive, log)
        yield server
    finally:
        server.stop()
        engine.dispose()


def delivered_jobs(server: ingest.Server) -> int:
    assert server.sessions is not None
    with server.sessions() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(ForwardJob)
                .where(ForwardJob.state == ForwardJobState.DELIVERED)
            )
            or 0
        )


def wait_for_deliveries(server: ingest.Server, expected: int) -> float:
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while delivered_jobs(server) < expected:
        if time.monotonic() > deadline or not server.alive():
            raise SystemExit(
                f"radgate delivered {delivered_jobs(server)}/{expected}; see {server.log}"
            )
        time.sleep(0.01)
    return time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--latency-samples", type=int, default=3)
    parser.add_argument("--quiet-period", type=float, default=2.0)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="radgate-bench-forward-") as scratch:
        work = Path(scratch)
        direct_files = ingest.write_studies(
            work / "direct", args.count, args.rows, args.rows, seed=1
        )
        gateway_files = ingest.write_studies(
            work / "gateway", args.count, args.rows, args.rows, seed=2
        )
        latency_files = ingest.write_studies(
            work / "latency", args.latency_samples, args.rows, args.rows, seed=3
        )
        with ingest.storescp(work / "dest") as destination:
            direct_s = ingest.send(destination.port, destination.called_aet, direct_files)
            with radgate_to(
                work / "radgate", args.model, destination, args.quiet_period
            ) as gateway:
                started = time.perf_counter()
                ingest.send(gateway.port, gateway.called_aet, gateway_files)
                gateway_s = wait_for_deliveries(gateway, args.count) - started
                latencies = []
                for index, image in enumerate(latency_files, start=1):
                    ingest.send(gateway.port, gateway.called_aet, [image])
                    sent = time.perf_counter()
                    latencies.append(wait_for_deliveries(gateway, args.count + index) - sent)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "count": args.count,
        "image": f"{args.rows}x{args.rows} DX, 8-bit",
        "direct_images_per_s": round(args.count / direct_s, 1),
        "radgate_images_per_s": round(args.count / gateway_s, 2),
        "ratio": round(direct_s / gateway_s, 4),
        "quiet_period_s": args.quiet_period,
        "latency_s": {
            "median": round(statistics.median(latencies), 3),
            "all": [round(x, 3) for x in latencies],
        },
    }
    print(f"direct storescu -> storescp: {result['direct_images_per_s']} img/s")
    print(
        f"storescu -> radgate -> storescp (classified, Grad-CAM, SR, forwarded): {result['radgate_images_per_s']} img/s"
    )
    print(f"ratio radgate / direct: {result['ratio']}")
    print(
        f"latency last C-STORE -> delivered (quiet period {args.quiet_period:g} s): median {result['latency_s']['median']} s"
    )
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
