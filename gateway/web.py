"""The audit dashboard: server-rendered pages, `/metrics`, `/healthz` and `/readyz`.

`radgate serve` runs it in a thread beside the DICOM service when the configuration
has a `web` section; `radgate web --config FILE` runs it alone on the same database
and spool. Pages are Jinja2 templates (no JavaScript); every page but `/healthz`,
`/readyz`, `/metrics` and the login form needs the token, given as
``Authorization: Bearer TOKEN`` or through the login form, which sets a cookie holding
an HMAC of the token (never the token itself). Without a configured token the
dashboard is open, which is refused on any host but loopback.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as day_time
from pathlib import Path
from types import FrameType
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import Engine, and_, exists, func, select
from sqlalchemy.orm import Session, selectinload
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from db.models import (
    AuditEvent,
    ForwardJob,
    ForwardJobState,
    GateDecision,
    Instance,
    Output,
    OutputKind,
    Prediction,
    Study,
    StudyState,
)
from db.session import make_engine, migrate, session_factory
from gateway import health
from gateway.audit import study_export
from gateway.config import WEB_TOKEN_VARIABLE, Config, WebConfig, load_config
from gateway.metrics import GatewayMetrics
from inference.errors import RadgateError

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).with_name("templates")
COOKIE_NAME = "radgate_session"
# The cookie holds HMAC(token, this text): it proves the token without revealing it.
COOKIE_PURPOSE = b"radgate dashboard session"
COOKIE_MAX_AGE_S = 12 * 3600
# A plot in the model directory is served only when its name is this simple.
PLOT_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
STOP_TIMEOUT_S = 10.0
START_TIMEOUT_S = 10.0
# Destination-state filter: which job states each choice means.
DESTINATION_STATES = {
    "pending": (ForwardJobState.PENDING, ForwardJobState.IN_PROGRESS),
    "delivered": (ForwardJobState.DELIVERED,),
    "dead": (ForwardJobState.DEAD,),
}


class WebError(RadgateError):
    """The dashboard cannot start with this configuration."""


class GatewayState(Protocol):
    """What `/readyz` asks of the gateway it runs in (`gateway.service.Service`)."""

    @property
    def model_loaded(self) -> bool: ...

    @property
    def scheduler_running(self) -> bool: ...


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def web_token(config: Config, environ: Mapping[str, str] | None = None) -> str | None:
    """The dashboard token: the environment's `RADGATE_WEB_TOKEN`, else `web.token`.

    Raises WebError when there is none and the dashboard would listen beyond loopback.
    """
    web = config.web or WebConfig()
    environment = os.environ if environ is None else environ
    from_environment = environment.get(WEB_TOKEN_VARIABLE, "").strip()
    if from_environment:
        if len(from_environment) < 16:
            raise WebError(
                f"{WEB_TOKEN_VARIABLE} holds {len(from_environment)} characters; expected at"
                " least 16 (e.g. the output of `openssl rand -hex 16`)"
            )
        return from_environment
    if web.token:
        return web.token
    if not is_loopback(web.host):
        raise WebError(
            f"web.host is {web.host} but no token is configured: the dashboard would be open"
            f" to the network. Set web.token or {WEB_TOKEN_VARIABLE}, or listen on 127.0.0.1"
            " (see docs/CONFIG.md)"
        )
    return None


def _cookie_value(token: str) -> str:
    return hmac.new(token.encode(), COOKIE_PURPOSE, hashlib.sha256).hexdigest()


# --- the studies list ------------------------------------------------------------------


@dataclass(frozen=True)
class StudyFilters:
    """The studies list's filters, as given in the query string (all optional)."""

    received_from: date | None = None
    received_to: date | None = None
    label: str | None = None
    gate: str | None = None  # passed, rejected, pending
    mismatch: bool = False
    low_confidence: bool = False
    destination: str | None = None  # pending, delivered, dead
    page: int = 1

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> StudyFilters:
        """Read the query string; raises ValueError naming a parameter that makes no sense."""

        def day(name: str) -> date | None:
            value = query.get(name, "").strip()
            if not value:
                return None
            try:
                return date.fromisoformat(value)
            except ValueError:
                raise ValueError(f"{name}={value!r}: expected a date as YYYY-MM-DD") from None

        def choice(name: str, allowed: tuple[str, ...]) -> str | None:
            value = query.get(name, "").strip().lower()
            if not value:
                return None
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: expected one of {', '.join(allowed)}")
            return value

        page_text = query.get("page", "1").strip() or "1"
        if not page_text.isdigit() or int(page_text) < 1:
            raise ValueError(f"page={page_text!r}: expected a page number from 1")
        label = query.get("label", "").strip().lower() or None
        return cls(
            received_from=day("from"),
            received_to=day("to"),
            label=label,
            gate=choice("gate", ("passed", "rejected", "pending")),
            mismatch=query.get("mismatch", "") in ("1", "on", "true", "yes"),
            low_confidence=query.get("low_confidence", "") in ("1", "on", "true", "yes"),
            destination=choice("destination", tuple(DESTINATION_STATES)),
            page=int(page_text),
        )

    def query_string(self, **changes: Any) -> str:
        values: dict[str, Any] = {
            "from": self.received_from.isoformat() if self.received_from else "",
            "to": self.received_to.isoformat() if self.received_to else "",
            "label": self.label or "",
            "gate": self.gate or "",
            "mismatch": "1" if self.mismatch else "",
            "low_confidence": "1" if self.low_confidence else "",
            "destination": self.destination or "",
            "page": str(self.page),
        }
        values.update({key: str(value) for key, value in changes.items()})
        return urlencode({key: value for key, value in values.items() if value})


