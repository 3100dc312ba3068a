"""Encryption at rest of the received data sets (``storage.incoming_key_file``).

A received data set holds PHI and waits on disk until it is de-identified (seconds, or as long
as the destinations lag under ``listen.acknowledge: after_receipt``). With a key configured it
is written *sealed*: encrypted and authenticated as it arrives, so that its plain text never
reaches the disk, and decrypted by the process that de-identifies it, into an anonymous memory
file (:func:`opened`).

The format is a stream of AES-256-GCM chunks (the STREAM construction), so that neither
side ever holds a large instance whole and nothing is used before it is authenticated::

    header   magic "APXSEAL1" (8) | key id (8) | salt (16) | chunk size (4, big-endian)
    chunk i  AES-GCM(file key, nonce = i (11 bytes, big-endian) | last (1 byte: 0 or 1),
                     plain text chunk, associated data = header)  -> ciphertext | tag (16)

The file key is HKDF-SHA256 of the configured key with the header's random salt: a new key per
file, so that the chunk counter is a safe nonce. Every chunk but the last holds exactly the
chunk size; the last one (which may be empty) is sealed with the *last* flag, so that a file
cut at a chunk boundary, chunks swapped, replayed from another file or altered all fail
authentication. The key id (a hash of the key, not the key) tells a file sealed with another
key from a tampered one.

The key file holds 32 random bytes, raw or as 64 hexadecimal digits (``openssl rand -out
FILE 32``, or ``-hex 32``); it must be readable by its owner only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import struct
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from anonproxy.errors import AnonproxyError, ConfigError

MAGIC = b"APXSEAL1"
CHUNK = 1 << 16
_HEADER = struct.Struct(">8s8s16sI")
HEADER_SIZE = _HEADER.size
_TAG = 16
_KEY_BYTES = 32
_INFO = b"anonproxy incoming spool v1"


class SealError(AnonproxyError):
    """A sealed file cannot be opened: another key, or it fails authentication (altered,
    cut short). The message names the reason only."""


def load_key(path: Path, setting: str = "storage.incoming_key_file") -> bytes:
    """The 256-bit key in *path*; :class:`ConfigError` naming *setting* when it cannot be read,
    is not 32 bytes (raw, or 64 hexadecimal digits), or others than its owner may read it."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        msg = f"{setting}: cannot read {path}: {exc.strerror or type(exc).__name__}"
        raise ConfigError(msg) from None
    if mode & 0o077:
        msg = f"{setting}: {path} must be readable by its owner only (chmod 600)"
        raise ConfigError(msg)
    text = data.strip()
    if len(text) == 2 * _KEY_BYTES:
        with contextlib.suppress(ValueError):
            return bytes.fromhex(text.decode("ascii"))
    if len(data) == _KEY_BYTES:
        return data
    msg = f"{setting}: {path} must hold 32 random bytes (openssl rand -out {path} 32)"
    raise ConfigError(msg)


def key_id(key: bytes) -> bytes:
    """Eight bytes that name *key* without revealing it."""
    return hashlib.sha256(b"anonproxy key id\0" + key).digest()[:8]


def _nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _file_key(key: bytes, salt: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=salt, info=_INFO)
    return AESGCM(hkdf.derive(key))


class Sealer:
    """Seals one file as its plain text arrives: :meth:`update` and :meth:`finish` return the
    bytes to write (the header first)."""

    def __init__(self, key: bytes, chunk: int = CHUNK) -> None:
        salt = os.urandom(16)
        self.header = _HEADER.pack(MAGIC, key_id(key), salt, chunk)
        self._aead = _file_key(key, salt)
        self._chunk = chunk
        self._buffer = bytearray()
        self._index = 0
        self._out: list[bytes] = [self.header]

    def _seal(self, plain: bytes | bytearray | memoryview, last: bool) -> None:
        self._out.append(self._aead.encrypt(_nonce(self._index, last), bytes(plain), self.header))
        self._index += 1

    def _take(self) -> bytes:
        out, self._out = self._out, []
        return b"".join(out)

    def update(self, data: bytes) -> bytes:
        """Take *data*; the sealed chunks now complete (a chunk is sealed once more follows)."""
        buffer = self._buffer
        buffer += data
        chunk = self._chunk
        if len(buffer) > chunk:
            whole = (len(buffer) - 1) // chunk * chunk  # keep at least one byte for the last
            view = memoryview(buffer)
            for start in range(0, whole, chunk):
                self._seal(view[start : start + chunk], last=False)
            view.release()
            del buffer[:whole]
        return self._take()

    def finish(self) -> bytes:
        """The last chunk (possibly empty): the file is complete once it is written."""
        self._seal(self._buffer, last=True)
        self._buffer = bytearray()
        return self._take()


