"""The dashboard's HTTP behaviour through Starlette's TestClient (no sockets).

A real SQLite file holds four studies recorded the way the gateway records them: a
chest image delivered to its destination, a low-confidence abdomen image whose
BodyPartExamined says CHEST and whose forward job is dead, a CT rejected by the gate
with a pending job, and a study still being received.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from db.models import (
    AuditEvent,
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
from db.work import ReceivedInstance, record_instance
from gateway.config import WEB_TOKEN_VARIABLE, Config, parse_config
from gateway.metrics import GatewayMetrics
from gateway.web import COOKIE_NAME, Dashboard, StudyFilters, WebError, web_token

TOKEN = "s3cret-dashboard-token-0123"
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


@dataclass
class Site:
    config: Config
    engine: Engine
    sessions: sessionmaker[Session]
    uids: dict[str, str]


def _config(tmp_path: Path, **web: Any) -> Config:
    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "model.json").write_text(
        json.dumps({"name": "chest-abd", "arch": "resnet18", "classes": ["abd", "chest"]})
    )
    (model_dir / "evaluation.json").write_text(json.dumps({"test": {"accuracy": 0.95}}))
    return parse_config(
        {
            "storage": {
                "spool_dir": str(tmp_path / "spool"),
                "database_url": f"sqlite:///{tmp_path / 'radgate.db'}",
                "min_free_mb": 1,
            },
            "model": {"dir": str(model_dir), "device": "cpu"},
            "web": {"host": "127.0.0.1", "port": 8080, "token": TOKEN, **web},
        }
    )


def _study(
    sessions: sessionmaker[Session],
    name: str,
    received: datetime,
    *,
    modality: str = "DX",
    body_part: str | None = None,
    gate: tuple[bool, list[str]] | None = None,
    prediction: tuple[str, float, bool] | None = None,
    job: ForwardJobState | None = None,
) -> str:
    study_uid = f"1.2.3.{len(name)}.{sum(map(ord, name))}"
    with sessions() as session:
        result = record_instance(
            session,
            ReceivedInstance(
                study_uid=study_uid,
                sop_instance_uid=study_uid + ".1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                spool_path=f"instances/{name}.dcm",
                sha256="0" * 64,
                size_bytes=1,
                modality=modality,
                body_part=body_part,
                calling_aet="MODALITY",
                patient_name=f"Patient^{name}",
            ),
            now=received,
        )
    with sessions() as session, session.begin():
        study = session.get(Study, result.study_id)
        instance = session.get(Instance, result.instance_id)
        assert study is not None and instance is not None
        if gate is not None:
            study.state = StudyState.PROCESSED
            study.processed_at = received + timedelta(seconds=5)
            session.add(
                GateDecision(
                    instance_id=instance.id, passed=gate[0], reasons=gate[1], decided_at=received
                )
            )
            instance.state = InstanceState.CLASSIFIED if gate[0] else InstanceState.REJECTED
        if prediction is not None:
            label, probability, mismatch = prediction
            other = "chest" if label == "abd" else "abd"
            session.add(
                Prediction(
                    instance_id=instance.id,
                    label=label,
                    probabilities={label: probability, other: 1 - probability},
                    top_probability=probability,
                    model_id="chest-abd@test",
                    weights_sha256="1" * 64,
                    device="cpu",
                    inference_ms=12.0,
                    body_part_mismatch=mismatch,
                    created_at=received,
                )
            )
        if job is not None:
            session.add(
                ForwardJob(
                    study_id=study.id,
                    destination="pacs",
                    routes=["everything"],
                    send=["originals"],
                    state=job,
                    attempts=3 if job is ForwardJobState.DEAD else 1,
                    last_error="cannot connect to 127.0.0.1:1"
                    if job is ForwardJobState.DEAD
                    else None,
                    created_at=received,
                    updated_at=received,
                    delivered_at=received if job is ForwardJobState.DELIVERED else None,
                )
            )
        session.add(
            AuditEvent(at=received, kind="decision", study_uid=study_uid, detail={"name": name})
        )
    return study_uid


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    config = _config(tmp_path)
    Path(config.storage.spool_dir).mkdir()
    engine = make_engine(config.storage.database_url)
    migrate(engine)
    sessions = session_factory(engine)
    uids = {
        "chest": _study(
            sessions,
            "chest",
            NOW - timedelta(days=3),
            gate=(True, []),
            prediction=("chest", 0.99, False),
            job=ForwardJobState.DELIVERED,
        ),
        "abd": _study(
            sessions,
            "abd",
            NOW - timedelta(days=2),
            body_part="CHEST",
            gate=(True, []),
            prediction=("abd", 0.62, True),
            job=ForwardJobState.DEAD,
        ),
        "ct": _study(
            sessions,
            "ct",
            NOW - timedelta(days=1),
            modality="CT",
            gate=(False, ["modality CT not in [CR, DX]"]),
            job=ForwardJobState.PENDING,
        ),
        "receiving": _study(sessions, "receiving", NOW),
    }
    yield Site(config, engine, sessions, uids)
    engine.dispose()


def _client(site: Site, **options: Any) -> TestClient:
    dashboard = Dashboard(
        site.config,
        site.engine,
        metrics=options.pop("metrics", GatewayMetrics()),
        token=options.pop("token", TOKEN),
        **options,
    )
    return TestClient(dashboard.app, follow_redirects=False)


def _bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _listed(client: TestClient, query: str = "") -> list[str]:
    response = client.get(f"/studies?{query}", headers=_bearer())
    assert response.status_code == 200, response.text
    return re.findall(r'data-study-uid="([^"]+)"', response.text)


# --- authentication ----------------------------------------------------------------------


def test_pages_without_a_token_redirect_to_the_login_form(site: Site) -> None:
    client = _client(site)
    response = client.get("/studies?label=chest")
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2Fstudies%3Flabel%3Dchest"
    for path in (
        f"/studies/{site.uids['chest']}/export.json",
        "/outputs/1.png",
        "/model/live/labels.png",
    ):
        assert client.get(path).status_code == 401, path
    assert client.post(f"/studies/{site.uids['abd']}/retry").status_code == 401


def test_a_wrong_token_is_refused(site: Site) -> None:
    client = _client(site)
    for headers in (_bearer("not-the-token-at-all"), {"Authorization": f"Basic {TOKEN}"}):
        response = client.get("/studies", headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
    client.cookies.set(COOKIE_NAME, TOKEN)  # the raw token is not a valid session cookie
    assert client.get("/model").status_code == 401
    response = client.post("/login", data={"token": "wrong-token-wrong-token", "next": "/model"})
    assert response.status_code == 401
    assert "not the dashboard&#39;s token" in response.text


def test_the_right_token_opens_every_page(site: Site) -> None:
    client = _client(site)
    for path in ("/studies", f"/studies/{site.uids['abd']}", "/model"):
        assert client.get(path, headers=_bearer()).status_code == 200, path
    response = client.post("/login", data={"token": TOKEN, "next": "/model"})
    assert response.status_code == 303 and response.headers["location"] == "/model"
    cookie = response.cookies[COOKIE_NAME]
    assert TOKEN not in cookie
    assert client.get("/model").status_code == 200
    # The login form only sends the browser to a local path.
    response = client.post("/login", data={"token": TOKEN, "next": "//evil.example/"})
    assert response.headers["location"] == "/studies"


def test_health_and_metrics_need_no_token(site: Site) -> None:
    client = _client(site)
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_token_comes_from_the_environment_or_the_file(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert web_token(config, {}) == TOKEN
    assert web_token(config, {WEB_TOKEN_VARIABLE: "from-the-environment-1"}) == (
        "from-the-environment-1"
    )
    with pytest.raises(WebError, match=f"{WEB_TOKEN_VARIABLE} holds 5 characters"):
        web_token(config, {WEB_TOKEN_VARIABLE: "short"})
    open_loopback = _config(tmp_path, token=None)
    assert web_token(open_loopback, {}) is None
    exposed = _config(tmp_path, token=None, host="0.0.0.0")
    with pytest.raises(WebError, match="web.host is 0.0.0.0 but no token is configured"):
        web_token(exposed, {})
    assert web_token(exposed, {WEB_TOKEN_VARIABLE: "from-the-environment-1"})


def test_a_short_token_in_the_file_is_a_configuration_error(tmp_path: Path) -> None:
    from gateway.config import ConfigError

    with pytest.raises(ConfigError, match=r"web.token: .*too easy to guess"):
        _config(tmp_path, token="abc")


def test_without_a_token_on_loopback_the_pages_are_open(site: Site) -> None:
    client = _client(site, token=None)
    assert client.get("/studies").status_code == 200


# --- the studies list --------------------------------------------------------------------


def test_studies_are_listed_newest_first_with_counts(site: Site) -> None:
    client = _client(site)
    u = site.uids
    assert _listed(client) == [u["receiving"], u["ct"], u["abd"], u["chest"]]
    page = client.get("/studies", headers=_bearer()).text
    counts = dict(
        (name.strip(), int(value))
        for value, name in re.findall(r"<div class=\"count\"[^>]*><b>(\d+)</b>([^<]+)</div>", page)
    )
    assert counts["studies"] == 4
    assert counts["processed"] == 3
    assert counts["waiting"] == 1
    assert counts["with rejected images"] == 1
    assert counts["body-part mismatch"] == 1
    assert counts["forwards pending"] == 1 and counts["delivered"] == 1 and counts["dead"] == 1


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("label=chest", ["chest"]),
        ("label=abd", ["abd"]),
        ("gate=rejected", ["ct"]),
        ("gate=passed", ["abd", "chest"]),
        ("gate=pending", ["receiving"]),
        ("mismatch=1", ["abd"]),
        ("low_confidence=1", ["abd"]),
        ("destination=dead", ["abd"]),
        ("destination=delivered", ["chest"]),
        ("destination=pending", ["ct"]),
        ("from=2026-03-08&to=2026-03-09", ["ct", "abd"]),
        ("from=2026-03-10", ["receiving"]),
        ("gate=passed&destination=dead", ["abd"]),
        ("label=chest&mismatch=1", []),
    ],
)
def test_filters(site: Site, query: str, expected: list[str]) -> None:
    assert _listed(_client(site), query) == [site.uids[name] for name in expected]


def test_pagination(site: Site) -> None:
    config = site.config.model_copy(
        update={"web": site.config.web.model_copy(update={"page_size": 3})}  # type: ignore[union-attr]
    )
    client = _client(Site(config, site.engine, site.sessions, site.uids))
    first = client.get("/studies", headers=_bearer()).text
    assert len(re.findall("data-study-uid", first)) == 3
    assert 'id="next"' in first and "Page 1 of 2" in first
    assert _listed(client, "page=2") == [site.uids["chest"]]


@pytest.mark.parametrize(
    ("query", "named"),
    [("from=10/03/2026", "from="), ("gate=maybe", "gate="), ("page=0", "page=")],
)
def test_a_bad_filter_is_answered_400_naming_it(site: Site, query: str, named: str) -> None:
    response = _client(site).get(f"/studies?{query}", headers=_bearer())
    assert response.status_code == 400
    assert named in response.text


def test_filter_links_keep_the_other_filters() -> None:
    filters = StudyFilters.parse({"label": "chest", "mismatch": "1", "page": "2"})
    assert filters.query_string(page=3) == "label=chest&mismatch=1&page=3"


# --- the study page, export and retry ----------------------------------------------------


def test_study_page_shows_the_decision_and_the_forwarding(site: Site) -> None:
    page = _client(site).get(f"/studies/{site.uids['abd']}", headers=_bearer()).text
    assert "Patient^abd" in page
    assert "<b>abd</b> 62.0 %" in page
    assert "body part MISMATCH" in page
    assert "cannot connect to 127.0.0.1:1" in page
    assert 'class="retry"' in page  # the dead job has a retry button
    rejected = _client(site).get(f"/studies/{site.uids['ct']}", headers=_bearer()).text
    assert "rejected: modality CT not in [CR, DX]" in rejected
    assert 'class="retry"' not in rejected  # a pending job has none
    assert _client(site).get("/studies/9.9.9", headers=_bearer()).status_code == 404


def test_export_is_the_study_record_with_its_audit_events(site: Site) -> None:
    response = _client(site).get(f"/studies/{site.uids['abd']}/export.json", headers=_bearer())
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert "attachment" in response.headers["content-disposition"]
    record = response.json()
    assert record["study_uid"] == site.uids["abd"]
    assert record["body_part_mismatch"] is True
    [instance] = record["instances"]
    assert instance["prediction"]["label"] == "abd"
    assert instance["prediction"]["probabilities"] == {"abd": 0.62, "chest": pytest.approx(0.38)}
    assert record["forwards"][0]["state"] == "dead"
    assert [event["detail"] for event in record["audit_events"]] == [{"name": "abd"}]
    missing = _client(site).get("/studies/9.9.9/export.json", headers=_bearer())
    assert missing.status_code == 404 and "9.9.9" in missing.json()["error"]


def test_retry_requeues_the_dead_job(site: Site) -> None:
    client = _client(site)
    response = client.post(
        f"/studies/{site.uids['abd']}/retry", data={"destination": "pacs"}, headers=_bearer()
    )
    assert response.status_code == 303
    assert "requeued" in response.headers["location"]
    with site.sessions() as session:
        job = session.scalars(
            select(ForwardJob).join(Study).where(Study.study_uid == site.uids["abd"])
        ).one()
        assert job.state is ForwardJobState.PENDING and job.attempts == 0
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.kind == "forward").order_by(AuditEvent.id.desc())
        ).first()
        assert event is not None and event.detail["reason"] == "dashboard retry"
    # Nothing dead any more: said so, nothing changes.
    again = client.post(f"/studies/{site.uids['abd']}/retry", headers=_bearer())
    assert "no+dead+forward+job" in again.headers["location"]
    assert client.post("/studies/9.9.9/retry", headers=_bearer()).status_code == 404


# --- readiness ---------------------------------------------------------------------------


@dataclass
class FakeGateway:
    model_loaded: bool = True
    scheduler_running: bool = True


def test_ready_when_every_check_passes(site: Site) -> None:
    response = _client(site, gateway=FakeGateway()).get("/readyz")
    assert response.status_code == 200
    assert response.text.splitlines()[0] == "ready"
    for name in ("model: ok", "database: ok", "spool: ok", "scheduler: ok"):
        assert name in response.text


@pytest.mark.parametrize(
    ("gateway", "failing"),
    [
        (FakeGateway(model_loaded=False), "model"),
        (FakeGateway(scheduler_running=False), "scheduler"),
    ],
)
def test_not_ready_without_model_or_scheduler(
    site: Site, gateway: FakeGateway, failing: str
) -> None:
    response = _client(site, gateway=gateway).get("/readyz")
    assert response.status_code == 503
    assert f"{failing}: FAILED" in response.text


def test_not_ready_when_the_database_file_is_unreadable(site: Site, tmp_path: Path) -> None:
    client = _client(site)
    site.engine.dispose()
    database = tmp_path / "radgate.db"
    for suffix in ("-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    database.write_bytes(b"this is not a database " * 200)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert "database: FAILED: database unreachable: file is not a database" in response.text


def test_not_ready_below_the_spool_watermark(site: Site) -> None:
    storage = site.config.storage.model_copy(update={"min_free_mb": 10**9})
    config = site.config.model_copy(update={"storage": storage})
    response = _client(Site(config, site.engine, site.sessions, site.uids)).get("/readyz")
    assert response.status_code == 503
    assert "spool: FAILED" in response.text
    assert "below the watermark storage.min_free_mb = 1000000000" in response.text


def test_not_ready_when_the_spool_is_not_writable(site: Site) -> None:
    spool = Path(site.config.storage.spool_dir)
    shutil.rmtree(spool, ignore_errors=True)
    spool.write_text("a file where the spool folder should be")
    response = _client(site).get("/readyz")
    assert response.status_code == 503
    assert f"spool: FAILED: spool {spool} is not a folder" in response.text


# --- the model page ----------------------------------------------------------------------


def test_model_page_shows_card_metrics_and_live_figures(site: Site) -> None:
    metrics = GatewayMetrics()
    metrics.started_at = NOW - timedelta(days=10)
    client = _client(site, metrics=metrics)
    page = client.get("/model", headers=_bearer()).text
    assert "chest-abd" in page and "resnet18" in page
    assert "test.accuracy" in page and "0.95" in page
    assert re.search(r'id="live-predictions">2<', page)
    assert "1 gate rejections" in page
    for which in ("labels", "probability", "reasons"):
        image = client.get(f"/model/live/{which}.png", headers=_bearer())
        assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get("/model/live/other.png", headers=_bearer()).status_code == 404
    assert client.get("/model/plots/..%2Fsecret.png", headers=_bearer()).status_code == 404


def test_live_figures_count_only_since_the_start(site: Site) -> None:
    metrics = GatewayMetrics()
    metrics.started_at = NOW - timedelta(days=1, hours=1)  # after chest and abd
    page = _client(site, metrics=metrics).get("/model", headers=_bearer()).text
    assert re.search(r'id="live-predictions">0<', page)
    everything = _client(site, metrics=metrics).get("/model?window=all", headers=_bearer()).text
    assert re.search(r'id="live-predictions">2<', everything)


def test_the_demo_gives_an_open_dashboard_a_token_for_its_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.demo import _dashboard_token

    monkeypatch.delenv(WEB_TOKEN_VARIABLE, raising=False)
    token, environment = _dashboard_token(_config(tmp_path, token=None))
    assert token is not None and len(token) == 32
    assert environment[WEB_TOKEN_VARIABLE] == token
    token, environment = _dashboard_token(_config(tmp_path))
    assert token == TOKEN and WEB_TOKEN_VARIABLE not in environment
    without = _config(tmp_path).model_copy(update={"web": None})
    assert _dashboard_token(without)[0] is None


def test_radgate_web_without_a_web_section_says_what_is_missing(tmp_path: Path) -> None:
    from gateway.cli import main

    path = tmp_path / "config.yaml"
    path.write_text("storage: {spool_dir: spool}\n")
    with pytest.raises(WebError, match="no `web` section; add one"):
        from gateway.web import command

        command(argparse.Namespace(config=path))
    assert main(["web", "--config", str(path)]) == 2
