"""Routing: which destinations a processed study goes to, and its forward jobs.

Routes are evaluated against `StudyFacts`, what the database (and, for `tags`, the
received files' headers) says about a study's processed instances.

Semantics, for a study that may hold several instances:

* A route's conditions hold for the study when ONE instance satisfies all of them at
  once: ``{label: chest, min_probability: 0.9}`` needs an instance predicted chest with
  probability at least 0.9, not a chest image next to some other confident image.
  ``when: {}`` matches every study that has a processed instance.
* `label`, `min_probability`, `max_probability` and `body_part_mismatch` (true or
  false) only hold for instances the model classified; bounds are inclusive
  (``min_probability <= p <= max_probability``), as docs/CONFIG.md says.
* `gate: passed` / `gate: rejected` match an instance the gate passed / rejected.
* `modality` and `calling_aet` match when the instance's value is in the list
  (compared upper-case and without padding spaces).
* `tags` compare the received file's header with `tag_value_matches`: exact text, or
  `/regex/` searched in it; multi-valued elements are joined with a backslash; an
  absent element, a sequence or binary value, or an unreadable file never matches.
* Every matching route applies. A destination named by several routes is planned once,
  remembering which routes asked for it and the union of their `send` lists. An
  `otherwise` route applies only when no other route matched.
* Instances still waiting to be processed (state `received`) are not evaluated: the
  study is routed again once they are.

`create_forward_jobs` (the pipeline's `on_processed` hook) persists one `ForwardJob`
per (study, destination) before anything is sent; `route_unrouted` re-runs it for
processed studies whose routing a crash interrupted. `radgate route` is the dry run.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from sqlalchemy import and_, exists, select
from sqlalchemy.exc import IntegrityError, InvalidRequestError
from sqlalchemy.orm import Session, SessionTransaction, selectinload, sessionmaker

from db.models import (
    AuditEvent,
    ForwardJob,
    ForwardJobState,
    Instance,
    InstanceState,
    Study,
    StudyState,
    utcnow,
)
from db.session import make_engine, migrate, session_factory
from gateway.config import SEND_KINDS, Config, Route, RouteWhen, load_config, tag_value_matches
from inference.errors import RadgateError

log = logging.getLogger(__name__)

# Audit event kind written each time a processed study is routed (also when no route
# matched): `route_unrouted` looks for it to find studies a crash left unrouted.
ROUTING_EVENT = "routing"
# Jobs in these states are finished; a study processed again after they finished
# gets them back as pending so its new instances go too.
FINISHED_STATES = (ForwardJobState.DELIVERED, ForwardJobState.DEAD)


# --- facts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceFacts:
    """What routes can test about one processed instance."""

    sop_instance_uid: str
    modality: str | None = None
    calling_aet: str | None = None
    gate_passed: bool = True
    label: str | None = None  # None: not classified
    probability: float | None = None  # of `label`
    body_part_mismatch: bool = False
    # Header values by keyword, only for the keywords some route's `tags` uses;
    # None when the element is absent (or has no text value).
    tags: Mapping[str, str | None] = field(default_factory=dict)
    # Why the header could not be read (then every tag is None).
    tags_error: str | None = None

    @property
    def classified(self) -> bool:
        return self.label is not None

    def describe(self) -> str:
        parts = [self.modality or "no modality", f"from {self.calling_aet or '?'}"]
        parts.append("gate passed" if self.gate_passed else "gate rejected")
        if self.label is not None and self.probability is not None:
            parts.append(f"{self.label} {self.probability:.6g}")
        if self.body_part_mismatch:
            parts.append("body part mismatch")
        return ", ".join(parts)


@dataclass(frozen=True)
class StudyFacts:
    """A study as routes see it: its processed instances, in order of arrival."""

    study_uid: str
    instances: tuple[InstanceFacts, ...] = ()
    state: str | None = None
    # Instances not processed yet (not evaluated).
    unprocessed: int = 0


def route_tag_keywords(config: Config) -> list[str]:
    """Every keyword some route's `tags` condition uses, sorted."""
    return sorted({keyword for route in config.routes for keyword in (route.when.tags or {})})


