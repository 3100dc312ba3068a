"""The switches anonproxy sets in pydicom (``pydicom.config`` and pydicom's logger), in one
place: every process that reads received data sets calls :func:`silence_value_reports`.

A module of its own, without structlog or pynetdicom: the offline command
(:mod:`anonproxy.offline`) needs it and nothing of :mod:`anonproxy.audit`.
"""

from __future__ import annotations

import logging
import warnings

from pydicom import config as pydicom_config


def silence_value_reports() -> None:
    """pydicom reports invalid values by quoting them (warnings and its logger): turn value
    validation off and keep its logger quiet, so that no received value reaches a log."""
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    logger = logging.getLogger("pydicom")
    logger.handlers[:] = [logging.NullHandler()]
    logger.setLevel(logging.CRITICAL)
    logger.propagate = False
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")
