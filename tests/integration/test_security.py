"""Only trusted peers get in: called AE title, caller addresses per AE title, DICOM TLS.

Every refusal happens at association time (or at the TLS handshake), nothing is
stored, and a `security` audit event (ATNA 110113) names the peer and the reason.
Certificates are made at test time (tests/integration/certificates.py).
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from certificates import PKI, KeyPair, make_pki
from conftest import (
    CALLED_AET,
    HOST,
    SUBPROCESS_TIMEOUT_S,
    InProcessGateway,
    ServeGateway,
    StartGateway,
    dcmtk,
    dcmtk_environment,
    echoscu,
    free_port,
    gateway_config,
    scu,
    storescu,
    wait_until,
    write_dx,
)
from pydicom.uid import generate_uid

from db.models import AssociationOutcome, ForwardJobState, StudyState
from gateway.cli import main
from gateway.config import parse_config
from gateway.security import PeerPolicy, client_tls_context, server_tls_context
from gateway.service import Service, ServiceError

SUCCESS = "Success"
# A second loopback address: a peer the configuration does not allow.
OTHER_LOOPBACK = "127.0.0.2"
TLS_DEADLINE_S = 60.0


def security_events(gateway: InProcessGateway) -> list[dict[str, Any]]:
    return [event.detail for event in gateway.audit_events("security")]


def assert_nothing_stored(gateway: InProcessGateway) -> None:
    assert gateway.instances() == []
    assert [path for path in gateway.spool_files() if path.suffix == ".dcm"] == []


def pynetdicom_echo(port: int, *, calling_aet: str, bind_host: str) -> bool:
    """Whether a C-ECHO from `bind_host` gets an association and a Success."""
    ae = scu(calling_aet, timeout_s=10)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(HOST, port, ae_title=CALLED_AET, bind_address=(bind_host, 0))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and int(status.Status) == 0


# --- called AE title ---------------------------------------------------------------------


def test_a_wrong_called_ae_title_is_rejected_and_audited(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_gateway(ae={"require_called_aet": True})
    image = write_dx(tmp_path)

    refused = storescu(gateway.port, [image], called_aet="NOT-RADGATE")
    echo = echoscu(gateway.port, called_aet="ANY-SCP")

    assert refused.rejected, refused.output
    assert "Called AE Title Not Recognized" in refused.output
    assert echo.returncode != 0
    assert_nothing_stored(gateway)
    events = wait_until(lambda: len(security_events(gateway)) == 2 and security_events(gateway))
    assert [event["called_aet"] for event in events] == ["NOT-RADGATE", "ANY-SCP"]
    assert all(event["atna_event_id"] == "110113" for event in events)
    assert all("Called AE title not recognised" in event["reason"] for event in events)
    assert {a.outcome for a in gateway.associations()} == {AssociationOutcome.REJECTED}

    assert storescu(gateway.port, [image]).statuses == [SUCCESS]


def test_without_require_called_aet_any_called_title_is_accepted(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_gateway()
    outcome = storescu(gateway.port, [write_dx(tmp_path)], called_aet="ANY-SCP")
    assert outcome.statuses == [SUCCESS], outcome.output
    assert security_events(gateway) == []


# --- caller addresses ----------------------------------------------------------------------


def test_an_allowed_ae_title_from_another_address_is_rejected_and_audited(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_gateway(
        ae={
            "allowed_calling_aets": ["ANYWHERE"],
            "allowed_peers": [{"ae_title": "MODALITY1", "hosts": [HOST]}],
        }
    )

    assert not pynetdicom_echo(gateway.port, calling_aet="MODALITY1", bind_host=OTHER_LOOPBACK)
    event = wait_until(lambda: security_events(gateway))[0]
    assert event["calling_aet"] == "MODALITY1"
    assert event["peer_host"] == OTHER_LOOPBACK
    assert event["atna_event_id"] == "110113"
    assert "not allowed from 127.0.0.2" in event["reason"]
    assert "127.0.0.1/32" in event["reason"]
    (association,) = gateway.associations()
    assert association.outcome is AssociationOutcome.REJECTED
    assert association.peer_host == OTHER_LOOPBACK

    # The same title from its address, and a title allowed from anywhere, get in.
    assert pynetdicom_echo(gateway.port, calling_aet="MODALITY1", bind_host=HOST)
    assert pynetdicom_echo(gateway.port, calling_aet="ANYWHERE", bind_host=OTHER_LOOPBACK)
    # A title in neither list is still refused, from any address.
    assert not pynetdicom_echo(gateway.port, calling_aet="STRANGER", bind_host=HOST)
    wait_until(lambda: len(security_events(gateway)) == 2)
    assert "Calling AE title not recognised" in security_events(gateway)[1]["reason"]


def test_storescu_from_the_allowed_address_stores(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_gateway(
        ae={"allowed_peers": [{"ae_title": "MODALITY1", "hosts": ["127.0.0.0/30"]}]}
    )
    image = write_dx(tmp_path)
    outcome = storescu(gateway.port, [image], calling_aet="MODALITY1")
    assert outcome.statuses == [SUCCESS], outcome.output
    refused = storescu(gateway.port, [image], calling_aet="OTHER")
    assert refused.rejected, refused.output
    assert len(gateway.instances()) == 1


def test_peer_policy_matches_networks_and_mapped_addresses() -> None:
    config = parse_config(
        {"ae": {"allowed_peers": [{"ae_title": "CR1", "hosts": ["10.1.2.0/24", "fd00::1"]}]}}
    )
    policy = PeerPolicy.from_config(config.ae)
    assert policy.refusal("CR1", "10.1.2.77") is None
    assert policy.refusal("CR1", "::ffff:10.1.2.77") is None
    assert policy.refusal("CR1", "fd00::1") is None
    assert policy.refusal("CR1", "10.1.3.1") is not None
    assert policy.refusal("CR1", "not-an-address") is not None
    # Titles it does not list are left to allowed_calling_aets.
    assert policy.refusal("OTHER", "10.9.9.9") is None


# --- DICOM TLS: receiving ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_tls(pki: PKI, **options: Any) -> dict[str, Any]:
    return {
        "cert_file": str(pki.server.cert),
        "key_file": str(pki.server.key),
        "ca_file": str(pki.ca),
        **options,
    }


def client_tls_args(identity: KeyPair, ca: Path) -> tuple[ssl.SSLContext, str]:
    """pynetdicom `tls_args` for a caller presenting `identity` and trusting `ca`."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.load_cert_chain(str(identity.cert), str(identity.key))
    return context, HOST


