"""Hostile runs, made as an attacker on the web host would: from the key holders' public keys alone.

An attacker with root on the web host can write any run: any dump text, any tar members, any index,
manifest names and mtimes. These helpers build such runs with the real tools only (zstd, ``gpg -e -r
FPR`` in a keyring that holds the public key and nothing else, ``sha256sum``), never through
ppbackup, so that what ppbackup makes of them proves what a run can and cannot do.
"""

from __future__ import annotations

import io
import json
import secrets
import subprocess
import tarfile
from pathlib import Path
from typing import Any, Iterable

NAME = 'assoc'


def public_keyring(base: Path, armored: str) -> Path:
    """Return a GnuPG home under ``base`` that holds one public key and no secret key."""
    home = base / f'attacker-gnupg-{secrets.token_hex(3)}'
    home.mkdir(mode=0o700, parents=True)
    subprocess.run(
        ['gpg', '--homedir', str(home), '--batch', '--import'],
        input=armored.encode(),
        capture_output=True,
        check=True,
    )
    return home


def seal(data: bytes, home: Path, fingerprint: str) -> bytes:
    """Given plaintext, return it as a run holds it: zstd, then encrypted to ``fingerprint``."""
    packed = subprocess.run(['zstd', '-q', '-c'], input=data, capture_output=True, check=True)
    sealed = subprocess.run(
        ['gpg', '--homedir', str(home), '--batch', '--trust-model', 'always', '--no-tty',
         '--compress-algo', 'none', '-e', '-r', fingerprint, '-o', '-'],
        input=packed.stdout, capture_output=True, check=True,
    )  # fmt: skip
    return sealed.stdout


def seal_stream(argv: list[str], home: Path, fingerprint: str, out: Path) -> None:
    """Seal what ``argv`` writes, as ``seal`` does, streamed through a pipeline into ``out``."""
    with open(out, 'wb') as sink:
        maker = subprocess.Popen(argv, stdout=subprocess.PIPE)
        packer = subprocess.Popen(
            ['zstd', '-q', '-T0', '-c'], stdin=maker.stdout, stdout=subprocess.PIPE
        )
        sealer = subprocess.Popen(
            ['gpg', '--homedir', str(home), '--batch', '--trust-model', 'always', '--no-tty',
             '--compress-algo', 'none', '-e', '-r', fingerprint, '-o', '-'],
            stdin=packer.stdout, stdout=sink,
        )  # fmt: skip
        assert maker.stdout and packer.stdout
        maker.stdout.close()
        packer.stdout.close()
        codes = [sealer.wait(), packer.wait(), maker.wait()]
    assert codes == [0, 0, 0], f'{argv}: exit codes gpg, zstd, maker: {codes}'


def tar_bytes(members: Iterable[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """Given (header, data) pairs, return a tar archive holding exactly those members."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w', format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(info)
    return buffer.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, **fields: Any) -> tarfile.TarInfo:
    """Return a tar header: ``kind`` (REGTYPE, SYMTYPE, CHRTYPE...) and any other field set."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = fields.pop('mode', 0o644)
    for field, value in fields.items():
        setattr(info, field, value)
    return info


def pg_dump_text(database: str, body: str) -> bytes:
    """Return a plain ``pg_dump --create`` file of ``database`` around ``body`` (the attack)."""
    return (
        '--\n-- PostgreSQL database dump\n--\n\n'
        "SET client_encoding = 'UTF8';\nSET standard_conforming_strings = on;\n\n"
        f'--\n-- Name: {database}; Type: DATABASE; Schema: -; Owner: postgres\n--\n\n'
        f"CREATE DATABASE {database} WITH TEMPLATE = template0 ENCODING = 'UTF8';\n\n"
        f'\\connect {database}\n\n'
        f'{body}\n'
        '--\n-- PostgreSQL database dump complete\n--\n\n'
    ).encode()


def write_run(
    slot: Path,
    home: Path,
    fingerprint: str,
    files: dict[str, bytes],
    *,
    index: dict[str, Any] | bytes | None = None,
    run_id: str = '20260101-010101',
    manifest_names: dict[str, str] | None = None,
    archives: dict[str, list[str]] | None = None,
) -> Path:
    """Write a run into ``slot``: each of ``files`` (plaintext name -> bytes, e.g. ``psql`` ->
    a dump) sealed as NAME-KIND-ID.EXT.zst.gpg, an index (a dict written as JSON, raw bytes, or by
    default one that lists the files as ppbackup's would), and a sha256sum manifest; return the
    manifest. ``manifest_names`` puts other names in the manifest (name in the slot -> name listed).
    ``archives`` (kind -> argv, e.g. ``tar -c``) seals what a command writes, streamed: any size.
    """
    slot.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}  # kind -> file name in the slot
    for kind, data in files.items():
        ext = '.tar' if kind in ('files', 'binaries') else '.sql'
        name = f'{NAME}-{kind}-{run_id}{ext}.zst.gpg'
        (slot / name).write_bytes(seal(data, home, fingerprint))
        written[kind] = name
    for kind, argv in (archives or {}).items():
        name = f'{NAME}-{kind}-{run_id}.tar.zst.gpg'
        seal_stream(argv, home, fingerprint, slot / name)
        written[kind] = name
    if index is None:
        index = default_index(written)
    raw = index if isinstance(index, bytes) else json.dumps(index).encode()
    index_name = f'{NAME}-rowcounts-{run_id}.json.zst.gpg'
    (slot / index_name).write_bytes(seal(raw, home, fingerprint))
    names = sorted([*written.values(), index_name])
    listing = subprocess.run(
        ['sha256sum', '--', *names], cwd=slot, capture_output=True, text=True, check=True
    ).stdout
    for real, listed in (manifest_names or {}).items():
        listing = listing.replace(f'  {real}\n', f'  {listed}\n')
    manifest = slot / f'{NAME}-{run_id}.sha256'
    manifest.write_text(listing)
    return manifest


def default_index(written: dict[str, str]) -> dict[str, Any]:
    """Return the index ppbackup would write for files named by kind (psql, mysql, files...)."""
    plain = {kind: name.removesuffix('.gpg') for kind, name in written.items()}
    databases = []
    for kind in ('psql', 'mysql'):
        if kind in plain:
            databases.append(
                {'kind': kind, 'database': f'forged_{kind}', 'file': plain[kind], 'rows': {}}
            )
    return {
        'format': 1,
        'name': NAME,
        'databases': databases,
        'pg_roles': plain.get('pg-roles'),
        'mariadb_users': plain.get('mariadb-users'),
        'archives': [plain[kind] for kind in ('files', 'binaries') if kind in plain],
        'lacks': [],
    }
