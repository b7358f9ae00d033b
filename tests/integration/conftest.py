"""Shared fixtures and helpers for gateway tests with real peers on loopback.

Everything listens on 127.0.0.1 on a port chosen at run time; every wait has a
deadline and every subprocess a timeout.

- `free_port()`, `wait_for_port(host, port, timeout_s)`, `wait_for_dicom(...)` (C-ECHO),
  `wait_until(predicate, ...)`.
- `write_dx(folder, ...)`: small DX images (any transfer syntax pydicom can encode).
- `gateway_config(tmp_path, **sections)`: a `Config` with spool and SQLite under
  tmp_path and a free port, also written as ``config.yaml`` (`GatewaySetup`).
- Fixture `start_gateway(**sections)`: an in-process `Service` (receiver and sweep, no
  pipeline unless `processor_factory` is given), stopped at teardown.
- Fixture `serve_gateway(setup, receive_only=..., limits=...)`: the gateway as a
  subprocess (`radgate serve`, or the same service without processing), stopped at
  teardown.
- `storescu(...)`, `echoscu(...)`: DCMTK with ``TCP_NODELAY=1``, outcome and the
  status of every C-STORE parsed from its verbose output.
- `send_files(...)`: a pynetdicom SCU that returns each exact status code.
- `GatewayHandle` (both kinds): database rows, spool files, readiness waits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import pytest
import yaml
from orthanc import OrthancServer, orthanc_servers
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Association, AuditEvent, Instance, Study, StudyState
from db.session import make_engine, session_factory
from gateway.config import Config, parse_config
from gateway.scp import STATUS_SUCCESS
from gateway.service import ProcessorFactory, Service

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
DX_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
# What the gateway answers to in these tests.
CALLED_AET = "RADGATE"
PROCESS_START_TIMEOUT_S = 120.0
SUBPROCESS_TIMEOUT_S = 120.0

T = TypeVar("T")


# --- sockets and waiting ---------------------------------------------------------------


def free_port(host: str = HOST) -> int:
    """A port free right now (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def wait_for_port(
    host: str,
    port: int,
    timeout_s: float = 30.0,
    *,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Block until (host, port) accepts a TCP connection; fail after `timeout_s`.

    `alive` is checked on every try, so a server process that died fails at once.
    For DICOM nodes see `wait_for_dicom`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if alive is not None and not alive():
            raise AssertionError(f"server for {host}:{port} exited before it listened")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"nothing listened on {host}:{port} within {timeout_s:g} s"
                ) from None
            time.sleep(0.05)


def wait_for_dicom(
    host: str,
    port: int,
    timeout_s: float = 30.0,
    *,
    called_aet: str = "ANY-SCP",
    alive: Callable[[], bool] | None = None,
    tls_args: tuple[ssl.SSLContext, str] | None = None,
) -> None:
    """Block until a DICOM node on (host, port) answers a C-ECHO; fail after `timeout_s`.
    `tls_args` (pynetdicom's: context and server name) for a node that speaks TLS.

    Prefer this to `wait_for_port` for DICOM servers: a bare TCP connect that never
    sends an A-ASSOCIATE-RQ keeps a pynetdicom acceptor busy until its ACSE timeout.
    """
    deadline = time.monotonic() + timeout_s
    ae = AE(ae_title="WAITFOR")
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    pynetdicom_log = logging.getLogger("pynetdicom")
    while True:
        if alive is not None and not alive():
            raise AssertionError(f"DICOM node on {host}:{port} exited before it answered")
        # "Connection refused" until the node listens is expected, not an error.
        level = pynetdicom_log.level
        pynetdicom_log.setLevel(logging.CRITICAL)
        try:
            assoc = ae.associate(host, port, ae_title=called_aet, tls_args=tls_args)
        finally:
            pynetdicom_log.setLevel(level)
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            if status and status.Status == 0:
                return
        if time.monotonic() >= deadline:
            raise AssertionError(f"no C-ECHO answer from {host}:{port} within {timeout_s:g} s")
        time.sleep(0.1)


def wait_until(
    predicate: Callable[[], T | None], timeout_s: float = 10.0, *, interval_s: float = 0.05
) -> T:
    """Poll `predicate` until it returns something truthy (returned); fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout_s:g} s (last: {value!r})")
        time.sleep(interval_s)


# --- DICOM files -----------------------------------------------------------------------


def dx_dataset(
    *,
    study_uid: str | None = None,
    sop_uid: str | None = None,
    patient_name: str = "TEST^PATIENT",
    patient_id: str = "TEST-0001",
    rows: int = 64,
    columns: int = 64,
    body_part: str | None = "CHEST",
    seed: int = 0,
) -> Dataset:
    """A valid DX For Presentation image: 16-bit monochrome, `rows` x `columns`."""
    sop_uid = UID(sop_uid or generate_uid())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = "20260101"
    ds.AccessionNumber = "ACC1"
    ds.Modality = "DX"
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    generator = np.random.default_rng(seed)
    pixels = generator.integers(0, 4096, size=(rows, columns), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    return ds


def write_dx(
    folder: Path,
    name: str | None = None,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **dataset_options: Any,
) -> Path:
    """Write a `dx_dataset` as a DICOM file (compressed when `transfer_syntax` says so)."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = dx_dataset(**dataset_options)
    if transfer_syntax != ExplicitVRLittleEndian:
        uid = UID(transfer_syntax)
        if uid.is_compressed:
            ds.compress(uid)
        else:
            ds.file_meta.TransferSyntaxUID = uid
    path = folder / (name or f"{ds.SOPInstanceUID}.dcm")
    ds.save_as(path, enforce_file_format=True)
    return path


def save_as_is(ds: Dataset, path: Path) -> Path:
    """Write `ds` with its file meta exactly as set (pydicom would otherwise correct a
    meta that disagrees with the data set, which tests of odd input need to keep)."""
    ds.preamble = b"\x00" * 128
    ds.save_as(path, enforce_file_format=False)
    return path


def dataset_bytes(path: Path) -> bytes:
    """The data set of a DICOM file without preamble and file meta: what goes over DIMSE."""
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        raise ValueError(f"{path} is not a DICOM file")
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


# --- the gateway -----------------------------------------------------------------------


@dataclass
class GatewaySetup:
    """A configuration for a test gateway and the YAML file it was written to."""

    config: Config
    path: Path

    @property
    def port(self) -> int:
        return self.config.ae.port


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def gateway_config(folder: Path, **sections: dict[str, Any]) -> GatewaySetup:
    """A test configuration: spool and SQLite in `folder`, a free port, a short quiet
    period; `sections` override any key (``study={"quiet_period_s": 1}``)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = _merge(
        {
            "ae": {"title": CALLED_AET, "host": HOST, "port": free_port()},
            "storage": {
                "spool_dir": str(folder / "spool"),
                "database_url": f"sqlite:///{folder / 'radgate.db'}",
                "min_free_mb": 1,
            },
            "model": {"dir": str(folder / "no-model"), "device": "cpu"},
            "study": {"quiet_period_s": 0.3, "unreleased_timeout_s": 300},
            "destinations": [],
            "routes": [],
        },
        sections,
    )
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return GatewaySetup(config=parse_config(data, base_dir=folder), path=path)


class GatewayHandle:
    """What tests inspect of a running gateway: its database and spool."""

    def __init__(self, setup: GatewaySetup) -> None:
        self.setup = setup
        self.config = setup.config
        self.host = setup.config.ae.host
        self.ae_title = setup.config.ae.title
        self._engine: Engine | None = None

    @property
    def port(self) -> int:
        return self.config.ae.port

    @property
    def spool_dir(self) -> Path:
        return Path(self.config.storage.spool_dir)

    @property
    def sessions(self) -> sessionmaker[Session]:
        if self._engine is None:
            self._engine = make_engine(
                self.config.storage.database_url, self.config.storage.busy_timeout_ms
            )
        return session_factory(self._engine, read_only=True)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def _all(self, model: type[T]) -> list[T]:
        with self.sessions() as session:
            return list(session.scalars(select(model).order_by(model.id)))  # type: ignore[attr-defined]

    def instances(self) -> list[Instance]:
        return self._all(Instance)

    def studies(self) -> list[Study]:
        return self._all(Study)

    def associations(self) -> list[Association]:
        return self._all(Association)

    def audit_events(self, kind: str | None = None) -> list[AuditEvent]:
        events = self._all(AuditEvent)
        return [event for event in events if kind is None or event.kind == kind]

    def study(self, study_uid: str) -> Study | None:
        with self.sessions() as session:
            return session.scalars(select(Study).where(Study.study_uid == study_uid)).first()

    def spool_files(self) -> list[Path]:
        """Every file under the spool (temporary ones included)."""
        return sorted(path for path in self.spool_dir.rglob("*") if path.is_file())

    def wait_for_state(self, study_uid: str, state: StudyState, timeout_s: float = 10.0) -> Study:
        def reached() -> Study | None:
            study = self.study(study_uid)
            return study if study is not None and study.state is state else None

        return wait_until(reached, timeout_s)


class InProcessGateway(GatewayHandle):
    """A `Service` running in the test process."""

    def __init__(self, setup: GatewaySetup, service: Service) -> None:
        super().__init__(setup)
        self.service = service

    def restart(self) -> Service:
        """Stop the service and start a new one on the same configuration, port,
        database and spool (what a restart after a crash or an upgrade finds)."""
        old = self.service
        old.stop(timeout_s=5)
        self.service = Service(
            self.config,
            processor_factory=old.processor_factory,
            sweep_interval_s=old.sweep_interval_s,
        )
        self.service.start()
        return self.service


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., InProcessGateway]]:
    """Start in-process gateways: ``start_gateway(study={...}, ae={...})``.

    Keyword `processor_factory` plugs in processing (default: none, receiver and
    sweep only); `sweep_interval_s` defaults to 0.1 s to keep tests short.
    """
    started: list[InProcessGateway] = []

    def start(
        *,
        processor_factory: ProcessorFactory | None = None,
        sweep_interval_s: float = 0.1,
        **sections: dict[str, Any],
    ) -> InProcessGateway:
        setup = gateway_config(tmp_path / f"gateway{len(started)}", **sections)
        service = Service(
            setup.config, processor_factory=processor_factory, sweep_interval_s=sweep_interval_s
        )
        service.start()
        # Listening once start() returns: no wait needed.
        gateway = InProcessGateway(setup, service)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.service.stop(timeout_s=5)
        gateway.close()


# Runs the service without processing in a child process; `radgate serve` is the same
# with the pipeline's processor.
_RECEIVE_ONLY_LAUNCHER = """
import argparse, logging, sys
from pathlib import Path
from gateway.service import command
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
sys.exit(command(argparse.Namespace(config=Path(sys.argv[1]), receive_only=True)))
"""


class GatewayProcess(GatewayHandle):
    """The gateway as a child process; its output goes to `log_path`."""

    def __init__(self, setup: GatewaySetup, process: subprocess.Popen[bytes], log_path: Path):
        super().__init__(setup)
        self.process = process
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """Send `sig` and wait for the exit status (killed after `timeout_s`)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                raise AssertionError(
                    f"gateway did not exit within {timeout_s:g} s of signal {sig}:\n{self.log()}"
                ) from None
        return int(self.process.returncode)


@pytest.fixture
def serve_gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Start gateway processes: ``serve_gateway(setup, receive_only=True, fsize_limit=None)``;
    `tls_args` (pynetdicom's) to check that one with `ae.tls` answers.

    `receive_only=False` runs the real ``radgate serve`` (the model in the config must
    exist). `fsize_limit` (bytes) runs it under RLIMIT_FSIZE, like ``ulimit -f``.
    """
    started: list[GatewayProcess] = []

    def start(
        setup: GatewaySetup,
        *,
        receive_only: bool = True,
        fsize_limit: int | None = None,
        start_timeout_s: float = PROCESS_START_TIMEOUT_S,
        tls_args: tuple[ssl.SSLContext, str] | None = None,
    ) -> GatewayProcess:
        if receive_only:
            command = [sys.executable, "-c", _RECEIVE_ONLY_LAUNCHER, str(setup.path)]
        else:
            command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(setup.path)]
        log_path = setup.path.with_name(f"gateway{len(started)}.log")

        def limit_file_size() -> None:
            if fsize_limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                command,
                cwd=REPO,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=limit_file_size if fsize_limit is not None else None,
            )
        gateway = GatewayProcess(setup, process, log_path)
        started.append(gateway)
        try:
            wait_for_dicom(
                gateway.host,
                gateway.port,
                start_timeout_s,
                called_aet=setup.config.ae.title,
                alive=gateway.alive,
                tls_args=tls_args,
            )
        except AssertionError as error:
            raise AssertionError(f"{error}\n--- gateway log ---\n{gateway.log()}") from None
        return gateway

    yield start
    for gateway in started:
        if gateway.alive():
            gateway.process.kill()
            gateway.process.wait(10)
        gateway.close()


# --- DICOM peers -----------------------------------------------------------------------


def dcmtk(tool: str) -> str:
    executable = shutil.which(tool)
    if executable is None:
        pytest.fail(f"{tool} (Debian package dcmtk, `make system-deps`) is required")
    return executable


def dcmtk_environment() -> dict[str, str]:
    # DCMTK leaves Nagle's algorithm on unless told: ~50x slower request/response.
    return {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class StoreOutcome:
    """What `storescu` did: exit status, per-file response statuses, full output."""

    returncode: int
    statuses: list[str] = field(default_factory=list)
    output: str = ""

    @property
    def rejected(self) -> bool:
        return "Association Rejected" in self.output


_STORE_RESPONSE = re.compile(r"Received Store Response \(([^)]*)\)")


def storescu(
    port: int,
    files: Sequence[Path],
    *,
    calling_aet: str = "STORESCU",
    called_aet: str = CALLED_AET,
    host: str = HOST,
    extra: Sequence[str] = (),
    timeout_s: float = SUBPROCESS_TIMEOUT_S,
) -> StoreOutcome:
    """Send `files` over one association with DCMTK storescu (verbose, no halt)."""
    result = subprocess.run(
        [
            dcmtk("storescu"),
            "-v",
            "-nh",
            "-aet",
            calling_aet,
            "-aec",
            called_aet,
            *extra,
            host,
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=dcmtk_environment(),
        check=False,
    )
    output = result.stdout + result.stderr
    return StoreOutcome(result.returncode, _STORE_RESPONSE.findall(output), output)


def echoscu(
    port: int,
    *,
    calling_aet: str = "ECHOSCU",
    called_aet: str = CALLED_AET,
    host: str = HOST,
    timeout_s: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """One C-ECHO with DCMTK echoscu."""
    return subprocess.run(
        [dcmtk("echoscu"), "-v", "-aet", calling_aet, "-aec", called_aet, host, str(port)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=dcmtk_environment(),
        check=False,
    )


def scu(calling_aet: str = "PYNETDICOM", timeout_s: float = 30.0) -> AE:
    """A pynetdicom SCU proposing every storage SOP class (explicit and implicit LE)."""
    ae = AE(ae_title=calling_aet)
    ae.requested_contexts = StoragePresentationContexts
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    return ae


@contextlib.contextmanager
def associated(
    port: int, *, calling_aet: str = "PYNETDICOM", host: str = HOST, release: bool = True
) -> Iterator[Any]:
    """An established pynetdicom association; released on exit (aborted if `release` is
    False or the body raised)."""
    assoc = scu(calling_aet).associate(host, port, ae_title=CALLED_AET)
    if not assoc.is_established:
        raise AssertionError(f"association to {host}:{port} was not established")
    try:
        yield assoc
    except BaseException:
        assoc.abort()
        raise
    if release:
        assoc.release()
    else:
        assoc.abort()


@contextlib.contextmanager
def files_sent_as_stored() -> Iterator[None]:
    """pynetdicom sends a file's bytes as they are (request UIDs from its file meta)
    instead of decoding it first; malformed test files need that."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def send_files(port: int, files: Sequence[Path | Dataset], **options: Any) -> list[int]:
    """C-STORE each item over one association and return each response's status code.

    A path is sent as stored, byte for byte, with the request's UIDs taken from its
    file meta; a `Dataset` is encoded by pynetdicom.
    """
    statuses = []
    with associated(port, **options) as assoc, files_sent_as_stored():
        for item in files:
            response = assoc.send_c_store(item)
            if "Status" not in response:
                raise AssertionError(f"no C-STORE response for {item}")
            statuses.append(int(response.Status))
    return statuses


# --- destinations: Orthanc and a pynetdicom storage SCP ---------------------------------


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Callable[..., OrthancServer]]:
    with orthanc_servers(tmp_path) as start:
        yield start


@dataclass
class StoreSCP:
    """A pynetdicom storage SCP whose answer per C-STORE the test decides."""

    port: int
    received: list[tuple[str, str]] = field(default_factory=list)  # (SOP class, SOP instance)
    # (sop_class_uid, sop_instance_uid, number of the request) -> status
    answer: Callable[[str, str, int], int] = lambda sop_class, uid, number: STATUS_SUCCESS
    delay_s: float = 0.0
    on_store: Callable[[int], None] | None = None
    # Abort the association on receiving this request (counted from 1), once.
    abort_at: int | None = None

    def counts(self) -> Counter[str]:
        """How many times each SOP Instance UID was sent (duplicates show as > 1)."""
        return Counter(uid for _, uid in list(self.received))


@pytest.fixture
def store_scp() -> Iterator[Callable[..., StoreSCP]]:
    servers: list[Any] = []

    def start(
        *,
        sop_classes: Sequence[str] | None = None,
        ae_title: str = "ORTHANC",
        max_associations: int = 10,
        **options: Any,
    ) -> StoreSCP:
        ae = AE(ae_title=ae_title)
        ae.maximum_associations = max_associations
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 10
        if sop_classes is None:
            ae.supported_contexts = StoragePresentationContexts
        else:
            for sop_class in sop_classes:
                ae.add_supported_context(
                    sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
                )
        scp = StoreSCP(port=0, **options)
        lock = threading.Lock()

        def handle(event: evt.Event) -> int:
            request = cast(C_STORE, event.request)
            sop_class = str(request.AffectedSOPClassUID)
            sop_instance = str(request.AffectedSOPInstanceUID)
            with lock:
                scp.received.append((sop_class, sop_instance))
                number = len(scp.received)
            if scp.on_store is not None:
                scp.on_store(number)
            if scp.abort_at == number:
                event.assoc.abort()
            if scp.delay_s:
                time.sleep(scp.delay_s)
            return scp.answer(sop_class, sop_instance, number)

        server = ae.start_server((HOST, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
        assert server is not None
        servers.append(server)
        scp.port = int(server.server_address[1])
        return scp

    yield start
    for server in servers:
        server.shutdown()


# The fixtures' types, for the tests' annotations.
StartGateway = Callable[..., InProcessGateway]
ServeGateway = Callable[..., GatewayProcess]