def tag_text(element: DataElement | None) -> str | None:
    """An element's value as route tags compare it; None when it has no text form."""
    if element is None or element.VR == "SQ":
        return None
    value = element.value
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        return None
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join("" if item is None else str(item) for item in value)
    return str(value)


def read_tags(path: Path, keywords: Sequence[str]) -> dict[str, str | None]:
    """The header values of `keywords` in the DICOM file at `path` (pixel data not read)."""
    dataset = pydicom.dcmread(
        path,
        stop_before_pixels=True,
        specific_tags=["SpecificCharacterSet", *keywords],
    )
    return {
        keyword: tag_text(dataset.data_element(keyword)) if keyword in dataset else None
        for keyword in keywords
    }


def _instance_facts(config: Config, instance: Instance, keywords: Sequence[str]) -> InstanceFacts:
    gate = instance.gate_decision
    prediction = instance.prediction
    tags: dict[str, str | None] = {}
    tags_error = None
    if keywords:
        path = Path(config.storage.spool_dir) / instance.spool_path
        try:
            tags = read_tags(path, keywords)
        except (OSError, ValueError, EOFError, pydicom.errors.InvalidDicomError) as error:
            tags_error = f"header of {instance.spool_path} unreadable: {error}"
            tags = dict.fromkeys(keywords)
    return InstanceFacts(
        sop_instance_uid=instance.sop_instance_uid,
        modality=instance.modality,
        calling_aet=instance.calling_aet or instance.study.calling_aet,
        gate_passed=bool(gate is not None and gate.passed),
        label=prediction.label if prediction is not None else None,
        probability=prediction.top_probability if prediction is not None else None,
        body_part_mismatch=bool(prediction is not None and prediction.body_part_mismatch),
        tags=tags,
        tags_error=tags_error,
    )


def _load_study(session: Session, study_id: int) -> Study:
    study = session.scalars(
        select(Study)
        .where(Study.id == study_id)
        .options(
            selectinload(Study.instances).selectinload(Instance.gate_decision),
            selectinload(Study.instances).selectinload(Instance.prediction),
        )
    ).first()
    if study is None:
        raise LookupError(f"no study {study_id}")
    return study


def facts_of(config: Config, study: Study) -> StudyFacts:
    """`StudyFacts` of a loaded study (instances with their gate decision and prediction)."""
    keywords = route_tag_keywords(config)
    processed = [
        instance
        for instance in sorted(study.instances, key=lambda row: (row.received_at, row.id))
        if instance.state is not InstanceState.RECEIVED and instance.gate_decision is not None
    ]
    return StudyFacts(
        study_uid=study.study_uid,
        instances=tuple(_instance_facts(config, instance, keywords) for instance in processed),
        state=study.state.value,
        unprocessed=len(study.instances) - len(processed),
    )


def study_facts(session: Session, config: Config, study_id: int) -> StudyFacts:
    """Read the facts of one study (its own read transaction)."""
    with _transaction(session):
        return facts_of(config, _load_study(session, study_id))


# --- evaluation --------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteMatch:
    """One route's verdict with the reasons, one line per instance (or per rule)."""

    route: Route
    reasons: list[str]


@dataclass
class DestinationPlan:
    """What a destination gets: which routes chose it, and what they asked to send."""

    routes: list[str] = field(default_factory=list)
    send: list[str] = field(default_factory=list)


@dataclass
class RoutingDecision:
    """Routes that matched (and why), those that did not (and why not), and the plan."""

    matches: list[RouteMatch] = field(default_factory=list)
    non_matches: list[RouteMatch] = field(default_factory=list)
    destinations: dict[str, DestinationPlan] = field(default_factory=dict)

    @property
    def matched_routes(self) -> list[str]:
        return [match.route.name for match in self.matches]


def _code(value: str | None) -> str:
    return (value or "").strip().upper()