def _start_of(day: date) -> datetime:
    return datetime.combine(day, day_time.min, tzinfo=UTC)


def _with_prediction(*conditions: Any) -> Any:
    return exists(
        select(Prediction.instance_id)
        .join(Instance, Instance.id == Prediction.instance_id)
        .where(Instance.study_id == Study.id, *conditions)
        .correlate(Study)
    )


def _with_gate(passed: bool) -> Any:
    return exists(
        select(GateDecision.instance_id)
        .join(Instance, Instance.id == GateDecision.instance_id)
        .where(Instance.study_id == Study.id, GateDecision.passed.is_(passed))
        .correlate(Study)
    )


def _any_gate() -> Any:
    return exists(
        select(GateDecision.instance_id)
        .join(Instance, Instance.id == GateDecision.instance_id)
        .where(Instance.study_id == Study.id)
        .correlate(Study)
    )


def _with_job(states: tuple[ForwardJobState, ...]) -> Any:
    return exists(
        select(ForwardJob.id)
        .where(ForwardJob.study_id == Study.id, ForwardJob.state.in_(states))
        .correlate(Study)
    )


def study_conditions(filters: StudyFilters, low_confidence_below: float) -> list[Any]:
    """SQL conditions on `Study` for the filters (combined with AND)."""
    conditions: list[Any] = []
    if filters.received_from is not None:
        conditions.append(Study.last_received_at >= _start_of(filters.received_from))
    if filters.received_to is not None:
        conditions.append(
            Study.first_received_at < _start_of(filters.received_to + timedelta(days=1))
        )
    if filters.label is not None:
        conditions.append(_with_prediction(Prediction.label == filters.label))
    if filters.gate == "rejected":
        conditions.append(_with_gate(False))
    elif filters.gate == "passed":
        conditions.append(and_(_with_gate(True), ~_with_gate(False)))
    elif filters.gate == "pending":
        conditions.append(~_any_gate())
    if filters.mismatch:
        conditions.append(_with_prediction(Prediction.body_part_mismatch.is_(True)))
    if filters.low_confidence:
        conditions.append(_with_prediction(Prediction.top_probability < low_confidence_below))
    if filters.destination is not None:
        conditions.append(_with_job(DESTINATION_STATES[filters.destination]))
    return conditions


