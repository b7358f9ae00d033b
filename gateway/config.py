"""The configuration: typed models of `config.yaml` and `radgate check-config`.

Load it once in `main` with `load_config` and pass the `Config` down. Every
problem is reported at once, one line each, naming the key path (``ae.port``,
``routes[2].when.tags``) and what was expected; docs/CONFIG.md describes every key.
Relative paths are resolved against the folder of the configuration file.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import re
import types
import typing
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydicom.datadict import keyword_dict, tag_for_keyword
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from inference.errors import RadgateError

CONFIG_REFERENCE = "docs/CONFIG.md"
# The classes the chest/abdomen model predicts; route labels are checked against them.
MODEL_LABELS = ("abd", "chest")
SendKind = Literal["originals", "gradcam", "report"]
SEND_KINDS: tuple[SendKind, ...] = ("originals", "gradcam", "report")
# The dashboard token may come from the environment instead of the file (it wins).
WEB_TOKEN_VARIABLE = "RADGATE_WEB_TOKEN"
MIN_TOKEN_LENGTH = 16


class ConfigError(RadgateError):
    """A configuration that cannot be used; `problems` holds one line per problem."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        count = len(self.problems)
        header = (
            f"{source}: {count} problem{'s' if count != 1 else ''}"
            f" (the keys are described in {CONFIG_REFERENCE})"
        )
        super().__init__("\n".join([header, *(f"  {problem}" for problem in self.problems)]))


# --- value types -------------------------------------------------------------------------


def _ae_title(value: str) -> str:
    # DICOM AE: default character repertoire without backslash or control characters,
    # leading and trailing spaces not significant, at most 16 characters.
    title = value.strip(" ")
    if not 1 <= len(title) <= 16:
        problem = f"has {len(title)} characters"
    elif "\\" in title:
        problem = "contains a backslash"
    elif any(not 0x20 <= ord(c) < 0x7F for c in title):
        problem = "contains a control or non-ASCII character"
    else:
        return title
    raise ValueError(
        f"AE title {value!r} {problem}; expected 1 to 16 printable ASCII characters, no backslash"
    )


def _code_string(value: str) -> str:
    # DICOM CS: upper-case letters, digits, space and underscore, at most 16 characters.
    code = value.strip().upper()
    if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", code):
        raise ValueError(
            f"{value!r} is not a DICOM code string; expected 1 to 16 letters, digits,"
            " spaces or underscores (e.g. CR, CHEST)"
        )
    return code


def _name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
        raise ValueError(
            f"name {value!r} is not valid; expected 1 to 64 letters, digits, '_', '.', '-',"
            " starting with a letter or digit"
        )
    return value


def _host(value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"host {value!r} is not valid; expected a host name or IP address")
    return value


def _unique(values: list[Any]) -> list[Any]:
    duplicates = sorted({str(v) for v in values if values.count(v) > 1})
    if duplicates:
        raise ValueError(f"duplicate entries {', '.join(duplicates)}; expected each once")
    return values


def _scalar_text(value: Any) -> Any:
    # Tag values compare as text; YAML reads `SeriesNumber: 1` as an integer.
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return str(value)
    return value


AETitle = Annotated[str, AfterValidator(_ae_title)]
CodeString = Annotated[str, AfterValidator(_code_string)]
Name = Annotated[str, AfterValidator(_name)]
Host = Annotated[str, AfterValidator(_host)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
Seconds = Annotated[StrictFloat, Field(gt=0)]
Probability = Annotated[StrictFloat, Field(ge=0, le=1)]
TagValue = Annotated[str, BeforeValidator(_scalar_text)]


def is_regex(value: str) -> bool:
    """Whether a route tag value is a `/regex/` rather than an exact value."""
    return len(value) >= 2 and value.startswith("/") and value.endswith("/")


def tag_value_matches(expected: str, actual: str | None) -> bool:
    """Route tag semantics: `/regex/` is searched anywhere in the value (anchor with ^ $);
    any other value must equal the element's text exactly. A missing element never matches.
    """
    if actual is None:
        return False
    if is_regex(expected):
        return re.search(expected[1:-1], actual) is not None
    return actual == expected


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- sections ----------------------------------------------------------------------------


def _network(value: str) -> str:
    # An address or a CIDR network; host names are refused: what a name resolves to
    # changes, and a check on it would be only as trustworthy as the DNS.
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IP address or network; expected e.g. 10.1.2.3,"
            " 10.1.2.0/24 or fd00::/64 (host names are not accepted)"
        ) from None


