"""The dashboard of a real `radgate serve` that received the sample studies over DICOM.

One gateway process per module (tiny model, studies sent with DCMTK storescu, a
destination that is down so that every forward job ends dead). Checked against the
database: `/metrics` after that traffic, `/readyz`, and, in headless Chromium driven by
Selenium, the login, the studies list and its filters, the study page with its Grad-CAM
image loaded, the model page, and the retry button delivering the dead job once the
destination (DCMTK storescp) is up. A screenshot of each page is kept in
``test-output/dashboard/`` (paths printed).

Also: the Dockerfile's ENTRYPOINT and CMD, run as they are outside a container with a
temporary configuration, serve a ready gateway, and its HEALTHCHECK command passes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    REPO,
    GatewaySetup,
    free_port,
    gateway_config,
    storescu,
    wait_for_dicom,
    wait_for_port,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from db.models import AuditEvent, ForwardJob, ForwardJobState, Instance, Study, StudyState
from db.session import make_engine, session_factory
from gateway.cli import main
from gateway.demo import storescu_batches

TOKEN = "dashboard-test-token-0123456789"
SCREENSHOTS = REPO / "test-output" / "dashboard"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PROCESSING_TIMEOUT_S = 300.0


@dataclass
class Running:
    setup: GatewaySetup
    process: subprocess.Popen[bytes]
    log: Path
    web: str
    destination_port: int
    study_uids: set[str]
    instances_sent: int

    def sessions(self) -> Any:
        engine = make_engine(self.setup.config.storage.database_url)
        return session_factory(engine, read_only=True)


def _get(url: str, token: str | None = TOKEN) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TCP_NODELAY": "1"}


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, sample_data_dir: Path, tiny_model: Path
) -> Iterator[Running]:
    folder = tmp_path_factory.mktemp("dashboard")
    samples = folder / "samples"
    assert (
        main(["samples", "--data", str(sample_data_dir), "--out", str(samples), "--variants"]) == 0
    )
    manifest = json.loads((samples / "manifest.json").read_text())
    destination_port = free_port()
    web_port = free_port()
    setup = gateway_config(
        folder / "gateway",
        model={"dir": str(tiny_model), "device": "cpu"},
        destinations=[
            {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": destination_port,
                "max_attempts": 1,
                "backoff_s": [1],
                "timeout_s": 5,
            }
        ],
        routes=[{"name": "everything", "when": {}, "forward_to": ["pacs"]}],
        web={"host": "127.0.0.1", "port": web_port, "token": TOKEN},
    )
    log = folder / "gateway.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(setup.path)],
            cwd=REPO,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=_environment(),
        )
    try:
        wait_for_dicom(
            "127.0.0.1", setup.port, 120, called_aet="RADGATE", alive=lambda: process.poll() is None
        )
        files = [samples / entry["path"] for entry in manifest]
        for options, batch in storescu_batches(files):
            outcome = storescu(setup.port, batch, calling_aet="MODALITY", extra=options)
            assert outcome.statuses == ["Success"] * len(batch), outcome.output
        running = Running(
            setup,
            process,
            log,
            f"http://127.0.0.1:{web_port}",
            destination_port,
            {entry["study_uid"] for entry in manifest},
            len(files),
        )
        sessions = running.sessions()

        def settled() -> bool:
            with sessions() as session:
                studies = session.scalars(select(Study)).all()
                jobs = session.scalars(select(ForwardJob)).all()
            return (
                len(studies) == len(running.study_uids)
                and all(study.state is StudyState.PROCESSED for study in studies)
                and len(jobs) == len(studies)
                and all(job.state is ForwardJobState.DEAD for job in jobs)
            )

        wait_until(settled, timeout_s=PROCESSING_TIMEOUT_S)
        yield running
    except BaseException:
        print(log.read_text(errors="replace"))
        raise
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


# --- metrics and readiness ---------------------------------------------------------------


def _samples(text: str) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def _value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples.get(name, [])
        if all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_metrics_after_real_traffic(gateway: Running) -> None:
    status, text = _get(f"{gateway.web}/metrics", token=None)
    assert status == 200
    samples = _samples(text)
    with gateway.sessions()() as session:
        instances = session.scalars(
            select(Instance).options(
                selectinload(Instance.prediction), selectinload(Instance.gate_decision)
            )
        ).all()
        attempts = Counter(
            event.detail["outcome"]
            for event in session.scalars(select(AuditEvent).where(AuditEvent.kind == "forward"))
            if event.detail.get("event") == "forward attempt"
        )
        dead = len(
            session.scalars(
                select(ForwardJob).where(ForwardJob.state == ForwardJobState.DEAD)
            ).all()
        )
    assert len(instances) == gateway.instances_sent
    assert _value(samples, "radgate_instances_received_total", calling_aet="MODALITY") == len(
        instances
    )
    assert _value(samples, "radgate_ingest_seconds_count") == len(instances)
    labels = Counter(i.prediction.label for i in instances if i.prediction)
    assert labels and all(
        _value(samples, "radgate_predictions_total", label=label) == count
        for label, count in labels.items()
    )
    assert _value(samples, "radgate_inference_seconds_count") == sum(labels.values())
    assert _value(samples, "radgate_gradcam_seconds_count") == sum(labels.values())
    reasons = Counter(
        reason
        for i in instances
        if i.gate_decision and not i.gate_decision.passed
        for reason in i.gate_decision.reasons
    )
    assert reasons and all(
        _value(samples, "radgate_instances_rejected_total", reason=reason) == count
        for reason, count in reasons.items()
    )
    mismatches = sum(1 for i in instances if i.prediction and i.prediction.body_part_mismatch)
    assert _value(samples, "radgate_body_part_mismatches_total") == mismatches
    assert attempts and all(
        _value(samples, "radgate_forward_attempts_total", destination="pacs", outcome=outcome)
        == count
        for outcome, count in attempts.items()
    )
    assert _value(samples, "radgate_queue_depth", queue="dead") == dead
    assert _value(samples, "radgate_queue_depth", queue="processing") == 0


def test_readyz_names_every_check(gateway: Running) -> None:
    status, text = _get(f"{gateway.web}/readyz", token=None)
    assert status == 200, text
    assert text.startswith("ready\n")
    for check in ("model: ok: loaded", "database: ok", "spool: ok", "scheduler: ok: running"):
        assert check in text
    assert _get(f"{gateway.web}/healthz", token=None) == (200, "ok\n")


# --- the browser -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    for executable, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(executable).is_file():
            pytest.fail(f"{executable} (Debian package {package}, `make system-deps`) is required")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _screenshot(driver: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    # The whole page, not just the window.
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1400, max(1000, min(int(height) + 100, 6000)))
    assert driver.save_screenshot(str(path)), path
    print(f"screenshot: {path}")
    return path


def _listed(driver: Any) -> list[str]:
    from selenium.webdriver.common.by import By

    return [
        row.get_attribute("data-study-uid")
        for row in driver.find_elements(By.CSS_SELECTOR, "tr.study-row")
    ]


def _image_loaded(driver: Any, element: Any) -> bool:
    return bool(
        driver.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", element
        )
    )


def test_dashboard_in_a_browser(gateway: Running, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = browser
    driver.get(f"{gateway.web}/studies")
    assert "/login" in driver.current_url
    _screenshot(driver, "login")
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.ID, "login").click()
    wait_until(lambda: driver.current_url.endswith("/studies"), timeout_s=30)

    with gateway.sessions()() as session:
        studies = session.scalars(
            select(Study)
            .options(
                selectinload(Study.instances).selectinload(Instance.gate_decision),
                selectinload(Study.instances).selectinload(Instance.prediction),
            )
            .order_by(Study.last_received_at.desc(), Study.id.desc())
        ).all()
        rejected = [
            s.study_uid
            for s in studies
            if any(i.gate_decision and not i.gate_decision.passed for i in s.instances)
        ]
        chest = [
            s.study_uid
            for s in studies
            if any(i.prediction and i.prediction.label == "chest" for i in s.instances)
        ]
        classified = next(s for s in studies if any(i.prediction for i in s.instances))
    assert _listed(driver) == [s.study_uid for s in studies]
    assert driver.find_element(By.ID, "count-studies").text.startswith(str(len(studies)))
    _screenshot(driver, "studies")

    Select(driver.find_element(By.ID, "filter-gate")).select_by_value("rejected")
    driver.find_element(By.ID, "apply").click()
    wait_until(lambda: "gate=rejected" in driver.current_url, timeout_s=30)
    assert rejected and _listed(driver) == rejected
    _screenshot(driver, "studies-rejected")

    driver.get(f"{gateway.web}/studies?label=chest")
    assert _listed(driver) == chest
    driver.get(f"{gateway.web}/studies?destination=delivered")
    assert _listed(driver) == []

    driver.get(f"{gateway.web}/studies/{classified.study_uid}")
    gradcams = driver.find_elements(By.CSS_SELECTOR, "img.gradcam")
    originals = driver.find_elements(By.CSS_SELECTOR, "img.original")
    assert gradcams and originals
    wait_until(
        lambda: all(_image_loaded(driver, image) for image in gradcams + originals), timeout_s=30
    )
    _screenshot(driver, "study")

    driver.get(f"{gateway.web}/model")
    live = driver.find_elements(By.CSS_SELECTOR, "img.live")
    assert len(live) == 3
    wait_until(lambda: all(_image_loaded(driver, image) for image in live), timeout_s=60)
    assert int(driver.find_element(By.ID, "live-predictions").text) > 0
    _screenshot(driver, "model")

    # The destination comes up; the dead job is retried from its study page.
    received = tmp_path / "storescp"
    received.mkdir()
    destination = subprocess.Popen(
        ["storescp", "-aet", "PACS", "-od", str(received), str(gateway.destination_port)],
        env=_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(
            "127.0.0.1", gateway.destination_port, 30, alive=lambda: destination.poll() is None
        )
        driver.get(f"{gateway.web}/studies/{classified.study_uid}")
        row = driver.find_element(By.CSS_SELECTOR, "tr.forward[data-destination='pacs']")
        assert row.get_attribute("data-state") == "dead"
        row.find_element(By.CSS_SELECTOR, "button.retry").click()
        wait_until(lambda: driver.find_elements(By.ID, "message"), timeout_s=30)
        assert "requeued" in driver.find_element(By.ID, "message").text

        def delivered() -> bool:
            driver.refresh()
            state = driver.find_element(By.CSS_SELECTOR, "tr.forward[data-destination='pacs']")
            return state.get_attribute("data-state") == "delivered"

        wait_until(delivered, timeout_s=120)
        _screenshot(driver, "study-after-retry")
        assert any(received.iterdir())
    finally:
        destination.terminate()
        destination.wait(30)


# --- the container's command line --------------------------------------------------------


def _dockerfile_command(instruction: str) -> list[str]:
    text = (REPO / "Dockerfile").read_text()
    match = re.search(rf"^{instruction}\s+(\[.*\])\s*$", text, re.MULTILINE)
    assert match, f"Dockerfile has no {instruction} in JSON form"
    return list(json.loads(match.group(1)))


def test_the_dockerfile_entrypoint_serves_a_ready_gateway(tmp_path: Path, tiny_model: Path) -> None:
    web_port = free_port()
    setup = gateway_config(
        tmp_path,
        model={"dir": str(tiny_model), "device": "cpu"},
        web={"host": "127.0.0.1", "port": web_port, "token": TOKEN},
    )
    entrypoint = _dockerfile_command("ENTRYPOINT")
    arguments = _dockerfile_command("CMD")
    assert entrypoint[0] == "radgate" and "--config" in arguments
    arguments[arguments.index("--config") + 1] = str(setup.path)
    radgate = shutil.which("radgate") or str(Path(sys.executable).with_name("radgate"))
    log = tmp_path / "entrypoint.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [radgate, *entrypoint[1:], *arguments],
            cwd=tmp_path,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=_environment(),
        )
    try:
        wait_for_port("127.0.0.1", web_port, 120, alive=lambda: process.poll() is None)
        status, text = _get(f"http://127.0.0.1:{web_port}/readyz", token=None)
        assert status == 200, text + log.read_text()
        healthcheck = _dockerfile_command("HEALTHCHECK.*CMD")
        healthcheck = [part.replace("8080", str(web_port)) for part in healthcheck]
        if healthcheck[0] == "python":
            healthcheck[0] = sys.executable
        assert subprocess.run(healthcheck, timeout=60, check=False).returncode == 0
    finally:
        process.terminate()
        assert process.wait(60) == 0, log.read_text()