def dcmtk_tls(key: Path | None, cert: Path | None, ca: Path) -> list[str]:
    """DCMTK options: TLS with this key and certificate (anonymous without), trusting `ca`."""
    identity = ["+tls", str(key), str(cert)] if key and cert else ["+tla"]
    return [*identity, "+cf", str(ca)]


def echoscu_tls(port: int, options: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk("echoscu"), "-v", "-aet", "ECHOSCU", "-aec", CALLED_AET, *options, HOST, str(port)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        env=dcmtk_environment(),
        check=False,
    )


def test_a_trusted_client_certificate_stores_over_tls(
    start_gateway: StartGateway, tmp_path: Path, pki: PKI
) -> None:
    gateway = start_gateway(ae={"tls": server_tls(pki)})
    image = write_dx(tmp_path)
    options = dcmtk_tls(pki.client.key, pki.client.cert, pki.ca)

    outcome = storescu(gateway.port, [image], extra=options)
    echo = echoscu_tls(gateway.port, options)

    assert outcome.statuses == [SUCCESS], outcome.output
    assert echo.returncode == 0, echo.stdout + echo.stderr
    (instance,) = gateway.instances()
    assert instance.sop_instance_uid == pydicom.dcmread(image).SOPInstanceUID
    assert security_events(gateway) == []


@pytest.mark.parametrize(
    "client",
    ["untrusted certificate", "no certificate"],
)
def test_a_client_without_a_trusted_certificate_is_refused(
    start_gateway: StartGateway, tmp_path: Path, pki: PKI, client: str
) -> None:
    gateway = start_gateway(ae={"tls": server_tls(pki)})
    if client == "untrusted certificate":
        options = dcmtk_tls(pki.untrusted_client.key, pki.untrusted_client.cert, pki.ca)
    else:
        options = dcmtk_tls(None, None, pki.ca)

    outcome = storescu(gateway.port, [write_dx(tmp_path)], extra=options)

    assert outcome.returncode != 0
    assert outcome.statuses == [], outcome.output
    assert_nothing_stored(gateway)
    event = wait_until(lambda: security_events(gateway))[0]
    assert event["event"] == "connection refused"
    assert event["peer_host"] == HOST
    assert event["reason"].startswith("TLS handshake failed")
    assert gateway.associations() == []
    # The gateway keeps serving trusted callers.
    trusted = echoscu_tls(gateway.port, dcmtk_tls(pki.client.key, pki.client.cert, pki.ca))
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr


def test_without_require_client_cert_a_client_without_one_gets_in(
    start_gateway: StartGateway, tmp_path: Path, pki: PKI
) -> None:
    gateway = start_gateway(ae={"tls": server_tls(pki, require_client_cert=False)})
    outcome = storescu(gateway.port, [write_dx(tmp_path)], extra=dcmtk_tls(None, None, pki.ca))
    assert outcome.statuses == [SUCCESS], outcome.output
    # A certificate it presents is still checked against ca_file.
    untrusted = dcmtk_tls(pki.untrusted_client.key, pki.untrusted_client.cert, pki.ca)
    assert storescu(gateway.port, [write_dx(tmp_path)], extra=untrusted).statuses == []
    assert len(gateway.instances()) == 1


def test_plain_tcp_to_the_tls_port_is_refused(
    start_gateway: StartGateway, tmp_path: Path, pki: PKI
) -> None:
    gateway = start_gateway(ae={"tls": server_tls(pki)})

    plain = storescu(gateway.port, [write_dx(tmp_path)])

    assert plain.returncode != 0
    assert plain.statuses == [], plain.output
    assert_nothing_stored(gateway)
    event = wait_until(lambda: security_events(gateway))[0]
    assert event["reason"].startswith("TLS handshake failed")


def test_a_silent_connection_does_not_hold_up_tls_callers(
    start_gateway: StartGateway, pki: PKI
) -> None:
    gateway = start_gateway(ae={"tls": server_tls(pki), "acse_timeout_s": 30})
    # Connected, never says a word: its handshake waits in its own thread.
    with socket.create_connection((HOST, gateway.port), timeout=5):
        trusted = echoscu_tls(gateway.port, dcmtk_tls(pki.client.key, pki.client.cert, pki.ca))
        assert trusted.returncode == 0, trusted.stdout + trusted.stderr


def test_tls_contexts_allow_tls12_and_later_with_aead_ciphers_only(pki: PKI) -> None:
    config = parse_config({"ae": {"tls": server_tls(pki)}})
    assert config.ae.tls is not None
    server = server_tls_context(config.ae.tls)
    assert server.minimum_version is ssl.TLSVersion.TLSv1_2
    assert server.verify_mode is ssl.CERT_REQUIRED
    names = {cipher["name"] for cipher in server.get_ciphers()}
    tls12 = {name for name in names if not name.startswith("TLS_")}
    assert tls12, names
    assert all("GCM" in name and ("ECDHE" in name or "DHE" in name) for name in tls12), tls12

    destination = parse_config(
        {
            "destinations": [
                {"name": "d", "ae_title": "D", "host": HOST, "port": 104, "tls": {}},
            ]
        }
    ).destinations[0]
    client, server_name = client_tls_context(destination)
    assert client.minimum_version is ssl.TLSVersion.TLSv1_2
    assert client.verify_mode is ssl.CERT_REQUIRED and client.check_hostname
    assert server_name == HOST


def test_a_missing_certificate_file_stops_the_start_naming_the_key(
    tmp_path: Path, pki: PKI
) -> None:
    missing = tmp_path / "nowhere" / "server.pem"
    setup = gateway_config(tmp_path / "gw", ae={"tls": server_tls(pki, cert_file=str(missing))})
    with pytest.raises(ServiceError, match=rf"ae\.tls\.cert_file: {missing}: file not found"):
        Service(setup.config, processor_factory=None).start()

    wrong_key = server_tls(pki, key_file=str(pki.client.key))
    setup = gateway_config(tmp_path / "gw2", ae={"tls": wrong_key})
    with pytest.raises(ServiceError, match=r"ae\.tls\.cert_file: .*cannot be used"):
        Service(setup.config, processor_factory=None).start()

    bad_destination = {
        "name": "pacs",
        "ae_title": "PACS",
        "host": HOST,
        "port": 104,
        "tls": {"ca_file": str(tmp_path / "missing-ca.pem")},
    }
    setup = gateway_config(tmp_path / "gw3", destinations=[bad_destination])
    with pytest.raises(ServiceError, match=r"destinations\[pacs\]\.tls\.ca_file: .*not found"):
        Service(setup.config, processor_factory=None).start()