Network = Annotated[str, AfterValidator(_network)]


class TLSConfig(_Section):
    cert_file: Path
    key_file: Path
    # CA bundle to verify calling peers' certificates.
    ca_file: Path | None = None
    # Callers must present a certificate `ca_file` signed; false: a certificate is
    # checked when presented, and a caller without one is let in.
    require_client_cert: StrictBool = True

    @model_validator(mode="after")
    def _ca_for_clients(self) -> TLSConfig:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError(
                "require_client_cert is true but ca_file is not set; expected"
                " the CA bundle that signed the callers' certificates, or"
                " require_client_cert: false"
            )
        return self


class AllowedPeer(_Section):
    """A calling AE title and the addresses it may call from."""

    ae_title: AETitle
    hosts: Annotated[list[Network], Field(min_length=1), AfterValidator(_unique)]


class DestinationTLS(_Section):
    # CA bundle that signed the destination's certificate; default: the system's CAs.
    ca_file: Path | None = None
    # radgate's own certificate and key, for destinations that require one.
    cert_file: Path | None = None
    key_file: Path | None = None
    # The name (or IP address) the destination's certificate must carry; default: host.
    server_name: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> DestinationTLS:
        if (self.cert_file is None) != (self.key_file is None):
            given, missing = (
                ("cert_file", "key_file") if self.key_file is None else ("key_file", "cert_file")
            )
            raise ValueError(
                f"{given} is set but {missing} is not; expected both (a client"
                " certificate and its key) or neither"
            )
        return self


