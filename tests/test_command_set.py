"""C-STORE and C-ECHO command sets coded without pydicom (anonproxy.command_set, patch
``command_sets``) against pynetdicom's own path through pydicom data sets (the patch in an
association: tests/test_pynetdicom_patches.py)."""

from __future__ import annotations

import contextlib
import string
import struct
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pynetdicom.dimse
import pynetdicom.dimse_messages
import pynetdicom.dsutils
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode

from anonproxy import command_set
from anonproxy import pynetdicom_patches as patches

_UIDS = st.from_regex(r"[1-9][0-9]{0,7}(\.(0|[1-9][0-9]{0,9})){1,8}", fullmatch=True).filter(
    lambda uid: len(uid) <= 64
)
_PLAIN_TEXT = "".join(c for c in string.printable if c.isprintable() and c != "\\")
_TEXT = st.text(alphabet=_PLAIN_TEXT, max_size=66) | st.text(max_size=8)  # the second: anything
_AE_TITLES = st.text(alphabet=_PLAIN_TEXT, min_size=1, max_size=16)
_IDS = st.integers(0, 0xFFFF)


@st.composite
def primitives(draw: st.DrawFn) -> C_STORE | C_ECHO:
    """A C-STORE or C-ECHO request or response, any optional parameter set or not."""
    primitive: Any = draw(st.sampled_from([C_STORE, C_ECHO]))()
    try:
        if draw(st.booleans()):  # a response
            primitive.MessageIDBeingRespondedTo = draw(_IDS)
            primitive.Status = draw(st.sampled_from([0x0000, 0xA700, 0xA900, 0xB000, 0xC211]))
            if draw(st.booleans()):
                primitive.ErrorComment = draw(_TEXT)
            if draw(st.booleans()):
                primitive.AffectedSOPClassUID = draw(_UIDS)
            if isinstance(primitive, C_STORE) and draw(st.booleans()):
                primitive.AffectedSOPInstanceUID = draw(_UIDS)
        else:
            primitive.MessageID = draw(_IDS)
            primitive.AffectedSOPClassUID = draw(_UIDS)
            if isinstance(primitive, C_STORE):
                primitive.AffectedSOPInstanceUID = draw(_UIDS)
                primitive.Priority = draw(st.sampled_from([0, 1, 2]))
                primitive.DataSet = BytesIO(b"\x08\x00\x18\x00") if draw(st.booleans()) else None
                if draw(st.booleans()):
                    primitive.MoveOriginatorApplicationEntityTitle = draw(_AE_TITLES)
                    primitive.MoveOriginatorMessageID = draw(_IDS)
    except ValueError:  # a value pynetdicom's primitive refuses
        assume(False)
    return primitive


@contextlib.contextmanager
def _pynetdicom_alone() -> Iterator[None]:
    """pynetdicom without the patches (then the patches installed before, again)."""
    before = patches.installed()
    patches.uninstall()
    try:
        yield
    finally:
        patches.install(without=set(patches.PATCHES) - before)


def _pydicom_message(primitive: C_STORE | C_ECHO) -> DIMSEMessage:
    """The message pynetdicom builds for *primitive* (``send_msg``)."""
    responding = primitive.MessageIDBeingRespondedTo is not None
    table = pynetdicom.dimse._RSP_TO_MESSAGE if responding else pynetdicom.dimse._RQ_TO_MESSAGE
    message: DIMSEMessage = table[type(primitive)]()
    message.primitive_to_message(primitive)
    return message


def _plain(text: object) -> bool:
    return isinstance(text, str) and len(text) <= 64 and all(c in _PLAIN_TEXT for c in text)


def _space_padded_uids(encoded: bytes) -> bytes:
    out, position = bytearray(encoded), 0
    while position < len(out):
        _, element, length = struct.unpack_from("<HHI", out, position)
        position += 8 + length
        if element in {0x0002, 0x1000} and out[position - 1] == 0:
            out[position - 1] = 0x20
    return bytes(out)


def _parameters(primitive: object) -> dict[str, object]:
    names = [*command_set.ELEMENTS, "OffendingElement", "DataSet"]
    names += ["_context_id", "_dataset_path", "_dataset_file"]
    return {name: getattr(primitive, name) for name in names if hasattr(primitive, name)}


@pytest.mark.filterwarnings("ignore:Failed to encode value")  # pydicom, for a text not Latin-1
@settings(max_examples=400, deadline=None)
@given(primitives())
def test_a_command_set_is_encoded_as_pydicom_encodes_it(primitive: C_STORE | C_ECHO) -> None:
    expected = _pydicom_message(primitive)
    fast = patches._encoded_message(primitive)
    if fast is None:  # a value it does not take: only text that is not plain
        assert not _plain(primitive.ErrorComment)
        return
    assert bytes(fast.command_set) == encode(expected.command_set, True, True)
    assert fast.data_set is expected.data_set or (
        fast.data_set.getvalue() == expected.data_set.getvalue() == b""
    )
    assert fast._data_set_path == expected._data_set_path
    assert type(fast) is type(expected)


