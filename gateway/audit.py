"""`radgate studies` and `radgate show`: what radgate received, what the model said, where
each study went. Read-only; the JSON form is documented in the README and stable.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from db.models import AuditEvent, Instance, Study
from db.session import make_engine, migrate, session_factory
from gateway.config import Config, load_config
from inference.errors import RadgateError


def _time(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def _spool_file(config: Config, relative: str | None) -> str | None:
    return str(Path(config.storage.spool_dir) / relative) if relative else None


def instance_record(config: Config, instance: Instance) -> dict[str, Any]:
    gate = instance.gate_decision
    prediction = instance.prediction
    return {
        "sop_instance_uid": instance.sop_instance_uid,
        "series_uid": instance.series_uid,
        "sop_class_uid": instance.sop_class_uid,
        "modality": instance.modality,
        "body_part": instance.body_part,
        "transfer_syntax_uid": instance.transfer_syntax_uid,
        "state": instance.state.value,
        "received_at": _time(instance.received_at),
        "calling_aet": instance.calling_aet,
        "file": _spool_file(config, instance.spool_path),
        "sha256": instance.sha256,
        "gate": None if gate is None else {"passed": gate.passed, "reasons": list(gate.reasons)},
        "prediction": None
        if prediction is None
        else {
            "label": prediction.label,
            "probability": prediction.top_probability,
            "probabilities": prediction.probabilities,
            "model_id": prediction.model_id,
            "weights_sha256": prediction.weights_sha256,
            "device": prediction.device,
            "body_part_mismatch": prediction.body_part_mismatch,
            "queue_wait_ms": prediction.queue_wait_ms,
            "inference_ms": prediction.inference_ms,
            "gradcam_ms": prediction.gradcam_ms,
        },
    }


def study_record(config: Config, study: Study) -> dict[str, Any]:
    """Everything recorded for one study, as plain JSON-able data."""
    instances = sorted(study.instances, key=lambda i: (i.received_at, i.id))
    labels = sorted({i.prediction.label for i in instances if i.prediction})
    return {
        "study_uid": study.study_uid,
        "patient_id": study.patient_id,
        "patient_name": study.patient_name,
        "accession_number": study.accession_number,
        "study_date": study.study_date,
        "calling_aet": study.calling_aet,
        "state": study.state.value,
        "error": study.error,
        "first_received_at": _time(study.first_received_at),
        "last_received_at": _time(study.last_received_at),
        "processed_at": _time(study.processed_at),
        "labels": labels,
        "gate": "rejected"
        if any(i.gate_decision and not i.gate_decision.passed for i in instances)
        else ("passed" if any(i.gate_decision for i in instances) else None),
        "body_part_mismatch": any(
            i.prediction and i.prediction.body_part_mismatch for i in instances
        ),
        "instances": [instance_record(config, i) for i in instances],
        "outputs": [
            {
                "kind": output.kind.value,
                "sop_instance_uid": output.sop_instance_uid,
                "series_uid": output.series_uid,
                "sop_class_uid": output.sop_class_uid,
                "source_instance_uid": next(
                    (i.sop_instance_uid for i in instances if i.id == output.instance_id), None
                ),
                "file": _spool_file(config, output.spool_path),
                "png": _spool_file(config, output.png_path),
            }
            for output in sorted(study.outputs, key=lambda o: o.id)
        ],
        "forwards": [
            {
                "destination": job.destination,
                "state": job.state.value,
                "attempts": job.attempts,
                "last_error": job.last_error,
                "permanent_failure": job.permanent_failure,
                "next_attempt_at": _time(job.next_attempt_at),
                "delivered_at": _time(job.delivered_at),
                "instances_delivered": len(job.forwarded),
            }
            for job in sorted(study.forward_jobs, key=lambda j: j.destination)
        ],
    }


def _load_studies(session: Session, limit: int, study_uid: str | None = None) -> list[Study]:
    query = select(Study).options(
        selectinload(Study.instances).selectinload(Instance.gate_decision),
        selectinload(Study.instances).selectinload(Instance.prediction),
        selectinload(Study.outputs),
        selectinload(Study.forward_jobs),
    )
    if study_uid is not None:
        query = query.where(Study.study_uid == study_uid)
    query = query.order_by(Study.last_received_at.desc(), Study.id.desc()).limit(limit)
    return list(session.scalars(query))


def open_sessions(config: Config) -> Any:
    engine = make_engine(config.storage.database_url, config.storage.busy_timeout_ms)
    migrate(engine)
    return session_factory(engine, read_only=True)


def list_studies(config: Config, limit: int = 50) -> list[dict[str, Any]]:
    with open_sessions(config)() as session:
        return [study_record(config, study) for study in _load_studies(session, limit)]


def _short(uid: str, width: int = 28) -> str:
    return uid if len(uid) <= width else "…" + uid[-(width - 1) :]


def _summary_line(record: dict[str, Any]) -> str:
    predictions = [
        f"{i['prediction']['label']} {i['prediction']['probability']:.3f}"
        for i in record["instances"]
        if i["prediction"]
    ]
    rejected = [
        "; ".join(i["gate"]["reasons"])
        for i in record["instances"]
        if i["gate"] and not i["gate"]["passed"]
    ]
    forwards = ", ".join(f"{f['destination']}:{f['state']}" for f in record["forwards"]) or "-"
    flags = " MISMATCH" if record["body_part_mismatch"] else ""
    parts = [", ".join(predictions)] if predictions else []
    if rejected:
        parts.append("rejected: " + " / ".join(rejected))
    result = " | ".join(parts) or "-"
    return (
        f"{_short(record['study_uid']):<29} {record['state']:<10} {len(record['instances']):>4} "
        f"{result}{flags}   -> {forwards}"
    )


def studies_command(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    records = list_studies(config, args.limit)
    if args.json:
        print(json.dumps({"studies": records}, indent=2))
        return 0
    if not records:
        print("no studies received yet")
        return 0
    print(f"{'study':<29} {'state':<10} {'imgs':>4} result   -> forwards")
    for record in records:
        print(_summary_line(record))
    return 0


def study_export(config: Config, session: Session, study_uid: str) -> dict[str, Any] | None:
    """`study_record` plus the study's audit events, oldest first; None if unknown."""
    studies = _load_studies(session, 1, study_uid)
    if not studies:
        return None
    record = study_record(config, studies[0])
    events = session.scalars(
        select(AuditEvent)
        .where(AuditEvent.study_uid == study_uid)
        .order_by(AuditEvent.at, AuditEvent.id)
    )
    record["audit_events"] = [
        {"at": _time(event.at), "kind": event.kind, "detail": event.detail} for event in events
    ]
    return record