def _check_instance(when: RouteWhen, instance: InstanceFacts) -> tuple[bool, list[str]]:
    """Whether `instance` satisfies every condition of `when`; what held, or what failed."""
    held: list[str] = []
    failed: list[str] = []

    def verdict(ok: bool, text: str) -> None:
        (held if ok else failed).append(text)

    probability = instance.probability
    if when.label is not None:
        if not instance.classified:
            verdict(False, f"label {when.label}: not classified")
        else:
            verdict(
                instance.label == when.label,
                f"label {instance.label}"
                + ("" if instance.label == when.label else f", not {when.label}"),
            )
    if when.min_probability is not None:
        if probability is None:
            verdict(False, "min_probability: not classified")
        else:
            ok = probability >= when.min_probability
            sign = ">=" if ok else "<"
            verdict(ok, f"probability {probability:.6g} {sign} {when.min_probability:g}")
    if when.max_probability is not None:
        if probability is None:
            verdict(False, "max_probability: not classified")
        else:
            ok = probability <= when.max_probability
            sign = "<=" if ok else ">"
            verdict(ok, f"probability {probability:.6g} {sign} {when.max_probability:g}")
    if when.gate is not None:
        gate = "passed" if instance.gate_passed else "rejected"
        verdict(
            gate == when.gate,
            f"gate {gate}" + ("" if gate == when.gate else f", not {when.gate}"),
        )
    if when.body_part_mismatch is not None:
        if not instance.classified:
            verdict(False, "body_part_mismatch: not classified")
        else:
            ok = instance.body_part_mismatch == when.body_part_mismatch
            state = "body part mismatch" if instance.body_part_mismatch else "body part agrees"
            verdict(
                ok, state + ("" if ok else f", not body_part_mismatch {when.body_part_mismatch}")
            )
    if when.modality is not None:
        modality = _code(instance.modality)
        ok = modality in when.modality
        verdict(ok, f"modality {modality or '(none)'}" + ("" if ok else f" not in {when.modality}"))
    if when.calling_aet is not None:
        calling = (instance.calling_aet or "").strip()
        ok = calling in when.calling_aet
        verdict(
            ok, f"calling AE {calling or '(none)'}" + ("" if ok else f" not in {when.calling_aet}")
        )
    for keyword, expected in (when.tags or {}).items():
        value = instance.tags.get(keyword)
        if value is None:
            verdict(False, instance.tags_error or f"{keyword} absent")
            continue
        ok = tag_value_matches(expected, value)
        verdict(ok, f"{keyword} {value!r} {'matches' if ok else 'does not match'} {expected!r}")
    return (False, failed) if failed else (True, held)


def _evaluate_route(route: Route, facts: StudyFacts) -> tuple[bool, list[str]]:
    if not facts.instances:
        return False, ["no processed instance"]
    if not route.when.conditions():
        return True, ["when: {} matches every study"]
    matched: list[str] = []
    missed: list[str] = []
    for instance in facts.instances:
        ok, why = _check_instance(route.when, instance)
        line = f"instance {instance.sop_instance_uid}: {', '.join(why)}"
        (matched if ok else missed).append(line)
    return (True, matched) if matched else (False, missed)


def _ordered_union(
    first: Iterable[str], second: Iterable[str], order: Sequence[str] = ()
) -> list[str]:
    """Union keeping `order` first (for send kinds), then first-seen order."""
    seen = list(dict.fromkeys([*first, *second]))
    ranked = [item for item in order if item in seen]
    return ranked + [item for item in seen if item not in ranked]


def evaluate_routes(config: Config, facts: StudyFacts) -> RoutingDecision:
    """Which routes match `facts` and why, and the resulting destination plan."""
    decision = RoutingDecision()
    otherwise: list[Route] = []
    for route in config.routes:
        if route.when.otherwise:
            otherwise.append(route)
            continue
        ok, reasons = _evaluate_route(route, facts)
        (decision.matches if ok else decision.non_matches).append(RouteMatch(route, reasons))
    matched_names = decision.matched_routes
    for route in otherwise:
        if matched_names:
            decision.non_matches.append(
                RouteMatch(route, [f"otherwise: route(s) {', '.join(matched_names)} matched"])
            )
        elif not facts.instances:
            decision.non_matches.append(RouteMatch(route, ["no processed instance"]))
        else:
            decision.matches.append(RouteMatch(route, ["otherwise: no other route matched"]))
    # Keep the configuration's order in both lists (otherwise routes were set aside).
    position = {route.name: index for index, route in enumerate(config.routes)}
    decision.matches.sort(key=lambda match: position[match.route.name])
    decision.non_matches.sort(key=lambda match: position[match.route.name])
    for match in decision.matches:
        for name in match.route.forward_to:
            plan = decision.destinations.setdefault(name, DestinationPlan())
            plan.routes.append(match.route.name)
            plan.send = _ordered_union(plan.send, match.route.send, SEND_KINDS)
    return decision