# --- DICOM TLS: forwarding ---------------------------------------------------------------


@pytest.fixture
def tls_storescp(tmp_path: Path) -> Iterator[Callable[..., tuple[int, Path]]]:
    """DCMTK storescp over TLS requiring a client certificate; returns (port, folder)."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(pki: PKI, ae_title: str = "TLSPACS") -> tuple[int, Path]:
        port = free_port()
        folder = tmp_path / f"tls-storescp{len(processes)}"
        folder.mkdir()
        options = dcmtk_tls(pki.server.key, pki.server.cert, pki.ca)
        process = subprocess.Popen(
            [dcmtk("storescp"), "-aet", ae_title, "-od", str(folder), *options, str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dcmtk_environment(),
        )
        processes.append(process)
        _wait_for_listen(port, lambda: process.poll() is None)
        return port, folder

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(SUBPROCESS_TIMEOUT_S)


def _wait_for_listen(port: int, alive: Callable[[], bool], timeout_s: float = 20.0) -> None:
    # A bare connect: storescp drops it after the failed handshake and keeps listening.
    deadline = time.monotonic() + timeout_s
    while True:
        if not alive():
            raise AssertionError(f"storescp on port {port} exited before it listened")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise AssertionError(f"nothing listened on {HOST}:{port}") from None
            time.sleep(0.05)


def test_a_study_received_over_tls_is_forwarded_over_tls(
    serve_gateway: ServeGateway,
    tls_storescp: Callable[..., tuple[int, Path]],
    tiny_model: Path,
    tmp_path: Path,
    pki: PKI,
) -> None:
    destination_port, received = tls_storescp(pki)
    setup = gateway_config(
        tmp_path / "gw",
        ae={"tls": server_tls(pki)},
        model={"dir": str(tiny_model), "device": "cpu"},
        destinations=[
            {
                "name": "tls-pacs",
                "ae_title": "TLSPACS",
                "host": HOST,
                "port": destination_port,
                "timeout_s": 10,
                "tls": {
                    "ca_file": str(pki.ca),
                    "cert_file": str(pki.client.cert),
                    "key_file": str(pki.client.key),
                },
            }
        ],
        routes=[{"name": "all", "when": {}, "forward_to": ["tls-pacs"], "send": ["originals"]}],
    )
    gateway = serve_gateway(setup, receive_only=False, tls_args=client_tls_args(pki.client, pki.ca))
    study_uid = generate_uid()
    image = write_dx(tmp_path / "in", study_uid=study_uid)

    outcome = storescu(
        gateway.port, [image], extra=dcmtk_tls(pki.client.key, pki.client.cert, pki.ca)
    )
    assert outcome.statuses == [SUCCESS], outcome.output

    gateway.wait_for_state(study_uid, StudyState.PROCESSED, timeout_s=TLS_DEADLINE_S)
    arrived = wait_until(lambda: list(received.iterdir()), TLS_DEADLINE_S)
    (copy,) = arrived
    assert pydicom.dcmread(copy).SOPInstanceUID == pydicom.dcmread(image).SOPInstanceUID
    forwards = wait_until(
        lambda: [e.detail for e in gateway.audit_events("forward")
                 if e.detail["state"] == ForwardJobState.DELIVERED.value],
        TLS_DEADLINE_S,
    )  # fmt: skip
    assert forwards[0]["destination"] == "tls-pacs"
    assert forwards[0]["instances_sent"] == 1


def test_the_demo_refuses_a_tls_configuration_with_the_reason(
    tmp_path: Path, pki: PKI, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = gateway_config(
        tmp_path / "gw",
        ae={"tls": server_tls(pki)},
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": HOST, "port": 104, "tls": {}},
        ],
        routes=[{"name": "all", "when": {}, "forward_to": ["pacs"]}],
    )
    arguments = ["demo", "--config", str(setup.path), "--data", str(tmp_path / "no-data")]
    assert main([*arguments, "--work", str(tmp_path / "work")]) == 2
    error = capsys.readouterr().err
    assert "ae.tls is set, and the demo sends with storescu without TLS" in error
    assert "destinations[pacs].tls is set" in error
    assert not (tmp_path / "work").exists()
