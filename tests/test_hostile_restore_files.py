"""A hostile run's archives, seen from the key holder who restores them with --files (FAULTS.md A3).

After a break-in of the web host the attacker writes any run, encrypted to the key holder's public
key (tests/forge.py, from the public key alone). The key holder restores it as root, as these tests
run. The promise: an archive is data, never instructions. Nothing lands outside the restore folder
(a canary folder beside it stays byte for byte as it was), no device node, FIFO, setuid bit or
foreign owner is ever made, and an archive that asks for one fails the restore with a sentence that
names the member, leaving nothing of what the restore extracted. A genuine run, made by ppbackup
itself, still comes back exactly: contents, modes, mtimes, relative symlinks and hard links.
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import tarfile
from pathlib import Path

import forge
import pytest
from conftest import Site, drop_databases

KEYS = 'ssh-ed25519 AAAA-the-key-holders-own-key\n'


def restore(
    site: Site, tmp_path: Path, archives: dict[str, bytes], out: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Forge a run holding ``archives`` (kind -> tar bytes) and restore it with --files ``out``."""
    home = forge.public_keyring(tmp_path, site.keys.public[site.keys.alice])
    slot = tmp_path / 'kept' / f'day{secrets.randbelow(1000)}'
    manifest = forge.write_run(slot, home, site.keys.alice, archives)
    return site.run(
        'restore',
        str(manifest),
        '--files',
        str(out or tmp_path / 'out'),
        '--gnupghome',
        str(site.keys.holder),
    )


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A folder beside the restore folder, as ~root/.ssh would be: what an attack aims at."""
    folder = tmp_path / 'canary'
    folder.mkdir()
    (folder / 'authorized_keys').write_text(KEYS)
    (folder / 'inner').mkdir()
    return folder


def snapshot(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Return, for everything under ``root`` (itself too), its mode, owner, size and content (a
    symlink's target)."""
    seen = {}
    for path in [root, *sorted(root.rglob('*'))]:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            data = os.readlink(path).encode()
        elif stat.S_ISREG(info.st_mode):
            data = path.read_bytes()
        else:
            data = b''
        seen[str(path)] = (info.st_mode, info.st_uid, info.st_size, data)
    return seen


def specials(root: Path) -> list[str]:
    """Return what under ``root`` is a device node, a FIFO, setuid/setgid/sticky or not ours."""
    found = []
    for path in sorted(root.rglob('*')):
        info = path.lstat()
        kind = stat.S_IFMT(info.st_mode)
        if kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO):  # gpg-agent's sockets are fine
            found.append(f'{path}: a special file')
        if info.st_mode & 0o7000:
            found.append(f'{path}: mode {info.st_mode:o}')
        if info.st_uid != os.getuid() or info.st_gid != os.getgid():
            found.append(f'{path}: owned by {info.st_uid}:{info.st_gid}')
    return found


def assert_refused(
    result: subprocess.CompletedProcess[str],
    member: str,
    out: Path,
    canary: Path,
    before: dict[str, tuple[int, int, int, bytes]],
) -> None:
    """The restore failed with a sentence naming ``member``, removed all it extracted, and changed
    nothing beside the restore folder."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert f'member {member} refused' in result.stderr, result.stderr
    assert 'Traceback' not in result.stderr
    assert not out.exists(), sorted(out.rglob('*'))
    assert snapshot(canary) == before
    assert specials(out.parent) == []


def test_A3_a_symlink_in_one_archive_then_a_file_through_it_in_the_next(
    site: Site, tmp_path: Path, canary: Path
) -> None:
    before = snapshot(canary)
    planted = forge.tar_bytes(
        [
            (forge.member('www/index.html'), b'<h1>site</h1>\n'),
            (forge.member('www/evil', tarfile.SYMTYPE, linkname=str(canary)), None),
        ]
    )
    through = forge.tar_bytes([(forge.member('www/evil/authorized_keys'), b'attacker key\n')])
    result = restore(site, tmp_path, {'files': planted, 'binaries': through})
    assert_refused(result, 'www/evil', tmp_path / 'out', canary, before)
    assert 'absolute' in result.stderr


@pytest.mark.parametrize(
    'target', ['../../canary', '../www2'], ids=['climbing out', 'inside the folder']
)
def test_A3_nothing_is_written_through_a_symlink_of_an_earlier_archive(
    site: Site, tmp_path: Path, canary: Path, target: str
) -> None:
    """A relative symlink that climbs out is refused itself; one that stays inside is kept, and a
    later archive's member through it is refused (the two archives cannot combine)."""
    before = snapshot(canary)
    planted = forge.tar_bytes(
        [
            (forge.member('www2', tarfile.DIRTYPE, mode=0o755), None),
            (forge.member('www/evil', tarfile.SYMTYPE, linkname=target), None),
        ]
    )
    through = forge.tar_bytes([(forge.member('www/evil/authorized_keys'), b'attacker key\n')])
    result = restore(site, tmp_path, {'files': planted, 'binaries': through})
    member = 'www/evil' if target.startswith('../..') else 'www/evil/authorized_keys'
    assert_refused(result, member, tmp_path / 'out', canary, before)


