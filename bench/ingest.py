"""Ingest rate: radgate's receiver against DCMTK storescp, measured in the same run.

N one-image studies (small DX images generated here) go over one association with
DCMTK `storescu`, to `storescp --output-directory` (the reference) and to radgate
(`radgate serve` in a child process, spool and SQLite in the work folder), alternating
storescp/radgate, radgate/storescp round after round so drift hits both alike. Both
DCMTK tools run with ``TCP_NODELAY=1`` (DCMTK leaves Nagle's algorithm on otherwise).
Each round sends new UIDs: a resend would only measure radgate's duplicate path.

They do not do the same work: storescp writes each file and answers; radgate answers
Success only after the file and its folder are flushed to disk and the instance row is
committed (SQLite, synchronous=FULL). `--tmpfs DIR` adds a diagnostic radgate run with
spool and database on a RAM file system, where flushing costs nothing: the gap between
the two radgate rows is what durability costs on this disk.

Latency: for `--latency-samples` one-image studies sent with pynetdicom, the time from
the C-STORE response to the study becoming ready (release + `study.quiet_period_s` +
the sweep), and to its prediction row when the gateway runs the pipeline (a model in
`--model`); without one the prediction column says so.

    .venv/bin/python bench/ingest.py [--count 200] [--rounds 3] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from db.models import Instance, Prediction, Study, StudyState  # noqa: E402
from db.session import make_engine, session_factory  # noqa: E402

HOST = "127.0.0.1"
RADGATE_AET = "RADGATE"
STORESCP_AET = "STORESCP"
DX_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.1.1")
START_TIMEOUT_S = 180.0
SEND_TIMEOUT_S = 600.0
IDLE_TIMEOUT_S = 600.0
LATENCY_TIMEOUT_S = 120.0
DEFAULT_MODEL = REPO / "models" / "chest-abd"

# The gateway without processing (radgate serve loads the pipeline's model).
_RECEIVE_ONLY_LAUNCHER = """
import argparse, logging, sys
from pathlib import Path
from gateway.service import command
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
sys.exit(command(argparse.Namespace(config=Path(sys.argv[1]), receive_only=True)))
"""


# --- inputs ----------------------------------------------------------------------------


def write_studies(folder: Path, count: int, rows: int, columns: int, seed: int) -> list[Path]:
    """`count` one-image DX studies, each with new UIDs, as DICOM files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = DX_SOP_CLASS
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = DX_SOP_CLASS
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.Modality = "DX"
        ds.BodyPartExamined = "CHEST"
        ds.PatientID = f"BENCH{index:05d}"
        ds.PatientName = "BENCH^INGEST"
        ds.StudyDate = "20260101"
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        pixels = generator.integers(0, 4096, size=(rows, columns), dtype=np.uint16)
        ds.PixelData = pixels.tobytes()
        path = folder / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --- peers -----------------------------------------------------------------------------


def dcmtk_environment() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def echo(port: int, called_aet: str) -> bool:
    result = subprocess.run(
        ["echoscu", "-aec", called_aet, HOST, str(port)],
        capture_output=True,
        timeout=30,
        env=dcmtk_environment(),
        check=False,
    )
    return result.returncode == 0


def wait_for_echo(
    port: int, called_aet: str, alive: Callable[[], bool], log: Path | None = None
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not echo(port, called_aet):
        if not alive():
            detail = log.read_text(errors="replace")[-4000:] if log else ""
            raise SystemExit(f"{called_aet} on port {port} exited before answering\n{detail}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{called_aet} on port {port} did not answer C-ECHO in time")
        time.sleep(0.2)


def send(port: int, called_aet: str, files: list[Path]) -> float:
    """Send `files` over one association with storescu; returns the wall time in seconds."""
    started = time.perf_counter()
    result = subprocess.run(
        ["storescu", "-aet", "BENCHSCU", "-aec", called_aet, HOST, str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=SEND_TIMEOUT_S,
        env=dcmtk_environment(),
        check=False,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"storescu to {called_aet} failed:\n{result.stdout}{result.stderr}")
    return seconds


@dataclass
class Server:
    name: str
    port: int
    called_aet: str
    process: subprocess.Popen[bytes]
    log: Path
    sessions: sessionmaker[Session] | None = None

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return int(self.process.returncode)


@contextmanager
def storescp(folder: Path) -> Iterator[Server]:
    out = folder / "received"
    out.mkdir(parents=True)
    port = free_port()
    log = folder / "storescp.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            ["storescp", "-aet", STORESCP_AET, "--output-directory", str(out), str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=dcmtk_environment(),
        )
    server = Server("storescp", port, STORESCP_AET, process, log)
    try:
        wait_for_echo(port, STORESCP_AET, server.alive, log)
        yield server
    finally:
        server.stop()


@contextmanager
def radgate(name: str, folder: Path, model: Path | None, quiet_period_s: float) -> Iterator[Server]:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    database_url = f"sqlite:///{folder / 'radgate.db'}"
    config = {
        "ae": {"title": RADGATE_AET, "host": HOST, "port": port},
        "storage": {
            "spool_dir": str(folder / "spool"),
            "database_url": database_url,
            "min_free_mb": 100,
        },
        "model": {"dir": str(model or folder / "no-model"), "device": "auto"},
        "study": {"quiet_period_s": quiet_period_s},
        "destinations": [],
        "routes": [],
    }
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    if model is None:
        command = [sys.executable, "-c", _RECEIVE_ONLY_LAUNCHER, str(config_path)]
    else:
        command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_path)]
    log = folder / "radgate.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
    engine = make_engine(database_url)
    server = Server(name, port, RADGATE_AET, process, log, session_factory(engine, read_only=True))
    try:
        wait_for_echo(port, RADGATE_AET, server.alive, log)
        yield server
    finally:
        status = server.stop()
        engine.dispose()
        if status != 0:
            print(f"warning: {name} exited with status {status}; see {log}", file=sys.stderr)


