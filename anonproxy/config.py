"""Configuration: YAML files validated by pydantic models.

Every section forbids unknown keys, so a typo is a start-up error that names the key. Relative
paths are taken relative to the working directory. The pseudonymisation secret is never part of
the configuration: see :mod:`anonproxy.secret`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    IPvAnyNetwork,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from anonproxy.errors import ConfigError
from anonproxy.file_names import NOT_QUEUES

#: listen.max_sequence_depth: the engine's anonproxy.deid.structure.DEFAULT_MAX_SEQUENCE_DEPTH,
#: repeated to keep this module free of pydicom (tests/test_config.py keeps them equal).
DEFAULT_MAX_SEQUENCE_DEPTH = 16

DEFAULT_CONFIG_RESOURCE = "default.yaml"

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no control


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        msg = "an AE title is 1 to 16 printable characters, not only spaces, without backslash"
        raise ValueError(msg)
    return value.strip()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AllowedPeer(_Section):
    """A calling AE title allowed to associate from some source addresses only."""

    ae_title: str
    addresses: list[IPvAnyNetwork] = Field(min_length=1)  # addresses or CIDR networks

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _check_ae_title(value)


def _allowed_entry_kind(value: Any) -> str:  # noqa: ANN401 - raw YAML or a model
    return "title" if isinstance(value, str) else "peer"


AllowedCallingEntry = Annotated[
    Annotated[str, Tag("title")] | Annotated[AllowedPeer, Tag("peer")],
    Discriminator(_allowed_entry_kind),
]


class TlsServerConfig(_Section):
    """DICOM TLS (PS3.15 Annex B) on the SCP: TLS 1.2 or newer, BCP 195 cipher suites."""

    certificate: Path  # PEM: the server certificate, then any intermediate certificates
    private_key: Path  # PEM, unencrypted: protect it with file permissions
    ca_certificates: Path | None = None  # PEM file or folder: CAs trusted for client certs
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _client_ca(self) -> TlsServerConfig:
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates")
        return self


class TlsClientConfig(_Section):
    """DICOM TLS (PS3.15 Annex B) to a destination: TLS 1.2 or newer, BCP 195 cipher suites."""

    ca_certificates: Path  # PEM file or folder: the CAs trusted for the PACS's certificate
    certificate: Path | None = None  # PEM: anonproxy's client certificate (mutual TLS)
    private_key: Path | None = None  # PEM, unencrypted
    verify_hostname: bool = True

    @model_validator(mode="after")
    def _key_pair(self) -> TlsClientConfig:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        return self


#: ``listen.processes`` when not configured: None is one acceptor process per core, at most 8
#: (see anonproxy.acceptors), and 1 with a transparent route; 1 is one receiving process (no
#: supervisor).
DEFAULT_LISTEN_PROCESSES: int | None = None


class ListenConfig(_Section):
    """The SCP: where anonproxy receives instances."""

    ae_title: str = "ANONPROXY"
    host: str = "0.0.0.0"  # noqa: S104 - a network appliance listens on all interfaces
    port: int = Field(default=11112, ge=0, le=65535)  # 0: any free port (tests)
    allowed_calling_ae_titles: list[AllowedCallingEntry] = Field(default_factory=list)
    max_associations: int = Field(default=16, ge=1)
    deidentify_workers: int | None = Field(default=None, ge=0, le=64)
    # Receiving processes on the one port (one listening socket, the least busy takes each
    # connection); null: one per core (at most 8; 1 with a transparent route)
    processes: int | None = Field(default=DEFAULT_LISTEN_PROCESSES, ge=1, le=64)
    max_associations_per_peer: int | None = Field(default=None, ge=1)
    tls: TlsServerConfig | None = None
    max_pdu_size: int = Field(default=262144, ge=0)
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    max_instance_bytes: int = Field(default=4 << 30, ge=1)
    max_sequence_depth: int = Field(default=DEFAULT_MAX_SEQUENCE_DEPTH, ge=1, le=1000)
    # `storage` (every Storage SOP Class, current and retired) and/or SOP Class UIDs
    sop_classes: list[str] = Field(default_factory=lambda: ["storage"], min_length=1)
    # When C-STORE Success is answered: once the instance is de-identified and spooled for its
    # destinations, or once the received data set is durably in the incoming spool (it is then
    # de-identified behind; see anonproxy.deferred)
    acknowledge: Literal["after_deidentification", "after_receipt"] = "after_deidentification"

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("sop_classes")
    @classmethod
    def _sop_classes(cls, value: list[str]) -> list[str]:
        # pydicom's UID dictionary only when the key is given: keep the config import light
        from anonproxy.sop_classes import check_entry  # noqa: PLC0415

        return list(dict.fromkeys(check_entry(entry) for entry in value))

    @field_validator("allowed_calling_ae_titles")
    @classmethod
    def _allowed(cls, value: list[str | AllowedPeer]) -> list[str | AllowedPeer]:
        entries = [v if isinstance(v, AllowedPeer) else _check_ae_title(v) for v in value]
        anywhere = {v for v in entries if isinstance(v, str)}
        bound = {v.ae_title for v in entries if isinstance(v, AllowedPeer)}
        if anywhere & bound:
            msg = f"AE title(s) {sorted(anywhere & bound)} listed both with and without addresses"
            raise ValueError(msg)
        return entries

    @property
    def allowed_ae_titles(self) -> list[str]:
        """The calling AE titles of the allow-list (with or without addresses)."""
        titles = (v if isinstance(v, str) else v.ae_title for v in self.allowed_calling_ae_titles)
        return list(dict.fromkeys(titles))


class DicomDestinationConfig(_Section):
    """A research PACS reached by C-STORE."""

    type: Literal["dicom"] = "dicom"
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = None
    # Parallel associations (each a forward worker and its sender process). A C-STORE mostly
    # waits for the PACS to store the instance, so several associations overlap those waits
    # (Orthanc, MR 256x256 on 2 cores: 1: 112/s, 2: 145/s, 4: 201/s); further ones are opened
    # only while instances wait, and a PACS that serves fewer (DCMTK's storescp without --fork,
    # an association limit) is detected and gets what it accepts (see anonproxy.forward).
    # Default 2: each association is a process on the proxy's own cores too; in the whole proxy
    # on 2 cores (throughput.py, Orthanc, 4 senders) 2 kept forwarding p50 at 37 ms with
    # delivered = acknowledged, where 4 cost a quarter of the acknowledgement rate.
    max_associations: int = Field(default=2, ge=1, le=16)
    idle_timeout: float = Field(default=10.0, gt=0)
    retry_max_age_s: float | None = Field(default=None, gt=0)
    retry_max_delay_s: float = Field(default=30.0, gt=0)
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    tls: TlsClientConfig | None = None

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _ae_title(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)


class FolderDestinationConfig(_Section):
    """A directory tree, one file per instance: ``<study>/<series>/<instance>.dcm``."""

    type: Literal["folder"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    path: Path


def _destination_type(value: Any) -> str:  # noqa: ANN401 - raw YAML or a model
    if isinstance(value, dict):
        return str(value.get("type", "dicom"))
    return str(getattr(value, "type", "dicom"))


DestinationConfig = Annotated[
    Annotated[DicomDestinationConfig, Tag("dicom")]
    | Annotated[FolderDestinationConfig, Tag("folder")],
    Discriminator(_destination_type),
]


class ProfileConfig(_Section):
    """De-identification profile: PS3.15 options by their CID 7050 names, presets, user rules,
    patient pseudonyms and the date shift range (see :mod:`anonproxy.deid`)."""

    class Rule(_Section):
        """One user rule: exactly one selector and an action (see :mod:`anonproxy.deid.rules`)."""

        keyword: str | None = None
        tag: str | None = None
        tag_mask: str | None = None
        private_creator: str | None = None
        element: int | str | None = None
        group: int | str | None = None
        action: Literal[
            "keep", "remove", "empty", "dummy", "replace", "hash", "shift_date", "regex_replace"
        ]
        value: str | int | float | None = None
        pattern: str | None = None
        replacement: str | None = None

        @model_validator(mode="after")
        def _valid_rule(self) -> ProfileConfig.Rule:
            from anonproxy.deid.rules import Rule  # noqa: PLC0415 - keep config import light

            Rule.parse(self.model_dump(exclude_none=True))  # ValueError: pydantic adds the index
            return self

    class PatientId(_Section):
        """Patient pseudonyms (see :mod:`anonproxy.deid.pseudonyms`)."""

        method: Literal["hash", "lookup"] = "hash"
        format: str = "ANON-{hash:16}"  # anonproxy.deid.pseudonyms.DEFAULT_FORMAT
        patient_name_format: str | None = None
        # method lookup: the table is in the state store (anonproxy lookup import); a CSV named
        # here is imported into it when serve or deidentify starts
        lookup_csv: Path | None = None
        unknown_patient: Literal["reject", "hash"] = "reject"

        @model_validator(mode="after")
        def _valid_patient_id(self) -> ProfileConfig.PatientId:
            from anonproxy.deid.pseudonyms import PseudonymFormat  # noqa: PLC0415

            PseudonymFormat.parse(self.format)
            if self.patient_name_format is not None:
                PseudonymFormat.parse(self.patient_name_format, allow_pseudonym=True)
            if self.method == "hash" and self.lookup_csv is not None:
                raise ValueError("lookup_csv goes with method lookup only")
            return self

    options: list[str] = Field(default_factory=list)
    preset: list[str] = Field(default_factory=list)
    strict: bool = False
    burned_in_annotation: Literal["pass", "reject"] = "reject"
    encapsulated_documents: Literal["reject", "clean"] = "reject"
    video: Literal["reject", "pass"] = "reject"
    rules: list[ProfileConfig.Rule] = Field(default_factory=list)
    patient_id: ProfileConfig.PatientId | None = None
    date_shift_days: tuple[int, int] = (-365, -1)
    clean_patterns: list[str] = Field(default_factory=list)
    pixel_rules: list[dict[str, Any]] = Field(default_factory=list)
    clean_pixel_data: Literal["identifying", "all_text", "off"] = "identifying"
    pixel_keep_regions: list[str] = Field(default_factory=list)

    @field_validator("pixel_keep_regions")
    @classmethod
    def _valid_keep_regions(cls, value: list[str]) -> list[str]:
        from anonproxy.deid.burned_in import parse_keep_regions  # noqa: PLC0415

        parse_keep_regions(value)  # ValueError naming the region
        return value

    @field_validator("pixel_rules")
    @classmethod
    def _valid_pixel_rules(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from anonproxy.deid.pixels import parse_pixel_rules  # noqa: PLC0415 - keep import light

        parse_pixel_rules(value)  # ValueError naming the rule
        return value

    @field_validator("clean_patterns")
    @classmethod
    def _valid_patterns(cls, value: list[str]) -> list[str]:
        for index, pattern in enumerate(value):
            try:
                re.compile(pattern)
            except re.error as exc:
                msg = f"clean_patterns.{index}: not a regular expression ({exc.msg})"
                raise ValueError(msg) from None
        return value

    @field_validator("options")
    @classmethod
    def _known_options(cls, value: list[str]) -> list[str]:
        from anonproxy.deid import ProfileOption  # noqa: PLC0415 - keep config import light

        known = {option.value for option in ProfileOption}
        unknown = [v for v in value if v not in known]
        if unknown:
            msg = f"unknown option(s) {unknown}; known: {sorted(known)}"
            raise ValueError(msg)
        return value

    @field_validator("preset", mode="before")
    @classmethod
    def _preset_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("preset")
    @classmethod
    def _known_presets(cls, value: list[str]) -> list[str]:
        from anonproxy.deid.profile import preset_options  # noqa: PLC0415

        preset_options(value)  # ValueError listing the known presets
        return value

    @field_validator("date_shift_days")
    @classmethod
    def _shift_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if not -36500 <= low <= high <= -1:
            msg = "date_shift_days is [min, max] with -36500 <= min <= max <= -1 (days back)"
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _consistent_options(self) -> ProfileConfig:
        from anonproxy.deid.profile import (  # noqa: PLC0415
            check_option_set,
            parse_options,
            preset_options,
        )

        check_option_set(parse_options(self.options) | preset_options(self.preset))
        return self


class RouteConfig(_Section):
    """Which destinations receive an instance. A route matches when every criterion given
    matches (an empty list matches anything); an instance goes to the destinations of every
    matching route (fan-out).

    A *transparent* route makes the C-STORE wait (up to ``transparent_timeout_s``) for the
    destinations' answer and relays it to the sender. When the time-out passes first, the
    sender gets Success: the instance is durably spooled and will be delivered.
    """

    destinations: list[str] = Field(min_length=1)
    calling_ae_titles: list[str] = Field(default_factory=list)
    modalities: list[str] = Field(default_factory=list)
    sop_classes: list[str] = Field(default_factory=list)
    transparent: bool = False
    transparent_timeout_s: float = Field(default=30.0, gt=0)

    def matches(self, calling_ae_title: str, modality: str, sop_class_uid: str) -> bool:
        """True when the instance meets every criterion of the route."""
        return (
            (not self.calling_ae_titles or calling_ae_title in self.calling_ae_titles)
            and (not self.modalities or modality in self.modalities)
            and (not self.sop_classes or sop_class_uid in self.sop_classes)
        )


class StorageConfig(_Section):
    """Spool, quarantine and state."""

    path: Path = Path("./var")
    max_bytes: int | None = Field(default=None, ge=0)
    min_free_bytes: int = Field(default=512 * 1024 * 1024, ge=0)
    fsync: bool = True
    keep_rejected_inputs: bool = False
    rejected_inputs_max_age_days: float = Field(default=7.0, gt=0)
    # received data sets acknowledged and waiting for de-identification (listen.acknowledge
    # after_receipt): at or over this many bytes, C-STORE gets Out of Resources (0xA700)
    incoming_max_bytes: int = Field(default=8 << 30, ge=0)
    # a file holding a 256-bit key (owner-only): received data sets are then written to the
    # spool sealed with it, AES-256-GCM (see anonproxy.sealed)
    incoming_key_file: Path | None = None


class StateConfig(_Section):
    """The state store (:mod:`anonproxy.state`): lookup-table pseudonyms and the
    re-identification map. SQLite in a file of this node, or PostgreSQL shared by several."""

    backend: Literal["sqlite", "postgresql"] = "sqlite"
    path: Path | None = None  # sqlite: the database file; default <storage.path>/state.sqlite3
    dsn_file: Path | None = None  # postgresql: a file (owner-only) holding the connection string
    pool_size: int = Field(default=4, ge=1, le=64)  # postgresql: connections per process
    timeout_s: float = Field(default=5.0, gt=0)  # postgresql: waiting for a connection

    @model_validator(mode="after")
    def _backend_settings(self) -> StateConfig:
        if self.backend == "postgresql" and self.dsn_file is None:
            raise ValueError("backend postgresql needs dsn_file (the password stays out of YAML)")
        if self.backend == "postgresql" and self.path is not None:
            raise ValueError("path goes with backend sqlite only")
        if self.backend == "sqlite" and self.dsn_file is not None:
            raise ValueError("dsn_file goes with backend postgresql only")
        return self


class MapConfig(_Section):
    """The re-identification map (:mod:`anonproxy.remap`): originals of each patient and study
    beside their pseudonyms, encrypted with the map key (``ANONPROXY_MAP_KEY_FILE``)."""

    enabled: bool = True  # false: no map is kept (nothing recorded, no key needed)


class SyslogConfig(_Section):
    """DICOM audit messages (PS3.15 A.5) sent as RFC 5424 syslog to an audit record repository:
    UDP (RFC 5426), TCP or TLS (RFC 5425, octet-counting framing). See :mod:`anonproxy.syslog`."""

    host: str = Field(min_length=1)
    port: int = Field(default=514, ge=1, le=65535)  # 6514: the RFC 5425 port for TLS
    transport: Literal["udp", "tcp", "tls"] = "udp"
    ca_certificates: Path | None = None  # TLS: PEM file or folder trusted for the server
    certificate: Path | None = None  # TLS: PEM client certificate (mutual TLS)
    private_key: Path | None = None  # PEM, unencrypted
    verify_hostname: bool = True
    app_name: str = Field(default="anonproxy", pattern=r"^[!-~]{1,48}$")  # RFC 5424 APP-NAME
    facility: int = Field(default=10, ge=0, le=23)  # 10: authpriv (security/authorization)
    audit_source_id: str | None = Field(default=None, min_length=1)  # default: the host name
    enterprise_site_id: str | None = Field(default=None, min_length=1)
    queue_size: int = Field(default=10000, ge=1)

    @model_validator(mode="after")
    def _tls_settings(self) -> SyslogConfig:
        if self.transport == "tls" and self.ca_certificates is None:
            raise ValueError("transport tls needs ca_certificates")
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        return self


class AuditConfig(_Section):
    """Audit trail: one JSON line per event; optionally DICOM audit messages over syslog."""

    path: Path | None = Path("./var/audit.jsonl")
    stdout: bool = False
    syslog: SyslogConfig | None = None


class LogConfig(_Section):
    """Operational log on standard error or to a file (never carries PHI)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    path: Path | None = None  # None: standard error; a file is reopened on SIGHUP


