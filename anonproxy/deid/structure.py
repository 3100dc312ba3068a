"""The structure of a decoded data set, checked before de-identification.

:func:`check_structure` walks the sequences of a data set read by
:func:`~anonproxy.deid.files.read_header` without recursion and without converting any other
element, and refuses one whose sequences nest deeper than a limit (``listen.max_sequence_depth``;
:data:`DEFAULT_MAX_SEQUENCE_DEPTH` by default), with an unknown VR, a truncated value, an odd
value length (PS3.5 7.1.1) or a Specific Character Set (0008,0005) term pydicom does not know.
Messages name the element's tag and the limit, never a value.

:func:`decoded` (and :func:`get_decoded`) is how the engine reads an element: as
``dataset[tag]``, for less.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pydicom
from pydicom import config as pydicom_config
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.hooks import hooks as pydicom_hooks
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.valuerep import AMBIGUOUS_VR
from pydicom.valuerep import VR as VR_
from pydicom.values import convert_value

from anonproxy.errors import LimitExceeded, StructureError

#: Sequences nested deeper are refused (a top-level sequence has depth 1); the default of
#: ``listen.max_sequence_depth`` (anonproxy.config keeps the same number).
DEFAULT_MAX_SEQUENCE_DEPTH = 16

_VRS = frozenset(str(vr) for vr in VR_)
#: The VRs an element still as received may be a sequence with: none (implicit VR), SQ, UN.
_MAYBE_SEQUENCE = frozenset({None, "SQ", "UN"})
#: Raw elements that pydicom's __getitem__ does more with than convert (see decoded): its
#: sequences, UN (perhaps another VR), ambiguous VRs (corrected), the character set (decoded
#: in the default one), pixel data (its array reset) and private data elements (their creator)
_CONVERTED_APART = frozenset({"SQ", "UN", *(str(vr) for vr in AMBIGUOUS_VR)})
_AMBIGUOUS = frozenset(str(vr) for vr in AMBIGUOUS_VR)
_SPECIFIC_CHARACTER_SET = 0x00080005
#: The pydicom whose Dataset.__getitem__ and __setitem__ decoded mirrors (the pinned one)
_MIRRORED_PYDICOM = "3.0.2"
_MIRRORS_PYDICOM = pydicom.__version__ == _MIRRORED_PYDICOM
#: True with the pydicom :func:`decoded` mirrors: the engine stores the public elements it
#: makes in a data set's dictionary as ``Dataset.__setitem__`` does, without its checks
MIRRORS_PYDICOM = _MIRRORS_PYDICOM
_PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
#: LUT descriptors: pydicom's value hook corrects their first value
_LUT_DESCRIPTORS = frozenset({0x00281101, 0x00281102, 0x00281103, 0x00283002})
_UNDEFINED_LENGTH = 0xFFFFFFFF
_RAW_ELEMENT_VR = pydicom_hooks.raw_element_vr
_RAW_ELEMENT_VALUE = pydicom_hooks.raw_element_value


def _is_sequence(raw: RawDataElement | DataElement) -> bool:
    if isinstance(raw, DataElement):
        return raw.VR == "SQ"
    if raw.length == 0xFFFFFFFF and raw.VR in {None, "UN"}:
        return True  # undefined length, VR unknown: pydicom reads it as a sequence
    if raw.VR is not None and raw.VR != "UN":
        return raw.VR == "SQ"
    # implicit VR, or a sequence sent as UN (by a node that did not know it): pydicom decodes
    # it by the dictionary (replace_un_with_known_vr), items and all
    return not raw.tag.is_private and dictionary_sequence(raw.tag)


@lru_cache(maxsize=4096)
def dictionary_keyword(tag: int) -> str:
    """The data dictionary's keyword of public attribute *tag* ("" if none), looked up once
    per tag (the walk and the self-check ask for every element)."""
    return keyword_for_tag(tag)


@lru_cache(maxsize=4096)
def dictionary_sequence(tag: int) -> bool:
    """True if the data dictionary says public attribute *tag* is a sequence."""
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def held_elements(dataset: Dataset) -> list[tuple[BaseTag, RawDataElement | DataElement]]:
    """The elements of *dataset* as it holds them, each with the Dataset's own tag object (a
    key pydicom finds without comparing tags): raw, undecoded, as long as nobody read them.
    As :meth:`~pydicom.dataset.Dataset.get_item` gives them, an element read without a value
    (zero length in most VRs, or a deferred read) is converted on the way: every caller sees
    what pydicom's writer writes."""
    # a comprehension: a quarter faster than appending
    return [(key, as_held(dataset, key, element)) for key, element in dataset.items()]


