"""Who may associate: DICOM TLS (BCP 195) and the per-AE address check.

* TLS contexts for receiving (`server_tls_context`, from `ae.tls`) and for sending to a
  destination (`client_tls_context`, from `destinations[].tls`): TLS 1.2 or later, and
  for TLS 1.2 only the AEAD cipher suites of the BCP 195 profile (PS3.15 B.9); TLS 1.3
  suites are all AEAD.
* `PeerPolicy`: the addresses each calling AE title in `ae.allowed_peers` may call from.
  A caller from another address is rejected at association time, as an unknown
  calling AE title is (A-ASSOCIATE-RJ permanent, "calling AE title not recognised").
* `GatewayServer`: pynetdicom's threaded server with two changes. The TLS handshake
  runs in the connection's own thread with the ACSE timeout, not in the accepting
  thread (pynetdicom's `get_request` handshakes there, so one silent client would
  stall every other), and a failed handshake is written to the audit log as a
  security alert. Each association negotiates with `PeerCheckingACSE`.

Refusals are audit events of kind `security` in the spirit of IHE ATNA event 110113
(Security Alert).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db.work import ATNA_SECURITY_ALERT, SECURITY_EVENT, add_audit_event
from gateway.config import AEConfig, Destination, DestinationTLS, TLSConfig
from inference.errors import RadgateError

log = logging.getLogger(__name__)

# BCP 195 (RFC 7525 section 4.2) cipher suites for TLS 1.2, in OpenSSL's names:
# ephemeral key exchange and AES-GCM only. TLS 1.3 suites are configured apart.
BCP195_TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
    ]
)

# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected-permanent, by the service user, calling AE
# title not recognised: what a caller from a wrong address is told.
REJECT_PERMANENT = 0x01
REJECT_SOURCE_SERVICE_USER = 0x01
REJECT_CALLING_AE_NOT_RECOGNISED = 0x03


class TLSSetupError(RadgateError):
    """A TLS certificate, key or CA file that cannot be used."""


def _bcp195(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION
    return context


def _load(what: str, path: Path, load: Callable[[], None]) -> None:
    if not path.is_file():
        raise TLSSetupError(f"{what}: {path}: file not found")
    try:
        load()
    except (ssl.SSLError, OSError, ValueError) as error:
        raise TLSSetupError(f"{what}: {path}: cannot be used ({error})") from None


def _load_certificate(context: ssl.SSLContext, key: str, cert_file: Path, key_file: Path) -> None:
    _load(f"{key}.key_file", key_file, lambda: None)
    _load(
        f"{key}.cert_file",
        cert_file,
        lambda: context.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file)),
    )


def server_tls_context(tls: TLSConfig) -> ssl.SSLContext:
    """The context radgate accepts TLS connections with, from `ae.tls`."""
    context = _bcp195(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_certificate(context, "ae.tls", tls.cert_file, tls.key_file)
    ca_file = tls.ca_file
    if ca_file is not None:
        _load("ae.tls.ca_file", ca_file, lambda: context.load_verify_locations(cafile=ca_file))
    if tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif ca_file is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_tls_context(destination: Destination) -> tuple[ssl.SSLContext, str]:
    """The context and the expected server name for sending to `destination` over TLS
    (pynetdicom's `tls_args`); the destination's certificate is always verified."""
    tls = destination.tls if destination.tls is not None else DestinationTLS()
    key = f"destinations[{destination.name}].tls"
    context = _bcp195(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ca_file = tls.ca_file
    if ca_file is not None:
        _load(f"{key}.ca_file", ca_file, lambda: context.load_verify_locations(cafile=ca_file))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.cert_file is not None and tls.key_file is not None:
        _load_certificate(context, key, tls.cert_file, tls.key_file)
    return context, tls.server_name or destination.host


# --- who may call from where -------------------------------------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def peer_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The caller's IP address; an IPv4-mapped IPv6 address (a dual-stack listener) as
    IPv4. None for something that is not an address."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class PeerPolicy:
    """The networks each address-bound calling AE title may call from (`ae.allowed_peers`).

    Calling AE titles not listed here are pynetdicom's to check
    (`ae.allowed_calling_aets`, or anyone when both lists are empty).
    """

    networks: dict[str, tuple[Network, ...]]

    @classmethod
    def from_config(cls, ae: AEConfig) -> PeerPolicy:
        return cls(
            {
                peer.ae_title: tuple(ipaddress.ip_network(host) for host in peer.hosts)
                for peer in ae.allowed_peers
            }
        )

    def refusal(self, calling_aet: str, host: str) -> str | None:
        """Why `calling_aet` calling from `host` is refused; None when it may call."""
        networks = self.networks.get(calling_aet.strip())
        if networks is None:
            return None
        address = peer_address(host)
        if address is not None and any(address in network for network in networks):
            return None
        allowed = ", ".join(str(network) for network in networks)
        return (
            f"calling AE title {calling_aet.strip()!r} is not allowed from {host}"
            f" (ae.allowed_peers allows it from {allowed})"
        )


class PeerCheckingACSE(ACSE):
    """pynetdicom's ACSE, rejecting a caller whose address its AE title is not allowed from."""

    def __init__(self, assoc: Association, policy: PeerPolicy) -> None:
        super().__init__(assoc)
        self.policy = policy
        # Read by the EVT_REJECTED handler: the reason written to the audit log.
        self.refusal_reason: str | None = None

    def _negotiate_as_acceptor(self) -> None:
        primitive = self.requestor.primitive
        calling_aet = str(getattr(primitive, "calling_ae_title", "") or "")
        refusal = self.policy.refusal(calling_aet, str(self.requestor.address))
        if refusal is None:
            super()._negotiate_as_acceptor()
            return
        self.refusal_reason = refusal
        self.requestor.ae_title = calling_aet
        self.send_reject(
            REJECT_PERMANENT, REJECT_SOURCE_SERVICE_USER, REJECT_CALLING_AE_NOT_RECOGNISED
        )
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


def refusal_reason(assoc: Association) -> str | None:
    """The reason `PeerCheckingACSE` rejected `assoc` for, if it did."""
    return getattr(assoc.acse, "refusal_reason", None)


# --- the server ----------------------------------------------------------------------------

TLSFailureHandler = Callable[[str, int | None, str], None]


class GatewayRequestHandler(RequestHandler):
    server: GatewayServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        assoc.acse = PeerCheckingACSE(assoc, self.server.peer_policy)
        return assoc


class GatewayServer(ThreadedAssociationServer):
    """pynetdicom's threaded server; TLS handshakes in the connection's thread."""

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int],
        ae_title: str,
        contexts: Any,
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: Any = None,
        *,
        peer_policy: PeerPolicy,
        handshake_timeout_s: float,
        on_tls_failure: TLSFailureHandler | None = None,
    ) -> None:
        self.peer_policy = peer_policy
        self.tls_context = ssl_context
        self.handshake_timeout_s = handshake_timeout_s
        self.on_tls_failure = on_tls_failure
        # No context for the base class: its `get_request` would handshake in the
        # accepting thread.
        super().__init__(
            ae,
            address,
            ae_title,
            contexts,
            None,
            evt_handlers=evt_handlers,
            request_handler=GatewayRequestHandler,
        )

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.tls_context is not None:
            wrapped = self._handshake(cast(socket.socket, request), client_address)
            if wrapped is None:
                return
            request = wrapped
        super().process_request_thread(request, client_address)

    def _handshake(self, raw: socket.socket, client_address: Any) -> ssl.SSLSocket | None:
        assert self.tls_context is not None
        host = str(client_address[0])
        port = int(client_address[1]) if len(client_address) > 1 else None
        previous_timeout = raw.gettimeout()
        try:
            raw.settimeout(self.handshake_timeout_s)
            wrapped = self.tls_context.wrap_socket(raw, server_side=True)
            wrapped.settimeout(previous_timeout)
            return wrapped
        except (OSError, ValueError) as error:
            reason = f"TLS handshake failed: {_tls_problem(error)}"
            log.warning("connection from %s:%s refused: %s", host, port, reason)
            self.shutdown_request(raw)
            if self.on_tls_failure is not None:
                self.on_tls_failure(host, port, reason)
            return None


