"""Test certificates, made at test time with the `openssl` command line tool.

`make_pki(folder)` writes a CA, a server certificate for 127.0.0.1 and localhost, a
client certificate signed by that CA, and a second, untrusted CA with a client
certificate of its own. Nothing here is ever committed.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

OPENSSL_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    ca: Path
    server: KeyPair
    client: KeyPair
    untrusted_ca: Path
    untrusted_client: KeyPair


def _openssl(*arguments: str, cwd: Path) -> None:
    executable = shutil.which("openssl")
    if executable is None:
        pytest.fail("openssl (Debian package openssl, `make system-deps`) is required")
    result = subprocess.run(
        [executable, *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=OPENSSL_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"openssl {' '.join(arguments)} failed:\n{result.stderr}")


def _ca(folder: Path, name: str) -> KeyPair:
    pair = KeyPair(folder / f"{name}.pem", folder / f"{name}.key")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
        "-subj", f"/CN=radgate test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", str(pair.key), "-out", str(pair.cert),
        cwd=folder,
    )  # fmt: skip
    return pair


def _leaf(folder: Path, name: str, ca: KeyPair, extensions: str) -> KeyPair:
    pair = KeyPair(folder / f"{name}.pem", folder / f"{name}.key")
    request = folder / f"{name}.csr"
    extension_file = folder / f"{name}.ext"
    extension_file.write_text(extensions, encoding="ascii")
    _openssl(
        "req", "-new", "-newkey", "rsa:2048", "-nodes", "-sha256",
        "-subj", f"/CN={name}", "-keyout", str(pair.key), "-out", str(request),
        cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(extension_file),
        "-out", str(pair.cert),
        cwd=folder,
    )  # fmt: skip
    return pair


def make_pki(folder: Path) -> PKI:
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "ca")
    untrusted_ca = _ca(folder, "untrusted-ca")
    server_extensions = (
        "basicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    client_extensions = (
        "basicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=clientAuth\n"
    )
    return PKI(
        ca=ca.cert,
        server=_leaf(folder, "server", ca, server_extensions),
        client=_leaf(folder, "client", ca, client_extensions),
        untrusted_ca=untrusted_ca.cert,
        untrusted_client=_leaf(folder, "untrusted-client", untrusted_ca, client_extensions),
    )
