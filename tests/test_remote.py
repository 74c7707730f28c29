"""The remote end: rsync over a real sshd on 127.0.0.1, a write-only rrsync remote, and ``watch``.

Every test runs the real ppbackup command; the remote is a real OpenSSH server (tests/sshd.py) with
its own host key, logging in as this user with a key of its own, either with a normal shell or
through ``rrsync -wo`` as a forced command.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Site, sh
from sshd import Sshd, free_port, start_sshd

HOST = 'root@127.0.0.1'


@pytest.fixture(scope='module')
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with start_sshd(tmp_path_factory.mktemp('sshd')) as server:
        yield server


@pytest.fixture
def plain_remote(sshd: Sshd) -> Iterator[Sshd]:
    """The sshd, letting the client key in with a normal shell."""
    sshd.allow_plain()
    yield sshd
    sshd.deny_all()


@pytest.fixture
def write_only_remote(sshd: Sshd, site: Site) -> Iterator[tuple[Sshd, Path]]:
    """The sshd, letting the client key in only through ``rrsync -wo FOLDER``; yields FOLDER."""
    folder = site.root / 'write-only'
    folder.mkdir()
    sshd.allow_write_only(folder)
    yield sshd, folder
    sshd.deny_all()


def files_under(root: Path) -> dict[str, bytes]:
    """Return {relative path: bytes} of every regular file under ``root``, but watch's first-seen
    record beside the kept runs (the backup host's own, not something the sender sent)."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob('*'))
        if path.is_file() and not path.is_symlink() and path.name != 'first-seen.json'
    }


def log_since(server: Sshd, offset: int) -> str:
    return server.log.read_bytes()[offset:].decode('utf-8', 'replace')


def one(paths: Iterator[Path]) -> Path:
    found = list(paths)
    assert len(found) == 1, found
    return found[0]


def new_mails(site: Site, before: int) -> list[dict[str, object]]:
    return site.mails()[before:]


def subject_of(mail: dict[str, object]) -> str:
    argv = mail['argv']
    assert isinstance(argv, list)
    return str(argv[argv.index('-s') + 1])


# ---------------------------------------------------------------------------------------------------
# T1: a remote that cannot be reached fails the run fast, with one mail, and keeps the local copies.
# ---------------------------------------------------------------------------------------------------


def assert_local_slots_complete_and_decryptable(site: Site) -> None:
    day = one(site.backups.glob('day*'))
    week = one(site.backups.glob('wk*'))
    day_files = sorted(path.name for path in day.glob('*.gpg'))
    week_files = sorted(path.name for path in week.glob('*.gpg'))
    # psql, mysql, files, binaries, and the PostgreSQL roles, MariaDB users and row counts
    assert len(day_files) == 7
    assert week_files == [name for name in day_files if '-binaries-' not in name]
    for slot in (day, week):
        manifest = one(slot.glob('*.sha256'))
        check = sh('sha256sum', '--strict', '-c', manifest.name, cwd=slot)
        assert check.stdout.count(': OK') == len(list(slot.glob('*.gpg')))
    for path in day.glob('*.gpg'):
        out = site.root / 'decrypted.out'
        site.decrypt(path, out)
        assert out.stat().st_size > 0
        if '-psql-' in path.name:
            assert b'-- PostgreSQL database dump complete' in out.read_bytes()


def test_T1_unreachable_remote_fails_fast(site: Site, sshd: Sshd) -> None:
    target = site.root / 'never-created'
    site.write_config(BACKUP_REMOTE=f'{HOST}:{target}')
    closed = free_port()  # nothing listens there: the connection is refused
    started = time.monotonic()
    result = site.run(extra_env=sshd.env(port=closed), timeout=90)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert elapsed < 60
    assert 'FAILED at sync' in result.stderr
    mails = site.mails()
    assert len(mails) == 1
    subject = site.subjects()[0]
    assert 'FAILED' in subject and 'sync' in subject
    assert 'Connection refused' in str(mails[0]['body'])  # ssh's own words reach the admin
    assert not target.exists()
    assert_local_slots_complete_and_decryptable(site)
    status = json.loads(site.run('status', '--json').stdout)
    assert status['last_result'] == 'failed'
    assert status['last_transfer'] is None