def test_A3_a_symlink_then_a_file_through_it_in_one_archive(
    site: Site, tmp_path: Path, canary: Path
) -> None:
    before = snapshot(canary)
    tar = forge.tar_bytes(
        [
            (forge.member('www', tarfile.DIRTYPE, mode=0o755), None),
            (forge.member('www/in', tarfile.DIRTYPE, mode=0o755), None),
            (forge.member('www/evil', tarfile.SYMTYPE, linkname='in'), None),
            (forge.member('www/evil/authorized_keys'), b'attacker key\n'),
        ]
    )
    result = restore(site, tmp_path, {'files': tar})
    assert_refused(result, 'www/evil/authorized_keys', tmp_path / 'out', canary, before)
    assert 'www/evil is a symlink' in result.stderr


@pytest.mark.parametrize('order', ['link first', 'link last'])
def test_A3_symlinks_chained_to_lead_out_are_refused(
    site: Site, tmp_path: Path, canary: Path, order: str
) -> None:
    """Each link stays inside alone; read through each other, ``t`` is DIR's parent."""
    before = snapshot(canary)
    deep = (forge.member('a/b/c/s', tarfile.SYMTYPE, linkname='../../..'), None)
    chained = (forge.member('t', tarfile.SYMTYPE, linkname='a/b/c/s/..'), None)
    folders = [(forge.member(n, tarfile.DIRTYPE, mode=0o755), None) for n in ('a', 'a/b', 'a/b/c')]
    members = [*folders, deep, chained] if order == 'link first' else [*folders, chained, deep]
    result = restore(site, tmp_path, {'files': forge.tar_bytes(members)})
    refused = 't' if order == 'link first' else 'a/b/c/s'
    assert_refused(result, refused, tmp_path / 'out', canary, before)


@pytest.mark.parametrize(
    'name',
    ['/ABS/authorized_keys', '../canary/authorized_keys', 'www/../../canary/authorized_keys'],
    ids=['absolute', 'climbing', 'climbing in the middle'],
)
def test_A3_absolute_and_climbing_member_names(
    site: Site, tmp_path: Path, canary: Path, name: str
) -> None:
    before = snapshot(canary)
    name = name.replace('/ABS', str(canary))
    tar = forge.tar_bytes(
        [(forge.member('www/index.html'), b'<h1>site</h1>\n'), (forge.member(name), b'key\n')]
    )
    result = restore(site, tmp_path, {'files': tar})
    assert_refused(result, name, tmp_path / 'out', canary, before)


def test_A3_a_hard_link_to_a_file_outside_the_archive(
    site: Site, tmp_path: Path, canary: Path
) -> None:
    before = snapshot(canary)
    target = str(canary / 'authorized_keys')
    tar = forge.tar_bytes(
        [
            (forge.member('www/index.html'), b'<h1>site</h1>\n'),
            (forge.member('www/keys', tarfile.LNKTYPE, linkname=target), None),
            (forge.member('www/keys'), b'attacker key\n'),  # would write the canary's inode
        ]
    )
    result = restore(site, tmp_path, {'files': tar})
    assert_refused(result, 'www/keys', tmp_path / 'out', canary, before)


@pytest.mark.parametrize(
    'fields',
    [{'mode': 0o4755}, {'mode': 0o2755}, {'mode': 0o1777, 'type': tarfile.DIRTYPE}],
    ids=['setuid', 'setgid', 'sticky'],
)
def test_A3_a_setuid_setgid_or_sticky_member(
    site: Site, tmp_path: Path, canary: Path, fields: dict[str, int]
) -> None:
    before = snapshot(canary)
    data = None if 'type' in fields else b'#!/bin/sh\nid\n'
    tar = forge.tar_bytes(
        [
            (forge.member('www/index.html'), b'<h1>site</h1>\n'),
            (forge.member('www/tool', uid=0, gid=0, uname='', gname='', **fields), data),
        ]
    )
    result = restore(site, tmp_path, {'files': tar})
    assert_refused(result, 'www/tool', tmp_path / 'out', canary, before)
    assert 'setuid, setgid or sticky' in result.stderr


