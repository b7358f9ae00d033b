"""`radgate serve`: the receiver, the completion sweep and processing, in one process.

`Service(config).start()` migrates the database, recovers what a killed run left
(open associations closed as aborted, claimed studies handed back, temporary spool
files removed), loads the processor, starts listening and starts the scheduler.
`stop()` stops accepting associations, lets open ones and the study in progress
finish within a bound, and shuts the rest down.

Processing plugs in through a `ProcessorFactory`: called once with the configuration,
the session factory and the spool, it returns a `Processor` whose `process_ready()`
claims and processes ready studies until none is left. The default,
`pipeline_processor`, builds it from ``gateway.pipeline`` when that module exists;
without it, studies are only marked ready. `claim_loop` turns a one-study
``process(study_id)`` into a `process_ready`.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import signal
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from db.session import make_engine, migrate, session_factory
from db.work import abort_open_associations, claim_study, new_worker_id, reset_processing
from gateway.config import Config, load_config
from gateway.metrics import GatewayMetrics
from gateway.scheduler import DEFAULT_SWEEP_INTERVAL_S, GatewayScheduler, ProcessReady
from gateway.scp import ReceiverContext, build_ae, start_server
from gateway.security import PeerPolicy, TLSSetupError, client_tls_context, server_tls_context
from gateway.spool import Spool
from gateway.web import Dashboard, DashboardServer, web_token
from inference.errors import RadgateError

log = logging.getLogger(__name__)

# How long `stop` waits, in all, for open associations and the study in progress.
DEFAULT_STOP_TIMEOUT_S = 30.0
PIPELINE_MODULE = "gateway.pipeline"


@dataclass(frozen=True)
class Processor:
    """What processes ready studies, and what the start line says about it."""

    process_ready: ProcessReady
    model_id: str | None = None
    device: str | None = None
    close: Callable[[], None] | None = None


# Called as factory(config, sessions, spool, worker_id), plus metrics=GatewayMetrics when
# the factory has a `metrics` parameter.
ProcessorFactory = Callable[..., "Processor | None"]


def pipeline_processor(
    config: Config,
    sessions: sessionmaker[Session],
    spool: Spool,
    worker_id: str,
    metrics: GatewayMetrics | None = None,
) -> Processor | None:
    """The default processor, from ``gateway.pipeline``; None while that module is absent.

    The module may provide ``make_processor(config, sessions, spool, worker_id)``
    returning a `Processor`; otherwise its ``load_classifier(config)`` and
    ``Pipeline(config, sessions, classifier, worker_id=...)`` with ``process_ready()``
    are used. A model that cannot be loaded stops the start (RadgateError).
    """
    try:
        module = importlib.import_module(PIPELINE_MODULE)
    except ModuleNotFoundError as error:
        if error.name != PIPELINE_MODULE:
            raise
        log.info(
            "no processing: %s is not installed; complete studies are marked ready and wait",
            PIPELINE_MODULE,
        )
        return None
    make_processor = getattr(module, "make_processor", None)
    if make_processor is not None:
        processor: Processor | None = make_processor(
            config, sessions, spool, worker_id, metrics=metrics
        )
        return processor
    classifier = module.load_classifier(config)
    pipeline = module.Pipeline(config, sessions, classifier, worker_id=worker_id)
    return Processor(
        process_ready=pipeline.process_ready,
        model_id=_optional_text(getattr(classifier.loaded, "model_id", None)),
        device=_optional_text(getattr(classifier, "device", None)),
        close=getattr(pipeline, "close", None),
    )


def claim_loop(
    sessions: sessionmaker[Session], process: Callable[[int], object], worker_id: str
) -> ProcessReady:
    """A `process_ready` that claims studies one by one for `worker_id` and processes each."""

    def process_ready() -> int:
        processed = 0
        while (study_id := claim_study(sessions, worker_id)) is not None:
            process(study_id)
            processed += 1
        return processed

    return process_ready


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


class ServiceError(RadgateError):
    """The gateway cannot start with this configuration."""


class Service:
    """The running gateway; usable in-process (tests) and by `radgate serve`."""

    def __init__(
        self,
        config: Config,
        *,
        processor_factory: ProcessorFactory | None = pipeline_processor,
        port: int | None = None,
        sweep_interval_s: float = DEFAULT_SWEEP_INTERVAL_S,
        metrics: GatewayMetrics | None = None,
        dashboard: bool = True,
    ) -> None:
        """`port` overrides `ae.port` (0: any free port, see `port` after `start`);
        `processor_factory` None runs the receiver and the sweep only; `dashboard`
        False leaves the `web` section unused."""
        self.config = config
        self.worker_id = new_worker_id()
        self.processor_factory = processor_factory
        self._requested_port = config.ae.port if port is None else port
        self.sweep_interval_s = sweep_interval_s
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        # Checked before anything starts: a dashboard that may not run stops the start.
        self.web_token = web_token(config) if dashboard and config.web is not None else None
        self.dashboard_enabled = dashboard and config.web is not None
        self.dashboard: DashboardServer | None = None
        self.engine: Engine | None = None
        self.sessions: sessionmaker[Session] | None = None
        self.spool: Spool | None = None
        self.processor: Processor | None = None
        self.receiver: ReceiverContext | None = None
        self.scheduler: GatewayScheduler | None = None
        self._ae: AE | None = None
        self._server: ThreadedAssociationServer | None = None
        self._stopped = False

    @property
    def port(self) -> int:
        """The port the gateway listens on (the chosen one when started with port 0)."""
        if self._server is None:
            raise RuntimeError("the service is not started")
        return int(self._server.server_address[1])

    def start(self) -> Service:
        config = self.config
        # Certificates and keys are checked before anything starts.
        tls_context = self._tls_contexts()
        self.engine = make_engine(config.storage.database_url, config.storage.busy_timeout_ms)
        migrate(self.engine)
        self.sessions = session_factory(self.engine)
        self.spool = Spool(config.storage.spool_dir)
        self.spool.sweep_temp()
        self._recover(self.sessions)

        if self.processor_factory is not None:
            options: dict[str, Any] = {}
            # Factories that count predictions and deliveries take the registry; the
            # simpler ones (tests, receive-only) do not have to.
            if "metrics" in inspect.signature(self.processor_factory).parameters:
                options["metrics"] = self.metrics
            self.processor = self.processor_factory(
                config, self.sessions, self.spool, self.worker_id, **options
            )
        self.receiver = ReceiverContext(
            spool=self.spool,
            sessions=self.sessions,
            min_free_mb=config.storage.min_free_mb,
            metrics=self.metrics,
            max_pdu=config.ae.max_pdu,
        )
        self._ae = build_ae(config.ae)
        self._server = start_server(
            self._ae,
            config.ae.host,
            self._requested_port,
            self.receiver,
            tls_context=tls_context,
            peer_policy=PeerPolicy.from_config(config.ae),
        )
        self.scheduler = GatewayScheduler(
            self.sessions,
            config.study,
            self.processor.process_ready if self.processor else None,
            sweep_interval_s=self.sweep_interval_s,
        )
        self.scheduler.start()
        self.metrics.watch_queues(self.sessions)
        if self.dashboard_enabled:
            assert config.web is not None
            self.dashboard = DashboardServer(
                Dashboard(
                    config,
                    self.engine,
                    metrics=self.metrics,
                    token=self.web_token,
                    gateway=self,
                )
            ).start()
        log.info("%s", self.describe())
        return self

    @property
    def model_loaded(self) -> bool:
        return self.processor is not None

    @property
    def scheduler_running(self) -> bool:
        return self.scheduler is not None and self.scheduler.running

    def _tls_contexts(self) -> ssl.SSLContext | None:
        """The receiving context (None without `ae.tls`); each TLS destination's context is
        built once here too, so that a bad file stops the start instead of every send."""
        try:
            for destination in self.config.destinations:
                if destination.tls is not None:
                    client_tls_context(destination)
            tls = self.config.ae.tls
            return None if tls is None else server_tls_context(tls)
        except TLSSetupError as error:
            raise ServiceError(str(error)) from None

    def describe(self) -> str:
        """The start line: AE title, address, and what processes the studies."""
        if self.processor is None:
            processing = "no processing (studies are marked ready only)"
        else:
            processing = (
                f"model {self.processor.model_id or 'unknown'}"
                f" on {self.processor.device or 'unknown device'}"
            )
        dashboard = f"; dashboard {self.dashboard.url}" if self.dashboard is not None else ""
        transport = " (DICOM TLS only)" if self.config.ae.tls is not None else ""
        return (
            f"radgate serving AE {self.config.ae.title} on {self.config.ae.host}:{self.port}"
            f"{transport}; {processing}{dashboard}"
        )

    def _recover(self, sessions: sessionmaker[Session]) -> None:
        # This process is the only receiver and processor on its database (the
        # SQLite default): whatever is open or claimed was left by a run that died.
        with sessions() as session:
            aborted = abort_open_associations(session, "gateway restarted")
        with sessions() as session:
            released = reset_processing(session, self.worker_id)
        if aborted or released:
            log.info(
                "recovered from an earlier run: %d open association(s) closed as aborted,"
                " %d claimed stud%s made ready again",
                len(aborted),
                len(released),
                "y" if len(released) == 1 else "ies",
            )

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> bool:
        """Stop accepting, let open associations and processing finish within
        `timeout_s`, then shut down; False if something had to be cut short."""
        if self._stopped:
            return True
        self._stopped = True
        deadline = time.monotonic() + timeout_s
        clean = True
        if self.dashboard is not None:
            self.dashboard.stop()
        if self._server is not None:
            # Closes the listening socket; open associations carry on.
            self._server.shutdown()
            clean &= self._wait_for_associations(deadline)
        if self.scheduler is not None:
            clean &= self.scheduler.shutdown(max(0.0, deadline - time.monotonic()))
        if self.processor is not None and self.processor.close is not None:
            self.processor.close()
        if self._ae is not None:
            self._ae.shutdown()
        if self.engine is not None:
            self.engine.dispose()
        log.info("radgate stopped%s", "" if clean else " (work was cut short)")
        return clean

    def _wait_for_associations(self, deadline: float) -> bool:
        """Wait for established associations to end; abort those left at `deadline`.

        Connections that never associated (a TCP port check, a peer still
        negotiating) carry no work: they are dropped at once rather than waited for,
        since pynetdicom would hold them open until the ACSE timeout.
        """
        assert self._server is not None
        while True:
            connections = self._server.active_associations
            working = [association for association in connections if association.is_established]
            if not working:
                for association in connections:
                    association.kill()
                return True
            if time.monotonic() >= deadline:
                log.warning("aborting %d association(s) still open at shutdown", len(working))
                for association in connections:
                    association.abort()
                return False
            time.sleep(0.05)

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def command(args: argparse.Namespace) -> int:
    """`radgate serve --config FILE`: run until SIGTERM or SIGINT, then stop cleanly."""
    config = load_config(args.config)
    # `receive_only` (no model loaded, studies wait in ready) where the caller offers it.
    receive_only = bool(getattr(args, "receive_only", False))
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        # pynetdicom logs every association and request at INFO; the receiver logs
        # its own summary per association, without patient data.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        stop_requested.set()

    previous = {
        signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        service = Service(config, processor_factory=None if receive_only else pipeline_processor)
        try:
            service.start()
        except OSError as error:
            service.stop(timeout_s=0)
            raise ServiceError(
                f"cannot listen on {config.ae.host}:{config.ae.port}: {error}"
            ) from error
        except BaseException:
            service.stop(timeout_s=0)
            raise
        while not stop_requested.wait(1.0):
            pass
        service.stop()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
