"""Routing: the documented example routes over StudyFacts, condition by condition, and the
forward jobs created from a processed study in a real SQLite file (no sockets)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from db import work
from db.models import (
    AuditEvent,
    ForwardedInstance,
    ForwardJob,
    ForwardJobState,
    GateDecision,
    Instance,
    InstanceState,
    Prediction,
    Study,
    StudyState,
)
from db.session import make_engine, migrate, session_factory
from gateway.config import Config, ConfigError, parse_config
from gateway.routing import (
    ROUTING_EVENT,
    InstanceFacts,
    StudyFacts,
    create_forward_jobs,
    evaluate_routes,
    route_command,
    route_unrouted,
    study_facts,
    tag_text,
    unrouted_study_ids,
)

PACS = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}
REVIEW = {"name": "review", "ae_title": "REVIEW", "host": "127.0.0.1", "port": 4243}
QUARANTINE = {"name": "quarantine", "ae_title": "QUARANTINE", "host": "127.0.0.1", "port": 4244}
ALL_SEND = ["originals", "gradcam", "report"]

# The example routes of docs/CONFIG.md, with a quarantine route for gate rejections.
EXAMPLE_ROUTES: list[dict[str, Any]] = [
    {
        "name": "chest",
        "when": {"label": "chest", "min_probability": 0.9},
        "forward_to": ["pacs"],
        "send": ALL_SEND,
    },
    {"name": "review", "when": {"max_probability": 0.9}, "forward_to": ["review"]},
    {"name": "mislabelled", "when": {"body_part_mismatch": True}, "forward_to": ["review"]},
    {"name": "rejected", "when": {"gate": "rejected"}, "forward_to": ["quarantine"]},
    {"name": "fallback", "when": {"otherwise": True}, "forward_to": ["pacs"]},
]


def config_with(routes: Sequence[dict[str, Any]], **sections: Any) -> Config:
    return parse_config(
        {"destinations": [PACS, REVIEW, QUARANTINE], "routes": list(routes), **sections}
    )


EXAMPLE = config_with(EXAMPLE_ROUTES)


def instance(
    label: str | None = "chest",
    probability: float | None = 0.95,
    *,
    gate_passed: bool = True,
    mismatch: bool = False,
    modality: str = "CR",
    calling_aet: str | None = "MODALITY",
    tags: dict[str, str | None] | None = None,
    uid: str | None = None,
) -> InstanceFacts:
    if not gate_passed:
        label = probability = None
    return InstanceFacts(
        sop_instance_uid=uid or generate_uid(),
        modality=modality,
        calling_aet=calling_aet,
        gate_passed=gate_passed,
        label=label,
        probability=probability,
        body_part_mismatch=mismatch,
        tags=tags or {},
    )


def study(*instances: InstanceFacts) -> StudyFacts:
    return StudyFacts(study_uid="1.2.3", instances=tuple(instances))


def plan(config: Config, facts: StudyFacts) -> dict[str, tuple[list[str], list[str]]]:
    decision = evaluate_routes(config, facts)
    return {name: (p.routes, p.send) for name, p in decision.destinations.items()}


# --- the example routes, table-driven ----------------------------------------------------


@dataclass
class Case:
    name: str
    facts: StudyFacts
    matched: list[str]
    destinations: dict[str, list[str]] = field(default_factory=dict)  # name -> routes


CASES = [
    Case("confident chest", study(instance("chest", 0.95)), ["chest"], {"pacs": ["chest"]}),
    Case("unsure abd", study(instance("abd", 0.7)), ["review"], {"review": ["review"]}),
    Case(
        "confident abd: no route but the fallback",
        study(instance("abd", 0.97)),
        ["fallback"],
        {"pacs": ["fallback"]},
    ),
    Case(
        "confident chest, body part says abdomen",
        study(instance("chest", 0.95, mismatch=True)),
        ["chest", "mislabelled"],
        {"pacs": ["chest"], "review": ["mislabelled"]},
    ),
    Case(
        "unsure and mislabelled: review once, asked by both routes",
        study(instance("chest", 0.8, mismatch=True)),
        ["review", "mislabelled"],
        {"review": ["review", "mislabelled"]},
    ),
    Case(
        "rejected by the gate",
        study(instance(gate_passed=False, modality="CT")),
        ["rejected"],
        {"quarantine": ["rejected"]},
    ),
    Case(
        "a classified and a rejected instance",
        study(instance("chest", 0.99), instance(gate_passed=False, modality="CT")),
        ["chest", "rejected"],
        {"pacs": ["chest"], "quarantine": ["rejected"]},
    ),
    Case(
        "label and probability must hold for the same instance",
        study(instance("chest", 0.6), instance("abd", 0.95)),
        ["review"],
        {"review": ["review"]},
    ),
    Case(
        "bounds are inclusive: exactly 0.9 is confident and to review",
        study(instance("chest", 0.9)),
        ["chest", "review"],
        {"pacs": ["chest"], "review": ["review"]},
    ),
    Case("no processed instance: nothing, not even the fallback", study(), [], {}),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_example_routes(case: Case) -> None:
    decision = evaluate_routes(EXAMPLE, case.facts)
    assert decision.matched_routes == case.matched
    assert {name: p.routes for name, p in decision.destinations.items()} == case.destinations
    evaluated = [m.route.name for m in decision.matches + decision.non_matches]
    assert sorted(evaluated) == sorted(r.name for r in EXAMPLE.routes)


def test_otherwise_applies_only_when_nothing_else_matched() -> None:
    nothing = evaluate_routes(EXAMPLE, study(instance("abd", 0.99)))
    assert nothing.matched_routes == ["fallback"]
    assert nothing.matches[0].reasons == ["otherwise: no other route matched"]

    something = evaluate_routes(EXAMPLE, study(instance("chest", 0.99)))
    assert "fallback" not in something.matched_routes
    (fallback,) = [m for m in something.non_matches if m.route.name == "fallback"]
    assert fallback.reasons == ["otherwise: route(s) chest matched"]


def test_every_otherwise_route_applies_together() -> None:
    config = config_with(
        [
            {"name": "chest", "when": {"label": "chest"}, "forward_to": ["pacs"]},
            {"name": "rest-a", "when": {"otherwise": True}, "forward_to": ["review"]},
            {"name": "rest-b", "when": {"otherwise": True}, "forward_to": ["quarantine"]},
        ]
    )
    assert set(plan(config, study(instance("abd")))) == {"review", "quarantine"}


def test_a_destination_chosen_twice_is_planned_once_with_the_union_of_send() -> None:
    config = config_with(
        [
            {"name": "report-only", "when": {}, "forward_to": ["pacs"], "send": ["report"]},
            {
                "name": "images",
                "when": {"label": "chest"},
                "forward_to": ["pacs", "review"],
                "send": ["gradcam", "originals"],
            },
        ]
    )
    assert plan(config, study(instance("chest"))) == {
        "pacs": (["report-only", "images"], ["originals", "gradcam", "report"]),
        "review": (["images"], ["originals", "gradcam"]),
    }
    # Without the second route, only what the first asked for.
    assert plan(config, study(instance("abd"))) == {"pacs": (["report-only"], ["report"])}


def test_send_defaults_to_all_three() -> None:
    assert plan(EXAMPLE, study(instance("abd", 0.5))) == {"review": (["review"], ALL_SEND)}


def test_when_empty_matches_every_study() -> None:
    config = config_with([{"name": "all", "when": {}, "forward_to": ["pacs"]}])
    assert evaluate_routes(config, study(instance(gate_passed=False))).matched_routes == ["all"]


# --- conditions one by one ---------------------------------------------------------------


def matches(when: dict[str, Any], *instances: InstanceFacts) -> bool:
    config = config_with([{"name": "r", "when": when, "forward_to": ["pacs"]}])
    return evaluate_routes(config, study(*instances)).matched_routes == ["r"]


@pytest.mark.parametrize(
    ("when", "facts", "expected"),
    [
        ({"label": "chest"}, instance("chest"), True),
        ({"label": "CHEST"}, instance("chest"), True),
        ({"label": "chest"}, instance("abd"), False),
        ({"label": "chest"}, instance(gate_passed=False), False),
        ({"min_probability": 0.9}, instance("abd", 0.9), True),
        ({"min_probability": 0.9}, instance("abd", 0.8999), False),
        ({"max_probability": 0.6}, instance("abd", 0.6), True),
        ({"max_probability": 0.6}, instance("abd", 0.61), False),
        ({"max_probability": 0.6}, instance(gate_passed=False), False),
        ({"min_probability": 0.5, "max_probability": 0.7}, instance("abd", 0.65), True),
        ({"min_probability": 0.5, "max_probability": 0.7}, instance("abd", 0.75), False),
        ({"gate": "passed"}, instance("abd"), True),
        ({"gate": "passed"}, instance(gate_passed=False), False),
        ({"gate": "rejected"}, instance(gate_passed=False), True),
        ({"gate": "rejected"}, instance("abd"), False),
        ({"body_part_mismatch": True}, instance("abd", mismatch=True), True),
        ({"body_part_mismatch": True}, instance("abd"), False),
        ({"body_part_mismatch": False}, instance("abd"), True),
        ({"body_part_mismatch": False}, instance(gate_passed=False), False),
        ({"modality": ["CR", "DX"]}, instance(modality="DX"), True),
        ({"modality": ["cr"]}, instance(modality="CR"), True),
        ({"modality": ["CR", "DX"]}, instance(modality="CT"), False),
        ({"calling_aet": ["WARD1", "WARD2"]}, instance(calling_aet="WARD2"), True),
        ({"calling_aet": ["WARD1", "WARD2"]}, instance(calling_aet="ER"), False),
        ({"calling_aet": ["WARD1"]}, instance(calling_aet=None), False),
    ],
)
def test_each_condition(when: dict[str, Any], facts: InstanceFacts, expected: bool) -> None:
    assert matches(when, facts) is expected


def test_modality_and_calling_aet_must_hold_for_the_same_instance() -> None:
    when = {"modality": ["DX"], "calling_aet": ["ER"]}
    dx_from_ward = instance(modality="DX", calling_aet="WARD1")
    cr_from_er = instance(modality="CR", calling_aet="ER")
    assert not matches(when, dx_from_ward, cr_from_er)
    assert matches(when, dx_from_ward, cr_from_er, instance(modality="DX", calling_aet="ER"))


WARD_TAGS = {"StationName": "/^WARD[0-9]+$/", "InstitutionName": "General Hospital"}


@pytest.mark.parametrize(
    ("tags", "when", "expected"),
    [
        ({"StationName": "WARD12", "InstitutionName": "General Hospital"}, WARD_TAGS, True),
        ({"StationName": "WARD12", "InstitutionName": "General Hospital East"}, WARD_TAGS, False),
        ({"StationName": "WARD12", "InstitutionName": "general hospital"}, WARD_TAGS, False),
        ({"StationName": "XWARD1", "InstitutionName": "General Hospital"}, WARD_TAGS, False),
        ({"StationName": None, "InstitutionName": "General Hospital"}, WARD_TAGS, False),
        # A regex is searched anywhere unless anchored; (?i) for case-insensitive.
        ({"StationName": "the WARD3 room"}, {"StationName": "/WARD[0-9]/"}, True),
        ({"StationName": "ward3"}, {"StationName": "/(?i)^WARD3$/"}, True),
        # A missing element never matches, not even a regex that matches anything.
        ({"StationName": None}, {"StationName": "/.*/"}, False),
        ({}, {"StationName": "/.*/"}, False),
        # An element present but empty is the empty text.
        ({"StationName": ""}, {"StationName": "/.*/"}, True),
        ({"SeriesNumber": "1"}, {"SeriesNumber": 1}, True),
    ],
)
def test_tags(tags: dict[str, str | None], when: dict[str, Any], expected: bool) -> None:
    assert matches({"tags": when}, instance(tags=tags)) is expected


def test_a_route_naming_an_unknown_destination_is_refused_when_the_config_loads() -> None:
    with pytest.raises(ConfigError) as caught:
        config_with([{"name": "r", "when": {}, "forward_to": ["pacs", "nowhere"]}])
    (problem,) = caught.value.problems
    assert "routes[0].forward_to" in problem and "'nowhere'" in problem


def test_reasons_say_why_a_route_matched_or_not() -> None:
    confident = instance("chest", 0.95, uid="1.2.3.4")
    decision = evaluate_routes(EXAMPLE, study(confident))
    (chest,) = [m for m in decision.matches if m.route.name == "chest"]
    assert chest.reasons == ["instance 1.2.3.4: label chest, probability 0.95 >= 0.9"]
    reasons = {m.route.name: m.reasons for m in decision.non_matches}
    assert reasons["review"] == ["instance 1.2.3.4: probability 0.95 > 0.9"]
    assert reasons["mislabelled"] == [
        "instance 1.2.3.4: body part agrees, not body_part_mismatch True"
    ]
    assert reasons["rejected"] == ["instance 1.2.3.4: gate passed, not rejected"]

    tagged = instance(tags={"StationName": "ER1"}, uid="1.2.3.5")
    config = config_with(
        [{"name": "ward", "when": {"tags": {"StationName": "/^WARD/"}}, "forward_to": ["pacs"]}]
    )
    (ward,) = evaluate_routes(config, study(tagged)).non_matches
    assert ward.reasons == ["instance 1.2.3.5: StationName 'ER1' does not match '/^WARD/'"]


def test_tag_text_joins_multiple_values_and_has_no_text_for_sequences() -> None:
    ds = Dataset()
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientName = "DOE^JANE"
    ds.SeriesNumber = 7
    ds.StationName = ""
    ds.ReferencedImageSequence = [Dataset()]
    assert tag_text(ds.data_element("ImageType")) == "ORIGINAL\\PRIMARY"
    assert tag_text(ds.data_element("PatientName")) == "DOE^JANE"
    assert tag_text(ds.data_element("SeriesNumber")) == "7"
    assert tag_text(ds.data_element("StationName")) == ""
    assert tag_text(ds.data_element("ReferencedImageSequence")) is None
    assert tag_text(None) is None


# --- facts and forward jobs from the database ---------------------------------------------

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'radgate.db'}", busy_timeout_ms=2000)
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


def db_config(tmp_path: Path, routes: Sequence[dict[str, Any]] = EXAMPLE_ROUTES) -> Config:
    return config_with(
        routes,
        storage={
            "spool_dir": str(tmp_path / "spool"),
            "database_url": f"sqlite:///{tmp_path / 'radgate.db'}",
        },
    )


@dataclass
class Stored:
    """One instance to store: what the gate and the model said about it."""

    label: str | None = "chest"
    probability: float = 0.95
    passed: bool = True
    mismatch: bool = False
    station: str | None = "WARD1"
    modality: str = "DX"


def write_header(path: Path, study_uid: str, sop_uid: str, stored: Stored) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.Modality = stored.modality
    if stored.station is not None:
        ds.StationName = stored.station
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def store_and_process(
    sessions: sessionmaker[Session],
    config: Config,
    study_uid: str,
    items: Sequence[Stored],
    *,
    at: datetime = T0,
) -> int:
    """Record instances as the receiver does and process them as the pipeline does."""
    spool = Path(config.storage.spool_dir)
    study_id = 0
    for number, stored in enumerate(items):
        sop_uid = generate_uid()
        relative = f"in/{sop_uid}.dcm"
        write_header(spool / relative, study_uid, sop_uid, stored)
        with sessions() as session:
            study_id = work.record_instance(
                session,
                work.ReceivedInstance(
                    study_uid=study_uid,
                    sop_instance_uid=sop_uid,
                    sop_class_uid=DigitalXRayImageStorageForPresentation,
                    transfer_syntax_uid=ExplicitVRLittleEndian,
                    spool_path=relative,
                    sha256="0" * 64,
                    size_bytes=1,
                    modality=stored.modality,
                    calling_aet="WARDCR",
                ),
                now=at + timedelta(seconds=number),
            ).study_id
    with sessions() as session:
        work.mark_ready(session, at + timedelta(hours=1), 0, 0)
    study_id_claimed = work.claim_study(sessions, "worker", now=at)
    assert study_id_claimed == study_id
    with sessions() as session, session.begin():
        rows = session.scalars(
            select(Instance).where(
                Instance.study_id == study_id, Instance.state == InstanceState.RECEIVED
            )
        ).all()
        for row, stored in zip(rows, items, strict=True):
            session.add(
                GateDecision(
                    instance_id=row.id,
                    passed=stored.passed,
                    reasons=[] if stored.passed else ["modality CT not in [CR, DX]"],
                    decided_at=at,
                )
            )
            if stored.passed and stored.label:
                session.add(
                    Prediction(
                        instance_id=row.id,
                        label=stored.label,
                        probabilities={stored.label: stored.probability},
                        top_probability=stored.probability,
                        model_id="test",
                        weights_sha256="0" * 64,
                        device="cpu",
                        inference_ms=1.0,
                        body_part_mismatch=stored.mismatch,
                        created_at=at,
                    )
                )
                row.state = InstanceState.CLASSIFIED
            else:
                row.state = InstanceState.REJECTED
    with sessions() as session:
        assert work.finish_study(session, study_id, "worker", now=at) is StudyState.PROCESSED
    return study_id


def jobs(sessions: sessionmaker[Session]) -> dict[str, ForwardJob]:
    with sessions() as session:
        return {job.destination: job for job in session.scalars(select(ForwardJob))}


def test_facts_come_from_the_database_and_the_headers(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    routes = [
        {"name": "ward", "when": {"tags": {"StationName": "/^WARD/"}}, "forward_to": ["pacs"]}
    ]
    config = db_config(tmp_path, routes)
    study_id = store_and_process(
        sessions,
        config,
        "1.2.9.1",
        [Stored("chest", 0.97, mismatch=True), Stored(passed=False, station=None, modality="CT")],
    )
    with sessions() as session:
        facts = study_facts(session, config, study_id)
    assert facts.study_uid == "1.2.9.1" and facts.state == "processed"
    first, second = facts.instances
    assert (first.label, first.probability, first.body_part_mismatch) == ("chest", 0.97, True)
    assert (first.gate_passed, first.modality, first.calling_aet) == (True, "DX", "WARDCR")
    assert first.tags == {"StationName": "WARD1"}
    assert (second.gate_passed, second.label, second.modality) == (False, None, "CT")
    assert second.tags == {"StationName": None}


def test_headers_are_not_read_when_no_route_uses_tags(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    config = db_config(tmp_path)
    study_id = store_and_process(sessions, config, "1.2.9.2", [Stored()])
    for path in (tmp_path / "spool").rglob("*.dcm"):
        path.write_bytes(b"not DICOM")
    with sessions() as session:
        (facts,) = study_facts(session, config, study_id).instances
    assert facts.tags == {} and facts.tags_error is None


def test_an_unreadable_header_matches_no_tag_and_says_why(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    routes = [{"name": "ward", "when": {"tags": {"StationName": "/.*/"}}, "forward_to": ["pacs"]}]
    config = db_config(tmp_path, routes)
    study_id = store_and_process(sessions, config, "1.2.9.3", [Stored()])
    for path in (tmp_path / "spool").rglob("*.dcm"):
        path.write_bytes(b"not DICOM")
    with sessions() as session:
        facts = study_facts(session, config, study_id)
    decision = evaluate_routes(config, facts)
    assert decision.matches == []
    assert "unreadable" in decision.non_matches[0].reasons[0]


def test_create_forward_jobs_persists_one_pending_job_per_destination(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    config = db_config(tmp_path)
    study_id = store_and_process(
        sessions, config, "1.2.9.4", [Stored("chest", 0.8, mismatch=True), Stored(passed=False)]
    )
    now = T0 + timedelta(minutes=5)
    with sessions() as session:
        job_ids = create_forward_jobs(session, config, study_id, now=now)
    found = jobs(sessions)
    assert set(found) == {"review", "quarantine"}
    assert sorted(job_ids) == sorted(job.id for job in found.values())
    review = found["review"]
    assert review.routes == ["review", "mislabelled"] and review.send == ALL_SEND
    assert (review.state, review.attempts, review.next_attempt_at) == (
        ForwardJobState.PENDING,
        0,
        now,
    )
    assert found["quarantine"].routes == ["rejected"]
    with sessions() as session:
        (event,) = session.scalars(select(AuditEvent).where(AuditEvent.kind == ROUTING_EVENT))
    assert event.study_uid == "1.2.9.4"
    assert event.detail["matched_routes"] == ["review", "mislabelled", "rejected"]
    assert {job["action"] for job in event.detail["jobs"]} == {"created"}


def test_routing_twice_for_the_same_processing_changes_nothing(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    config = db_config(tmp_path)
    study_id = store_and_process(sessions, config, "1.2.9.5", [Stored("chest", 0.99)])
    with sessions() as session:
        (first,) = create_forward_jobs(session, config, study_id, now=T0 + timedelta(minutes=1))
    with sessions() as session, session.begin():
        job = session.get(ForwardJob, first)
        assert job is not None
        job.state = ForwardJobState.DELIVERED
        job.attempts = 1
        job.delivered_at = T0 + timedelta(minutes=2)
    with sessions() as session:
        (second,) = create_forward_jobs(session, config, study_id, now=T0 + timedelta(minutes=3))
    assert second == first
    job = jobs(sessions)["pacs"]
    assert (job.state, job.attempts) == (ForwardJobState.DELIVERED, 1)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(ForwardJob)) == 1


def test_a_study_processed_again_gets_its_finished_jobs_back_without_losing_deliveries(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    config = db_config(tmp_path)
    study_id = store_and_process(sessions, config, "1.2.9.6", [Stored("chest", 0.99)])
    with sessions() as session:
        (job_id,) = create_forward_jobs(session, config, study_id, now=T0 + timedelta(minutes=1))
    with sessions() as session, session.begin():
        job = session.get(ForwardJob, job_id)
        assert job is not None
        job.state = ForwardJobState.DEAD
        job.attempts = 8
        job.permanent_failure = True
        job.updated_at = T0 + timedelta(minutes=2)
        session.add(
            ForwardedInstance(
                job_id=job_id, sop_instance_uid="1.2.9.6.1", delivered_at=T0, status=0
            )
        )
    # A second image arrives and the study is processed again: a low-confidence chest.
    later = T0 + timedelta(minutes=10)
    store_and_process(sessions, config, "1.2.9.6", [Stored("chest", 0.7)], at=later)
    with sessions() as session:
        job_ids = create_forward_jobs(session, config, study_id, now=later)
    found = jobs(sessions)
    assert set(found) == {"pacs", "review"} and found["pacs"].id in job_ids
    pacs = found["pacs"]
    assert (pacs.state, pacs.attempts, pacs.permanent_failure, pacs.next_attempt_at) == (
        ForwardJobState.PENDING,
        0,
        False,
        later,
    )
    with sessions() as session:
        delivered = session.scalars(
            select(ForwardedInstance.sop_instance_uid).where(ForwardedInstance.job_id == job_id)
        ).all()
    assert delivered == ["1.2.9.6.1"]


def test_a_study_not_processed_is_not_routed(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    config = db_config(tmp_path)
    study_id = store_and_process(sessions, config, "1.2.9.7", [Stored()])
    with sessions() as session, session.begin():
        found = session.get(Study, study_id)
        assert found is not None
        found.state = StudyState.RECEIVING
    with sessions() as session:
        assert create_forward_jobs(session, config, study_id) == []
    assert jobs(sessions) == {}


def test_no_matching_route_is_recorded_and_the_study_counts_as_routed(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    routes = [{"name": "chest", "when": {"label": "chest"}, "forward_to": ["pacs"]}]
    config = db_config(tmp_path, routes)
    study_id = store_and_process(sessions, config, "1.2.9.8", [Stored("abd")])
    with sessions() as session:
        assert unrouted_study_ids(session) == [study_id]
    with sessions() as session:
        assert create_forward_jobs(session, config, study_id) == []
    with sessions() as session:
        (event,) = session.scalars(select(AuditEvent).where(AuditEvent.kind == ROUTING_EVENT))
        assert event.detail["event"] == "no destination"
    with sessions() as session:
        assert unrouted_study_ids(session) == []


def test_route_unrouted_finishes_what_a_crash_interrupted(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    config = db_config(tmp_path)
    routed = store_and_process(sessions, config, "1.2.9.9", [Stored("chest", 0.99)])
    with sessions() as session:
        create_forward_jobs(session, config, routed)
    # Processed, then killed before routing.
    crashed = store_and_process(sessions, config, "1.2.9.10", [Stored("abd", 0.5)])
    assert route_unrouted(sessions, config) == [crashed]
    assert route_unrouted(sessions, config) == []
    with sessions() as session:
        destinations = {
            (job.study_id, job.destination) for job in session.scalars(select(ForwardJob))
        }
    assert destinations == {(routed, "pacs"), (crashed, "review")}


def test_route_command_prints_the_verdicts_and_sends_nothing(
    tmp_path: Path, sessions: sessionmaker[Session], capsys: pytest.CaptureFixture[str]
) -> None:
    config = db_config(tmp_path)
    store_and_process(sessions, config, "1.2.9.11", [Stored("chest", 0.8, mismatch=True)])
    path = tmp_path / "config.yaml"
    data = {
        "storage": {
            "spool_dir": str(tmp_path / "spool"),
            "database_url": f"sqlite:///{tmp_path / 'radgate.db'}",
        },
        "destinations": [PACS, REVIEW, QUARANTINE],
        "routes": EXAMPLE_ROUTES,
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert route_command(argparse.Namespace(config=path, study_uid="1.2.9.11")) == 0
    out = capsys.readouterr().out
    assert "route chest: no match" in out
    assert "route review: MATCHES" in out
    assert "route mislabelled: MATCHES" in out
    assert "probability 0.8 < 0.9" in out
    assert "review (REVIEW at 127.0.0.1:4243): originals, gradcam, report" in out
    assert "[route(s) review, mislabelled]" in out
    assert "originals: 1 instance(s)" in out
    assert jobs(sessions) == {}


def test_route_command_on_an_unknown_study_is_an_error(tmp_path: Path) -> None:
    from gateway.cli import main

    path = tmp_path / "config.yaml"
    path.write_text(
        f"storage: {{spool_dir: {tmp_path / 'spool'}, database_url: 'sqlite:///{tmp_path / 'x.db'}'}}\n",
        encoding="utf-8",
    )
    assert main(["route", "--config", str(path), "1.2.404"]) == 2