@pytest.mark.parametrize(
    'kind', [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE], ids=['char', 'block', 'fifo']
)
def test_A3_a_device_node_or_a_fifo(site: Site, tmp_path: Path, canary: Path, kind: bytes) -> None:
    before = snapshot(canary)
    # /dev/mem and /dev/sda: a node as root gives whoever can read the restore the whole machine.
    numbers = {'devmajor': 1, 'devminor': 1} if kind == tarfile.CHRTYPE else {'devmajor': 8}
    tar = forge.tar_bytes(
        [
            (forge.member('www/index.html'), b'<h1>site</h1>\n'),
            (forge.member('www/node', kind, mode=0o666, **numbers), None),
        ]
    )
    result = restore(site, tmp_path, {'files': tar})
    assert_refused(result, 'www/node', tmp_path / 'out', canary, before)
    assert ('FIFO' if kind == tarfile.FIFOTYPE else 'device node') in result.stderr


def test_A3_a_contiguous_file_is_refused(site: Site, tmp_path: Path, canary: Path) -> None:
    before = snapshot(canary)
    tar = forge.tar_bytes(
        [
            (forge.member('www/index.html'), b'<h1>site</h1>\n'),
            (forge.member('www/contiguous', tarfile.CONTTYPE), b'data\n'),
        ]
    )
    result = restore(site, tmp_path, {'files': tar})
    assert_refused(result, 'www/contiguous', tmp_path / 'out', canary, before)


def test_A3_foreign_owners_are_never_applied(site: Site, tmp_path: Path, canary: Path) -> None:
    before = snapshot(canary)
    foreign = {'uid': 4242, 'gid': 4242, 'uname': '', 'gname': ''}
    tar = forge.tar_bytes(
        [
            (forge.member('www', tarfile.DIRTYPE, mode=0o755, **foreign), None),
            (forge.member('www/index.php', mode=0o640, **foreign), b'<?php ?>\n'),
            (forge.member('www/link', tarfile.SYMTYPE, linkname='index.php', **foreign), None),
        ]
    )
    out = tmp_path / 'out'
    result = restore(site, tmp_path, {'files': tar}, out)
    assert result.returncode == 0, result.stderr
    assert f'files: assoc-files-20260101-010101.tar.zst extracted into {out}' in result.stdout
    assert (out / 'www' / 'index.php').read_bytes() == b'<?php ?>\n'
    assert stat.S_IMODE((out / 'www' / 'index.php').stat().st_mode) == 0o640
    assert specials(out) == []  # everything belongs to whoever restored it
    assert snapshot(canary) == before


def test_A3_restore_files_only_into_a_new_or_empty_folder(
    site: Site, tmp_path: Path, canary: Path
) -> None:
    tar = forge.tar_bytes([(forge.member('www/index.html'), b'<h1>site</h1>\n')])
    full = tmp_path / 'full'
    full.mkdir()
    (full / 'www').mkdir()
    (full / 'www' / 'index.html').write_text('the live site\n')
    before = snapshot(full)
    refused = restore(site, tmp_path, {'files': tar}, full)
    assert refused.returncode != 0
    assert f'--files {full}: this folder holds files already' in refused.stderr
    assert snapshot(full) == before

    link = tmp_path / 'link'
    link.symlink_to(canary / 'inner')  # an empty folder, but through a symlink
    canary_before = snapshot(canary)
    through = restore(site, tmp_path, {'files': tar}, link)
    assert through.returncode != 0 and 'a symlink or not a folder' in through.stderr
    assert snapshot(canary) == canary_before

    empty = tmp_path / 'empty'
    empty.mkdir()
    taken = restore(site, tmp_path, {'files': tar}, empty)
    assert taken.returncode == 0, taken.stderr
    assert (empty / 'www' / 'index.html').read_text() == '<h1>site</h1>\n'

    root = restore(site, tmp_path, {'files': tar}, Path('/'))
    assert root.returncode != 0 and 'root folder' in root.stderr


