"""The configuration: the committed default, every validator, path resolution, lint."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config as config_module
from gateway.cli import main
from gateway.config import (
    Config,
    ConfigError,
    Destination,
    lint_routes,
    load_config,
    parse_config,
    tag_value_matches,
)

REPO = Path(__file__).resolve().parents[2]
PACS = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}
REVIEW = {"name": "review", "ae_title": "REVIEW", "host": "127.0.0.1", "port": 4243}


def write(folder: Path, text: str, name: str = "config.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return caught.value.problems


def only_problem(data: Any) -> str:
    found = problems(data)
    assert len(found) == 1, found
    return found[0]


def with_routes(*routes: dict[str, Any], destinations: Any = (PACS, REVIEW)) -> dict[str, Any]:
    return {"destinations": list(destinations), "routes": list(routes)}


# --- the committed default ----------------------------------------------------------------


def test_the_committed_config_loads_with_paths_under_its_folder() -> None:
    config = load_config(REPO / "config.yaml")
    assert (config.ae.title, config.ae.host, config.ae.port) == ("RADGATE", "127.0.0.1", 11112)
    assert config.storage.spool_dir == REPO / "var" / "spool"
    assert config.storage.database_url == f"sqlite:///{REPO / 'var' / 'radgate.db'}"
    assert config.model.dir == REPO / "models" / "chest-abd"
    assert config.gate.modalities == ["CR", "DX"]
    assert config.study.quiet_period_s == 2
    assert [d.name for d in config.destinations] == ["local-pacs"]
    assert all(set(r.forward_to) <= {"local-pacs"} for r in config.routes)
    assert lint_routes(config) == []


def test_the_committed_config_states_the_code_defaults() -> None:
    # config.yaml documents the defaults: the two must not drift apart.
    committed = load_config(REPO / "config.yaml")
    defaults = parse_config({}, base_dir=REPO)
    for section in ("ae", "storage", "model", "gate", "study", "outputs"):
        assert getattr(committed, section) == getattr(defaults, section), section
    assert committed.destinations[0].model_dump(exclude={"name", "ae_title", "host", "port"}) == (
        Destination(name="x", ae_title="X", host="h", port=1).model_dump(
            exclude={"name", "ae_title", "host", "port"}
        )
    )


def test_an_empty_file_means_all_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "# nothing set\n"))
    assert config.ae.port == 11112 and config.destinations == [] and config.routes == []


# --- values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("title", "why"),
    [
        ("ABCDEFGHIJKLMNOPQ", "17 characters"),
        ("", "0 characters"),
        ("   ", "0 characters"),
        ("A\\B", "backslash"),
        ("A\tB", "control"),
        ("RÖNTGEN", "non-ASCII"),
    ],
)
def test_invalid_ae_titles(title: str, why: str) -> None:
    message = only_problem({"ae": {"title": title}})
    assert message.startswith("ae.title: ")
    assert why in message and "expected 1 to 16" in message


def test_ae_title_spaces_are_stripped() -> None:
    assert parse_config({"ae": {"title": "  GATE "}}).ae.title == "GATE"


@pytest.mark.parametrize("port", [0, 65536, -1, "11112", True, 1.5])
def test_invalid_ports(port: Any) -> None:
    message = only_problem({"ae": {"port": port}})
    assert message.startswith("ae.port: ")
    assert f"(got {port!r})" in message


@pytest.mark.parametrize(
    ("data", "path", "expected"),
    [
        (
            {"ae": {"allowed_calling_aets": ["OK", "TOO-LONG-AE-TITLE-X"]}},
            "ae.allowed_calling_aets[1]",
            "1 to 16",
        ),
        ({"ae": {"allowed_calling_aets": ["A", "A"]}}, "ae.allowed_calling_aets", "duplicate"),
        ({"ae": {"max_pdu": -1}}, "ae.max_pdu", "greater than or equal to 0"),
        ({"ae": {"max_associations": 0}}, "ae.max_associations", "greater than or equal to 1"),
        ({"ae": {"network_timeout_s": 0}}, "ae.network_timeout_s", "greater than 0"),
        ({"ae": {"dimse_timeout_s": "slow"}}, "ae.dimse_timeout_s", "valid number"),
        ({"ae": {"host": "my host"}}, "ae.host", "host name or IP"),
        ({"ae": {"tls": {"cert_file": "c.pem"}}}, "ae.tls.key_file", "required key is missing"),
        (
            {"ae": {"tls": {"cert_file": "c.pem", "key_file": "k.pem"}}},
            "ae.tls",
            "require_client_cert is true but ca_file is not set",
        ),
        ({"ae": {"require_called_aet": "yes"}}, "ae.require_called_aet", "valid boolean"),
        (
            {"ae": {"allowed_peers": [{"ae_title": "CR1", "hosts": ["ct-room.lan"]}]}},
            "ae.allowed_peers[0].hosts[0]",
            "'ct-room.lan' is not an IP address or network",
        ),
        (
            {"ae": {"allowed_peers": [{"ae_title": "CR1", "hosts": []}]}},
            "ae.allowed_peers[0].hosts",
            "at least 1 item",
        ),
        (
            {
                "ae": {
                    "allowed_peers": [
                        {"ae_title": "CR1", "hosts": ["10.0.0.1"]},
                        {"ae_title": "CR1", "hosts": ["10.0.0.2"]},
                    ]
                }
            },
            "ae",
            "allowed_peers[1].ae_title: 'CR1' is already listed in allowed_peers[0]",
        ),
        (
            {
                "ae": {
                    "allowed_calling_aets": ["CR1"],
                    "allowed_peers": [{"ae_title": "CR1", "hosts": ["10.0.0.1"]}],
                }
            },
            "ae",
            "'CR1' is also in allowed_calling_aets",
        ),
        (
            {
                "destinations": [
                    {"name": "d", "ae_title": "D", "host": "h", "port": 1, "tls": {"key_file": "k"}}
                ]
            },
            "destinations[0].tls",
            "key_file is set but cert_file is not",
        ),
        ({"storage": {"database_url": "not a url"}}, "storage.database_url", "sqlite:///"),
        ({"storage": {"min_free_mb": -5}}, "storage.min_free_mb", "greater than or equal to 0"),
        ({"storage": {"busy_timeout_ms": 1.5}}, "storage.busy_timeout_ms", "valid integer"),
        ({"model": {"device": "tpu"}}, "model.device", "'auto', 'cpu' or 'cuda'"),
        ({"model": {"batch_size": 0}}, "model.batch_size", "greater than or equal to 1"),
        ({"model": {"threads": -1}}, "model.threads", "greater than or equal to 0"),
        ({"gate": {"modalities": []}}, "gate.modalities", "at least 1 item"),
        ({"gate": {"modalities": ["C-R"]}}, "gate.modalities[0]", "code string"),
        ({"gate": {"body_parts": ["CHEST", "chest"]}}, "gate.body_parts", "duplicate"),
        (
            {"gate": {"allow_missing_body_part": "yes"}},
            "gate.allow_missing_body_part",
            "valid boolean",
        ),
        ({"study": {"quiet_period_s": -1}}, "study.quiet_period_s", "greater than or equal to 0"),
        ({"outputs": {"gradcam": "on"}}, "outputs.gradcam", "valid boolean"),
        ({"ae": "RADGATE"}, "ae", "expected a mapping"),
    ],
)
def test_each_invalid_value_names_its_key_path(data: Any, path: str, expected: str) -> None:
    message = only_problem(data)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message


def test_code_strings_are_upper_cased() -> None:
    config = parse_config({"gate": {"modalities": ["cr", " dx"], "body_parts": ["chest"]}})
    assert config.gate.modalities == ["CR", "DX"] and config.gate.body_parts == ["CHEST"]


def test_a_timeout_shorter_than_the_quiet_period_is_refused() -> None:
    message = only_problem({"study": {"quiet_period_s": 60, "unreleased_timeout_s": 30}})
    assert "study.unreleased_timeout_s" in message and "study.quiet_period_s" in message


def test_unknown_keys_are_refused_by_name() -> None:
    found = problems({"ae": {"titel": "X"}, "extra_section": {}})
    assert found == [
        "ae.titel: unknown key; expected one of: title, host, port, allowed_calling_aets,"
        " allowed_peers, require_called_aet, max_pdu, max_associations, network_timeout_s,"
        " acse_timeout_s, dimse_timeout_s, tls",
        "extra_section: unknown key; expected one of: ae, storage, model, gate, study, outputs,"
        " destinations, routes, web",
    ]


def test_unknown_key_in_a_route_condition() -> None:
    message = only_problem(
        with_routes({"name": "r", "when": {"lable": "chest"}, "forward_to": ["pacs"]})
    )
    assert message.startswith("routes[0].when.lable: unknown key; expected one of: label,")
    assert message.endswith("(route 'r')")


def test_every_problem_is_reported_at_once() -> None:
    found = problems({"ae": {"port": 0, "title": ""}, "model": {"device": "gpu"}})
    assert [line.split(":")[0] for line in found] == ["ae.title", "ae.port", "model.device"]


# --- destinations and routes --------------------------------------------------------------


@pytest.mark.parametrize(
    ("destination", "path", "expected"),
    [
        ({"name": "pacs", "host": "h", "port": 1}, "destinations[0].ae_title", "required key"),
        ({**PACS, "port": 0}, "destinations[0].port", "greater than or equal to 1"),
        ({**PACS, "max_attempts": 0}, "destinations[0].max_attempts", "greater than or equal to 1"),
        ({**PACS, "backoff_s": []}, "destinations[0].backoff_s", "at least 1 item"),
        (
            {**PACS, "backoff_s": [5, -1]},
            "destinations[0].backoff_s[1]",
            "greater than or equal to 0",
        ),
        ({**PACS, "timeout_s": 0}, "destinations[0].timeout_s", "greater than 0"),
        ({**PACS, "name": "my pacs"}, "destinations[0].name", "letters, digits"),
        ({**PACS, "ae_title": "A" * 17}, "destinations[0].ae_title", "17 characters"),
        ({**PACS, "retries": 3}, "destinations[0].retries", "unknown key"),
    ],
)
def test_invalid_destinations(destination: dict[str, Any], path: str, expected: str) -> None:
    message = only_problem({"destinations": [destination]})
    assert message.startswith(f"{path}: ") and expected in message, message


def test_destination_defaults_follow_the_routing_issue() -> None:
    destination = parse_config({"destinations": [PACS]}).destinations[0]
    assert destination.max_attempts == 8
    assert destination.backoff_s == [5, 30, 120, 600]
    assert destination.timeout_s == 30
    assert [destination.backoff_for(n) for n in (1, 2, 4, 5, 9)] == [5, 30, 600, 600, 600]


def test_duplicate_destination_and_route_names() -> None:
    found = problems(
        {
            "destinations": [PACS, {**REVIEW, "name": "pacs"}],
            "routes": [
                {"name": "r", "when": {}, "forward_to": ["pacs"]},
                {"name": "r", "when": {}, "forward_to": ["pacs"]},
            ],
        }
    )
    assert found == [
        "destinations[1].name: 'pacs' is already used by destinations[0]; expected unique names",
        "routes[1].name: 'r' is already used by routes[0]; expected unique names",
    ]


def test_a_route_to_an_unknown_destination_is_refused_at_load_time() -> None:
    message = only_problem(
        with_routes({"name": "chest", "when": {}, "forward_to": ["pacs", "archive"]})
    )
    assert message.startswith("routes[0].forward_to: ")
    assert "route 'chest'" in message and "unknown destination 'archive'" in message
    assert "pacs, review" in message


@pytest.mark.parametrize(
    ("route", "path", "expected"),
    [
        (
            {"when": {"label": "chest", "otherwise": True}},
            "routes[0].when",
            "otherwise cannot be combined",
        ),
        (
            {"when": {"min_probability": 1.5}},
            "routes[0].when.min_probability",
            "less than or equal to 1",
        ),
        (
            {"when": {"max_probability": -0.1}},
            "routes[0].when.max_probability",
            "greater than or equal to 0",
        ),
        ({"when": {"gate": "failed"}}, "routes[0].when.gate", "'passed' or 'rejected'"),
        (
            {"when": {"body_part_mismatch": "maybe"}},
            "routes[0].when.body_part_mismatch",
            "valid boolean",
        ),
        ({"when": {"modality": []}}, "routes[0].when.modality", "at least 1 item"),
        ({"when": {"calling_aet": ["A" * 20]}}, "routes[0].when.calling_aet[0]", "20 characters"),
        (
            {"when": {"tags": {"BodyPart": "CHEST"}}},
            "routes[0].when.tags",
            "did you mean BodyPartExamined",
        ),
        (
            {"when": {"tags": {"StationName": "/[unclosed/"}}},
            "routes[0].when.tags",
            "does not compile",
        ),
        ({"when": {}, "forward_to": []}, "routes[0].forward_to", "at least 1 item"),
        ({"when": {}, "forward_to": ["pacs", "pacs"]}, "routes[0].forward_to", "duplicate"),
        (
            {"when": {}, "send": ["gradcam", "pixels"]},
            "routes[0].send[1]",
            "'originals', 'gradcam' or 'report'",
        ),
        ({"when": {}, "send": []}, "routes[0].send", "at least 1 item"),
        ({}, "routes[0].when", "required key"),
    ],
)
def test_invalid_routes(route: dict[str, Any], path: str, expected: str) -> None:
    message = only_problem(with_routes({"name": "r", "forward_to": ["pacs"], **route}))
    assert message.startswith(f"{path}: ") and expected in message, message


def test_the_example_routes_of_the_routing_issue_load() -> None:
    quarantine = {"name": "quarantine", "ae_title": "QUAR", "host": "127.0.0.1", "port": 4244}
    config = parse_config(
        with_routes(
            {
                "name": "chest",
                "when": {"label": "chest", "min_probability": 0.9},
                "forward_to": ["pacs"],
                "send": ["originals", "gradcam", "report"],
            },
            {"name": "review", "when": {"max_probability": 0.9}, "forward_to": ["review"]},
            {"name": "mislabelled", "when": {"body_part_mismatch": True}, "forward_to": ["review"]},
            {"name": "rejected", "when": {"gate": "rejected"}, "forward_to": ["quarantine"]},
            {
                "name": "by-station",
                "when": {
                    "tags": {"StationName": "/^XR[0-9]+$/", "SeriesNumber": 1},
                    "modality": ["dx"],
                    "calling_aet": ["MODALITY"],
                },
                "forward_to": ["pacs"],
            },
            {"name": "fallback", "when": {"otherwise": True}, "forward_to": ["pacs"]},
            destinations=[PACS, REVIEW, quarantine],
        )
    )
    chest, review, _, _, station, fallback = config.routes
    assert chest.when.label == "chest" and chest.when.min_probability == 0.9
    assert review.send == ["originals", "gradcam", "report"]  # the default
    assert station.when.tags == {"StationName": "/^XR[0-9]+$/", "SeriesNumber": "1"}
    assert station.when.modality == ["DX"]
    assert fallback.when.otherwise and fallback.when.conditions() == []
    assert lint_routes(config) == []


def test_tag_value_semantics() -> None:
    assert tag_value_matches("CHEST", "CHEST")
    assert not tag_value_matches("CHEST", "CHEST PA")
    assert tag_value_matches("/^XR[0-9]+$/", "XR12")
    assert not tag_value_matches("/^XR[0-9]+$/", "XR12A")
    assert tag_value_matches("/PA/", "CHEST PA")  # searched anywhere
    assert not tag_value_matches("/.*/", None)  # a missing element never matches


# --- files ----------------------------------------------------------------------------


def test_python_object_tags_are_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        ae:
          title: RADGATE
        storage: !!python/object/apply:os.system ["touch pwned"]
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message and "line 3" in message
    assert "!!python/object" in message
    assert not (tmp_path / "pwned").exists()


def test_a_repeated_key_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "ae:\n  port: 104\n  title: A\n  port: 11112\n")
    with pytest.raises(ConfigError, match=r"line 4.*'port' given twice \(first on line 2\)"):
        load_config(path)


def test_yaml_syntax_errors_name_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "ae:\n  title: RADGATE\n  port: [11112\n")
    with pytest.raises(ConfigError, match=r"line \d+, column \d+: not valid YAML"):
        load_config(path)


def test_a_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holds a list; expected a mapping"):
        load_config(write(tmp_path, "- ae\n- storage\n"))


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.yaml")


def test_the_error_points_to_the_key_reference() -> None:
    with pytest.raises(ConfigError, match="docs/CONFIG.md"):
        parse_config({"ae": {"port": 0}})
    assert (REPO / "docs" / "CONFIG.md").is_file()


def test_relative_paths_are_resolved_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc" / "radgate"
    folder.mkdir(parents=True)
    path = write(
        folder,
        """\
        ae:
          tls: {cert_file: tls/cert.pem, key_file: /secure/key.pem, ca_file: ../ca.pem}
        storage:
          spool_dir: spool
          database_url: sqlite:///state/radgate.db
        model:
          dir: ../models/chest-abd
        """,
    )
    monkeypatch.chdir(tmp_path)  # somewhere else: the config's folder counts, not this
    config = load_config(path)
    assert config.storage.spool_dir == folder / "spool"
    assert config.storage.database_url == f"sqlite:///{folder / 'state' / 'radgate.db'}"
    assert config.model.dir == tmp_path / "etc" / "models" / "chest-abd"
    assert config.ae.tls is not None
    assert config.ae.tls.cert_file == folder / "tls" / "cert.pem"
    assert config.ae.tls.key_file == Path("/secure/key.pem")
    assert config.ae.tls.ca_file == tmp_path / "etc" / "ca.pem"


def test_destination_tls_paths_are_taken_from_the_config_folder(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        destinations:
          - name: archive
            ae_title: ARCHIVE
            host: 10.0.0.7
            port: 2762
            tls: {ca_file: tls/ca.pem, cert_file: /secure/radgate.pem, key_file: tls/radgate.key}
        routes:
          - {name: all, when: {}, forward_to: [archive]}
        """,
    )
    tls = load_config(path).destinations[0].tls
    assert tls is not None
    assert tls.ca_file == tmp_path / "tls" / "ca.pem"
    assert tls.cert_file == Path("/secure/radgate.pem")
    assert tls.key_file == tmp_path / "tls" / "radgate.key"
    assert tls.server_name is None


