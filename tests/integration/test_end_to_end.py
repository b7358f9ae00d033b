"""The product end to end: DCMTK storescu -> radgate (trained model) -> Orthanc.

The sample studies with every variant are sent over one association; the test checks
what a user relies on: every acknowledged instance is recorded, the valid ones are
classified correctly by the real model, the others are rejected with the right reasons,
a contradicting BodyPartExamined is flagged, and Orthanc holds each study exactly once
with the RADGATE tags, the Grad-CAM series and the result report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import echoscu, storescu, wait_until
from orthanc import OrthancServer
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from db.models import ForwardJob, ForwardJobState, Instance, Study, StudyState
from gateway.cli import main
from gateway.demo import storescu_batches
from gateway.pipeline import make_processor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sample_studies(tmp_path_factory: pytest.TempPathFactory, sample_data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("samples")
    assert main(["samples", "--data", str(sample_data_dir), "--out", str(out), "--variants"]) == 0
    return out


def test_samples_flow_from_modality_to_pacs(
    start_gateway: Any, orthanc: Any, trained_model: Path, sample_studies: Path
) -> None:
    pacs: OrthancServer = orthanc(ae_title="PACS")
    gateway = start_gateway(
        processor_factory=make_processor,
        model={"dir": str(trained_model), "device": "cpu"},
        destinations=[
            {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs.dicom_port,
                "backoff_s": [1],
            }
        ],
        routes=[{"name": "everything", "when": {}, "forward_to": ["pacs"]}],
    )
    manifest = json.loads((sample_studies / "manifest.json").read_text())
    files = [sample_studies / entry["path"] for entry in manifest]
    for options, batch in storescu_batches(files):  # compressed files go unchanged
        outcome = storescu(gateway.port, batch, calling_aet="MODALITY", extra=options)
        assert outcome.returncode == 0, outcome.output
        assert outcome.statuses == ["Success"] * len(batch), outcome.output
    assert echoscu(gateway.port).returncode == 0

    study_uids = {entry["study_uid"] for entry in manifest}

    def all_delivered() -> bool:
        with gateway.sessions() as session:
            studies = session.scalars(select(Study)).all()
            jobs = session.scalars(select(ForwardJob)).all()
        return (
            len(studies) == len(study_uids)
            and all(s.state is StudyState.PROCESSED for s in studies)
            and len(jobs) == len(study_uids)
            and all(j.state is ForwardJobState.DELIVERED for j in jobs)
        )

    wait_until(all_delivered, timeout_s=300)

    with gateway.sessions() as session:
        instances = {
            i.sop_instance_uid: i
            for i in session.scalars(
                select(Instance).options(
                    selectinload(Instance.gate_decision), selectinload(Instance.prediction)
                )
            )
        }
    assert len(instances) == len(manifest)
    for entry in manifest:
        instance = instances[entry["sop_instance_uid"]]
        decision = instance.gate_decision
        assert decision is not None
        if entry["expected_gate"] == "rejected":
            assert not decision.passed and decision.reasons == entry["expected_reasons"]
            assert instance.prediction is None
            continue
        assert decision.passed, (entry["variant"], decision.reasons)
        prediction = instance.prediction
        assert prediction is not None
        assert prediction.label == entry["expected_label"], entry["variant"]
        assert prediction.body_part_mismatch == ("body part mismatch" in entry["expected_flags"])

    for entry in manifest:
        datasets = pacs.datasets(entry["study_uid"])
        descriptions = sorted(str(ds.get("SeriesDescription", "")) for ds in datasets.values())
        original = datasets[entry["sop_instance_uid"]]
        block = original.private_block(0x0011, "RADGATE")
        if entry["expected_gate"] == "rejected":
            assert len(datasets) == 2  # the tagged original and the report
            assert block[0x05].value == "REJECTED"
            continue
        assert len(datasets) == 3, descriptions  # tagged original, Grad-CAM SC, report
        assert "radgate Grad-CAM" in descriptions and "radgate result" in descriptions
        assert block[0x01].value == entry["expected_label"].upper()
        assert block[0x05].value == "PASSED"