class AEConfig(_Section):
    title: AETitle = "RADGATE"
    host: Host = "127.0.0.1"
    port: Port = 11112
    # Empty (and no allowed_peers): any calling AE title may associate.
    allowed_calling_aets: Annotated[list[AETitle], AfterValidator(_unique)] = []
    # Calling AE titles allowed only from the listed addresses.
    allowed_peers: list[AllowedPeer] = []
    # Refuse associations whose called AE title is not `title`.
    require_called_aet: StrictBool = False
    # Maximum PDU size we receive; 0 means unlimited.
    max_pdu: Annotated[StrictInt, Field(ge=0)] = 0
    max_associations: Annotated[StrictInt, Field(ge=1)] = 10
    network_timeout_s: Seconds = 30
    acse_timeout_s: Seconds = 30
    dimse_timeout_s: Seconds = 60
    tls: TLSConfig | None = None

    @model_validator(mode="after")
    def _peers(self) -> AEConfig:
        problems = []
        titles = [peer.ae_title for peer in self.allowed_peers]
        for index, title in enumerate(titles):
            if title in titles[:index]:
                problems.append(
                    f"allowed_peers[{index}].ae_title: {title!r} is already listed in"
                    f" allowed_peers[{titles.index(title)}]; expected each AE title once"
                    " (list all its hosts together)"
                )
            elif title in self.allowed_calling_aets:
                problems.append(
                    f"allowed_peers[{index}].ae_title: {title!r} is also in"
                    " allowed_calling_aets, which allows it from any address; expected it"
                    " in one of the two"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def allowed_callers(self) -> list[str]:
        """Every calling AE title allowed; empty when any may call."""
        return [*self.allowed_calling_aets, *(peer.ae_title for peer in self.allowed_peers)]


class StorageConfig(_Section):
    spool_dir: Path = Path("var/spool")
    database_url: str = "sqlite:///var/radgate.db"
    # Below this much free space in the spool, C-STOREs get "out of resources".
    min_free_mb: Annotated[StrictInt, Field(ge=0)] = 100
    busy_timeout_ms: Annotated[StrictInt, Field(ge=0)] = 5000

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        try:
            make_url(value)
        except (ArgumentError, ValueError) as error:
            raise ValueError(
                f"{value!r} is not a database URL ({error}); expected e.g."
                " sqlite:///var/radgate.db or postgresql://user@host/radgate"
            ) from None
        return value


class ModelConfig(_Section):
    dir: Path = Path("models/chest-abd")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: Annotated[StrictInt, Field(ge=1, le=1024)] = 16
    # CPU threads for inference; 0 leaves PyTorch's default.
    threads: Annotated[StrictInt, Field(ge=0)] = 0


class GateConfig(_Section):
    modalities: Annotated[list[CodeString], Field(min_length=1), AfterValidator(_unique)] = [
        "CR",
        "DX",
    ]
    body_parts: Annotated[list[CodeString], AfterValidator(_unique)] = ["CHEST", "ABDOMEN"]
    allow_missing_body_part: StrictBool = True


class StudyConfig(_Section):
    # Seconds without a new instance, after a normal release, before a study is processed.
    quiet_period_s: Annotated[StrictFloat, Field(ge=0)] = 2
    # A study whose sender never released normally is processed after this long anyway.
    unreleased_timeout_s: Seconds = 300

    @model_validator(mode="after")
    def _timeouts(self) -> StudyConfig:
        if self.unreleased_timeout_s < self.quiet_period_s:
            raise ValueError(
                f"study.unreleased_timeout_s ({self.unreleased_timeout_s:g}) is shorter than"
                f" study.quiet_period_s ({self.quiet_period_s:g}); expected at least as long"
            )
        return self


class OutputsConfig(_Section):
    gradcam: StrictBool = True
    tag_originals: StrictBool = True
    structured_report: StrictBool = True


class Destination(_Section):
    name: Name
    ae_title: AETitle
    host: Host
    port: Port
    max_attempts: Annotated[StrictInt, Field(ge=1)] = 8
    # Wait before retry n is backoff_s[n-1]; the last value repeats.
    backoff_s: Annotated[list[Annotated[StrictFloat, Field(ge=0)]], Field(min_length=1)] = [
        5,
        30,
        120,
        600,
    ]
    timeout_s: Seconds = 30
    # DICOM over TLS to this destination.
    tls: DestinationTLS | None = None

    def backoff_for(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        return self.backoff_s[min(max(attempt, 1), len(self.backoff_s)) - 1]


class RouteWhen(_Section):
    """Conditions of a route; all given must hold. `{}` matches every study."""

    label: str | None = None
    min_probability: Probability | None = None
    max_probability: Probability | None = None
    gate: Literal["passed", "rejected"] | None = None
    body_part_mismatch: StrictBool | None = None
    modality: Annotated[list[CodeString], Field(min_length=1)] | None = None
    calling_aet: Annotated[list[AETitle], Field(min_length=1)] | None = None
    tags: dict[str, TagValue] | None = None
    otherwise: StrictBool = False

    @field_validator("label")
    @classmethod
    def _label(cls, value: str | None) -> str | None:
        if value is None:
            return None
        label = value.strip().lower()
        if not label:
            raise ValueError("empty label; expected a class name such as chest or abd")
        return label

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: dict[str, str] | None) -> dict[str, str] | None:
        if tags is None:
            return None
        problems = []
        for keyword, value in tags.items():
            if tag_for_keyword(keyword) is None:
                close = difflib.get_close_matches(keyword, keyword_dict.keys(), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                problems.append(
                    f"{keyword!r} is not a DICOM keyword{hint}; expected e.g. BodyPartExamined"
                )
            elif is_regex(value):
                try:
                    re.compile(value[1:-1])
                except re.error as error:
                    problems.append(f"{keyword}: regex {value} does not compile ({error})")
        if problems:
            raise ValueError("; ".join(problems))
        return tags

    def conditions(self) -> list[str]:
        """Names of the conditions given, `otherwise` excluded."""
        return [
            name
            for name in type(self).model_fields
            if name != "otherwise" and getattr(self, name) is not None
        ]

    @model_validator(mode="after")
    def _otherwise_alone(self) -> RouteWhen:
        if self.otherwise and self.conditions():
            raise ValueError(
                "otherwise cannot be combined with other conditions"
                f" (got {', '.join(self.conditions())}); expected {{otherwise: true}} alone"
            )
        return self


class Route(_Section):
    name: Name
    when: RouteWhen
    forward_to: Annotated[list[Name], Field(min_length=1), AfterValidator(_unique)]
    send: Annotated[
        list[SendKind],
        Field(min_length=1),
        AfterValidator(_unique),
    ] = list(SEND_KINDS)


class WebConfig(_Section):
    host: Host = "127.0.0.1"
    port: Port = 8080
    # Better given in the environment (WEB_TOKEN_VARIABLE) than written here.
    token: str | None = None
    # Predictions below this top-class probability count as low confidence.
    low_confidence_below: Probability = 0.9
    page_size: Annotated[StrictInt, Field(ge=1, le=500)] = 25

    @field_validator("token")
    @classmethod
    def _token(cls, value: str | None) -> str | None:
        if value is not None and len(value.strip()) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"a token of {len(value.strip())} characters is too easy to guess; expected at"
                f" least {MIN_TOKEN_LENGTH} (e.g. the output of `openssl rand -hex 16`)"
            )
        return value.strip() if value is not None else None


class Config(_Section):
    ae: AEConfig = AEConfig()
    storage: StorageConfig = StorageConfig()
    model: ModelConfig = ModelConfig()
    gate: GateConfig = GateConfig()
    study: StudyConfig = StudyConfig()
    outputs: OutputsConfig = OutputsConfig()
    destinations: list[Destination] = []
    routes: list[Route] = []
    # The audit dashboard; absent: `radgate serve` runs without it.
    web: WebConfig | None = None

    @model_validator(mode="after")
    def _references(self) -> Config:
        problems = []
        problems += _duplicate_names("destinations", [d.name for d in self.destinations])
        problems += _duplicate_names("routes", [r.name for r in self.routes])
        known = {d.name for d in self.destinations}
        for index, route in enumerate(self.routes):
            for name in route.forward_to:
                if name not in known:
                    expected = ", ".join(sorted(known)) or "none defined"
                    problems.append(
                        f"routes[{index}].forward_to: route {route.name!r} names unknown"
                        f" destination {name!r}; expected one of the destinations ({expected})"
                    )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def destination(self, name: str) -> Destination:
        for destination in self.destinations:
            if destination.name == name:
                return destination
        raise KeyError(name)


def _duplicate_names(section: str, names: list[str]) -> list[str]:
    problems = []
    for index, name in enumerate(names):
        if name in names[:index]:
            problems.append(
                f"{section}[{index}].name: {name!r} is already used by {section}"
                f"[{names.index(name)}]; expected unique names"
            )
    return problems


# --- loading -----------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader (no Python object tags) that also refuses repeated keys,
    which plain YAML loading silently resolves to the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first_line = seen.get(key)
            except TypeError:
                continue
            if first_line is not None:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"key {key!r} given twice (first on line {first_line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error)
    if "constructor for the tag" in problem:
        problem += " (only plain YAML is accepted: tags such as !!python/object are refused)"
    return f"{where}not valid YAML: {problem}"


def load_config(path: Path) -> Config:
    """Read, validate and resolve a configuration file; raises ConfigError listing every problem."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(source, [f"cannot read the file: {error}"]) from None
    try:
        # A SafeLoader: no Python object construction.
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as error:
        raise ConfigError(source, [_yaml_problem(error)]) from None
    return parse_config(data, base_dir=path.resolve().parent, source=source)


def parse_config(data: Any, base_dir: Path | None = None, source: str = "configuration") -> Config:
    """Validate already-parsed YAML; with `base_dir`, resolve relative paths against it."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            source, [f"the file holds a {type(data).__name__}; expected a mapping of sections"]
        )
    try:
        config = Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(source, _format_errors(error, data)) from None
    return resolve_paths(config, base_dir) if base_dir is not None else config


