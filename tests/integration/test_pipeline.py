"""The processing pipeline on a real SQLite file and real sample studies (no networking).

Studies are recorded the way the receiver records them, made ready, claimed and processed;
the database rows, the derived DICOM files (checked with dciodvfy) and the re-run after a
simulated crash are checked.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import func, select

from db.models import GateDecision, Instance, Output, OutputKind, Prediction, Study, StudyState
from db.session import make_engine, migrate, session_factory
from db.work import (
    ReceivedInstance,
    close_association,
    mark_ready,
    open_association,
    record_instance,
)
from gateway.cli import main
from gateway.config import Config, parse_config
from gateway.pipeline import Pipeline, load_classifier


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory, sample_data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("samples")
    assert main(["samples", "--data", str(sample_data_dir), "--out", str(out), "--variants"]) == 0
    return out


def _config(tmp_path: Path, model: Path) -> Config:
    return parse_config(
        {
            "storage": {
                "spool_dir": str(tmp_path / "spool"),
                "database_url": f"sqlite:///{tmp_path / 'radgate.db'}",
            },
            "model": {"dir": str(model), "device": "cpu"},
            "destinations": [],
            "routes": [],
        }
    )


def _database(config: Config) -> Any:
    engine = make_engine(config.storage.database_url)
    migrate(engine)
    return session_factory(engine)


def _receive(config: Config, sessions: Any, files: list[Path]) -> None:
    """Store files in the spool and record them as one released association would."""
    spool = Path(config.storage.spool_dir)
    with sessions() as session:
        association = open_association(
            session, calling_aet="TESTSCU", called_aet="RADGATE", peer_host="127.0.0.1", peer_port=1
        )
    for path in files:
        data = path.read_bytes()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        digest = hashlib.sha256(data).hexdigest()
        relative = f"in/{digest}.dcm"
        (spool / "in").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, spool / relative)
        with sessions() as session:
            record_instance(
                session,
                ReceivedInstance(
                    study_uid=ds.StudyInstanceUID,
                    sop_instance_uid=ds.SOPInstanceUID,
                    sop_class_uid=ds.SOPClassUID,
                    transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                    spool_path=relative,
                    sha256=digest,
                    size_bytes=len(data),
                    series_uid=ds.SeriesInstanceUID,
                    modality=ds.get("Modality"),
                    body_part=ds.get("BodyPartExamined"),
                    calling_aet="TESTSCU",
                    association_id=association,
                ),
            )
    with sessions() as session:
        close_association(session, association, "released")
        mark_ready(session, datetime.now(UTC) + timedelta(seconds=60), 0)


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [
        line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")
    ]


def test_pipeline_gates_classifies_and_writes_outputs(
    tmp_path: Path, samples: Path, tiny_model: Path
) -> None:
    config = _config(tmp_path, tiny_model)
    sessions = _database(config)
    manifest = json.loads((samples / "manifest.json").read_text())
    entries = manifest
    _receive(config, sessions, [samples / e["path"] for e in entries])

    pipeline = Pipeline(config, sessions, load_classifier(config))
    assert pipeline.process_ready() == len({e["study_uid"] for e in entries})
    assert pipeline.process_ready() == 0  # nothing is processed twice

    spool = Path(config.storage.spool_dir)
    with sessions() as session:
        assert {s.state for s in session.scalars(select(Study))} == {StudyState.PROCESSED}
        for entry in entries:
            instance = session.scalar(
                select(Instance).where(Instance.sop_instance_uid == entry["sop_instance_uid"])
            )
            assert instance is not None
            decision = session.get(GateDecision, instance.id)
            assert decision is not None
            assert decision.passed == (entry["expected_gate"] == "passed"), entry["variant"]
            if not decision.passed:
                assert decision.reasons == entry["expected_reasons"], entry["variant"]
                assert session.get(Prediction, instance.id) is None
                continue
            prediction = session.get(Prediction, instance.id)
            assert prediction is not None and prediction.label in ("abd", "chest")
            assert abs(sum(prediction.probabilities.values()) - 1) < 1e-5
            gradcams = session.scalars(
                select(Output).where(
                    Output.instance_id == instance.id, Output.kind == OutputKind.GRADCAM_SC
                )
            ).all()
            assert len(gradcams) == 1
            capture = pydicom.dcmread(spool / gradcams[0].spool_path)
            assert capture.StudyInstanceUID == entry["study_uid"]
            assert (
                capture.SourceImageSequence[0].ReferencedSOPInstanceUID == entry["sop_instance_uid"]
            )
            assert capture.SeriesDescription == "radgate Grad-CAM"
            assert (spool / gradcams[0].png_path).stat().st_size > 0
        reports = session.scalars(select(Output).where(Output.kind == OutputKind.REPORT_SR)).all()
        assert len(reports) == len({e["study_uid"] for e in entries})
        tagged = session.scalars(
            select(Output).where(Output.kind == OutputKind.TAGGED_ORIGINAL)
        ).all()
        assert len(tagged) == len(entries)
        one_capture = spool / gradcams[0].spool_path
        one_report = spool / reports[0].spool_path
    assert _dciodvfy_errors(one_capture) == []
    assert _dciodvfy_errors(one_report) == []


def test_a_crash_before_the_commit_is_redone_once(
    tmp_path: Path, samples: Path, tiny_model: Path
) -> None:
    config = _config(tmp_path, tiny_model)
    sessions = _database(config)
    files = sorted(samples.glob("*chest*plain*/*.dcm"))[:1]
    assert files
    _receive(config, sessions, files)

    crashing = Pipeline(config, sessions, load_classifier(config), worker_id="first")

    def crash(*args: Any, **kwargs: Any) -> None:
        raise SystemExit("killed")  # not an Exception: like a kill, nothing gets recorded

    crashing._record = crash  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        crashing.process_ready()
    derived_before = sorted(p.name for p in (Path(config.storage.spool_dir) / "derived").rglob("*"))

    from db.work import reset_processing

    with sessions() as session:
        assert reset_processing(session, "second") != []
    second = Pipeline(config, sessions, load_classifier(config), worker_id="second")
    assert second.process_ready() == 1
    derived_after = sorted(p.name for p in (Path(config.storage.spool_dir) / "derived").rglob("*"))
    assert derived_after == derived_before  # the same files again, no orphans
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Prediction)) == 1
        assert session.scalar(select(func.count()).select_from(Output)) == 3  # SC, tagged, SR


def test_an_output_highdicom_refuses_is_recorded_and_the_rest_kept(
    tmp_path: Path, samples: Path, tiny_model: Path
) -> None:
    config = _config(tmp_path, tiny_model)
    sessions = _database(config)
    source = sorted(samples.glob("*chest*plain*/*.dcm"))[0]
    odd = pydicom.dcmread(source)
    odd.PatientSex = "X"  # not M, F or O: highdicom refuses to copy it into an SC or SR
    odd_path = tmp_path / "odd.dcm"
    odd.save_as(odd_path)
    _receive(config, sessions, [odd_path])

    assert Pipeline(config, sessions, load_classifier(config)).process_ready() == 1
    from db.models import AuditEvent

    with sessions() as session:
        study = session.scalars(select(Study)).one()
        assert study.state == StudyState.PROCESSED
        assert session.scalar(select(func.count()).select_from(Prediction)) == 1
        kinds = {o.kind for o in session.scalars(select(Output))}
        assert kinds == {OutputKind.TAGGED_ORIGINAL}
        errors = session.scalars(select(AuditEvent).where(AuditEvent.kind == "error")).all()
        assert {e.detail["output"] for e in errors} == {"gradcam_sc", "report_sr"}


def test_audit_views_show_what_was_decided(
    tmp_path: Path, samples: Path, tiny_model: Path, capsys: pytest.CaptureFixture
) -> None:
    import yaml

    config = _config(tmp_path, tiny_model)
    sessions = _database(config)
    manifest = json.loads((samples / "manifest.json").read_text())
    chosen = [e for e in manifest if e["variant"] in ("plain", "ct")][:3]
    _receive(config, sessions, [samples / e["path"] for e in chosen])
    assert Pipeline(config, sessions, load_classifier(config)).process_ready() == len(chosen)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "storage": {
                    "spool_dir": str(config.storage.spool_dir),
                    "database_url": config.storage.database_url,
                },
                "model": {"dir": str(tiny_model)},
                "destinations": [],
                "routes": [],
            }
        )
    )
    capsys.readouterr()
    assert main(["studies", "--config", str(config_file), "--json"]) == 0
    studies = {s["study_uid"]: s for s in json.loads(capsys.readouterr().out)["studies"]}
    assert set(studies) == {e["study_uid"] for e in chosen}
    for entry in chosen:
        record = studies[entry["study_uid"]]
        assert record["state"] == "processed"
        (instance,) = record["instances"]
        assert instance["gate"]["passed"] == (entry["expected_gate"] == "passed")
        if entry["expected_gate"] == "rejected":
            assert record["gate"] == "rejected" and instance["prediction"] is None
            assert instance["gate"]["reasons"] == entry["expected_reasons"]
        else:
            assert instance["prediction"]["label"] in ("abd", "chest")
            kinds = sorted(o["kind"] for o in record["outputs"])
            assert kinds == ["gradcam_sc", "report_sr", "tagged_original"]
            assert all(Path(o["file"]).is_file() for o in record["outputs"])

    assert main(["studies", "--config", str(config_file)]) == 0
    table = capsys.readouterr().out
    assert "rejected: modality CT not in [CR, DX]" in table or not any(
        e["variant"] == "ct" for e in chosen
    )
    shown = chosen[0]
    assert main(["show", "--config", str(config_file), shown["study_uid"]]) == 0
    printed = capsys.readouterr().out
    assert shown["sop_instance_uid"] in printed and '"audit_events"' in printed
    assert main(["show", "--config", str(config_file), "1.2.3.4"]) == 2
    assert "study 1.2.3.4: not found" in capsys.readouterr().err
