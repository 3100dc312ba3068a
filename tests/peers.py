"""Real DICOM peers for tests and benchmarks: DCMTK tools and Orthanc on loopback ports.

DCMTK and Orthanc run with ``TCP_NODELAY=1`` in their environment: Debian's DCMTK otherwise
leaves Nagle's algorithm on, which costs about 40 ms per C-STORE on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


def tool(name: str) -> str:
    """Path of a Debian-installed tool (DCMTK, dicom3tools, Orthanc), preferring /usr/bin."""
    for directory in ("/usr/bin", "/usr/sbin"):
        candidate = Path(directory) / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        msg = f"{name} is not installed (apt-get install dcmtk orthanc dicom3tools)"
        raise FileNotFoundError(msg)
    return found


def stop_process(process: subprocess.Popen[Any] | None, timeout: float) -> None:
    """Terminate a peer, killing it when it does not stop within *timeout* seconds."""
    if process is None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def descendants(pid: int) -> list[int]:
    """The child processes of *pid*, and theirs (Linux /proc)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:  # the process ended meanwhile
        return found
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found


def running(pid: int) -> bool:
    """Whether *pid* is a process that has not ended (a zombie has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in {"Z", "X"}


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    """Wait until something listens on the loopback *port*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    msg = f"nothing listens on port {port} after {timeout} s"
    raise TimeoutError(msg)


# DCMTK storescu proposes uncompressed transfer syntaxes unless told which compressed one to
# propose; a mixed set of files is therefore sent in one storescu run per transfer syntax.
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG Extended
    "1.2.840.10008.1.2.4.57": "-xs",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",  # RLE Lossless
    "1.2.840.10008.1.2.1.99": "-xd",  # Deflated Explicit VR Little Endian
}


def _propose_option(path: Path) -> str:
    from pydicom import dcmread

    try:
        syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    except Exception:  # noqa: BLE001 - no meta: storescu sends it uncompressed
        return ""
    return STORESCU_PROPOSE.get(syntax, "")