def resolve_paths(config: Config, base_dir: Path) -> Config:
    """A copy of `config` whose relative paths (spool, SQLite file, model, TLS files)
    are absolute, taken relative to `base_dir`."""

    def absolute(path: Path) -> Path:
        path = path.expanduser()
        return path if path.is_absolute() else (base_dir / path).resolve()

    tls = config.ae.tls
    if tls is not None:
        tls = tls.model_copy(
            update={
                "cert_file": absolute(tls.cert_file),
                "key_file": absolute(tls.key_file),
                "ca_file": absolute(tls.ca_file) if tls.ca_file is not None else None,
            }
        )
    destinations = []
    for destination in config.destinations:
        if destination.tls is not None:
            files = ("ca_file", "cert_file", "key_file")
            resolved = {
                name: absolute(getattr(destination.tls, name))
                for name in files
                if getattr(destination.tls, name) is not None
            }
            destination = destination.model_copy(
                update={"tls": destination.tls.model_copy(update=resolved)}
            )
        destinations.append(destination)
    return config.model_copy(
        update={
            "ae": config.ae.model_copy(update={"tls": tls}),
            "destinations": destinations,
            "storage": config.storage.model_copy(
                update={
                    "spool_dir": absolute(config.storage.spool_dir),
                    "database_url": _resolve_sqlite_url(config.storage.database_url, absolute),
                }
            ),
            "model": config.model.model_copy(update={"dir": absolute(config.model.dir)}),
        }
    )