def study_counts(
    session: Session, conditions: list[Any], low_confidence_below: float
) -> dict[str, int]:
    """How many of the matching studies fall in each category shown above the list."""
    categories = {
        "studies": None,
        "processed": Study.state == StudyState.PROCESSED,
        "waiting": Study.state.in_([StudyState.RECEIVING, StudyState.READY, StudyState.PROCESSING]),
        "failed": Study.state == StudyState.FAILED,
        "rejected": _with_gate(False),
        "mismatch": _with_prediction(Prediction.body_part_mismatch.is_(True)),
        "low_confidence": _with_prediction(Prediction.top_probability < low_confidence_below),
        "forward_pending": _with_job(DESTINATION_STATES["pending"]),
        "forward_delivered": _with_job(DESTINATION_STATES["delivered"]),
        "forward_dead": _with_job(DESTINATION_STATES["dead"]),
    }
    counts: dict[str, int] = {}
    for name, category in categories.items():
        where = [*conditions, category] if category is not None else conditions
        counts[name] = int(session.scalar(select(func.count(Study.id)).where(*where)) or 0)
    return counts


# --- live figures ----------------------------------------------------------------------


def live_figures(session: Session, since: datetime | None) -> dict[str, Any]:
    """Predictions per label, top-class probabilities and rejection reasons since `since`."""
    predictions = select(Prediction.label, Prediction.top_probability)
    decisions = select(GateDecision.reasons).where(GateDecision.passed.is_(False))
    if since is not None:
        predictions = predictions.where(Prediction.created_at >= since)
        decisions = decisions.where(GateDecision.decided_at >= since)
    labels: dict[str, int] = {}
    probabilities: list[float] = []
    for label, probability in session.execute(predictions):
        labels[label] = labels.get(label, 0) + 1
        probabilities.append(float(probability))
    reasons: dict[str, int] = {}
    for (reason_list,) in session.execute(decisions):
        for reason in reason_list or ["(no reason recorded)"]:
            reasons[reason] = reasons.get(reason, 0) + 1
    return {"labels": labels, "probabilities": probabilities, "reasons": reasons}