class AdminConfig(_Section):
    """The HTTP admin endpoint: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``. See
    :mod:`anonproxy.admin`."""

    enabled: bool = True
    host: str = "127.0.0.1"  # loopback: a reverse proxy or the local Prometheus agent scrapes it
    port: int = Field(default=8080, ge=0, le=65535)  # 0: any free port (tests)
    token_file: Path | None = None  # a file holding a bearer token /metrics then requires
    max_queue_age_s: float = Field(default=3600.0, gt=0)  # /readyz: oldest queued instance
    tls: TlsServerConfig | None = None  # HTTPS (TLS 1.2+, BCP 195 suites; client certs optional)


class Settings(_Section):
    """The whole configuration of one anonproxy node."""

    listen: ListenConfig = Field(default_factory=ListenConfig)
    destinations: list[DestinationConfig] = Field(default_factory=list)
    routes: list[RouteConfig] = Field(default_factory=list)
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    map: MapConfig = Field(default_factory=MapConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)

    @model_validator(mode="after")
    def _unique_destination_names(self) -> Settings:
        names = [d.name for d in self.destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            msg = f"destination names must be unique: {duplicates}"
            raise ValueError(msg)
        reserved = sorted(NOT_QUEUES & set(names))  # folders of the spool
        if reserved:
            msg = f"destination names {reserved} are reserved"
            raise ValueError(msg)
        known = {d.name for d in self.effective_destinations}
        for index, route in enumerate(self.routes):
            unknown = sorted(set(route.destinations) - known)
            if unknown:
                msg = f"routes.{index}.destinations: unknown destination(s) {unknown}"
                raise ValueError(msg)
            if route.transparent and (self.listen.processes or 1) > 1:
                msg = (
                    f"routes.{index}.transparent: a transparent route relays the destination's"
                    " answer to the receiving process, which needs listen.processes: 1"
                )
                raise ValueError(msg)
            if route.transparent and self.listen.acknowledge == "after_receipt":
                msg = (
                    f"routes.{index}.transparent: a transparent route relays the destination's"
                    " answer, which needs listen.acknowledge: after_deidentification"
                )
                raise ValueError(msg)
        return self

    @property
    def effective_destinations(self) -> list[DicomDestinationConfig | FolderDestinationConfig]:
        """The configured destinations, or the built-in folder when there are none."""
        if self.destinations:
            return list(self.destinations)
        return [
            FolderDestinationConfig(
                type="folder", name="local", path=self.storage.path / "received"
            )
        ]


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {key}: {item['msg']}")
    return "\n".join(lines)


def parse_settings(data: object, source: str = "<config>") -> Settings:
    """Validate a mapping (parsed YAML) into :class:`Settings`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        msg = f"invalid configuration in {source}: the top level must be a mapping"
        raise ConfigError(msg)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def apply_overrides(data: object, overrides: Sequence[str]) -> object:
    """*data* (parsed YAML) with each ``section.key=value`` of *overrides* set; the value is
    read as YAML (``admin.port=9090``, ``admin.host=0.0.0.0``, ``listen.tls=null``). Keys name
    mappings only (not list items such as a destination): ConfigError otherwise."""
    root: dict[str, Any] = dict(data) if isinstance(data, dict) else {}
    for override in overrides:
        key, sep, text = override.partition("=")
        names = key.strip().split(".")
        if not sep or not all(names):
            msg = f"--set {override!r}: expected section.key=value"
            raise ConfigError(msg)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            msg = f"--set {key}: the value is not valid YAML"
            raise ConfigError(msg) from None
        node = root
        for depth, name in enumerate(names[:-1]):
            child = node.get(name)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                msg = f"--set {key}: {'.'.join(names[: depth + 1])} is not a mapping"
                raise ConfigError(msg)
            node[name] = child = dict(child)
            node = child
        node[names[-1]] = value
    return root


def load_settings(path: Path | None = None, overrides: Sequence[str] = ()) -> Settings:
    """Load a YAML file, or the embedded default configuration when *path* is None, with the
    ``--set`` *overrides* applied (see :func:`apply_overrides`)."""
    if path is None:
        text = resources.files("anonproxy").joinpath(DEFAULT_CONFIG_RESOURCE).read_text("utf-8")
        source = "embedded default"
    else:
        try:
            text = Path(path).read_text("utf-8")
        except OSError as exc:
            msg = f"cannot read configuration {path}: {exc.strerror}"
            raise ConfigError(msg) from None
        source = str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        msg = f"invalid YAML in {source}: {exc}"
        raise ConfigError(msg) from None
    if overrides:
        data = apply_overrides(data, overrides)
        source += " with --set"
    return parse_settings(data, source)


def dump_settings(settings: Settings) -> str:
    """The effective configuration as YAML (it never contains a secret)."""
    data = settings.model_dump(mode="json")
    data["destinations"] = [d.model_dump(mode="json") for d in settings.effective_destinations]
    return yaml.safe_dump(data, sort_keys=False)