def _resolve_sqlite_url(url: str, absolute: typing.Callable[[Path], Path]) -> str:
    parsed = make_url(url)
    database = parsed.database
    if (
        parsed.get_backend_name() != "sqlite"
        or not database
        or database == ":memory:"
        or database.startswith("file:")
        or parsed.query.get("uri")
    ):
        return url
    return parsed.set(database=str(absolute(Path(database)))).render_as_string(hide_password=False)


# --- error messages ----------------------------------------------------------------------


def _key_path(loc: Iterable[int | str]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path


def _model_at(loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The model class found at `loc` below Config, to list the keys it accepts."""
    annotation: Any = Config
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(part, int):
            args = typing.get_args(annotation)
            if typing.get_origin(annotation) is not list or not args:
                return None
            annotation = args[0]
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part)
            if field is None:
                return None
            annotation = field.annotation
        else:
            return None
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _unwrap(annotation: Any) -> Any:
    # Annotated[X, ...] -> X; X | None -> X.
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            options = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(options) != 1:
                return annotation
            annotation = options[0]
        else:
            return annotation


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _entry_name(data: dict[str, Any], loc: Sequence[int | str]) -> str:
    """The suffix naming the route or destination an error is in, e.g. " (route 'chest')"."""
    if len(loc) < 2 or loc[0] not in ("routes", "destinations") or not isinstance(loc[1], int):
        return ""
    entries = data.get(str(loc[0]))
    if not isinstance(entries, list) or not 0 <= loc[1] < len(entries):
        return ""
    entry = entries[loc[1]]
    name = entry.get("name") if isinstance(entry, dict) else None
    if not isinstance(name, str) or len(loc) == 2 or loc[2] == "name":
        return ""
    return f" ({'route' if loc[0] == 'routes' else 'destination'} {name!r})"


def _format_errors(error: ValidationError, data: dict[str, Any]) -> list[str]:
    lines = []
    for item in error.errors(include_url=False):
        loc = item["loc"]
        path = _key_path(loc)
        kind = item["type"]
        message = item["msg"]
        if kind == "value_error":
            message = message.removeprefix("Value error, ")
        if kind == "extra_forbidden":
            model = _model_at(loc[:-1])
            keys = ", ".join(model.model_fields) if model is not None else ""
            message = f"unknown key; expected one of: {keys}" if keys else "unknown key"
        elif kind == "missing":
            message = "required key is missing"
        elif kind in ("model_type", "dict_type"):
            message = f"expected a mapping of keys, got {_shown(item.get('input'))}"
        elif kind != "value_error" and "input" in item:
            message += f" (got {_shown(item['input'])})"
        if not path:
            # Cross-section checks name their own key paths, one per line.
            lines.extend(message.splitlines())
        else:
            lines.append(f"{path}: {message}{_entry_name(data, loc)}")
    return lines


# --- lint --------------------------------------------------------------------------------


def lint_routes(config: Config, labels: Collection[str] = MODEL_LABELS) -> list[str]:
    """Warnings about routes that can never match or do less than they seem to."""
    warnings = []
    known_labels = {label.lower() for label in labels}
    gate_modalities = set(config.gate.modalities)
    allowed_callers = set(config.ae.allowed_callers())
    otherwise_routes = [r.name for r in config.routes if r.when.otherwise]
    catch_all = [r.name for r in config.routes if not r.when.otherwise and not r.when.conditions()]

    for index, route in enumerate(config.routes):
        where = f"routes[{index}] ({route.name})"
        when = route.when
        needs_prediction = (
            when.label is not None
            or when.min_probability is not None
            or when.max_probability is not None
            or when.body_part_mismatch is not None
        )
        if (
            when.min_probability is not None
            and when.max_probability is not None
            and when.min_probability > when.max_probability
        ):
            warnings.append(
                f"{where}: never matches: min_probability {when.min_probability:g}"
                f" > max_probability {when.max_probability:g}"
            )
        if when.label is not None and when.label not in known_labels:
            warnings.append(
                f"{where}: never matches: label {when.label!r} is not one the model predicts"
                f" ({', '.join(sorted(known_labels))})"
            )
        if when.modality is not None and (when.gate == "passed" or needs_prediction):
            passable = [m for m in when.modality if m in gate_modalities]
            if not passable:
                warnings.append(
                    f"{where}: never matches: modality {', '.join(when.modality)} never passes"
                    f" the gate (gate.modalities: {', '.join(config.gate.modalities)})"
                )
        if when.gate == "rejected" and needs_prediction:
            warnings.append(
                f"{where}: may never match: gate: rejected combined with prediction conditions,"
                " and rejected images are not classified"
            )
        if when.calling_aet is not None and allowed_callers:
            reachable = [aet for aet in when.calling_aet if aet in allowed_callers]
            if not reachable:
                warnings.append(
                    f"{where}: never matches: calling_aet {', '.join(when.calling_aet)} is not"
                    " in ae.allowed_calling_aets or ae.allowed_peers, so those callers are"
                    " refused"
                )
        if "gradcam" in route.send and not config.outputs.gradcam:
            warnings.append(f"{where}: sends gradcam but outputs.gradcam is off")
        if "report" in route.send and not config.outputs.structured_report:
            warnings.append(f"{where}: sends report but outputs.structured_report is off")
        if when.otherwise and index < len(config.routes) - 1:
            later = ", ".join(r.name for r in config.routes[index + 1 :])
            warnings.append(
                f"{where}: routes after an otherwise route ({later}): every route is evaluated"
                " and otherwise applies only when no other matched; put it last"
            )

    if len(otherwise_routes) > 1:
        warnings.append(
            f"more than one otherwise route ({', '.join(otherwise_routes)}): they all apply"
            " together; one is enough"
        )
    if otherwise_routes and catch_all:
        warnings.append(
            f"otherwise route {', '.join(otherwise_routes)} never applies: route"
            f" {', '.join(catch_all)} (when: {{}}) matches every study"
        )
    used = {name for route in config.routes for name in route.forward_to}
    for destination in config.destinations:
        if destination.name not in used:
            warnings.append(f"destination {destination.name!r} is not used by any route")
    return warnings


def summary(config: Config) -> str:
    """One line describing a loaded configuration."""
    database = make_url(config.storage.database_url).render_as_string(hide_password=True)
    destinations = ", ".join(d.name for d in config.destinations) or "none"
    routes = ", ".join(r.name for r in config.routes) or "none"
    return (
        f"AE {config.ae.title} on {config.ae.host}:{config.ae.port};"
        f" database {database}; spool {config.storage.spool_dir};"
        f" {len(config.destinations)} destination(s) ({destinations});"
        f" {len(config.routes)} route(s) ({routes})"
    )


def command(args: argparse.Namespace) -> int:
    """`radgate check-config FILE`: OK and lint warnings, or ConfigError (exit status 2)."""
    config = load_config(args.config)
    print(f"OK: {summary(config)}")
    for warning in lint_routes(config):
        print(f"warning: {warning}")
    return 0