def storescu(
    port: int,
    paths: Sequence[Path | str],
    *,
    called: str = "ANONPROXY",
    calling: str = "MODALITY",
    extra: Sequence[str] = (),
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Send files (or folders, recursively) with DCMTK storescu, one run per transfer syntax.

    storescu exits 0 even when a C-STORE fails: callers check ``stderr`` for "Store Failed".
    """
    groups: dict[str, list[str]] = {}
    for path in map(Path, paths):
        option = "" if path.is_dir() else _propose_option(path)
        groups.setdefault(option, []).append(str(path))
    returncode, stdout, stderr = 0, "", ""
    for option, members in groups.items():
        command = [
            tool("storescu"),
            "-aet", calling,
            "-aec", called,
            "+sd", "+r",  # scan folders, recursively
            "-nh",  # folders without DICOMDIR: no header check
            "-R",  # propose the SOP Classes of the files (storescu's own list lacks some)
            *([option] if option else []),
            *extra,
            "127.0.0.1", str(port),
            *members,
        ]  # fmt: skip
        done = subprocess.run(
            command, env=PEER_ENV, capture_output=True, text=True, timeout=timeout, check=False
        )
        returncode = max(returncode, done.returncode)
        stdout += done.stdout
        stderr += done.stderr
    return subprocess.CompletedProcess(["storescu"], returncode, stdout, stderr)


def echoscu(port: int, *, called: str = "ANONPROXY", calling: str = "MODALITY") -> int:
    """C-ECHO with DCMTK echoscu; returns its exit code."""
    command = [tool("echoscu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port)]
    done = subprocess.run(command, env=PEER_ENV, capture_output=True, timeout=60, check=False)
    return done.returncode


class StoreSCP:
    """DCMTK storescp as a research PACS: writes every received instance to a folder."""

    def __init__(
        self,
        directory: Path,
        *,
        ae_title: str = "RESEARCH",
        port: int = 0,
        accept_compressed: bool = True,
        extra: Sequence[str] = (),
        log: Path | None = None,
    ) -> None:
        self.directory = directory
        self.log = log  # storescp's output (with extra=["-d"]: the negotiation), else none
        self.ae_title = ae_title
        self.port = port or free_port()
        self.accept_compressed = accept_compressed
        self.extra = list(extra)  # more storescp options (--fork, --max-pdu N, -d)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            tool("storescp"),
            "--aetitle", self.ae_title,
            "--output-directory", str(self.directory),
            *(["+xa"] if self.accept_compressed else []),  # every transfer syntax
            "--filename-extension", ".dcm",
            *self.options(),
            *self.extra,
            str(self.port),
        ]  # fmt: skip
        if self.log is None:
            self.process = subprocess.Popen(
                command, env=PEER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        else:
            with self.log.open("ab") as log:
                self.process = subprocess.Popen(command, env=PEER_ENV, stdout=log, stderr=log)
        wait_port(self.port)
        return self

    def options(self) -> list[str]:
        """More storescp options (subclasses)."""
        return []

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.rglob("*.dcm") if p.is_file())

    def stop(self) -> None:
        stop_process(self.process, 10)
        self.process = None


class Orthanc:
    """Orthanc as a research PACS, with its REST API on a loopback port."""

    def __init__(
        self, directory: Path, *, ae_title: str = "ORTHANC", options: dict[str, Any] | None = None
    ) -> None:
        self.directory = directory
        self.ae_title = ae_title
        self.options = options or {}  # more configuration (MaximumPduLength, DicomThreadsCount)
        self.port = free_port()
        self.http_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "anonproxy-test",
            "StorageDirectory": str(self.directory / "db"),
            "IndexDirectory": str(self.directory / "db"),
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "Plugins": [],
            "TcpNoDelay": True,
            "StorageCompression": False,
            **self.options,
        }
        config_path = self.directory / "orthanc.json"
        config_path.write_text(json.dumps(config), "utf-8")
        log = (self.directory / "orthanc.log").open("wb")
        self.process = subprocess.Popen(
            [tool("Orthanc"), str(config_path)], env=PEER_ENV, stdout=log, stderr=log
        )
        wait_port(self.http_port, timeout=60)
        wait_port(self.port, timeout=60)
        return self

    def get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read()
        return body if path.endswith(("/file", "/content")) else json.loads(body)

    def instances(self) -> list[str]:
        return list(self.get("/instances"))

    def stop(self) -> None:
        stop_process(self.process, 20)
        self.process = None


def wait_for(condition: Any, timeout: float = 60.0, interval: float = 0.1) -> bool:
    """Poll *condition* until it is true or *timeout* seconds pass; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


class RefusingSCP:
    """A pynetdicom Storage SCP on loopback answering every C-STORE with one fixed status.

    A real network peer for outcomes DCMTK's storescp cannot be asked to produce: permanent
    failures (0xA9xx, 0xCxxx) and SOP Classes it does not support.
    """

    def __init__(
        self,
        status: int,
        *,
        sop_classes: Sequence[str] | None = None,
        max_pdu: int = 16382,
        max_associations: int = 10,
        delay: float = 0.0,
        abort_after: int | None = None,
    ) -> None:
        self.status = status
        self.sop_classes = sop_classes
        self.max_pdu = max_pdu  # the Maximum Length it advertises (0: any)
        self.max_associations = max_associations  # more at once are rejected (transient)
        self.delay = delay  # seconds each C-STORE takes (a PACS storing the instance)
        self.abort_after = abort_after  # an association aborted just after its N-th answer
        self.port = free_port()
        self.ae_title = "REFUSER"
        self.calls = 0
        self.pdv_lengths: list[int] = []  # of every P-DATA value received
        # of every C-STORE: the association (its ID in this peer), the SOP Instance UID
        self.stored: list[tuple[int, str]] = []
        self.requested_max_pdu: list[int | None] = []  # the requestor's Maximum Length, each
        self.server: Any = None

    def start(self) -> RefusingSCP:
        from pydicom.uid import AllTransferSyntaxes
        from pynetdicom import AE, evt
        from pynetdicom.presentation import AllStoragePresentationContexts

        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = self.max_pdu
        ae.maximum_associations = self.max_associations
        classes = self.sop_classes or [c.abstract_syntax for c in AllStoragePresentationContexts]
        for sop_class in classes:
            ae.add_supported_context(sop_class, list(AllTransferSyntaxes))
        ae.add_supported_context("1.2.840.10008.1.1")  # Verification, as every PACS has

        def handle_store(event: Any) -> int:
            self.calls += 1
            self.stored.append((id(event.assoc), str(event.request.AffectedSOPInstanceUID)))
            if self.delay:
                time.sleep(self.delay)
            if self.abort_after == sum(1 for a, _ in self.stored if a == id(event.assoc)):
                threading.Timer(0.05, event.assoc.abort).start()
            return self.status

        def handle_established(event: Any) -> None:
            self.requested_max_pdu.append(event.assoc.requestor.maximum_length)

        def handle_pdu(event: Any) -> None:
            for item in getattr(event.pdu, "presentation_data_value_items", []):
                self.pdv_lengths.append(len(item.presentation_data_value))

        handlers = [
            (evt.EVT_C_STORE, handle_store),
            (evt.EVT_PDU_RECV, handle_pdu),
            (evt.EVT_ESTABLISHED, handle_established),
        ]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


# --- DICOM TLS and access control ---------------------------------------------------------------


class Pki:
    """A throw-away test PKI made with the openssl command: a CA, a server certificate for
    localhost/127.0.0.1 and a client certificate, each with its unencrypted PEM key."""

    def __init__(self, directory: Path, *, name: str = "anonproxy test") -> None:
        self.directory = directory
        self.name = name
        self.ca = directory / "ca.pem"
        self.ca_key = directory / "ca.key"
        self.server_cert = directory / "server.pem"
        self.server_key = directory / "server.key"
        self.client_cert = directory / "client.pem"
        self.client_key = directory / "client.key"

    def _openssl(self, *args: str) -> None:
        subprocess.run(
            [tool("openssl"), *args],
            cwd=self.directory,
            capture_output=True,
            check=True,
            timeout=60,
        )

    def _leaf(self, stem: str, common_name: str, extensions: str) -> None:
        (self.directory / f"{stem}.ext").write_text(extensions, "utf-8")
        self._openssl(
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={common_name}",
            "-keyout", f"{stem}.key", "-out", f"{stem}.csr",
        )  # fmt: skip
        self._openssl(
            "x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "2",
            "-sha256", "-extfile", f"{stem}.ext", "-out", f"{stem}.pem",
        )  # fmt: skip

    def create(self) -> Pki:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
            "-subj", f"/CN={self.name} CA", "-keyout", "ca.key", "-out", "ca.pem",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        common = (
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
        )
        self._leaf(
            "server",
            "localhost",
            common + "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        self._leaf("client", "MODALITY", common + "extendedKeyUsage=clientAuth\n")
        return self

    def dcmtk_client(self, *, certificate: bool = True) -> list[str]:
        """DCMTK storescu/echoscu options: TLS with the client certificate (or without any,
        ``+tla``), trusting this CA."""
        identity = (
            ["+tls", str(self.client_key), str(self.client_cert)] if certificate else ["+tla"]
        )
        return [*identity, "+cf", str(self.ca)]

    def dcmtk_server(self) -> list[str]:
        """DCMTK storescp options: TLS with the server certificate; clients need a certificate
        of this CA."""
        return ["+tls", str(self.server_key), str(self.server_cert), "+cf", str(self.ca)]


def echo(
    port: int,
    *,
    called: str = "ANONPROXY",
    calling: str = "MODALITY",
    extra: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """C-ECHO with DCMTK echoscu and extra options (``-d`` shows the A-ASSOCIATE-RJ fields)."""
    command = [
        tool("echoscu"), "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port),
    ]  # fmt: skip
    return subprocess.run(
        command, env=PEER_ENV, capture_output=True, text=True, timeout=60, check=False
    )


class TlsStoreSCP(StoreSCP):
    """DCMTK storescp as a research PACS that speaks DICOM TLS only (mutual TLS)."""

    def __init__(self, directory: Path, pki: Pki, *, ae_title: str = "RESEARCH") -> None:
        super().__init__(directory, ae_title=ae_title)
        self.pki = pki

    def options(self) -> list[str]:
        return self.pki.dcmtk_server()


# --- hostile peers: raw PDUs and raw data sets -----------------------------------------------------


def _pdu_item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def associate_rq(
    *,
    called: str = "ANONPROXY",
    calling: str = "MODALITY",
    contexts: Sequence[tuple[int, str, Sequence[str]]] = (
        (1, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",)),
    ),
    max_pdu: int = 16384,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2), built byte by byte."""
    presentation = b"".join(
        _pdu_item(
            0x20,
            bytes([context_id, 0, 0, 0])
            + _pdu_item(0x30, abstract.encode())
            + b"".join(_pdu_item(0x40, syntax.encode()) for syntax in syntaxes),
        )
        for context_id, abstract, syntaxes in contexts
    )
    user = _pdu_item(
        0x50, _pdu_item(0x51, struct.pack(">L", max_pdu)) + _pdu_item(0x52, b"1.2.3.4.5.6")
    )
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16).encode()
        + calling.ljust(16).encode()
        + bytes(32)
        + _pdu_item(0x10, b"1.2.840.10008.3.1.1.1")
        + presentation
        + user
    )
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def p_data_tf(items: Sequence[tuple[int, int, bytes]]) -> bytes:
    """A P-DATA-TF PDU of PDV items (context ID, message control header, fragment)."""
    body = b"".join(
        struct.pack(">LBB", len(data) + 2, context_id, control) + data
        for context_id, control, data in items
    )
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def _command_element(number: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, number, len(value)) + value


def c_echo_rq(message_id: int = 1) -> bytes:
    """A C-ECHO-RQ command set (Implicit VR Little Endian)."""
    body = (
        _command_element(0x0002, b"1.2.840.10008.1.1\x00")
        + _command_element(0x0100, struct.pack("<H", 0x0030))
        + _command_element(0x0110, struct.pack("<H", message_id))
        + _command_element(0x0800, struct.pack("<H", 0x0101))
    )
    return _command_element(0x0000, struct.pack("<L", len(body))) + body


RELEASE_RQ = struct.pack(">BBLL", 0x05, 0, 4, 0)
_CT = "1.2.840.10008.5.1.4.1.1.2"
_EXPLICIT_LITTLE = "1.2.840.10008.1.2.1"


def conversation() -> bytes:
    """A valid C-ECHO conversation of an SCU, as one byte stream."""
    return associate_rq() + p_data_tf([(1, 0x03, c_echo_rq())]) + RELEASE_RQ


def _element(group: int, number: int, vr: bytes, value: bytes) -> bytes:
    """An Explicit VR Little Endian element (short-length VRs, and OB)."""
    if vr == b"OB":
        return struct.pack("<HH2sHL", group, number, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, number, vr, len(value)) + value


def store_conversation() -> bytes:
    """A valid C-STORE conversation (a CT image's header and 3 KB of pixels), its data set in
    three P-DATA-TF PDUs: two middle fragments and the last, the way the proxy's straight path
    to the data set's file takes them."""
    instance = b"1.2.826.0.1.3680043.8.498.1\x00"
    body = (
        _command_element(0x0002, _CT.encode())
        + _command_element(0x0100, struct.pack("<H", 0x0001))
        + _command_element(0x0110, struct.pack("<H", 7))
        + _command_element(0x0700, struct.pack("<H", 0))
        + _command_element(0x0800, struct.pack("<H", 0x0000))
        + _command_element(0x1000, instance)
    )
    command = _command_element(0x0000, struct.pack("<L", len(body))) + body
    data_set = (
        _element(0x0008, 0x0016, b"UI", _CT.encode())
        + _element(0x0008, 0x0018, b"UI", instance)
        + _element(0x0008, 0x0060, b"CS", b"CT")
        + _element(0x0010, 0x0010, b"PN", b"FUZZ^PATIENT")
        + _element(0x0020, 0x000D, b"UI", b"1.2.826.0.1.3680043.8.498.2\x00")
        + _element(0x7FE0, 0x0010, b"OB", bytes(3000))
    )
    third = len(data_set) // 3
    fragments = [data_set[:third], data_set[third : 2 * third], data_set[2 * third :]]
    contexts = [(1, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",)), (3, _CT, (_EXPLICIT_LITTLE,))]
    return (
        associate_rq(contexts=contexts)
        + p_data_tf([(3, 0x03, command)])
        + p_data_tf([(3, 0x00, fragments[0])])
        + p_data_tf([(3, 0x00, fragments[1])])
        + p_data_tf([(3, 0x02, fragments[2])])
        + RELEASE_RQ
    )


class RawPeer:
    """A scripted peer on a plain TCP socket: sends bytes, reads whole PDUs."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send(self, data: bytes) -> None:
        import contextlib

        with contextlib.suppress(OSError):  # the server may abort before it has read it all
            self.sock.sendall(data)

    def _read(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            try:
                chunk = self.sock.recv(count - len(data))
            except OSError:
                return data
            if not chunk:
                return data
            data += chunk
        return data

    def read_pdu(self) -> tuple[int, bytes] | None:
        """The next PDU (type, body), or None once the server closed the connection."""
        import struct

        header = self._read(6)
        if len(header) < 6:
            return None
        pdu_type, _, length = struct.unpack(">BBL", header)
        return pdu_type, self._read(length)

    def pdus_until_closed(self, limit: int = 10) -> list[tuple[int, bytes]]:
        """Every PDU the server sends until it closes the connection."""
        pdus = []
        while len(pdus) < limit:
            pdu = self.read_pdu()
            if pdu is None:
                break
            pdus.append(pdu)
        return pdus

    def close(self) -> None:
        self.sock.close()


def send_body(port: int, sop_class: str, transfer_syntax: str, body: bytes, directory: Path) -> Any:
    """C-STORE a data set body as it is, with pynetdicom (which streams a file without parsing
    it); returns the status data set (Status, ErrorComment), or None when aborted."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom import AE

    from anonproxy import pynetdicom_patches

    pynetdicom_patches.install()  # chunked sending, as the proxy's forwarding does

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.999.1"
    meta.TransferSyntaxUID = transfer_syntax
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"raw-{time.monotonic_ns()}.dcm"
    with path.open("wb") as handle:
        handle.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(handle, meta, enforce_standard=True)
        handle.write(body)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(sop_class, transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="ANONPROXY")
    if not assoc.is_established:
        return None
    status = assoc.send_c_store(path)
    if assoc.is_established:
        assoc.release()
    return status if status else None
