"""Debian's Orthanc as a DICOM destination for tests, on loopback.

Each server gets its own configuration JSON, storage folder, DICOM and HTTP ports and
AE title, all under a temporary folder; nothing from /etc/orthanc is read. The REST
API (``http://127.0.0.1:<http_port>``) is how tests look at what arrived.

    with OrthancServer(tmp_path / "pacs") as pacs:       # started, stopped on exit
        ...  # C-STORE to 127.0.0.1:pacs.dicom_port, called AE pacs.ae_title
        assert pacs.instance_count() == 3

`orthanc_servers(folder)` starts servers on demand and stops every one on exit (the
body of an `orthanc` fixture): ``start(accepted_transfer_syntaxes=UNCOMPRESSED_SYNTAXES)``. Orthanc's DICOM server
listens on every interface (Orthanc 1.10 has no bind address option); its HTTP server
refuses other hosts (``RemoteAccessAllowed: false``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from io import BytesIO
from pathlib import Path
from types import TracebackType
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
HTTP_TIMEOUT_S = 10.0
# Explicit and implicit VR little endian: an archive that takes no compressed data.
UNCOMPRESSED_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")


def orthanc_executable() -> str:
    executable = shutil.which("Orthanc") or shutil.which("orthanc")
    if executable is None:
        pytest.fail("Orthanc (Debian package orthanc, `make system-deps`) is required")
    return executable


def free_port(host: str = HOST) -> int:
    """A port free right now (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class OrthancServer:
    """One Orthanc process; `start()` returns once its REST API answers."""

    def __init__(
        self,
        folder: Path,
        *,
        ae_title: str = "ORTHANC",
        dicom_port: int | None = None,
        http_port: int | None = None,
        check_called_aet: bool = False,
        always_allow_store: bool = True,
        accepted_transfer_syntaxes: Sequence[str] | None = None,
    ) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.check_called_aet = check_called_aet
        self.always_allow_store = always_allow_store
        self.accepted_transfer_syntaxes = accepted_transfer_syntaxes
        self.process: subprocess.Popen[bytes] | None = None
        self.config_path = folder / "orthanc.json"
        self.log_path = folder / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    def configuration(self) -> dict[str, Any]:
        storage = self.folder / "storage"
        config: dict[str, Any] = {
            "Name": f"radgate-test-{self.ae_title}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            # Test data need not survive a power cut; fsync per file only slows the tests.
            "SyncStorageArea": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": self.check_called_aet,
            "DicomAlwaysAllowStore": self.always_allow_store,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": {},
            "DicomScpTimeout": 30,
            "DicomThreadsCount": 2,
            "HttpThreadsCount": 4,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "StableAge": 1,
            "DeidentifyLogs": True,
        }
        if self.accepted_transfer_syntaxes is not None:
            config["AcceptedTransferSyntaxes"] = list(self.accepted_transfer_syntaxes)
        return config

    def start(self, timeout_s: float = START_TIMEOUT_S) -> OrthancServer:
        if self.process is not None:
            raise RuntimeError("this Orthanc is already started")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.configuration(), indent=2), encoding="utf-8")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [orthanc_executable(), "--no-jobs", str(self.config_path)],
                cwd=self.folder,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            self._wait_until_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"Orthanc exited with status {self.process.returncode} before its REST API"
                    f" answered:\n{self.log()}"
                )
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                system = self.get("/system", timeout_s=1.0)
                if system.get("DicomAet") == self.ae_title and self._dicom_listening():
                    return
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"Orthanc did not answer on {self.url} within {timeout_s:g} s:\n{self.log()}"
                )
            time.sleep(0.1)

    def _dicom_listening(self) -> bool:
        try:
            with socket.create_connection((HOST, self.dicom_port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self, timeout_s: float = STOP_TIMEOUT_S, *, kill: bool = False) -> None:
        """Stop the process: SIGTERM (SIGKILL after `timeout_s`), or SIGKILL at once with
        `kill` (a clean shutdown takes Orthanc a few seconds). The storage stays."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if kill:
            process.kill()
        else:
            process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)

    def __enter__(self) -> OrthancServer:
        return self.start() if self.process is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-20000:]
        except OSError:
            return "(no log)"

    # --- REST API ---------------------------------------------------------------------

    def _request(
        self, path: str, *, data: bytes | None = None, timeout_s: float = HTTP_TIMEOUT_S
    ) -> bytes:
        request = urllib.request.Request(self.url + path, data=data)
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body: bytes = response.read()
            return body

    def get(self, path: str, *, timeout_s: float = HTTP_TIMEOUT_S) -> Any:
        return json.loads(self._request(path, timeout_s=timeout_s))

    def studies(self) -> list[str]:
        """Orthanc ids of the stored studies."""
        return list(self.get("/studies"))

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """The instances of the study with this Study Instance UID ([] if none)."""
        matches = json.loads(self._request("/tools/lookup", data=study_uid.encode()))
        study_ids = [match["ID"] for match in matches if match.get("Type") == "Study"]
        instances: list[dict[str, Any]] = []
        for study_id in study_ids:
            instances.extend(self.get(f"/studies/{study_id}/instances"))
        return instances

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file, as received."""
        return self._request(f"/instances/{orthanc_id}/file")

    def instance_dataset(self, orthanc_id: str) -> Dataset:
        return pydicom.dcmread(BytesIO(self.instance_file(orthanc_id)))

    def datasets(self, study_uid: str) -> dict[str, Dataset]:
        """The study's stored instances, read back, by SOP Instance UID."""
        datasets = [self.instance_dataset(item["ID"]) for item in self.study_instances(study_uid)]
        return {str(ds.SOPInstanceUID): ds for ds in datasets}


@contextlib.contextmanager
def orthanc_servers(folder: Path) -> Iterator[Callable[..., OrthancServer]]:
    """Start Orthanc servers under `folder`: ``start(ae_title=..., ...)``; all stopped on exit.

    `start=False` returns a configured server (ports chosen) that the caller starts later.
    As a fixture::

        @pytest.fixture
        def orthanc(tmp_path: Path) -> Iterator[Callable[..., OrthancServer]]:
            with orthanc_servers(tmp_path) as start:
                yield start
    """
    servers: list[OrthancServer] = []

    def make(*, start: bool = True, **options: Any) -> OrthancServer:
        server = OrthancServer(folder / f"orthanc{len(servers)}", **options)
        servers.append(server)
        return server.start() if start else server

    try:
        yield make
    finally:
        # Their storage is thrown away: no need to wait for clean shutdowns.
        for server in servers:
            server.stop(kill=True)
