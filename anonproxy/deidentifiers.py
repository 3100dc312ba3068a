"""The engine of the validated configuration: the ``profile:`` section made into a
:class:`~anonproxy.deid.Profile` and a :class:`~anonproxy.deid.Deidentifier`, and the
patient lookup table in the state store that the lookup method asks.

``serve`` (:mod:`anonproxy.service`, and each acceptor and worker process), ``deidentify``
(:mod:`anonproxy.offline`) and ``describe-profile`` all build their engine here. Nothing here
touches the network: the offline command imports this module without pynetdicom (the
import-linter contract "the offline path imports no network module" keeps it so).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from anonproxy import codecs
from anonproxy.config import ProfileConfig, Settings
from anonproxy.deid import Deidentifier, PatientPseudonyms, Profile
from anonproxy.deid.pseudonyms import PatientLookup
from anonproxy.errors import ConfigError, StateUnavailable

if TYPE_CHECKING:  # imported where used: only a profile with the lookup table needs the store
    from anonproxy.patients import PatientDirectory
    from anonproxy.state import StateStore


def build_profile(config: ProfileConfig, patients: PatientLookup | None = None) -> Profile:
    """The engine's :class:`~anonproxy.deid.Profile` of a ``profile:`` section: options,
    presets, strict, user rules, patient pseudonyms and the burned-in annotation policy.
    ``serve`` and ``deidentify`` give the lookup method its table as *patients* (the state
    store's, :func:`patient_lookup`); without, a ``lookup_csv`` is read here (embedders), or
    every patient is unknown (``describe-profile``). ConfigError for a table that cannot be
    used. ``serve``, ``deidentify`` and ``describe-profile`` all build their profile here."""
    try:
        patient_ids = None
        if config.patient_id is not None:
            spec = config.patient_id
            if patients is None and spec.method == "lookup" and spec.lookup_csv is None:
                patients = _no_table
            patient_ids = PatientPseudonyms.build(
                method=spec.method,
                format=spec.format,
                patient_name_format=spec.patient_name_format,
                lookup_csv=spec.lookup_csv,
                unknown_patient=spec.unknown_patient,
                lookup=patients,
            )
        return Profile.from_options(
            config.options,
            strict=config.strict,
            presets=config.preset,
            rules=[rule.model_dump(exclude_none=True) for rule in config.rules],
            patient_ids=patient_ids,
            burned_in_annotation=config.burned_in_annotation,
            encapsulated_documents=config.encapsulated_documents,
            video=config.video,
            pixel_rules=config.pixel_rules,
            clean_pixel_data=config.clean_pixel_data,
            pixel_keep_regions=config.pixel_keep_regions,
        )
    except ValueError as exc:
        raise ConfigError(f"invalid configuration in profile: {exc}") from None


def _no_table(original_id: str, fallback: str | None) -> str | None:
    """No lookup table: every patient is unknown."""
    return fallback


def build_deidentifier(
    config: ProfileConfig, secret: bytes, patients: PatientLookup | None = None
) -> Deidentifier:
    """The engine of a ``profile:`` section keyed by *secret*: :func:`build_profile` with its
    date shift range and clean patterns (ConfigError as :func:`build_profile`). The decoders
    the pixel rules may need (:mod:`anonproxy.codecs`) are installed in the process."""
    codecs.install()
    return Deidentifier(
        build_profile(config, patients),
        secret,
        date_shift_days=config.date_shift_days,
        clean_patterns=config.clean_patterns,
    )


def deidentifier_factory(
    config: ProfileConfig, secret: bytes, settings: Settings | None = None
) -> Callable[[], Deidentifier]:
    """A picklable function that builds :func:`build_deidentifier` of *config* and *secret*
    again, for the worker processes (:class:`~anonproxy.workers.DeidentifierPool`); with
    *settings* (whose profile is *config*), each worker asks the state store of *settings* for
    lookup-table pseudonyms through a connection of its own (:func:`patient_lookup`)."""
    if settings is not None and uses_lookup_table(settings):
        return functools.partial(
            _deidentifier_of_settings, settings.model_dump(mode="json"), secret
        )
    return functools.partial(_deidentifier_of_section, config.model_dump(mode="json"), secret)


def _deidentifier_of_section(section: dict[str, object], secret: bytes) -> Deidentifier:
    """:func:`build_deidentifier` of a ``profile:`` section in its JSON form."""
    return build_deidentifier(ProfileConfig.model_validate(section), secret)


def _deidentifier_of_settings(section: dict[str, object], secret: bytes) -> Deidentifier:
    """:func:`build_deidentifier` of whole settings in their JSON form."""
    settings = Settings.model_validate(section)
    return build_deidentifier(settings.profile, secret, patient_lookup(settings, secret))


def uses_lookup_table(settings: Settings) -> bool:
    """Whether patient pseudonyms come from the lookup table (the state store)."""
    spec = settings.profile.patient_id
    return spec is not None and spec.method == "lookup"


def open_state(settings: Settings, *, migrate: bool = True) -> StateStore:
    """The state store of *settings* (schema migrations applied with *migrate*)."""
    from anonproxy.state import StateStore  # noqa: PLC0415 - sqlite3, for the lookup table only

    return StateStore.open(settings.state, settings.storage.path, migrate=migrate)


def patient_lookup(settings: Settings, secret: bytes) -> PatientDirectory | None:
    """The engine's lookup table in the state store, when the profile uses one (a
    connection of this process; the service applied the migrations)."""
    if not uses_lookup_table(settings):
        return None
    from anonproxy.patients import PatientDirectory  # noqa: PLC0415 - see open_state

    return PatientDirectory(open_state(settings, migrate=False), secret)


def prepare_lookup_table(settings: Settings, secret: bytes) -> None:
    """For an offline run: the state store's schema migrated and the configured lookup CSV
    imported, when the profile uses the lookup table (ConfigError when it cannot be)."""
    if uses_lookup_table(settings):
        try:
            store = open_state(settings)
        except StateUnavailable as exc:
            raise ConfigError(f"state: {exc}") from None
        try:
            import_configured_table(settings, store, secret)
        finally:
            store.close()


def import_configured_table(settings: Settings, store: StateStore, secret: bytes) -> None:
    """Import ``profile.patient_id.lookup_csv``, when set, into the state store (at start:
    a row that disagrees with the store stops the start, ConfigError)."""
    spec = settings.profile.patient_id
    if spec is not None and spec.method == "lookup" and spec.lookup_csv is not None:
        from anonproxy.patients import import_csv  # noqa: PLC0415 - see open_state

        import_csv(store, secret, spec.lookup_csv)