def test_allowed_peers_normalise_addresses_and_count_as_allowed_callers() -> None:
    config = parse_config(
        {
            "ae": {
                "allowed_calling_aets": ["DX1"],
                "allowed_peers": [{"ae_title": " CR1 ", "hosts": ["10.1.2.77/24", " fd00::1 "]}],
                "tls": {"cert_file": "c.pem", "key_file": "k.pem", "require_client_cert": False},
            }
        }
    )
    assert config.ae.allowed_peers[0].ae_title == "CR1"
    assert config.ae.allowed_peers[0].hosts == ["10.1.2.0/24", "fd00::1/128"]
    assert config.ae.allowed_callers() == ["DX1", "CR1"]


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:////var/lib/radgate.db",
        "postgresql://gw:s%40cret@db/radgate",
    ],
)
def test_other_database_urls_are_kept_as_given(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, f"storage: {{database_url: '{url}'}}\n")
    assert load_config(path).storage.database_url == url


def test_the_config_is_read_only() -> None:
    config = parse_config({})
    with pytest.raises(ValueError, match="frozen"):
        config.ae.port = 104  # type: ignore[misc]


# --- lint -------------------------------------------------------------------------------


def lint(*routes: dict[str, Any], **sections: Any) -> list[str]:
    return lint_routes(parse_config({**with_routes(*routes), **sections}))