# --- forward jobs ------------------------------------------------------------------------


def _transaction(session: Session) -> SessionTransaction:
    # Like db.work: one transaction per function, in a session that has none open.
    if session.in_transaction():
        raise InvalidRequestError(
            "routing functions run their own transaction: pass a session with none open"
        )
    return session.begin()


def create_forward_jobs(
    session: Session, config: Config, study_id: int, *, now: datetime | None = None
) -> list[int]:
    """Route a processed study: one `ForwardJob` per chosen destination, in one transaction.

    A new destination gets a pending job, due now. A job that already exists (the
    study was processed again after more instances arrived) takes the union of the old
    and new routes and `send` lists; if it had finished (delivered or dead) before this
    processing, it goes back to pending with its attempts cleared, and the forwarder
    sends what is not yet confirmed delivered (`forwarded_instances`), so nothing is
    sent twice. Pending and in-progress jobs are left to the forwarder, which looks
    again for new instances when it finishes an attempt.

    Nothing is created for a study that is not `processed` (a new instance sent it back
    to `receiving`: it is routed when processed again). Writes a `routing` audit event
    (also when no route matched) and returns the ids of the study's jobs for the chosen
    destinations.
    """
    facts = study_facts(session, config, study_id)
    decision = evaluate_routes(config, facts)
    try:
        return _persist_jobs(session, study_id, decision, now or utcnow())
    except IntegrityError:
        # Another process inserted the same (study, destination) job first: the second
        # try finds it and treats it as existing.
        return _persist_jobs(session, study_id, decision, now or utcnow())


def _persist_jobs(
    session: Session, study_id: int, decision: RoutingDecision, moment: datetime
) -> list[int]:
    with _transaction(session):
        study = session.get(Study, study_id, with_for_update=True)
        if study is None:
            raise LookupError(f"no study {study_id}")
        if study.state is not StudyState.PROCESSED:
            log.info(
                "study %s is %s, not processed: routed when it is processed again",
                study.study_uid,
                study.state.value,
            )
            return []
        existing = {
            job.destination: job
            for job in session.scalars(select(ForwardJob).where(ForwardJob.study_id == study_id))
        }
        processed_at = study.processed_at or moment
        jobs: list[ForwardJob] = []
        actions: list[dict[str, Any]] = []
        for name, plan in decision.destinations.items():
            job = existing.get(name)
            if job is None:
                job = ForwardJob(
                    study_id=study_id,
                    destination=name,
                    routes=list(plan.routes),
                    send=list(plan.send),
                    state=ForwardJobState.PENDING,
                    attempts=0,
                    next_attempt_at=moment,
                    permanent_failure=False,
                    created_at=moment,
                    updated_at=moment,
                )
                session.add(job)
                action = "created"
            else:
                job.routes = _ordered_union(job.routes, plan.routes)
                job.send = _ordered_union(job.send, plan.send, SEND_KINDS)
                finished_at = job.delivered_at or job.updated_at
                if job.state in FINISHED_STATES and finished_at <= processed_at:
                    action = f"requeued ({job.state.value} before the study was processed again)"
                    job.state = ForwardJobState.PENDING
                    job.attempts = 0
                    job.permanent_failure = False
                    job.next_attempt_at = moment
                    job.delivered_at = None
                else:
                    action = f"kept ({job.state.value})"
                job.updated_at = moment
            jobs.append(job)
            actions.append(
                {"destination": name, "routes": job.routes, "send": job.send, "action": action}
            )
        session.flush()
        for job, entry in zip(jobs, actions, strict=True):
            entry["job_id"] = job.id
        session.add(
            AuditEvent(
                at=moment,
                kind=ROUTING_EVENT,
                study_uid=study.study_uid,
                detail={
                    "event": "routed" if jobs else "no destination",
                    "matched_routes": decision.matched_routes,
                    "jobs": actions,
                },
            )
        )
        if not jobs:
            log.info("study %s: no route matched, not forwarded", study.study_uid)
        return [job.id for job in jobs]


