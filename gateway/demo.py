"""`radgate demo`: the whole product on the sample radiographs, on this machine.

1. wrap the sample PNGs as DICOM studies, odd cases included (`radgate samples --variants`);
2. start the configured destination locally: Orthanc when installed, else a DCMTK
   `storescp` sink, on the destination's AE title and port;
3. start `radgate serve` with the configuration, and send the studies with DCMTK `storescu`;
4. wait until every study is processed and every forward job delivered or dead-lettered;
5. print the audit view and where the Grad-CAM images are; stop everything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.audit import list_studies, studies_command
from gateway.config import WEB_TOKEN_VARIABLE, Config, Destination, load_config
from gateway.web import web_token
from inference.errors import RadgateError

START_TIMEOUT_S = 120.0
SEND_TIMEOUT_S = 300.0
DEFAULT_WAIT_S = 600.0


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_for_port(
    host: str, port: int, process: subprocess.Popen[bytes], what: str, log: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _port_open(host, port):
        if process.poll() is not None:
            raise RadgateError(f"{what} exited with status {process.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise RadgateError(
                f"{what} did not listen on {host}:{port} within {START_TIMEOUT_S:g} s; see {log}"
            )
        time.sleep(0.2)


def _stop(process: subprocess.Popen[bytes] | None, timeout_s: float = 30.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout_s)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def destination_node(destination: Destination, work: Path) -> Iterator[str]:
    """Run a local DICOM node for `destination`; yields a line that says what it is."""
    if _port_open(destination.host, destination.port):
        yield f"{destination.name}: something already listens on {destination.host}:{destination.port}; using it"
        return
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"{destination.name}.log"
    orthanc = shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None
    )
    process: subprocess.Popen[bytes] | None = None
    try:
        if orthanc:
            http_port = _free_port()
            storage = work / "orthanc-storage"
            config = {
                "Name": f"radgate-demo-{destination.name}",
                "StorageDirectory": str(storage),
                "IndexDirectory": str(storage),
                "HttpPort": http_port,
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                "DicomAet": destination.ae_title,
                "DicomPort": destination.port,
                "DicomCheckCalledAet": True,
                "DicomAlwaysAllowStore": True,
                "DicomAlwaysAllowEcho": True,
                "Plugins": [],
                "StableAge": 1,
                "DeidentifyLogs": True,
            }
            config_path = work / "orthanc.json"
            config_path.write_text(json.dumps(config, indent=2))
            with log.open("ab") as handle:
                process = subprocess.Popen(
                    [orthanc, "--no-jobs", str(config_path)],
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    cwd=work,
                )
            _wait_for_port(destination.host, destination.port, process, "Orthanc", log)
            description = (
                f"{destination.name}: Orthanc, AE {destination.ae_title} on port {destination.port},"
                f" browse it at http://127.0.0.1:{http_port}/app/explorer.html"
            )
        else:
            received = work / "received"
            received.mkdir(exist_ok=True)
            with log.open("ab") as handle:
                process = subprocess.Popen(
                    [
                        "storescp",
                        "-aet",
                        destination.ae_title,
                        "--output-directory",
                        str(received),
                        "--sort-on-study-uid",
                        "st",
                        str(destination.port),
                    ],
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "TCP_NODELAY": "1"},
                )
            _wait_for_port(destination.host, destination.port, process, "storescp", log)
            description = f"{destination.name}: DCMTK storescp writing to {received}"
        yield description
    finally:
        _stop(process)


# storescu sends a compressed file unchanged only when told to propose its transfer syntax.
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG extended (12-bit)
    "1.2.840.10008.1.2.4.57": "-xs",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",  # RLE lossless
    "1.2.840.10008.1.2.1.99": "-xd",  # deflated explicit VR little endian
}


def storescu_batches(files: list[Path]) -> list[tuple[list[str], list[Path]]]:
    """Files grouped by the storescu option their transfer syntax needs (one association each)."""
    import pydicom

    groups: dict[str, list[Path]] = {}
    for path in files:
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(STORESCU_PROPOSE.get(syntax, ""), []).append(path)
    return [([option] if option else [], group) for option, group in sorted(groups.items())]


def _send(config: Config, files: list[Path], log: Path) -> None:
    for options, batch in storescu_batches(files):
        command = [
            "storescu", "-aet", "MODALITY", "-aec", config.ae.title, "-nh", *options,
            "--timeout", "30", "--dimse-timeout", "60",
            config.ae.host, str(config.ae.port), *map(str, batch),
        ]  # fmt: skip
        with log.open("ab") as handle:
            result = subprocess.run(
                command,
                stdout=handle,
                stderr=subprocess.STDOUT,
                timeout=SEND_TIMEOUT_S,
                env={**os.environ, "TCP_NODELAY": "1"},
                check=False,
            )
        if result.returncode != 0:
            raise RadgateError(f"storescu exited with status {result.returncode}; see {log}")


def _settled(records: list[dict[str, Any]], study_uids: set[str]) -> tuple[bool, str]:
    mine = [r for r in records if r["study_uid"] in study_uids]
    processed = sum(r["state"] in ("processed", "failed") for r in mine)
    jobs = [f for r in mine for f in r["forwards"]]
    finished = sum(f["state"] in ("delivered", "dead") for f in jobs)
    done = (
        len(mine) == len(study_uids)
        and processed == len(mine)
        and (finished == len(jobs))
        and all(r["forwards"] or r["state"] == "failed" for r in mine)
    )
    return (
        done,
        f"{len(mine)}/{len(study_uids)} received, {processed} processed, {finished}/{len(jobs)} forwards finished",
    )


def _dashboard_token(config: Config) -> tuple[str | None, dict[str, str]]:
    """The dashboard's token and the gateway's environment.

    A configuration without a token gets one made for this run (given to the gateway as
    RADGATE_WEB_TOKEN), so the demo shows the dashboard as it is meant to be used.
    """
    environment = dict(os.environ)
    if config.web is None:
        return None, environment
    token = web_token(config)
    if token is None:
        token = secrets.token_hex(16)
        environment[WEB_TOKEN_VARIABLE] = token
    return token, environment


def _print_dashboard(
    config: Config, config_path: Path, token: str | None, *, running: bool
) -> None:
    if config.web is None:
        print("\nNo dashboard: add a `web` section to the configuration (docs/CONFIG.md).")
        return
    url = f"http://{config.web.host}:{config.web.port}/"
    print(f"\nDashboard: {url}  token: {token}")
    if not running:
        print(
            "  the gateway has stopped; to browse the demo's studies run\n"
            f"  {WEB_TOKEN_VARIABLE}={token} radgate web --config {config_path}"
        )


def _plain_dicom_only(config: Config) -> None:
    """The demo sends with plain storescu and starts plain local destination nodes."""
    problems = []
    if config.ae.tls is not None:
        problems.append("ae.tls is set, and the demo sends with storescu without TLS")
    problems += [
        f"destinations[{d.name}].tls is set, and the demo's local nodes do not speak TLS"
        for d in config.destinations
        if d.tls is not None
    ]
    if problems:
        raise RadgateError(
            "; ".join(problems) + ": run the demo with a configuration without TLS"
            " (TLS itself is covered by radgate serve, docs/CONFIG.md)"
        )


def command(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    _plain_dicom_only(config)
    model_card = Path(config.model.dir) / "model.json"
    if not model_card.is_file():
        raise RadgateError(f"{model_card}: no model; train one first (make model)")
    if _port_open(config.ae.host, config.ae.port):
        raise RadgateError(
            f"{config.ae.host}:{config.ae.port} is in use: stop the other gateway first"
        )
    work = Path(args.work).resolve()
    samples_dir = work / "samples"
    from inference.samples import make_samples

    entries = make_samples(args.data, samples_dir, "test", True)
    files = [samples_dir / entry.path for entry in entries]
    study_uids = {entry.study_uid for entry in entries}
    print(
        f"[demo] {len(files)} sample instances in {len(study_uids)} studies written to {samples_dir}"
    )

    dashboard_token, environment = _dashboard_token(config)
    with contextlib.ExitStack() as stack:
        for destination in config.destinations:
            print(
                f"[demo] destination {stack.enter_context(destination_node(destination, work / destination.name))}"
            )
        gateway_log = work / "gateway.log"
        with gateway_log.open("ab") as handle:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--config", str(args.config)],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=environment,
            )
        stack.callback(_stop, gateway)
        _wait_for_port(config.ae.host, config.ae.port, gateway, "radgate serve", gateway_log)
        print(
            f"[demo] radgate listening as {config.ae.title} on {config.ae.host}:{config.ae.port} (log: {gateway_log})"
        )
        _send(config, files, work / "storescu.log")
        print(f"[demo] sent {len(files)} instances with DCMTK storescu")
        deadline = time.monotonic() + args.wait
        last = ""
        while True:
            done, progress = _settled(list_studies(config, limit=10_000), study_uids)
            if progress != last:
                print(f"[demo] {progress}", flush=True)
                last = progress
            if done:
                break
            if time.monotonic() > deadline:
                print(f"[demo] gave up waiting after {args.wait:g} s; see {gateway_log}")
                break
            time.sleep(0.5)
        print()
        studies_command(argparse.Namespace(config=args.config, json=False, limit=len(study_uids)))
        records = [r for r in list_studies(config, limit=10_000) if r["study_uid"] in study_uids]
        pngs = [
            o["png"]
            for r in records
            for o in r["outputs"]
            if o["kind"] == "gradcam_sc" and o["png"]
        ]
        print(
            f"\nGrad-CAM overlays ({len(pngs)}), also stored as DICOM Secondary Captures in each study:"
        )
        for png in pngs:
            print(f"  {png}")
        print(
            f"\nEverything recorded for one study: radgate show --config {args.config} {records[0]['study_uid'] if records else 'STUDY_UID'}"
        )
        _print_dashboard(config, args.config, dashboard_token, running=args.keep_running)
        if args.keep_running:
            print("[demo] gateway and destination keep running; Ctrl-C stops them")
            with contextlib.suppress(KeyboardInterrupt):
                gateway.wait()
    return 0