def test_A3_a_hostile_archive_fails_the_drill(site: Site, tmp_path: Path, canary: Path) -> None:
    """The drill reads every member as a restore would, writing nothing: a run that a restore
    refuses fails the drill too."""
    before = snapshot(canary)
    planted = forge.tar_bytes(
        [(forge.member('www/evil', tarfile.SYMTYPE, linkname='../www2'), None)]
    )
    through = forge.tar_bytes([(forge.member('www/evil/authorized_keys'), b'attacker key\n')])
    home = forge.public_keyring(tmp_path, site.keys.public[site.keys.alice])
    manifest = forge.write_run(
        tmp_path / 'kept' / 'day1', home, site.keys.alice, {'files': planted, 'binaries': through}
    )
    result = site.run(
        'drill', str(manifest), '--gnupghome', str(site.keys.holder), '--mail', 'k@example.org'
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'drill: FAILED' in result.stdout
    assert 'member www/evil/authorized_keys refused' in result.stdout
    assert snapshot(canary) == before


def tree(root: Path) -> dict[str, tuple[str, int, int, bytes]]:
    """Return, for everything under ``root``, its kind, mode bits, mtime and content (a symlink's
    target), and, for files, which other names share its inode."""
    seen = {}
    inodes: dict[int, list[str]] = {}
    for path in sorted(root.rglob('*')):
        info = path.lstat()
        name = str(path.relative_to(root))
        if stat.S_ISLNK(info.st_mode):
            seen[name] = ('symlink', 0, 0, os.readlink(path).encode())
        elif stat.S_ISDIR(info.st_mode):
            seen[name] = ('folder', stat.S_IMODE(info.st_mode), int(info.st_mtime), b'')
        else:
            data = path.read_bytes()
            seen[name] = ('file', stat.S_IMODE(info.st_mode), int(info.st_mtime), data)
            inodes.setdefault(info.st_ino, []).append(name)
    for names in inodes.values():
        for name in names:
            kind, mode, mtime, data = seen[name]
            seen[name] = (f'{kind} linked to {names}', mode, mtime, data)
    return seen


def test_A3_a_genuine_run_restores_exactly(site: Site, tmp_path: Path) -> None:
    data = site.home / 'site'
    (data / 'uploads' / 'same-photo.bin').hardlink_to(data / 'uploads' / 'photo.bin')
    (data / 'latest-photo').symlink_to('uploads/photo.bin')
    (data / 'uploads' / 'up').symlink_to('../index.php')
    (data / 'private').mkdir(mode=0o750)
    (data / 'private' / 'notes.txt').write_text('members only\n')
    (data / 'private' / 'notes.txt').chmod(0o600)
    (data / 'run.sh').write_text('#!/bin/sh\n')
    (data / 'run.sh').chmod(0o755)
    (data / 'readonly').mkdir()
    (data / 'readonly' / 'frozen.txt').write_text('frozen\n')
    (data / 'readonly').chmod(0o555)
    os.utime(data / 'private', (1_500_000_000, 1_500_000_000))
    result = site.run()
    assert result.returncode == 0, result.stderr
    day = next(site.backups.glob('day*'))
    out = tmp_path / 'restored'
    scratch = f'{site.pg_db}_files'
    try:
        restored = site.run(
            'restore',
            str(day),
            '--database',
            site.pg_db,
            '--as',
            scratch,
            '--files',
            str(out),
            '--gnupghome',
            str(site.keys.holder),
        )
    finally:
        drop_databases(scratch)
    assert restored.returncode == 0, restored.stderr
    assert 'files: assoc-files-' in restored.stdout and 'files: assoc-binaries-' in restored.stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o700  # the restore folder stays private
    for top in ('site', 'my docs', 'bin'):
        assert tree(out / top) == tree(site.home / top), top
    assert (out / 'crontab').is_file()  # the crontab travels with the files
    assert specials(out) == []
    assert os.path.samefile(out / 'site/uploads/photo.bin', out / 'site/uploads/same-photo.bin')


def test_A3_a_plaintext_that_is_no_tar_archive_fails_with_a_sentence(
    site: Site, tmp_path: Path
) -> None:
    good = forge.tar_bytes([(forge.member('www/index.html'), b'<h1>site</h1>\n')])
    for junk in (b'', b'no archive at all\n' * 100, good[:700]):
        out = tmp_path / f'out{len(junk)}'
        result = restore(site, tmp_path, {'files': good, 'binaries': junk}, out)
        assert result.returncode == 1, result.stdout + result.stderr
        assert 'not a tar archive, or a truncated one' in result.stderr, result.stderr
        assert 'Traceback' not in result.stderr and not out.exists()