def test_T1_unknown_host_key_fails_fast(site: Site, plain_remote: Sshd, tmp_path: Path) -> None:
    target = site.root / 'never-created'
    site.write_config(BACKUP_REMOTE=f'{HOST}:{target}')
    empty_known_hosts = tmp_path / 'empty_known_hosts'
    empty_known_hosts.write_text('')
    # An ssh allowed to ask would ask this program, which answers "yes" to the host-key question
    # (and would make the run succeed): ppbackup's BatchMode=yes must keep it from being asked.
    asked = tmp_path / 'askpass-was-asked'
    askpass = tmp_path / 'askpass'
    askpass.write_text(f'#!/bin/sh\necho "$*" >> {asked}\necho yes\n')
    askpass.chmod(0o755)
    env = {
        **plain_remote.env(known_hosts=empty_known_hosts, strict=False),
        'SSH_ASKPASS': str(askpass),
        'SSH_ASKPASS_REQUIRE': 'force',
        'DISPLAY': ':0',
    }
    offset = plain_remote.log.stat().st_size
    started = time.monotonic()
    result = site.run(extra_env=env, timeout=90)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert elapsed < 60
    assert not asked.exists(), asked.read_text()
    assert empty_known_hosts.read_text() == ''  # the unknown key was not learnt
    assert not target.exists()
    mails = site.mails()
    assert len(mails) == 1
    subject = site.subjects()[0]
    assert 'FAILED' in subject and 'sync' in subject
    assert 'Host key verification failed' in str(mails[0]['body'])
    assert 'Accepted publickey' not in log_since(plain_remote, offset)
    assert_local_slots_complete_and_decryptable(site)


# ---------------------------------------------------------------------------------------------------
# Over ssh for real: a plain login, and a write-only rrsync login.
# ---------------------------------------------------------------------------------------------------


def test_sync_over_ssh(site: Site, plain_remote: Sshd) -> None:
    remote_dir = site.root / 'ssh-remote'
    site.write_config(BACKUP_REMOTE=f'{HOST}:{remote_dir}')
    offset = plain_remote.log.stat().st_size
    result = site.run(extra_env=plain_remote.env())
    assert result.returncode == 0, result.stderr
    assert result.stdout == '' and result.stderr == ''
    assert site.subjects() == ['[ppbackup] assoc: succeeded']
    # It went over ssh: one session for the transfer, one for the checksum verification.
    log = log_since(plain_remote, offset)
    assert log.count('Accepted publickey for root') == 2, log
    local = files_under(site.backups)
    remote = files_under(remote_dir / 'backups')
    assert len(local) == 15  # day: 7 files + manifest; week: 6 files + manifest
    assert remote == local
    # Hard links survive the trip: the week copies cost no disk on the remote either.
    day = one((remote_dir / 'backups').glob('day*'))
    week = one((remote_dir / 'backups').glob('wk*'))
    for path in week.glob('*.gpg'):
        assert path.stat().st_ino == (day / path.name).stat().st_ino
    status = json.loads(site.run('status', '--json').stdout)
    assert status['last_result'] == 'succeeded' and status['last_transfer']