def test_lint_probability_range_that_cannot_match() -> None:
    (warning,) = lint(
        {
            "name": "odd",
            "when": {"min_probability": 0.9, "max_probability": 0.5},
            "forward_to": ["pacs", "review"],
        }
    )
    assert warning.startswith(
        "routes[0] (odd): never matches: min_probability 0.9 > max_probability 0.5"
    )


def test_lint_unknown_label() -> None:
    (warning,) = lint({"name": "knee", "when": {"label": "knee"}, "forward_to": ["pacs", "review"]})
    assert "label 'knee'" in warning and "abd, chest" in warning


def test_lint_modality_the_gate_never_passes() -> None:
    (warning,) = lint(
        {
            "name": "ct",
            "when": {"modality": ["CT"], "gate": "passed"},
            "forward_to": ["pacs", "review"],
        }
    )
    assert "modality CT never passes the gate" in warning
    # Rejected CT studies can match: no warning.
    assert (
        lint(
            {
                "name": "ct",
                "when": {"modality": ["CT"], "gate": "rejected"},
                "forward_to": ["pacs", "review"],
            }
        )
        == []
    )


def test_lint_calling_aet_that_is_refused() -> None:
    warnings = lint(
        {"name": "ward", "when": {"calling_aet": ["WARD"]}, "forward_to": ["pacs", "review"]},
        ae={"allowed_calling_aets": ["CR1"]},
    )
    assert (
        len(warnings) == 1 and "calling_aet WARD is not in ae.allowed_calling_aets" in warnings[0]
    )
    # A title allowed from some addresses only can still call.
    assert (
        lint(
            {"name": "ward", "when": {"calling_aet": ["WARD"]}, "forward_to": ["pacs", "review"]},
            ae={
                "allowed_calling_aets": ["CR1"],
                "allowed_peers": [{"ae_title": "WARD", "hosts": ["10.0.0.0/8"]}],
            },
        )
        == []
    )