# --- measuring -------------------------------------------------------------------------


def wait_until_idle(server: Server, processing: bool) -> None:
    """With a pipeline, wait until no study is waiting or being processed, so its work
    does not run during the next measurement."""
    if not processing or server.sessions is None:
        return
    busy = (StudyState.RECEIVING, StudyState.READY, StudyState.PROCESSING)
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while time.monotonic() < deadline:
        with server.sessions() as session:
            pending = session.scalar(select(Study.id).where(Study.state.in_(busy)).limit(1))
        if pending is None:
            return
        time.sleep(0.2)
    print(f"warning: {server.name} still processing after {IDLE_TIMEOUT_S:g} s", file=sys.stderr)


def prediction_exists(session: Session, sop_uid: str) -> bool:
    """The hook for end-to-end latency: a prediction row for the instance."""
    return (
        session.scalar(
            select(Prediction.instance_id)
            .join(Instance, Prediction.instance_id == Instance.id)
            .where(Instance.sop_instance_uid == sop_uid)
        )
        is not None
    )


def measure_latency(server: Server, image: Path, processing: bool) -> dict[str, float | None]:
    """Seconds from the C-STORE response to ready, and to the prediction row."""
    import pydicom

    assert server.sessions is not None
    dataset = pydicom.dcmread(image)
    ae = AE(ae_title="BENCHLAT")
    ae.add_requested_context(DX_SOP_CLASS, ExplicitVRLittleEndian)
    assoc = ae.associate(HOST, server.port, ae_title=server.called_aet)
    if not assoc.is_established:
        raise SystemExit("latency: association refused")
    status = assoc.send_c_store(dataset)
    answered = time.perf_counter()
    assoc.release()
    if status.Status != 0:
        raise SystemExit(f"latency: C-STORE status 0x{status.Status:04X}")
    ready_s: float | None = None
    predicted_s: float | None = None
    deadline = answered + LATENCY_TIMEOUT_S
    while time.perf_counter() < deadline:
        with server.sessions() as session:
            state = session.scalar(
                select(Study.state).where(Study.study_uid == dataset.StudyInstanceUID)
            )
            if ready_s is None and state not in (None, StudyState.RECEIVING):
                ready_s = time.perf_counter() - answered
            if (
                processing
                and predicted_s is None
                and prediction_exists(session, dataset.SOPInstanceUID)
            ):
                predicted_s = time.perf_counter() - answered
        if ready_s is not None and (predicted_s is not None or not processing):
            break
        time.sleep(0.005)
    return {"ready_s": ready_s, "prediction_s": predicted_s}


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=200, help="one-image studies per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--columns", type=int, default=64)
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help=f"model for `radgate serve` (default: {DEFAULT_MODEL} when it exists)",
    )
    parser.add_argument(
        "--receive-only", action="store_true", help="run radgate without the pipeline"
    )
    parser.add_argument("--quiet-period", type=float, default=2.0, help="study.quiet_period_s")
    parser.add_argument("--latency-samples", type=int, default=5)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where files, spool and database go"
    )
    parser.add_argument(
        "--tmpfs",
        type=Path,
        default=None,
        metavar="DIR",
        help="also run radgate with spool and database under DIR (e.g. /dev/shm)",
    )
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: install DCMTK (`make system-deps`)")

    model = None if args.receive_only else (args.model or DEFAULT_MODEL)
    if model is not None and not (model / "model.json").is_file():
        if args.model is not None:
            raise SystemExit(f"--model {model}: no model.json there (train one: `make model`)")
        print(f"note: no model in {model}; radgate runs without the pipeline", file=sys.stderr)
        model = None
    processing = model is not None

    work = Path(tempfile.mkdtemp(prefix="radgate-ingest-", dir=args.workdir))
    load_before = os.getloadavg()
    rounds: list[dict[str, Any]] = []
    latencies: list[dict[str, float | None]] = []
    tmpfs_rates: list[float] = []
    try:
        inputs = [
            write_studies(work / "in" / f"round{r}", args.count, args.rows, args.columns, r)
            for r in range(args.rounds)
        ]
        extra_inputs = [
            write_studies(work / "in" / f"tmpfs{r}", args.count, args.rows, args.columns, 100 + r)
            for r in range(args.rounds if args.tmpfs else 0)
        ]
        probes = write_studies(work / "in" / "latency", args.latency_samples, 64, 64, 999)
        with (
            storescp(work / "storescp") as reference,
            radgate("radgate", work / "radgate", model, args.quiet_period) as gateway,
        ):
            for index, files in enumerate(inputs):
                order = [reference, gateway] if index % 2 == 0 else [gateway, reference]
                rates = {}
                for server in order:
                    wait_until_idle(gateway, processing)
                    rates[server.name] = args.count / send(server.port, server.called_aet, files)
                rounds.append(
                    {
                        "round": index + 1,
                        "storescp_images_per_s": round(rates["storescp"], 1),
                        "radgate_images_per_s": round(rates["radgate"], 1),
                        "ratio": round(rates["radgate"] / rates["storescp"], 3),
                    }
                )
                print(
                    f"round {index + 1}: storescp {rates['storescp']:.1f}/s,"
                    f" radgate {rates['radgate']:.1f}/s",
                    flush=True,
                )
            wait_until_idle(gateway, processing)
            for probe in probes:
                latencies.append(measure_latency(gateway, probe, processing))
                wait_until_idle(gateway, processing)
        if args.tmpfs is not None:
            ram = Path(tempfile.mkdtemp(prefix="radgate-ingest-", dir=args.tmpfs))
            try:
                with radgate("radgate-tmpfs", ram, None, args.quiet_period) as gateway:
                    for files in extra_inputs:
                        seconds = send(gateway.port, gateway.called_aet, files)
                        tmpfs_rates.append(args.count / seconds)
            finally:
                shutil.rmtree(ram, ignore_errors=True)
    finally:
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    storescp_rates = [r["storescp_images_per_s"] for r in rounds]
    radgate_rates = [r["radgate_images_per_s"] for r in rounds]
    ratio = statistics.median(radgate_rates) / statistics.median(storescp_rates)
    ready = [x["ready_s"] for x in latencies if x["ready_s"] is not None]
    predicted = [x["prediction_s"] for x in latencies if x["prediction_s"] is not None]
    result: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "images_per_round": args.count,
        "image": f"DX {args.rows}x{args.columns} 16-bit, explicit VR little endian",
        "radgate_mode": "radgate serve with the pipeline" if processing else "receive only",
        "rounds": rounds,
        "storescp_images_per_s": summary(storescp_rates),
        "radgate_images_per_s": summary(radgate_rates),
        "ratio_radgate_to_storescp": round(ratio, 3),
        "radgate_tmpfs_images_per_s": summary(tmpfs_rates) if tmpfs_rates else None,
        "latency": {
            "quiet_period_s": args.quiet_period,
            "samples": len(latencies),
            "response_to_ready_s": summary(ready) if ready else None,
            "response_to_prediction_s": summary(predicted) if predicted else None,
        },
        "durability": (
            "storescp writes each file and answers; radgate answers Success after the file"
            " and its folder are fsynced and the SQLite row is committed (synchronous=FULL)"
        ),
    }
    print()
    print(f"{'':28}{'median':>10}{'min':>10}{'max':>10}   images/s")
    for label, stats in (
        ("storescp (DCMTK)", result["storescp_images_per_s"]),
        ("radgate", result["radgate_images_per_s"]),
        ("radgate, spool+db on tmpfs", result["radgate_tmpfs_images_per_s"]),
    ):
        if stats:
            print(f"{label:28}{stats['median']:>10.1f}{stats['min']:>10.1f}{stats['max']:>10.1f}")
    print(f"ratio radgate/storescp (medians): {ratio:.3f}")
    if ready:
        print(f"C-STORE response -> study ready: median {statistics.median(ready):.2f} s")
    print(
        "C-STORE response -> prediction row: "
        + (
            f"median {statistics.median(predicted):.2f} s"
            if predicted
            else "n/a (radgate ran without the pipeline)"
            if not processing
            else "no prediction row appeared"
        )
    )
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