def show_command(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    with open_sessions(config)() as session:
        record = study_export(config, session, args.study_uid)
    if record is None:
        raise RadgateError(f"study {args.study_uid}: not found")
    print(json.dumps(record, indent=2))
    pngs = [o["png"] for o in record["outputs"] if o["png"]]
    if pngs:
        print("\nGrad-CAM images:")
        for png in pngs:
            print(f"  {png}")
    return 0


# --- radgate audit -----------------------------------------------------------------------


def audit_record(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "at": _time(event.at),
        "kind": event.kind,
        "study_uid": event.study_uid,
        "detail": event.detail,
    }


def list_audit_events(
    config: Config,
    *,
    kinds: list[str] | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Audit events, newest first: `kinds` and `since` narrow them down."""
    query = select(AuditEvent)
    if kinds:
        query = query.where(AuditEvent.kind.in_(kinds))
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    query = query.order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit)
    with open_sessions(config)() as session:
        return [audit_record(event) for event in session.scalars(query)]


def _peer(detail: dict[str, Any]) -> str:
    host = detail.get("peer_host") or "?"
    port = detail.get("peer_port")
    return f"{host}:{port}" if port else str(host)


def audit_summary(record: dict[str, Any]) -> str:
    """One line per event: what happened, with whom, how it ended."""
    detail = record["detail"] or {}
    kind = record["kind"]
    if kind == "association":
        text = (
            f"{detail.get('calling_aet')} at {_peer(detail)} -> {detail.get('called_aet')}:"
            f" {detail.get('outcome')}, {detail.get('instances', 0)} instance(s)"
        )
        reason = detail.get("reason")
        if reason and reason != detail.get("outcome"):
            text += f" ({reason})"
    elif kind == "security":
        caller = f"{detail['calling_aet']} at " if detail.get("calling_aet") else ""
        text = f"{detail.get('event', 'refused')}: {caller}{_peer(detail)}: {detail.get('reason')}"
    elif kind == "forward":
        text = (
            f"-> {detail.get('destination')} ({detail.get('called_aet')} at"
            f" {detail.get('host')}:{detail.get('port')}) attempt {detail.get('attempt')}:"
            f" {detail.get('outcome')}, {detail.get('instances_sent', 0)} instance(s) sent"
        )
        if detail.get("error"):
            text += f": {detail['error']}"
    else:
        text = str(detail.get("event") or json.dumps(detail, sort_keys=True))
        if detail.get("error"):
            text += f": {detail['error']}"
    study = f"  study {_short(record['study_uid'])}" if record["study_uid"] else ""
    return f"{record['at']}  {kind:<11} {text}{study}"


def _since(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise RadgateError(
            f"--since {value!r} is not a date or time; expected ISO 8601, e.g."
            " 2026-01-31 or 2026-01-31T08:00:00+00:00"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def audit_command(args: argparse.Namespace) -> int:
    """`radgate audit`: associations, security refusals, forwards and the other events."""
    config = load_config(args.config)
    since = _since(args.since) if args.since else None
    records = list_audit_events(config, kinds=args.kind, since=since, limit=args.limit)
    if args.json:
        print(json.dumps({"events": records}, indent=2))
        return 0
    if not records:
        print("no audit events")
        return 0
    for record in records:
        print(audit_summary(record))
    return 0