def test_lint_otherwise_routes() -> None:
    warnings = lint(
        {"name": "fallback", "when": {"otherwise": True}, "forward_to": ["pacs"]},
        {"name": "second-fallback", "when": {"otherwise": True}, "forward_to": ["review"]},
        {"name": "all", "when": {}, "forward_to": ["pacs"]},
    )
    assert any("routes[0] (fallback): routes after an otherwise route" in w for w in warnings)
    assert any("more than one otherwise route (fallback, second-fallback)" in w for w in warnings)
    assert any("never applies: route all (when: {}) matches every study" in w for w in warnings)


def test_lint_outputs_that_are_off_and_unused_destinations() -> None:
    warnings = lint(
        {"name": "r", "when": {}, "forward_to": ["pacs"], "send": ["gradcam", "report"]},
        outputs={"gradcam": False, "structured_report": False},
    )
    assert warnings == [
        "routes[0] (r): sends gradcam but outputs.gradcam is off",
        "routes[0] (r): sends report but outputs.structured_report is off",
        "destination 'review' is not used by any route",
    ]


# --- the command --------------------------------------------------------------------------


def test_check_config_prints_ok_and_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = with_routes({"name": "odd", "when": {"label": "knee"}, "forward_to": ["pacs", "review"]})
    path = write(tmp_path, yaml.safe_dump(data))
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("OK: AE RADGATE on 127.0.0.1:11112;")
    assert "2 destination(s) (pacs, review); 1 route(s) (odd)" in out[0]
    assert out[1].startswith("warning: routes[0] (odd): never matches: label 'knee'")


def test_check_config_reports_errors_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "ae: {port: 0}\nroutes: [{name: r, when: {}, forward_to: [nowhere]}]\n")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "docs/CONFIG.md" in err and "ae.port: " in err


def test_command_raises_config_error_for_the_cli_to_print(tmp_path: Path) -> None:
    path = write(tmp_path, "model: {device: gpu}\n")
    with pytest.raises(ConfigError, match="model.device"):
        config_module.command(argparse.Namespace(config=path))


def test_config_objects_compare_by_value() -> None:
    assert parse_config({}) == Config()