def as_held(
    dataset: Dataset, key: BaseTag, element: RawDataElement | DataElement
) -> RawDataElement | DataElement:
    """*element*, held by *dataset* at *key*, as :func:`held_elements` gives it (for loops over
    ``dataset.items()`` that need no list): converted if it was read without a value."""
    if element.__class__ is RawDataElement and element.value is None:
        return dataset[key]
    return element


def decoded(dataset: Dataset, key: int) -> DataElement:
    """``dataset[key]``: the element, converted from its raw form on first access (KeyError
    when absent). pydicom's ``__getitem__`` looks a converted element up three more times and
    stores it through ``__setitem__``'s checks; for the elements most data sets hold (public,
    received with a VR that is not SQ, UN or ambiguous, not the character set, pixel data or a
    LUT descriptor) this makes the same conversion — the steps of pydicom's
    ``convert_raw_data_element`` with its default hooks: ``convert_value``, then a
    ``DataElement`` of the value as converted — and stores it directly. Any other element goes
    through pydicom, and so does every element with another pydicom than the one this mirrors
    (:data:`_MIRRORED_PYDICOM`), with other hooks, or whose value pydicom fails to convert."""
    if not _MIRRORS_PYDICOM:
        return dataset[key]
    store: Any = dataset._dict  # pydicom's own (a dict)
    held = store[key]
    if held.__class__ is DataElement:
        return held
    return _convert(dataset, store, key, held)


def _convert(
    dataset: Dataset, store: dict[int, Any], key: int, held: RawDataElement | DataElement
) -> DataElement:
    """:func:`decoded` of an element not converted yet."""
    tag = int(key)
    if held.__class__ is RawDataElement and held.VR == "SQ" and held.value is not None:
        if not tag >> 16 & 1:
            return _convert_sequence(dataset, store, key, held)
        return dataset[key]
    if (
        held.__class__ is not RawDataElement
        or held.value is None
        or held.VR is None
        or held.VR in _CONVERTED_APART
        or tag >> 16 & 1
        or tag == _SPECIFIC_CHARACTER_SET
        or tag in _PIXEL_DATA_TAGS
        or tag in _LUT_DESCRIPTORS
    ):
        return dataset[key]
    encoding = dataset.original_character_set or dataset._character_set  # as __getitem__
    if _default_conversion():  # convert_raw_data_element's steps for these elements
        try:
            value = convert_value(held.VR, held, encoding)  # what the value hook calls
        except Exception:  # noqa: BLE001 - pydicom's path raises, or makes it UN
            return dataset[key]
        element = DataElement(
            held.tag,
            held.VR,
            value,
            held.value_tell,
            held.length == _UNDEFINED_LENGTH,
            already_converted=True,
        )
    else:
        element = convert_raw_data_element(held, encoding=encoding, ds=dataset)
    store[key] = element  # as __setitem__ stores a public element
    return element


def _convert_sequence(
    dataset: Dataset, store: dict[int, Any], key: int, held: RawDataElement
) -> DataElement:
    """``dataset[key]`` for a public element received as SQ, its value read (not deferred):
    pydicom's conversion (its hooks, which read the items), stored as ``__setitem__`` stores
    a sequence (a Sequence value, the Pixel Representation passed down to its items) and
    returned without ``__getitem__``'s four more look-ups of it and its second pass over the
    items for the Pixel Representation (the same values again). The conversion gives an SQ,
    or UN when pydicom's value hook could not read the items (stored as it is)."""
    encoding = dataset.original_character_set or dataset._character_set  # as __getitem__
    element = convert_raw_data_element(held, encoding=encoding, ds=dataset)
    store[key] = element
    if element.VR == "SQ":
        if not isinstance(element.value, Sequence):
            element.value = Sequence(element.value)
        dataset._set_pixel_representation(element)
    elif element.VR in _AMBIGUOUS:  # not what pydicom makes of SQ: its own path, to be sure
        store[key] = held
        return dataset[key]
    return element