def figure_png(figures: dict[str, Any], which: str) -> bytes:
    """One live figure as a PNG (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.0, 3.2), dpi=100, layout="constrained")
    axes = figure.subplots()
    if which == "labels":
        labels = sorted(figures["labels"])
        axes.bar(labels, [figures["labels"][label] for label in labels], color="#4472c4")
        axes.set_title("Predictions per label")
        axes.set_ylabel("instances")
    elif which == "probability":
        axes.hist(figures["probabilities"], bins=[0.5 + i * 0.025 for i in range(21)])
        axes.set_title("Top-class probability")
        axes.set_xlabel("probability")
        axes.set_ylabel("instances")
    elif which == "reasons":
        reasons = sorted(figures["reasons"], key=lambda r: (-figures["reasons"][r], r))
        axes.barh(reasons, [figures["reasons"][r] for r in reasons], color="#c0504d")
        axes.invert_yaxis()
        axes.set_title("Gate rejections by reason")
        axes.set_xlabel("instances")
    else:
        raise KeyError(which)
    if not any(figures[key] for key in ("labels", "probabilities", "reasons")):
        axes.text(0.5, 0.5, "nothing yet", ha="center", va="center", transform=axes.transAxes)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def original_png(path: Path) -> bytes:
    """A stored DICOM image as an 8-bit greyscale PNG (display pipeline of `inference`)."""
    import numpy as np
    from PIL import Image

    from inference.dicom_pixels import read_dicom_file

    pixels = read_dicom_file(path)
    if pixels.ndim == 3:
        pixels = pixels[..., 0]
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    buffer = io.BytesIO()
    Image.fromarray((scaled * 255).astype("uint8")).save(buffer, format="PNG")
    return buffer.getvalue()


# --- the application -------------------------------------------------------------------


class Dashboard:
    """The Starlette application over one configuration, database and metrics registry."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        *,
        metrics: GatewayMetrics,
        token: str | None,
        gateway: GatewayState | None = None,
    ) -> None:
        self.config = config
        self.web = config.web or WebConfig()
        self.reader = session_factory(engine, read_only=True)
        self.writer = session_factory(engine)
        self.metrics = metrics
        self.token = token
        self.gateway = gateway
        self.templates = Jinja2Templates(directory=str(TEMPLATES))
        self.templates.env.filters["when"] = _when
        self.templates.env.filters["percent"] = lambda value: f"{value * 100:.1f} %"
        self.templates.env.filters["quote"] = lambda value: quote(str(value), safe="")
        self.app = Starlette(
            routes=[
                Route("/healthz", self.healthz),
                Route("/readyz", self.readyz),
                Route("/metrics", self.metrics_page),
                Route("/login", self.login_form, methods=["GET"]),
                Route("/login", self.login, methods=["POST"]),
                Route("/logout", self.logout, methods=["POST"]),
                Route("/", self.home),
                Route("/studies", self.studies),
                Route("/studies/{study_uid}", self.study),
                Route("/studies/{study_uid}/export.json", self.export),
                Route("/studies/{study_uid}/retry", self.retry, methods=["POST"]),
                Route("/outputs/{output_id:int}.png", self.output_png),
                Route("/instances/{instance_id:int}/original.png", self.instance_png),
                Route("/model", self.model),
                Route("/model/plots/{name}.png", self.model_plot),
                Route("/model/live/{which}.png", self.live_plot),
            ]
        )

    # --- authentication ------------------------------------------------------------------

    def _authorised(self, request: Request) -> bool | None:
        """True: the token was given; None: nothing was given; False: a wrong one."""
        if self.token is None:
            return True
        header = request.headers.get("authorization", "")
        if header:
            scheme, _, given = header.partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(
                given.strip().encode(), self.token.encode()
            )
        cookie = request.cookies.get(COOKIE_NAME)
        if cookie:
            return hmac.compare_digest(cookie.encode(), _cookie_value(self.token).encode())
        return None

    def _refuse(self, request: Request, page: bool) -> Response | None:
        """None when authorised; else a redirect to the login form (pages) or 401."""
        verdict = self._authorised(request)
        if verdict:
            return None
        if verdict is None and page and request.method == "GET":
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?{urlencode({'next': target})}", status_code=303)
        return PlainTextResponse(
            "401 unauthorised: give the dashboard token (Authorization: Bearer TOKEN or the"
            " login form)\n",
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="radgate"'},
        )

    async def login_form(self, request: Request) -> Response:
        return self._render(
            request, "login.html", {"next": _safe_next(request.query_params.get("next"))}
        )

    async def login(self, request: Request) -> Response:
        form = await request.form()
        given = str(form.get("token", "")).strip()
        target = _safe_next(str(form.get("next", "")))
        if self.token is None:
            return RedirectResponse(target, status_code=303)
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return self._render(
                request,
                "login.html",
                {"next": target, "error": "That token is not the dashboard's token."},
                status_code=401,
            )
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE_NAME,
            _cookie_value(self.token),
            max_age=COOKIE_MAX_AGE_S,
            httponly=True,
            samesite="strict",
        )
        return response

    async def logout(self, request: Request) -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE_NAME)
        return response

    # --- health and metrics ----------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok\n")

    def readiness(self) -> list[health.Check]:
        storage = self.config.storage
        gateway = self.gateway

        def of_gateway(
            name: str, ok: Callable[[GatewayState], bool], good: str, bad: str
        ) -> health.Check:
            # `radgate web` alone runs neither the model nor the scheduler.
            if gateway is None:
                return health.Check(name, True, "not run by this process (radgate web)")
            return health.check_flag(name, lambda: ok(gateway), good, bad)

        return [
            of_gateway(
                "model",
                lambda running: running.model_loaded,
                "loaded",
                f"not loaded (model.dir {self.config.model.dir}; receive-only or failed)",
            ),
            health.check_database(self.reader),
            health.check_spool(Path(storage.spool_dir), storage.min_free_mb),
            of_gateway(
                "scheduler",
                lambda running: running.scheduler_running,
                "running",
                "not running (the completion sweep or the processing worker stopped)",
            ),
        ]

    async def readyz(self, request: Request) -> Response:
        ready, text = health.summary(self.readiness())
        return PlainTextResponse(text, status_code=200 if ready else 503)

    async def metrics_page(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- pages -----------------------------------------------------------------------------

    def _render(
        self, request: Request, name: str, context: dict[str, Any], status_code: int = 200
    ) -> Response:
        context = {"auth": self.token is not None, **context}
        return self.templates.TemplateResponse(request, name, context, status_code=status_code)

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/studies", status_code=303)

    async def studies(self, request: Request) -> Response:
        if (refused := self._refuse(request, page=True)) is not None:
            return refused
        try:
            filters = StudyFilters.parse(request.query_params)
        except ValueError as error:
            return PlainTextResponse(f"400 bad request: {error}\n", status_code=400)
        low = self.web.low_confidence_below
        size = self.web.page_size
        conditions = study_conditions(filters, low)
        with self.reader() as session:
            counts = study_counts(session, conditions, low)
            studies = list(
                session.scalars(
                    select(Study)
                    .options(
                        selectinload(Study.instances).selectinload(Instance.gate_decision),
                        selectinload(Study.instances).selectinload(Instance.prediction),
                        selectinload(Study.forward_jobs),
                    )
                    .where(*conditions)
                    .order_by(Study.last_received_at.desc(), Study.id.desc())
                    .offset((filters.page - 1) * size)
                    .limit(size)
                )
            )
            rows = [self._study_row(session, study, low) for study in studies]
            labels = sorted(session.scalars(select(Prediction.label).distinct()))
        pages = max(1, (counts["studies"] + size - 1) // size)
        return self._render(
            request,
            "studies.html",
            {
                "rows": rows,
                "counts": counts,
                "filters": filters,
                "labels": labels,
                "low_confidence_below": low,
                "pages": pages,
                "previous": filters.query_string(page=filters.page - 1)
                if filters.page > 1
                else None,
                "next": filters.query_string(page=filters.page + 1)
                if filters.page < pages
                else None,
            },
        )

    def _study_row(self, session: Session, study: Study, low: float) -> dict[str, Any]:
        instances = list(study.instances)
        predictions = [i.prediction for i in instances if i.prediction is not None]
        decisions = [i.gate_decision for i in instances if i.gate_decision is not None]
        return {
            "study": study,
            "images": len(instances),
            "predictions": predictions,
            "rejected": [reason for d in decisions if not d.passed for reason in d.reasons],
            "gate": None
            if not decisions
            else ("rejected" if any(not d.passed for d in decisions) else "passed"),
            "mismatch": any(p.body_part_mismatch for p in predictions),
            "low_confidence": any(p.top_probability < low for p in predictions),
            "forwards": sorted(study.forward_jobs, key=lambda job: job.destination),
        }

    async def study(self, request: Request) -> Response:
        if (refused := self._refuse(request, page=True)) is not None:
            return refused
        study_uid = request.path_params["study_uid"]
        with self.reader() as session:
            study = session.scalar(select(Study).where(Study.study_uid == study_uid))
            if study is None:
                return PlainTextResponse(f"404: no study {study_uid}\n", status_code=404)
            outputs = list(session.scalars(select(Output).where(Output.study_id == study.id)))
            instances = []
            for instance in study.instances:
                mine = [o for o in outputs if o.instance_id == instance.id]
                gradcam = next((o for o in mine if o.kind is OutputKind.GRADCAM_SC), None)
                instances.append(
                    {
                        "row": instance,
                        "gate": instance.gate_decision,
                        "prediction": instance.prediction,
                        "gradcam": gradcam,
                        "original_url": f"/instances/{instance.id}/original.png",
                    }
                )
            report = next((o for o in outputs if o.kind is OutputKind.REPORT_SR), None)
            record = study_export(self.config, session, study_uid)
            jobs = sorted(study.forward_jobs, key=lambda job: job.destination)
            events = list(
                session.scalars(
                    select(AuditEvent)
                    .where(AuditEvent.study_uid == study_uid)
                    .order_by(AuditEvent.at, AuditEvent.id)
                )
            )
            return self._render(
                request,
                "study.html",
                {
                    "study": study,
                    "instances": instances,
                    "report": report,
                    "report_items": _report_items(record),
                    "jobs": jobs,
                    "events": events,
                    "message": request.query_params.get("message"),
                },
            )

    async def export(self, request: Request) -> Response:
        if (refused := self._refuse(request, page=False)) is not None:
            return refused
        study_uid = request.path_params["study_uid"]
        with self.reader() as session:
            record = study_export(self.config, session, study_uid)
        if record is None:
            return JSONResponse({"error": f"no study {study_uid}"}, status_code=404)
        return Response(
            json.dumps(record, indent=2),
            media_type="application/json",
            headers={
                "Content-Disposition": f'attachment; filename="radgate-study-{study_uid}.json"'
            },
        )

    async def retry(self, request: Request) -> Response:
        if (refused := self._refuse(request, page=False)) is not None:
            return refused
        from gateway.forward import requeue_dead

        study_uid = request.path_params["study_uid"]
        form = await request.form()
        destination = str(form.get("destination", "")).strip() or None
        with self.reader() as session:
            known = session.scalar(select(Study.id).where(Study.study_uid == study_uid))
        if known is None:
            return PlainTextResponse(f"404: no study {study_uid}\n", status_code=404)
        with self.writer() as session:
            requeued = requeue_dead(
                session, study_uid=study_uid, destination=destination, reason="dashboard retry"
            )
        if requeued:
            names = ", ".join(job.destination for job in requeued)
            message = f"requeued the dead forward job to {names}"
        else:
            message = "no dead forward job to requeue" + (
                f" for {destination}" if destination else ""
            )
        log.info("dashboard: study %s: %s", study_uid, message)
        return RedirectResponse(
            f"/studies/{quote(study_uid, safe='')}?{urlencode({'message': message})}",
            status_code=303,
        )

    async def output_png(self, request: Request) -> Response:
        if (refused := self._refuse(request, page=False)) is not None:
            return refused
        with self.reader() as session:
            output = session.get(Output, request.path_params["output_id"])
            png = output.png_path if output is not None else None
        if png is None:
            return PlainTextResponse("404: no such image\n", status_code=404)
        path = Path(self.config.storage.spool_dir) / png
        if not path.is_file():
            return PlainTextResponse(f"404: {png} is missing from the spool\n", status_code=404)
        return FileResponse(path, media_type="image/png")

    async def instance_png(self, request: Request) -> Response:
        if (refused := self._refuse(request, page=False)) is not None:
            return refused
        with self.reader() as session:
            instance = session.get(Instance, request.path_params["instance_id"])
            if instance is None:
                return PlainTextResponse("404: no such instance\n", status_code=404)
            rendered = session.scalar(
                select(Output.png_path).where(
                    Output.instance_id == instance.id,
                    Output.kind == OutputKind.TAGGED_ORIGINAL,
                    Output.png_path.is_not(None),
                )
            )
            spool_path = instance.spool_path
        spool = Path(self.config.storage.spool_dir)
        if rendered is not None and (spool / rendered).is_file():
            # The picture the model saw, written by the pipeline.
            return FileResponse(spool / rendered, media_type="image/png")
        try:
            data = original_png(spool / spool_path)
        except Exception as error:  # the pixel decoders raise many kinds
            return PlainTextResponse(
                f"422: the stored image cannot be rendered: {error}\n", status_code=422
            )
        return Response(data, media_type="image/png")

    async def model(self, request: Request) -> Response:
        if (refused := self._refuse(request, page=True)) is not None:
            return refused
        model_dir = Path(self.config.model.dir)
        card, card_error = _read_json(model_dir / "model.json")
        evaluation, _ = _read_json(model_dir / "evaluation.json")
        plots = sorted(
            path.stem for path in model_dir.glob("*.png") if set(path.stem) <= PLOT_NAME_CHARACTERS
        )
        window = request.query_params.get("window", "start")
        since = None if window == "all" else self.metrics.started_at
        with self.reader() as session:
            figures = live_figures(session, since)
        return self._render(
            request,
            "model.html",
            {
                "model_dir": model_dir,
                "card": card,
                "card_error": card_error,
                "card_text": json.dumps(card, indent=2) if card else None,
                "metrics": _flatten(evaluation) if evaluation else [],
                "plots": plots,
                "window": "all" if since is None else "start",
                "since": since,
                "figures": figures,
                "predictions": sum(figures["labels"].values()),
            },
        )

    async def model_plot(self, request: Request) -> Response:
        if (refused := self._refuse(request, page=False)) is not None:
            return refused
        name = request.path_params["name"]
        path = Path(self.config.model.dir) / f"{name}.png"
        if not set(name) <= PLOT_NAME_CHARACTERS or not path.is_file():
            return PlainTextResponse(f"404: no plot {name}.png\n", status_code=404)
        return FileResponse(path, media_type="image/png")

    async def live_plot(self, request: Request) -> Response:
        if (refused := self._refuse(request, page=False)) is not None:
            return refused
        which = request.path_params["which"]
        if which not in ("labels", "probability", "reasons"):
            return PlainTextResponse(f"404: no live figure {which}\n", status_code=404)
        since = None if request.query_params.get("window") == "all" else self.metrics.started_at
        with self.reader() as session:
            figures = live_figures(session, since)
        return Response(figure_png(figures, which), media_type="image/png")


def _safe_next(target: str | None) -> str:
    """Only a local path: the login form must not send the browser elsewhere."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/studies"
    return target


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "-"


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"{path} not found"
    except (OSError, ValueError) as error:
        return None, f"{path}: {error}"
    return (data, None) if isinstance(data, dict) else (None, f"{path}: not a JSON object")


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested evaluation results as (dotted key, scalar) rows; lists of numbers kept whole."""
    rows: list[tuple[str, Any]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            rows += _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(data, float):
        rows.append((prefix, round(data, 4)))
    elif isinstance(data, list) and (
        len(data) > 8 or any(isinstance(item, dict | list) for item in data)
    ):
        # Per-image results and long curves belong to the plots and evaluation.json.
        rows.append((prefix, f"[{len(data)} values]"))
    else:
        rows.append((prefix, data))
    return rows


def _report_items(record: dict[str, Any] | None) -> list[dict[str, Any]]:
    """What the result report says, one entry per reported instance."""
    if record is None:
        return []
    items = []
    for instance in record["instances"]:
        gate = instance["gate"]
        prediction = instance["prediction"]
        if gate is None:
            continue
        items.append(
            {
                "sop_instance_uid": instance["sop_instance_uid"],
                "result": f"{prediction['label']} ({prediction['probability']:.3f})"
                if prediction
                else "not classified: " + "; ".join(gate["reasons"]),
            }
        )
    return items


# --- running it ------------------------------------------------------------------------


class DashboardServer:
    """uvicorn serving a `Dashboard` in a background thread."""

    def __init__(self, dashboard: Dashboard, port: int | None = None) -> None:
        web = dashboard.web
        self.dashboard = dashboard
        self.host = web.host
        self._server = uvicorn.Server(
            uvicorn.Config(
                dashboard.app,
                host=web.host,
                port=web.port if port is None else port,
                log_level="warning",
                access_log=False,
                lifespan="off",
            )
        )
        self._thread = threading.Thread(
            target=self._server.run, name="radgate-dashboard", daemon=True
        )

    @property
    def port(self) -> int:
        for server in self._server.servers:
            for listener in server.sockets:
                return int(listener.getsockname()[1])
        raise RuntimeError("the dashboard is not listening")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> DashboardServer:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive():
                raise WebError(
                    f"the dashboard could not listen on {self.host}:{self._server.config.port}"
                    " (in use, or not an address of this machine); see the log above"
                )
            if time.monotonic() > deadline:
                raise WebError(f"the dashboard did not start within {START_TIMEOUT_S:g} s")
            time.sleep(0.02)
        log.info("dashboard on %s", self.url)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT_S)


def command(args: argparse.Namespace) -> int:
    """`radgate web --config FILE`: the dashboard alone, until SIGTERM or SIGINT."""
    config = load_config(args.config)
    if config.web is None:
        raise WebError(
            f"{args.config}: no `web` section; add one to run the dashboard (see docs/CONFIG.md)"
        )
    token = web_token(config)
    engine = make_engine(config.storage.database_url, config.storage.busy_timeout_ms)
    migrate(engine)
    metrics = GatewayMetrics()
    metrics.watch_queues(session_factory(engine, read_only=True))
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous = {
        signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    server = DashboardServer(Dashboard(config, engine, metrics=metrics, token=token))
    try:
        server.start()
        print(f"radgate dashboard on {server.url}", flush=True)
        while not stop_requested.wait(1.0):
            pass
    finally:
        server.stop()
        engine.dispose()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
