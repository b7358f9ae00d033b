"""Initial schema: associations, studies, instances, decisions, outputs, forwarding, audit.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Written out in full rather than importing db.models, so that this revision keeps
creating the same schema whatever the models become later.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ASSOCIATION_OUTCOMES = ("released", "aborted", "rejected")
STUDY_STATES = ("receiving", "ready", "processing", "processed", "failed")
INSTANCE_STATES = ("received", "gated", "classified", "rejected", "failed")
OUTPUT_KINDS = ("gradcam_sc", "tagged_original", "report_sr")
FORWARD_JOB_STATES = ("pending", "in_progress", "delivered", "dead")


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column[Any]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _state(
    name: str, values: Sequence[str], enum_name: str, *, nullable: bool = False
) -> sa.Column[Any]:
    return sa.Column(
        name,
        sa.Enum(
            *values,
            name=enum_name,
            native_enum=False,
            create_constraint=True,
            length=16,
        ),
        nullable=nullable,
    )


def _uid(name: str, *, nullable: bool = False) -> sa.Column[Any]:
    return sa.Column(name, sa.String(length=64), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "associations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("calling_aet", sa.String(length=16), nullable=False),
        sa.Column("called_aet", sa.String(length=16), nullable=False),
        sa.Column("peer_host", sa.String(length=255), nullable=False),
        sa.Column("peer_port", sa.Integer(), nullable=True),
        _timestamp("started_at"),
        _timestamp("ended_at", nullable=True),
        _state("outcome", ASSOCIATION_OUTCOMES, "association_outcome", nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("instances_received", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_associations")),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        _timestamp("at"),
        sa.Column("kind", sa.String(length=32), nullable=False),
        _uid("study_uid", nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index(op.f("ix_audit_events_at"), "audit_events", ["at"])
    op.create_index(op.f("ix_audit_events_kind"), "audit_events", ["kind"])
    op.create_index(op.f("ix_audit_events_study_uid"), "audit_events", ["study_uid"])

    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        _uid("study_uid"),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("patient_name", sa.String(length=324), nullable=True),
        sa.Column("accession_number", sa.String(length=16), nullable=True),
        sa.Column("study_date", sa.String(length=16), nullable=True),
        sa.Column("calling_aet", sa.String(length=16), nullable=True),
        _timestamp("first_received_at"),
        _timestamp("last_received_at"),
        _timestamp("released_at", nullable=True),
        _state("state", STUDY_STATES, "study_state"),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        _timestamp("claimed_at", nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _timestamp("processed_at", nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        sa.UniqueConstraint("study_uid", name=op.f("uq_studies_study_uid")),
    )
    op.create_index("ix_studies_state_last_received_at", "studies", ["state", "last_received_at"])

    op.create_table(
        "association_studies",
        sa.Column("association_id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["association_id"],
            ["associations.id"],
            name=op.f("fk_association_studies_association_id_associations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_association_studies_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("association_id", "study_id", name=op.f("pk_association_studies")),
    )
    op.create_index(op.f("ix_association_studies_study_id"), "association_studies", ["study_id"])

    op.create_table(
        "forward_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("routes", sa.JSON(), nullable=False),
        sa.Column("send", sa.JSON(), nullable=False),
        _state("state", FORWARD_JOB_STATES, "forward_job_state"),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _timestamp("next_attempt_at", nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("permanent_failure", sa.Boolean(), nullable=False),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        _timestamp("delivered_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_forward_jobs_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_forward_jobs")),
        sa.UniqueConstraint(
            "study_id", "destination", name=op.f("uq_forward_jobs_study_id_destination")
        ),
    )
    op.create_index(
        "ix_forward_jobs_state_next_attempt_at", "forward_jobs", ["state", "next_attempt_at"]
    )

    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        _uid("sop_instance_uid"),
        _uid("sop_class_uid"),
        _uid("series_uid", nullable=True),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("body_part", sa.String(length=16), nullable=True),
        _uid("transfer_syntax_uid"),
        sa.Column("spool_path", sa.String(length=512), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("calling_aet", sa.String(length=16), nullable=True),
        sa.Column("association_id", sa.Integer(), nullable=True),
        _timestamp("received_at"),
        _state("state", INSTANCE_STATES, "instance_state"),
        sa.ForeignKeyConstraint(
            ["association_id"],
            ["associations.id"],
            name=op.f("fk_instances_association_id_associations"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_instances_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_instances_sop_instance_uid")),
    )
    op.create_index(op.f("ix_instances_association_id"), "instances", ["association_id"])
    op.create_index(op.f("ix_instances_study_id"), "instances", ["study_id"])

    op.create_table(
        "forwarded_instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        _uid("sop_instance_uid"),
        _timestamp("delivered_at"),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["forward_jobs.id"],
            name=op.f("fk_forwarded_instances_job_id_forward_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_forwarded_instances")),
        sa.UniqueConstraint(
            "job_id",
            "sop_instance_uid",
            name=op.f("uq_forwarded_instances_job_id_sop_instance_uid"),
        ),
    )
    op.create_table(
        "gate_decisions",
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        _timestamp("decided_at"),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id"],
            name=op.f("fk_gate_decisions_instance_id_instances"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("instance_id", name=op.f("pk_gate_decisions")),
    )
    op.create_table(
        "outputs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=True),
        _state("kind", OUTPUT_KINDS, "output_kind"),
        _uid("sop_instance_uid"),
        _uid("series_uid"),
        _uid("sop_class_uid"),
        sa.Column("spool_path", sa.String(length=512), nullable=False),
        sa.Column("png_path", sa.String(length=512), nullable=True),
        _timestamp("created_at"),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id"],
            name=op.f("fk_outputs_instance_id_instances"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_outputs_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outputs")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_outputs_sop_instance_uid")),
    )
    op.create_index(op.f("ix_outputs_instance_id"), "outputs", ["instance_id"])
    op.create_index(op.f("ix_outputs_study_id"), "outputs", ["study_id"])

    op.create_table(
        "predictions",
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=32), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("top_probability", sa.Float(), nullable=False),
        sa.Column("model_id", sa.String(length=128), nullable=False),
        sa.Column("weights_sha256", sa.String(length=64), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=False),
        sa.Column("queue_wait_ms", sa.Float(), nullable=True),
        sa.Column("inference_ms", sa.Float(), nullable=False),
        sa.Column("gradcam_ms", sa.Float(), nullable=True),
        sa.Column("body_part_mismatch", sa.Boolean(), nullable=False),
        _timestamp("created_at"),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id"],
            name=op.f("fk_predictions_instance_id_instances"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("instance_id", name=op.f("pk_predictions")),
    )


def downgrade() -> None:
    # Children first; indexes go with their tables.
    for table in (
        "predictions",
        "outputs",
        "gate_decisions",
        "forwarded_instances",
        "instances",
        "forward_jobs",
        "association_studies",
        "studies",
        "audit_events",
        "associations",
    ):
        op.drop_table(table)
