"""The database schema: the one place where radgate's work state lives.

Every timestamp is stored in UTC and read back timezone-aware (`UTCDateTime`), on
SQLite as on PostgreSQL. States are short strings checked by the database
(`Enum(native_enum=False)`), so a row can never hold a state the code does not know.

Patient names may be stored here (the audit view shows them); they never go into
log lines.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# DICOM value lengths (PS3.5 table 6.2-1): UI 64, AE 16, CS 16, SH 16, LO 64,
# PN 3 x 64 plus separators.
UID_LENGTH = 64
AE_LENGTH = 16
CS_LENGTH = 16
SH_LENGTH = 16
LO_LENGTH = 64
PN_LENGTH = 324

# Constraint names are fixed so that later migrations (SQLite batch mode included)
# can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    SQLite has no time zone type: values are stored as UTC text (which also sorts
    correctly in SQL comparisons) and get their UTC zone back when read. Naive
    datetimes are refused: their zone is unknown.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()}: a time zone is required")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class AssociationOutcome(enum.StrEnum):
    RELEASED = "released"
    ABORTED = "aborted"
    REJECTED = "rejected"


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"
    READY = "ready"
    PROCESSING = "processing"
    PROCESSED = "processed"
    FAILED = "failed"


class InstanceState(enum.StrEnum):
    RECEIVED = "received"
    GATED = "gated"
    CLASSIFIED = "classified"
    REJECTED = "rejected"
    FAILED = "failed"


class OutputKind(enum.StrEnum):
    GRADCAM_SC = "gradcam_sc"
    TAGGED_ORIGINAL = "tagged_original"
    REPORT_SR = "report_sr"


class ForwardJobState(enum.StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    DELIVERED = "delivered"
    DEAD = "dead"


def _state_enum(enum_class: type[enum.StrEnum], name: str) -> Enum:
    """A string column limited to the enum's values (stored as the values, not the names)."""
    return Enum(
        enum_class,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        validate_strings=True,
        values_callable=lambda members: [member.value for member in members],
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        dict[str, float]: JSON(),
        list[str]: JSON(),
    }


class Association(Base):
    """One DICOM association with a peer, accepted or rejected."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(primary_key=True)
    calling_aet: Mapped[str] = mapped_column(String(AE_LENGTH))
    called_aet: Mapped[str] = mapped_column(String(AE_LENGTH))
    peer_host: Mapped[str] = mapped_column(String(255))
    peer_port: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    # Null while the association is open.
    outcome: Mapped[AssociationOutcome | None] = mapped_column(
        _state_enum(AssociationOutcome, "association_outcome")
    )
    reason: Mapped[str | None] = mapped_column(Text)
    # Every acknowledged C-STORE, duplicates included; totalled when the association
    # ends (association_studies holds the running counts).
    instances_received: Mapped[int] = mapped_column(default=0)

    studies: Mapped[list[AssociationStudy]] = relationship(
        back_populates="association", cascade="all, delete-orphan", passive_deletes=True
    )


class AssociationStudy(Base):
    """Which association delivered to which study, so that its release can mark them.

    Kept for duplicates too: a sender that resends a whole study after an abort
    delivers only duplicates, and its normal release must still count.
    """

    __tablename__ = "association_studies"

    association_id: Mapped[int] = mapped_column(
        ForeignKey("associations.id", ondelete="CASCADE"), primary_key=True
    )
    study_id: Mapped[int] = mapped_column(
        ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    instances: Mapped[int] = mapped_column(default=0)

    association: Mapped[Association] = relationship(back_populates="studies")
    study: Mapped[Study] = relationship()


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = (Index("ix_studies_state_last_received_at", "state", "last_received_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(LO_LENGTH))
    patient_name: Mapped[str | None] = mapped_column(String(PN_LENGTH))
    accession_number: Mapped[str | None] = mapped_column(String(SH_LENGTH))
    # DICOM DA text as received (YYYYMMDD); kept raw because senders get it wrong.
    study_date: Mapped[str | None] = mapped_column(String(SH_LENGTH))
    calling_aet: Mapped[str | None] = mapped_column(String(AE_LENGTH))
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime]
    # Set when an association that delivered to the study released normally; cleared
    # by every new instance and by an abort, so it is set only when the last
    # delivery ended well.
    released_at: Mapped[datetime | None]
    state: Mapped[StudyState] = mapped_column(
        _state_enum(StudyState, "study_state"), default=StudyState.RECEIVING
    )
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_at: Mapped[datetime | None]
    # How many times a worker claimed the study: a study that keeps killing its
    # worker is failed instead of being claimed forever.
    attempts: Mapped[int] = mapped_column(default=0)
    processed_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)

    instances: Mapped[list[Instance]] = relationship(
        back_populates="study",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Instance.id",
    )
    outputs: Mapped[list[Output]] = relationship(
        back_populates="study", cascade="all, delete-orphan", passive_deletes=True
    )
    forward_jobs: Mapped[list[ForwardJob]] = relationship(
        back_populates="study", cascade="all, delete-orphan", passive_deletes=True
    )


class Instance(Base):
    """One received SOP instance; its file lies in the spool at `spool_path`."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    series_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    modality: Mapped[str | None] = mapped_column(String(CS_LENGTH))
    body_part: Mapped[str | None] = mapped_column(String(CS_LENGTH))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    # Relative to storage.spool_dir, so the spool can move.
    spool_path: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_aet: Mapped[str | None] = mapped_column(String(AE_LENGTH))
    association_id: Mapped[int | None] = mapped_column(
        ForeignKey("associations.id", ondelete="SET NULL"), index=True
    )
    received_at: Mapped[datetime]
    state: Mapped[InstanceState] = mapped_column(
        _state_enum(InstanceState, "instance_state"), default=InstanceState.RECEIVED
    )

    study: Mapped[Study] = relationship(back_populates="instances")
    gate_decision: Mapped[GateDecision | None] = relationship(
        back_populates="instance", cascade="all, delete-orphan", passive_deletes=True
    )
    prediction: Mapped[Prediction | None] = relationship(
        back_populates="instance", cascade="all, delete-orphan", passive_deletes=True
    )