def unrouted_study_ids(session: Session) -> list[int]:
    """Processed studies with no `routing` event since they were processed, oldest first.

    These are studies whose process was killed between the end of processing and
    `create_forward_jobs`.
    """
    routed = exists().where(
        and_(
            AuditEvent.kind == ROUTING_EVENT,
            AuditEvent.study_uid == Study.study_uid,
            AuditEvent.at >= Study.processed_at,
        )
    )
    with _transaction(session):
        return list(
            session.scalars(
                select(Study.id)
                .where(Study.state == StudyState.PROCESSED, ~routed)
                .order_by(Study.processed_at, Study.id)
            )
        )


def route_unrouted(
    sessions: sessionmaker[Session], config: Config, *, now: datetime | None = None
) -> list[int]:
    """Run `create_forward_jobs` for every study `unrouted_study_ids` finds (at start-up,
    or now and then); returns those study ids."""
    with sessions() as session:
        study_ids = unrouted_study_ids(session)
    for study_id in study_ids:
        with sessions() as session:
            create_forward_jobs(session, config, study_id, now=now)
    return study_ids


# --- `radgate route` ---------------------------------------------------------------------


def _destination_line(config: Config, name: str, plan: DestinationPlan) -> str:
    destination = config.destination(name)
    return (
        f"  {name} ({destination.ae_title} at {destination.host}:{destination.port}):"
        f" {', '.join(plan.send)}  [route(s) {', '.join(plan.routes)}]"
    )


def route_command(args: argparse.Namespace) -> int:
    """`radgate route --config FILE STUDY_UID`: which routes match a stored study and why,
    and what would be sent where; sends nothing, writes nothing."""
    from gateway.forward import items_to_send

    config = load_config(args.config)
    engine = make_engine(config.storage.database_url, config.storage.busy_timeout_ms)
    try:
        migrate(engine)
        sessions = session_factory(engine, read_only=True)
        with sessions() as session, session.begin():
            study = session.scalars(
                select(Study)
                .where(Study.study_uid == args.study_uid)
                .options(
                    selectinload(Study.instances).selectinload(Instance.gate_decision),
                    selectinload(Study.instances).selectinload(Instance.prediction),
                    selectinload(Study.forward_jobs),
                )
            ).first()
            if study is None:
                raise RadgateError(f"study {args.study_uid}: not found")
            facts = facts_of(config, study)
            decision = evaluate_routes(config, facts)
            print(
                f"study {facts.study_uid}: {facts.state}, {len(facts.instances)} processed instance(s)"
            )
            if study.state is not StudyState.PROCESSED:
                print(
                    f"  note: the study is {study.state.value}; routes are evaluated on what is"
                    " processed so far"
                )
            if facts.unprocessed:
                print(f"  note: {facts.unprocessed} instance(s) not processed yet, not evaluated")
            for instance in facts.instances:
                print(f"  instance {instance.sop_instance_uid}: {instance.describe()}")
            print()
            for route in config.routes:
                match = next((m for m in decision.matches if m.route is route), None)
                verdict = "MATCHES" if match is not None else "no match"
                entry = match or next(m for m in decision.non_matches if m.route is route)
                print(f"route {route.name}: {verdict}")
                for reason in entry.reasons:
                    print(f"    {reason}")
            print()
            if not decision.destinations:
                print("would send: nothing (no route matched)")
            else:
                print("would send:")
                jobs = {job.destination: job for job in study.forward_jobs}
                for name, plan in decision.destinations.items():
                    print(_destination_line(config, name, plan))
                    items = items_to_send(session, config, study.id, plan.send)
                    counts = {
                        kind: sum(1 for item in items if item.kind == kind) for kind in plan.send
                    }
                    print(
                        "      "
                        + ", ".join(
                            f"{kind}: {count} instance(s)" for kind, count in counts.items()
                        )
                    )
                    job = jobs.get(name)
                    if job is not None:
                        print(
                            f"      existing job: {job.state.value}, {job.attempts} attempt(s),"
                            f" {len(job.forwarded)} instance(s) confirmed delivered"
                        )
            others = [
                job for job in study.forward_jobs if job.destination not in decision.destinations
            ]
            for job in others:
                print(
                    f"  existing job to {job.destination} (no route chooses it now): {job.state.value}"
                )
    finally:
        engine.dispose()
    return 0