@pytest.mark.filterwarnings("ignore:Failed to encode value")
@settings(max_examples=400, deadline=None)
@given(primitives(), st.booleans())
def test_a_command_set_is_decoded_as_pynetdicom_decodes_it(
    primitive: C_STORE | C_ECHO, space_padded: bool
) -> None:
    encoded = encode(_pydicom_message(primitive).command_set, True, True)
    assert encoded is not None
    if space_padded:  # UIDs padded with a space, as some peers send them
        encoded = _space_padded_uids(encoded)
    data_set = BytesIO()

    def received() -> DIMSEMessage:
        message = DIMSEMessage()
        message.encoded_command_set = BytesIO(encoded)
        message.command_set = pynetdicom.dsutils.decode(BytesIO(encoded), True, True)
        message.__class__ = pynetdicom.dimse_messages._MESSAGE_TYPES[
            message.command_set.CommandField
        ][1]
        message.context_id = 3
        message.data_set = data_set
        return message

    with _pynetdicom_alone():
        expected = received().message_to_primitive()
    fast = patches._decoded_primitive(received())
    if fast is None:  # only a comment that is not plain, or empty once its padding is off
        assert not _plain(primitive.ErrorComment) or not str(primitive.ErrorComment).rstrip(" ")
        return
    assert type(fast) is type(expected)
    assert _parameters(fast) == _parameters(expected)


def test_plain_messages_take_the_fast_path_both_ways() -> None:
    """The proxy's own messages: a C-STORE request with its data set and a success or failure
    response with a comment, a C-ECHO."""
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    request.AffectedSOPInstanceUID = "2.25.1234567890123456789"
    request.Priority = 2
    request._dataset_path = (Path("/spool/x.dcm"), 312)  # sent from a file
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 1
    response.Status = 0xA700
    response.ErrorComment = "Out of resources: the spool is full"
    echo = C_ECHO()
    echo.MessageID = 9
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    for primitive in (request, response, echo):
        message = patches._encoded_message(primitive)
        assert message is not None
        assert bytes(message.command_set) == encode(
            _pydicom_message(primitive).command_set, True, True
        )
        message.encoded_command_set = BytesIO(bytes(message.command_set))
        decoded = patches._decoded_primitive(message)
        assert decoded is not None
        assert {
            k: v for k, v in _parameters(decoded).items() if k[0] != "_" and k != "DataSet"
        } == {k: v for k, v in _parameters(primitive).items() if k[0] != "_" and k != "DataSet"}


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00\x00\x04\x00\x00\x00\x08\x00\x00\x00\x00\x00\x00\x01",  # truncated
        b"\x02\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00",  # not group 0000
        b"\x00\x00\x01\x09\x02\x00\x00\x00\x00\x00",  # an element it does not know
        b"\x00\x00\x00\x01\x04\x00\x00\x00\x01\x00\x01\x00",  # two values of a US
        b"\x00\x00\x02\x00\x04\x00\x00\x00\x31\x5c\x32\x00",  # two UIDs
        b"\x00\x00\x02\x00\x02\x00\x00\x00\xe9\x00",  # not ASCII
        b"\x00\x00\x02\x00\x00\x00\x00\x00",  # no value
        b"\x00\x00\x10\x01\x02\x00\x00\x00\x01\x00\x00\x00\x00\x01\x02\x00\x00\x00\x01\x00",
    ],
)
def test_anything_else_is_left_to_pydicom(data: bytes) -> None:
    assert command_set.decode(data) is None


def test_values_it_does_not_take_are_left_to_pydicom() -> None:
    assert command_set.encode({"CommandGroupLength": 4}) is None  # computed, never given
    assert command_set.encode({"OffendingElement": [0x00100010]}) is None  # AT
    assert command_set.encode({"MessageID": 0x10000}) is None
    assert command_set.encode({"MessageID": True}) is None
    assert command_set.encode({"AffectedSOPClassUID": "1.2.a"}) is None
    assert command_set.encode({"ErrorComment": "x" * 65}) is None
    assert command_set.encode({"ErrorComment": "two\\values"}) is None
    assert command_set.encode({"MessageID": 1}) == (
        b"\x00\x00\x00\x00\x04\x00\x00\x00\x0a\x00\x00\x00\x00\x00\x10\x01\x02\x00\x00\x00\x01\x00"
    )