def _tls_problem(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason)
    if isinstance(error, TimeoutError | socket.timeout):
        return "no handshake within the ACSE timeout"
    return str(error) or type(error).__name__


def start_gateway_server(
    ae: AE,
    address: tuple[str, int],
    evt_handlers: list[Any],
    *,
    peer_policy: PeerPolicy,
    tls_context: ssl.SSLContext | None = None,
    on_tls_failure: TLSFailureHandler | None = None,
) -> GatewayServer:
    """Listen on `address` in background threads, as `ae.start_server(block=False)` does."""
    server = ae.make_server(
        address,
        ssl_context=tls_context,
        evt_handlers=evt_handlers,
        server_class=GatewayServer,
        peer_policy=peer_policy,
        handshake_timeout_s=ae.acse_timeout if ae.acse_timeout is not None else 30.0,
        on_tls_failure=on_tls_failure,
    )
    server = cast(GatewayServer, server)
    thread = threading.Thread(
        target=server.serve_forever, name=f"AcceptorServer@{address[0]}:{address[1]}"
    )
    thread.daemon = True
    thread.start()
    # As `start_server` does, so that `ae.shutdown()` stops this server too.
    ae._servers.append(server)
    return server


def record_security_alert(
    sessions: sessionmaker[Session],
    event: str,
    *,
    peer_host: str,
    peer_port: int | None,
    reason: str,
    now: datetime | None = None,
    **detail: Any,
) -> None:
    """Write a `security` audit event (ATNA 110113); a database failure is logged."""
    try:
        with sessions() as session:
            add_audit_event(
                session,
                SECURITY_EVENT,
                {
                    "event": event,
                    "atna_event_id": ATNA_SECURITY_ALERT,
                    "peer_host": peer_host,
                    "peer_port": peer_port,
                    "reason": reason,
                    **detail,
                },
                now=now,
            )
    except SQLAlchemyError as error:
        log.error("security alert from %s not recorded: %s", peer_host, type(error).__name__)