def sealed_key_id(path: Path) -> bytes | None:
    """The key id of the sealed file *path*, or None when it is not sealed."""
    with path.open("rb") as handle:
        head = handle.read(HEADER_SIZE)
    if len(head) < HEADER_SIZE or not head.startswith(MAGIC):
        return None
    ident: bytes = _HEADER.unpack(head)[1]
    return ident


def _open_chunks(handle: io.BufferedReader, key: bytes) -> Iterator[bytes]:
    """The authenticated plain text chunks of the sealed file open in *handle* (positioned at
    its start). Raises :class:`SealError`."""
    header = handle.read(HEADER_SIZE)
    if len(header) < HEADER_SIZE:
        raise SealError("sealed data set cut short (no header)")
    magic, ident, salt, chunk = _HEADER.unpack(header)
    if magic != MAGIC:
        raise SealError("not a sealed data set")
    if ident != key_id(key):
        raise SealError("sealed with another key than storage.incoming_key_file")
    if not 0 < chunk <= 1 << 26:
        raise SealError("sealed data set fails authentication")
    aead = _file_key(key, salt)
    size = chunk + _TAG
    current = handle.read(size)
    index = 0
    while True:
        following = handle.read(size) if len(current) == size else b""
        last = not following
        try:
            yield aead.decrypt(_nonce(index, last), current, header)
        except InvalidTag:
            raise SealError("sealed data set fails authentication (altered or cut)") from None
        if last:
            return
        current = following
        index += 1


def plain_prefix(path: Path, key: bytes) -> bytes:
    """The first authenticated chunk of the sealed file *path* (its file meta is in it)."""
    with path.open("rb") as handle:
        for piece in _open_chunks(handle, key):
            return piece
    return b""


def is_sealed(path: Path) -> bool:
    """Whether *path* starts as a sealed file does (False when it cannot be read: the
    engine reports that)."""
    try:
        with path.open("rb") as handle:
            return handle.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


@contextlib.contextmanager
def opened(path: Path, key: bytes | None) -> Iterator[Path]:
    """A path to the plain text of the received data set *path*: *path* itself when it is not
    sealed, else an anonymous memory file (``/proc/self/fd/N``, gone when the block ends)
    holding it, every chunk authenticated before it is yielded. Raises :class:`SealError`
    when it is sealed and cannot be opened (no key, another key, fails authentication)."""
    if not is_sealed(path):
        yield path
        return
    if key is None:
        raise SealError("sealed, and no storage.incoming_key_file is configured")
    fd = os.memfd_create("anonproxy-received", os.MFD_CLOEXEC)
    try:
        with path.open("rb") as handle:
            for piece in _open_chunks(handle, key):
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view) :]
        yield Path(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def check_waiting(paths: list[Path], key: bytes | None) -> None:
    """At start-up: :class:`ConfigError` when data sets wait sealed and *key* cannot open
    them (no key configured, or another key), rather than refusing each of them: with the
    right key back, they are processed."""
    foreign = 0
    for path in paths:
        with contextlib.suppress(OSError):
            ident = sealed_key_id(path)
            if ident is not None and (key is None or ident != key_id(key)):
                foreign += 1
    if foreign and key is None:
        msg = (
            f"storage.incoming_key_file: {foreign} received data sets wait sealed; configure "
            "the key they were sealed with"
        )
        raise ConfigError(msg)
    if foreign:
        msg = (
            f"storage.incoming_key_file: {foreign} received data sets wait sealed with another "
            "key; configure the key they were sealed with"
        )
        raise ConfigError(msg)