def test_T5_write_only_remote(
    site: Site, write_only_remote: tuple[Sshd, Path], tmp_path: Path
) -> None:
    server, folder = write_only_remote
    # rrsync runs in FOLDER and takes the client's path relative to it: "." is FOLDER itself.
    site.write_config(BACKUP_REMOTE=f'{HOST}:.')
    offset = server.log.stat().st_size
    result = site.run(extra_env=server.env())
    assert result.returncode == 0, result.stderr
    assert result.stderr == ''
    assert site.subjects() == ['[ppbackup] assoc: succeeded']
    log = log_since(server, offset)
    # The transfer and the --checksum verification both went through the forced rrsync -wo.
    assert (
        log.count(
            f"forced-command (key-option) '/usr/bin/rrsync -wo -no-del -no-overwrite -munge {folder}'"
        )
        == 2
    ), log
    assert files_under(folder / 'backups') == files_under(site.backups)
    assert len(files_under(site.backups)) == 15

    # Reading back is refused, and nothing arrives.
    for source in ('backups/', f'backups/{one(site.backups.glob("day*")).name}/'):
        dest = tmp_path / 'read-back'
        pulled = subprocess.run(
            ['rsync', '-a', '-e', server.rsh(), f'{HOST}:{source}', str(dest)],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert pulled.returncode != 0
        assert 'reading from write-only server is not allowed' in pulled.stderr
        assert not dest.exists() or not any(dest.iterdir())
    # Nor does the key open a shell or run anything but rsync.
    shell = subprocess.run(
        [*server.rsh().split(), '-o', 'BatchMode=yes', HOST, f'cat {folder}/backups/*/*.sha256'],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert shell.returncode != 0
    assert 'sha256' not in shell.stdout and shell.stdout.strip() == ''


# ---------------------------------------------------------------------------------------------------
# watch: on the backup host, retention, integrity and freshness of what arrived.
# ---------------------------------------------------------------------------------------------------


def at(day: str, hour: str = '03:00:00') -> str:
    return f'@{day} {hour}'


def run_ok(site: Site, **kwargs: object) -> None:
    result = site.run(**kwargs)  # type: ignore[arg-type]
    assert result.returncode == 0, result.stderr


def names(slot: Path) -> set[str]:
    return {path.name for path in slot.iterdir()}


def to_incoming(site: Site) -> Path:
    """Send to SITE.remote/incoming, the layout watch expects: return the sender's folder."""
    site.write_config(BACKUP_REMOTE=str(site.remote / 'incoming'))
    return site.remote


def runs_in(slot: Path) -> set[str]:
    return {path.name for path in slot.glob('*.sha256')}


def test_watch_keeps_runs_by_its_own_clock_and_prunes_both_copies(site: Site) -> None:
    folder = to_incoming(site)
    site.write_config(BACKUP_MYSQL_DB=None)
    received = folder / 'incoming' / 'backups'
    kept = folder / 'kept' / 'backups'
    # Each run is seen by watch an hour after it was made: that is when its time starts here.
    seen_in: dict[str, set[str]] = {}
    for day, hour in (
        ('2027-01-04', '03:00:00'),
        ('2027-01-04', '14:00:00'),
        ('2027-01-11', '02:00:00'),
    ):
        before_run = runs_in(kept / 'wk1') | runs_in(kept / 'day1') if kept.exists() else set()
        run_ok(site, faketime=at(day, hour))
        seen = f'{int(hour[:2]) + 1:02d}:00:00'
        watched = site.run('watch', str(folder), faketime=at(day, seen))
        assert watched.returncode == 0, watched.stderr
        seen_in[hour] = runs_in(kept / 'day1') - before_run
    day1, wk1, wk2 = kept / 'day1', kept / 'wk1', kept / 'wk2'
    assert len(runs_in(day1)) == 3 and len(runs_in(wk1)) == 2 and len(runs_in(wk2)) == 1
    early, late, next_week = (one(iter(seen_in[h])) for h in ('03:00:00', '14:00:00', '02:00:00'))
    # Kept files are the received inodes, owned by watch: no extra copy.
    for path in day1.iterdir():
        twin = received / 'day1' / path.name
        assert path.stat().st_ino == twin.stat().st_ino
        assert path.stat().st_uid == os.geteuid() and path.stat().st_mode & 0o022 == 0
    # Things watch must never touch: a file no manifest names, and anything outside DIR.
    (received / 'day1' / 'README.txt').write_text('not a backup\n')
    (site.root / 'elsewhere.txt').write_text('outside the watched folder\n')
    before = site.snapshot(site.root / 'elsewhere.txt', site.backups)
    kept_before = {path.name: path.read_bytes() for path in day1.iterdir()}
    # Eight days after the week-1 runs arrived: they go, except the newest week-slot run of
    # week 1 (53 weeks); the week-2 run is newer than 7 days and stays.
    when = at('2027-01-12', '16:00:00')
    dry = site.run('watch', str(folder), '--dry-run', '--max-age', '48', faketime=when)
    assert dry.returncode == 0, dry.stderr
    assert sorted(dry.stdout.splitlines()) == sorted(
        [f'would remove {folder}/kept/backups/day1/{name} (6 file(s))' for name in (early, late)]
        + [f'would remove {folder}/kept/backups/wk1/{early} (5 file(s))']
    )
    assert {path.name: path.read_bytes() for path in day1.iterdir()} == kept_before

    result = site.run('watch', str(folder), '--max-age', '48', faketime=when)
    assert result.returncode == 0, result.stderr
    assert result.stdout == '' and result.stderr == ''
    assert runs_in(day1) == {next_week}
    assert runs_in(wk1) == {late}
    assert len(runs_in(wk2)) == 1
    # the manifest and its five files: psql, its roles, the row counts, files, binaries
    assert len(list(day1.iterdir())) == 6
    # The received names of what expired went too (the same inodes); the rest stays.
    assert runs_in(received / 'day1') == {next_week}
    assert runs_in(received / 'wk1') == {late}
    assert 'README.txt' in names(received / 'day1')
    assert site.snapshot(site.root / 'elsewhere.txt', site.backups) == before
    again = site.run('watch', str(folder), '--dry-run', '--max-age', '48', faketime=when)
    assert again.returncode == 0 and again.stdout == '' and again.stderr == ''


def test_watch_names_a_flipped_byte_and_a_truncated_file(site: Site) -> None:
    folder = to_incoming(site)
    run_ok(site)
    received = folder / 'incoming' / 'backups'
    day = one(received.glob('day*'))
    week = one(received.glob('wk*'))
    flipped = one(day.glob('*-binaries-*.gpg'))  # day slot only
    truncated = one(day.glob('*-psql-*.gpg'))  # hard-linked into the week slot too
    size = flipped.stat().st_size
    with open(flipped, 'r+b') as handle:
        handle.seek(size // 2)
        byte = handle.read(1)
        handle.seek(size // 2)
        handle.write(bytes([byte[0] ^ 0x01]))
    assert flipped.stat().st_size == size
    os.truncate(truncated, truncated.stat().st_size // 2)
    mails_before = len(site.mails())

    quiet = site.run('watch', str(folder))
    assert quiet.returncode == 1
    for name in (
        f'{day.name}/{flipped.name}',
        f'{day.name}/{truncated.name}',
        f'{week.name}/{truncated.name}',
    ):
        assert name in quiet.stderr, quiet.stderr
    assert '-files-' not in quiet.stderr  # the intact files are not accused
    assert new_mails(site, mails_before) == []  # no --mail, no mail
    assert not list((folder / 'kept').rglob('*.gpg'))  # a run that fails is not kept

    alerted = site.run('watch', str(folder), '--mail', 'a@example.org')
    assert alerted.returncode == 1
    assert flipped.name in alerted.stderr and truncated.name in alerted.stderr
    mails = new_mails(site, mails_before)
    assert len(mails) == 1
    assert 'FAILED' in subject_of(mails[0]) and str(folder) in subject_of(mails[0])
    assert 'assoc' in subject_of(mails[0])
    assert mails[0]['argv'][-1] == 'a@example.org'  # type: ignore[index]
    assert flipped.name in str(mails[0]['body']) and truncated.name in str(mails[0]['body'])
    assert flipped.exists() and truncated.exists()  # watch reports damage; it does not delete it


def test_watch_alarms_when_the_newest_run_is_too_old(site: Site) -> None:
    folder = to_incoming(site)
    site.write_config(BACKUP_MYSQL_DB=None)
    run_ok(site, faketime=at('2027-01-04'))
    mails_before = len(site.mails())

    fresh = site.run('watch', str(folder), faketime=at('2027-01-04', '04:00:00'))
    assert fresh.returncode == 0, fresh.stderr
    short = site.run(
        'watch', str(folder), '--max-age', '0.5', faketime=at('2027-01-04', '05:00:00')
    )
    assert short.returncode == 1
    # Its age counts from when watch first saw it, by this host's clock, not the sender's mtime.
    assert 'no backup has arrived since 2027-01-04 04:00' in short.stderr, short.stderr
    assert new_mails(site, mails_before) == []

    late = site.run('watch', str(folder), '--mail', 'a@example.org', faketime=at('2027-01-07'))
    assert late.returncode == 1
    assert 'no backup has arrived since 2027-01-04 04:00' in late.stderr, late.stderr
    mails = new_mails(site, mails_before)
    assert len(mails) == 1
    assert 'ALERT' in subject_of(mails[0]) and 'FAILED' not in subject_of(mails[0])
    assert 'no backup has arrived since' in str(mails[0]['body'])


def test_watch_is_quiet_on_a_healthy_tree(site: Site) -> None:
    folder = to_incoming(site)
    run_ok(site)
    mails_before = len(site.mails())
    dry = site.run('watch', str(folder), '--dry-run')
    assert dry.returncode == 0, dry.stderr
    slots = sorted(path.name for path in (folder / 'incoming' / 'backups').iterdir())
    assert [line.rsplit('/', 2)[1] for line in dry.stdout.splitlines()] == slots
    assert all(
        line.startswith(f'would keep {folder}/kept/backups/') for line in dry.stdout.splitlines()
    )
    assert not (folder / 'kept').exists()  # a dry run changes nothing
    result = site.run('watch', str(folder), '--mail', 'a@example.org')
    assert result.returncode == 0, result.stderr
    assert result.stdout == '' and result.stderr == ''
    assert new_mails(site, mails_before) == []
    received = files_under(folder / 'incoming' / 'backups')
    assert received == files_under(site.backups)
    assert files_under(folder / 'kept' / 'backups') == received
    before = site.snapshot(folder)
    again = site.run('watch', str(folder), '--mail', 'a@example.org')
    assert again.returncode == 0 and again.stderr == ''
    assert site.snapshot(folder) == before


def test_watch_over_write_only_remote_end_to_end(
    site: Site, write_only_remote: tuple[Sshd, Path]
) -> None:
    server, folder = write_only_remote
    # The rrsync folder is the sender's incoming/; watch looks at the folder above it.
    incoming = folder / 'incoming'
    incoming.mkdir()
    server.allow_write_only(incoming)
    site.write_config(BACKUP_REMOTE=f'{HOST}:.')
    result = site.run(extra_env=server.env())
    assert result.returncode == 0, result.stderr
    received = incoming / 'backups'
    assert files_under(received) == files_under(site.backups)
    mails_before = len(site.mails())
    watched = site.run('watch', str(folder), '--mail', 'a@example.org')
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout == '' and watched.stderr == ''
    assert new_mails(site, mails_before) == []
    assert files_under(received) == files_under(site.backups)
    assert files_under(folder / 'kept' / 'backups') == files_under(site.backups)