def _default_conversion() -> bool:
    """True while pydicom converts raw elements with its own hooks and no callback: for an
    element with a VR that is not UN, the VR hook keeps it and the value hook is
    ``convert_value`` (but for LUT descriptors, which decoded leaves to pydicom)."""
    return (
        not pydicom_config.data_element_callback
        and not pydicom_hooks.raw_element_kwargs
        and pydicom_hooks.raw_element_vr is _RAW_ELEMENT_VR
        and pydicom_hooks.raw_element_value is _RAW_ELEMENT_VALUE
    )


def get_decoded(dataset: Dataset, tag: int) -> DataElement | None:
    """``dataset.get(tag)`` for an int *tag*, by :func:`decoded`: None when absent."""
    if not _MIRRORS_PYDICOM:
        try:
            return dataset[tag]
        except KeyError:
            return None
    store: Any = dataset._dict  # pydicom's own (a dict)
    held = store.get(tag)  # not store[tag]: a KeyError raised and caught costs more
    if held is None or held.__class__ is DataElement:
        return held
    return _convert(dataset, store, tag, held)


def _known_character_sets(dataset: Dataset) -> bool:
    store: Any = dataset._dict  # pydicom's own (a dict)
    raw: Any = store.get(_SPECIFIC_CHARACTER_SET)  # by int: most data sets lack it
    if isinstance(raw, RawDataElement) and raw.value is None:
        raw = dataset.get_item(_SPECIFIC_CHARACTER_SET)  # deferred: get_item reads it
    if raw is None:
        return True
    value = raw.value
    if isinstance(value, bytes | bytearray):
        terms = [term.strip() for term in bytes(value).decode("ascii", "replace").split("\\")]
    elif isinstance(value, str):
        terms = [value.strip()]
    else:
        terms = [str(term).strip() for term in value or []]
    return all(term == "" or term in python_encoding for term in terms)


def check_structure(dataset: Dataset, max_depth: int) -> None:
    """Refuse, before de-identification, a data set whose sequences nest deeper than
    *max_depth* (a top-level sequence has depth 1), or with an unknown VR, a value shorter than
    its length (a truncated data set), an odd value length (PS3.5 7.1.1; tolerated in private
    data elements, which vendors get wrong and de-identification removes), or a Specific
    Character Set term pydicom does not know. Only sequence elements are converted; the walk
    uses no recursion.

    Raises :class:`~anonproxy.errors.LimitExceeded` (depth) or
    :class:`~anonproxy.errors.StructureError`; a sequence that cannot be parsed raises what
    pydicom raises.
    """
    stack: list[tuple[Dataset, int]] = [(dataset, 0)]
    while stack:
        current, depth = stack.pop()
        if not _known_character_sets(current):
            raise StructureError("unknown Specific Character Set (0008,0005)")
        for tag, held in current.items():
            raw = as_held(current, tag, held)
            if isinstance(raw, RawDataElement):
                vr, length = raw.VR, raw.length
                if vr is not None and vr not in _VRS:
                    raise StructureError(f"element {raw.tag} has an unknown VR")
                if length != 0xFFFFFFFF:
                    if length % 2 and not tag >> 16 & 1:  # vendors' private quirks: removed
                        raise StructureError(f"element {raw.tag} has an odd value length")
                    value = raw.value
                    if isinstance(value, bytes) and len(value) != length:
                        raise StructureError(f"element {raw.tag} is truncated")
                if vr not in _MAYBE_SEQUENCE:  # most elements: an explicit VR, not SQ
                    continue
            if not _is_sequence(raw):
                continue
            element = decoded(current, tag)  # current[tag]
            if element.VR != "SQ":
                continue
            if depth + 1 > max_depth:
                raise LimitExceeded(f"sequences nest deeper than max_sequence_depth {max_depth}")
            stack.extend((item, depth + 1) for item in element.value)
