"""Payloads that header de-identification cannot see into: encapsulated documents and video.

An Encapsulated PDF, CDA, STL, OBJ or MTL instance carries a whole document in Encapsulated
Document (0042,0011): a report names the patient, the physicians and the institution in its
text, and the Basic Profile says nothing about it. Video transfer syntaxes (MPEG-2, MPEG-4
AVC/H.264, HEVC/H.265) compress pixel data that this proxy cannot decode to look for burned-in
text. The profile decides (:class:`~anonproxy.deid.profile.Profile`):

* ``encapsulated_documents: reject`` (default) refuses every encapsulated document;
  ``clean`` reads its text (:func:`document_text`: every page and the metadata of a PDF, the
  XML of a CDA, the text of an OBJ, MTL or STL file) so that the engine can search it for the
  identifying values of the instance; only a document in which none is found passes, unchanged.
  A PDF whose pages hold images (scanned text cannot be read here), that is encrypted or that
  cannot be parsed is refused.
* ``video: reject`` (default) refuses an instance in a video transfer syntax; ``pass`` lets it
  through with its pixel data unchecked.

Messages name the document type and the reason, never text of the document.
"""

from __future__ import annotations

import io
import logging
from functools import lru_cache
from typing import Any, Literal

from pydicom.dataset import Dataset
from pydicom.uid import UID

from anonproxy.deid.structure import get_decoded
from anonproxy.errors import DeidentificationError

EncapsulatedDocumentPolicy = Literal["reject", "clean"]
VideoPolicy = Literal["reject", "pass"]

#: Encapsulated document Storage SOP Classes (PS3.4) → the document type.
DOCUMENT_TYPES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.104.1": "PDF",
    "1.2.840.10008.5.1.4.1.1.104.2": "CDA",
    "1.2.840.10008.5.1.4.1.1.104.3": "STL",
    "1.2.840.10008.5.1.4.1.1.104.4": "OBJ",
    "1.2.840.10008.5.1.4.1.1.104.5": "MTL",
}
_ENCAPSULATED_DOCUMENT = 0x00420011
_SOP_CLASS_UID = 0x00080016


def document_type(ds: Dataset) -> str | None:
    """The type of the document an instance of an encapsulated document SOP Class carries
    (``"PDF"``...), or None. (Encapsulated Document in any other instance is dummied by its
    Table E.1-1 row, D.)"""
    element = get_decoded(ds, _SOP_CLASS_UID)
    sop_class = str(element.value if element is not None else "").strip("\0 ")
    return DOCUMENT_TYPES.get(sop_class)


def is_video(transfer_syntax: object) -> bool:
    """True for the MPEG-2, MPEG-4 AVC/H.264 and HEVC/H.265 transfer syntaxes (PS3.5 8.2.5-8)."""
    if not transfer_syntax:
        return False
    if isinstance(transfer_syntax, str):
        return _video_uid(str(transfer_syntax))
    return _video_name(transfer_syntax)  # not a string: as pydicom's UID() takes it


@lru_cache(maxsize=256)
def _video_uid(transfer_syntax: str) -> bool:
    """:func:`_video_name`, once per UID (its name is a look-up in pydicom's dictionary)."""
    return _video_name(transfer_syntax)


def _video_name(transfer_syntax: Any) -> bool:  # noqa: ANN401 - what pydicom's UID() takes
    name = UID(transfer_syntax).name
    return any(word in name for word in ("MPEG", "HEVC", "H.264", "H.265"))


def document_text(ds: Dataset, kind: str) -> str:
    """The text of the document ``ds`` encapsulates, to be searched for identifying values.

    Raises DeidentificationError when it cannot all be read (a PDF with images, encrypted or
    damaged; no document at all)."""
    element = ds.get(_ENCAPSULATED_DOCUMENT)
    data = bytes(element.value) if element is not None and element.value else b""
    if not data:
        raise DeidentificationError(f"encapsulated {kind} document is empty or missing")
    if kind == "PDF" or data.startswith(b"%PDF"):
        return _pdf_text(data)
    return data.decode("utf-8", errors="replace")


def _pdf_text(data: bytes) -> str:
    from pypdf import PdfReader  # noqa: PLC0415 - only documents need it

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings may quote the document
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise DeidentificationError("encapsulated PDF document is encrypted: not readable")
        parts = [str(value) for value in (reader.metadata or {}).values()]
        for page in reader.pages:
            if page.images:
                raise DeidentificationError(
                    "encapsulated PDF document holds images: their text cannot be read"
                )
            parts.append(page.extract_text() or "")
        parts.extend(str(field.get("/V", "")) for field in (reader.get_fields() or {}).values())
    except DeidentificationError:
        raise
    except Exception:  # noqa: BLE001 - whatever stops the reading, the document is not released
        raise DeidentificationError("encapsulated PDF document cannot be parsed") from None
    return "\n".join(parts)