class GateDecision(Base):
    __tablename__ = "gate_decisions"

    instance_id: Mapped[int] = mapped_column(
        ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True
    )
    passed: Mapped[bool] = mapped_column(Boolean)
    # Short stable texts, e.g. "modality CT not in [CR, DX]", "multi-frame".
    reasons: Mapped[list[str]] = mapped_column(default=list)
    decided_at: Mapped[datetime]

    instance: Mapped[Instance] = relationship(back_populates="gate_decision")


class Prediction(Base):
    __tablename__ = "predictions"

    instance_id: Mapped[int] = mapped_column(
        ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True
    )
    label: Mapped[str] = mapped_column(String(32))
    probabilities: Mapped[dict[str, float]]
    top_probability: Mapped[float] = mapped_column(Float)
    model_id: Mapped[str] = mapped_column(String(128))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    device: Mapped[str] = mapped_column(String(32))
    queue_wait_ms: Mapped[float | None] = mapped_column(Float)
    inference_ms: Mapped[float] = mapped_column(Float)
    gradcam_ms: Mapped[float | None] = mapped_column(Float)
    # BodyPartExamined names the other class: flagged, not hidden.
    body_part_mismatch: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime]

    instance: Mapped[Instance] = relationship(back_populates="prediction")


class Output(Base):
    """A DICOM object radgate made: Grad-CAM capture, tagged copy of an original, or SR."""

    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    # Null for the per-study report.
    instance_id: Mapped[int | None] = mapped_column(
        ForeignKey("instances.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[OutputKind] = mapped_column(_state_enum(OutputKind, "output_kind"))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    series_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    spool_path: Mapped[str] = mapped_column(String(512))
    png_path: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime]

    study: Mapped[Study] = relationship(back_populates="outputs")


class ForwardJob(Base):
    """Delivery of one study to one destination; retry state lives next to it."""

    __tablename__ = "forward_jobs"
    __table_args__ = (
        UniqueConstraint("study_id", "destination"),
        Index("ix_forward_jobs_state_next_attempt_at", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    destination: Mapped[str] = mapped_column(String(64))
    # The routes that chose this destination and what they asked to send
    # (originals, gradcam, report), fixed when the job is created.
    routes: Mapped[list[str]] = mapped_column(default=list)
    send: Mapped[list[str]] = mapped_column(default=list)
    state: Mapped[ForwardJobState] = mapped_column(
        _state_enum(ForwardJobState, "forward_job_state"), default=ForwardJobState.PENDING
    )
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    # A refusal that will never succeed (e.g. called AE title rejected permanently).
    permanent_failure: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]

    study: Mapped[Study] = relationship(back_populates="forward_jobs")
    forwarded: Mapped[list[ForwardedInstance]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True
    )


class ForwardedInstance(Base):
    """An instance the destination confirmed: never sent again for this job."""

    __tablename__ = "forwarded_instances"
    __table_args__ = (UniqueConstraint("job_id", "sop_instance_uid"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("forward_jobs.id", ondelete="CASCADE"))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    delivered_at: Mapped[datetime]
    # The C-STORE response status (0x0000 or a warning).
    status: Mapped[int | None] = mapped_column(Integer)

    job: Mapped[ForwardJob] = relationship(back_populates="forwarded")


class AuditEvent(Base):
    """What happened, for auditors: associations, security refusals, decisions, deliveries."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    # association, security, gate, prediction, forward, error, ...
    kind: Mapped[str] = mapped_column(String(32), index=True)
    study_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH), index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
