"""Restore what you ask for: the files alone, one path of them, and a listing of what a run holds.

The most common restore is no disaster: an upload deleted on Tuesday, one folder an upgrade broke.
These tests run as the README's restore section does, on this machine, whose servers hold the
site's databases: a restore of the files must not touch them (strace sees every connect() of
ppbackup and its children), and a run's listing must say what the run backed up.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import forge
import ppbackup
import pytest
from conftest import REPO, InProcess, Site

# Where the machine's servers listen: a connect() to one of these is a connection to a database.
DB_SOCKETS = ('/var/run/postgresql/.s.PGSQL.', '/run/postgresql/.s.PGSQL.', 'mysqld.sock')
DB_PORTS = ('htons(5432)', 'htons(3306)')


def day_slot(site: Site) -> Path:
    return next(path for path in sorted(site.backups.iterdir()) if path.name.startswith('day'))


def backed_up(site: Site) -> Path:
    result = site.run()
    assert result.returncode == 0, result.stderr
    return day_slot(site)


def tree(root: Path, *tops: str) -> dict[str, bytes | None]:
    """Given folders under ``root``, return {name as archived: content, None for a folder}."""
    found: dict[str, bytes | None] = {}
    for top in tops:
        found[top] = None
        for folder, dirs, files in os.walk(root / top):
            rel = Path(folder).relative_to(root)
            found.update({str(rel / name): None for name in dirs})
            found.update({str(rel / name): (Path(folder) / name).read_bytes() for name in files})
    return found


def traced(site: Site, *args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run ppbackup as the key holder under strace; return its result and every connect() to a
    database server that it or any child made."""
    log = site.root / f'strace-{len(list(site.root.glob("strace-*")))}.log'
    argv = ['strace', '-f', '-qq', '-e', 'trace=connect', '-o', str(log)]
    argv += [sys.executable, str(REPO / 'ppbackup.py'), *args, '--gnupghome', str(site.keys.holder)]
    result = subprocess.run(argv, env=site.env, capture_output=True, text=True, cwd=site.home)
    calls = log.read_text().splitlines()
    assert any('connect(' in line for line in calls), 'strace saw no connect() at all: gpg-agent?'
    return result, [
        line for line in calls if any(place in line for place in (*DB_SOCKETS, *DB_PORTS))
    ]


def test_restore_files_alone_extracts_the_files_and_touches_no_database_server(site: Site) -> None:
    slot = backed_up(site)
    restored = site.root / 'restored'
    result, connections = traced(site, 'restore', str(slot), '--files', str(restored))
    assert result.returncode == 0, result.stderr
    assert connections == [], 'a files-only restore connected to a database server'
    assert tree(restored, 'site', 'my docs', 'bin') == tree(site.home, 'site', 'my docs', 'bin')
    assert 'extracted into' in result.stdout
    assert 'database' not in result.stdout.replace(str(restored), '')
    # The same restore of everything goes to the servers (which hold the site's databases, so it
    # refuses to load over them): the trace above would have seen it.
    everything, connections = traced(site, 'restore', str(slot))
    assert everything.returncode == 1
    assert 'already holds' in everything.stderr
    assert connections, (
        'strace saw no connection of a database restore: the check above proves nothing'
    )


def test_restore_one_database_restores_it_alone(site: Site) -> None:
    slot = backed_up(site)
    # The MariaDB database is dropped: restoring only it must not touch the PostgreSQL one, which
    # still holds its tables (a restore of it would refuse and fail).
    subprocess.run(['mysql', '-e', f'DROP DATABASE `{site.my_db}`'], check=True)
    result = site.run(
        'restore', str(slot), '--database', site.my_db, '--gnupghome', str(site.keys.holder)
    )
    assert result.returncode == 0, result.stderr
    assert f'restored MariaDB database {site.my_db}' in result.stdout
    assert 'PostgreSQL database' not in result.stdout
    rows = subprocess.run(
        ['mysql', '-N', '-e', 'SELECT COUNT(*) FROM ballots', site.my_db],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert int(rows) == 500


def test_restore_one_file_and_one_folder_with_path(site: Site) -> None:
    slot = backed_up(site)
    restored = site.root / 'restored'
    result = site.run(
        'restore', str(slot), '--files', str(restored), '--path', 'site/uploads/photo.bin',
        '--path', 'my docs/', '--gnupghome', str(site.keys.holder),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    photo = (site.home / 'site' / 'uploads' / 'photo.bin').read_bytes()
    expected = {'site': None, 'site/uploads': None, 'site/uploads/photo.bin': photo}
    expected.update(tree(site.home, 'my docs'))
    got = tree(restored, 'site', 'my docs')
    assert got == expected
    assert not (restored / 'bin').exists() and not (restored / 'site' / 'index.php').exists()
    # A folder asked for keeps its own mode; one on the way to a file asked for is made 0700.
    assert (restored / 'my docs').stat().st_mode & 0o777 == (
        site.home / 'my docs'
    ).stat().st_mode & 0o777
    assert (restored / 'site' / 'uploads').stat().st_mode & 0o777 == 0o700


def test_restore_path_of_a_name_not_there_fails_naming_it_and_leaves_nothing(site: Site) -> None:
    slot = backed_up(site)
    restored = site.root / 'restored'
    result = site.run(
        'restore', str(slot), '--files', str(restored), '--path', 'site/index.php',
        '--path', 'site/uplods', '--gnupghome', str(site.keys.holder),
    )  # fmt: skip
    assert result.returncode == 1
    assert re.search(r'--path site/uplods: no such file or folder in \S+', result.stderr)
    assert 'site/index.php:' not in result.stderr  # the one that is there is not named
    assert not restored.exists()  # all or nothing: what it extracted was removed
    for bad in ('/etc/passwd', '../site', 'site/../../etc'):
        refused = site.run(
            'restore', str(slot), '--files', str(restored), '--path', bad,
            '--gnupghome', str(site.keys.holder),
        )  # fmt: skip
        assert refused.returncode == 2, refused.stderr
        assert f'--path {bad}: give a path as it was archived' in refused.stderr
    alone = site.run('restore', str(slot), '--path', 'site', '--gnupghome', str(site.keys.holder))
    assert alone.returncode == 2 and '--path needs --files DIR' in alone.stderr


def test_list_says_what_the_run_holds_in_text_and_json(site: Site) -> None:
    slot = backed_up(site)
    holder = ['--gnupghome', str(site.keys.holder)]
    text = site.run('list', str(slot), *holder)
    assert text.returncode == 0, text.stderr
    assert f'database PostgreSQL {site.pg_db}: 2 table(s), 503 row(s)' in text.stdout
    assert f'database MariaDB {site.my_db}: 2 table(s), 503 row(s)' in text.stdout
    assert re.search(r'^archive assoc-files-\S+\.tar\.zst$', text.stdout, re.M)
    assert re.search(r'^archive assoc-binaries-\S+\.tar\.zst$', text.stdout, re.M)
    assert 'index.php' not in text.stdout  # no member without --files

    plain = site.run('list', str(slot), '--json', *holder)
    summary = json.loads(plain.stdout)
    assert {(db['kind'], db['database'], db['rows']) for db in summary['databases']} == {
        ('psql', site.pg_db, 503),
        ('mysql', site.my_db, 503),
    }
    assert [set(archive) for archive in summary['archives']] == [{'file'}, {'file'}]

    listed = json.loads(site.run('list', str(slot), '--files', '--json', *holder).stdout)
    members = {
        member['name']: member
        for archive in listed['archives']
        for member in archive['members']
        if member['name'] != 'crontab'
    }
    backed = tree(site.home, 'site', 'my docs', 'bin')
    assert set(members) == set(backed)
    for name, content in backed.items():
        info = (site.home / name).stat()
        assert members[name]['type'] == ('folder' if content is None else 'file')
        assert members[name]['size'] == (0 if content is None else len(content))
        stamp = members[name]['mtime']
        assert stamp == f'{dt_utc(info.st_mtime)}', name
        assert 'refused' not in members[name]
    # The text listing names the same members, a line each.
    lines = site.run('list', str(slot), '--files', *holder).stdout
    assert re.search(r'^  file +65536 \S+ +site/uploads/photo\.bin$', lines, re.M)
    assert re.search(r'^  folder +0 \S+ +my docs$', lines, re.M)


def dt_utc(stamp: float) -> str:
    return dt.datetime.fromtimestamp(int(stamp), dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


def test_list_of_a_hostile_archive_acts_on_nothing_and_marks_what_restore_refuses(
    site: Site, tmp_path: Path
) -> None:
    """A run is data: names with terminal escapes, a device node and a symlink out are listed
    (escaped in text), marked refused, and nothing is extracted or followed."""
    home = forge.public_keyring(tmp_path, site.keys.public[site.keys.alice])
    slot = tmp_path / 'backups' / 'day3'
    canary = tmp_path / 'canary'
    archive = forge.tar_bytes(
        [
            (forge.member('ok.txt'), b'fine\n'),
            (forge.member('\x1b]2;owned\x07title'), b'x'),
            (forge.member('dev', tarfile.CHRTYPE, devmajor=1, devminor=3), None),
            (forge.member('out', tarfile.SYMTYPE, linkname=f'../../{canary.name}'), None),
        ]
    )
    forge.write_run(slot, home, site.keys.alice, {'files': archive})
    result = site.run('list', str(slot), '--files', '--gnupghome', str(site.keys.holder))
    assert result.returncode == 0, result.stderr
    assert '\x1b' not in result.stdout and '\\x1b]2;owned\\x07title' in result.stdout
    assert re.search(r'dev +\(refused: it is a device node\)$', result.stdout, re.M)
    assert re.search(
        r'out -> \.\./\.\./canary +\(refused: .*outside the restore folder\)', result.stdout
    )
    assert not canary.exists()
    listed = json.loads(
        site.run(
            'list', str(slot), '--files', '--json', '--gnupghome', str(site.keys.holder)
        ).stdout
    )
    names = [member['name'] for member in listed['archives'][0]['members']]
    assert names == ['ok.txt', '\x1b]2;owned\x07title', 'dev', 'out']


def peak_kib(site: Site, *args: str) -> int:
    """Run ppbackup.main in a new interpreter and return its own peak RSS (VmHWM), in KiB."""
    code = (
        'import sys, ppbackup\n'
        'code = ppbackup.main(sys.argv[1:])\n'
        'sys.stdout.flush()\n'
        'hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]\n'
        'print("VmHWM", hwm, file=sys.stderr)\n'
        'sys.exit(code)\n'
    )
    result = subprocess.run(
        [sys.executable, '-c', code, *args], env={**site.env, 'PYTHONPATH': str(REPO)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=site.home,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return int(re.findall(r'^VmHWM (\d+)$', result.stderr, re.M)[-1])


def test_listing_a_1_gib_archive_keeps_memory_flat(site: Site, tmp_path: Path) -> None:
    """1 GiB of members (one large file and 20,000 small ones) listed with --files --json: the
    process's peak memory is that of listing a tiny archive, within a few MiB."""
    home = forge.public_keyring(tmp_path, site.keys.public[site.keys.alice])
    source = tmp_path / 'big'
    (source / 'many').mkdir(parents=True)
    with open(source / 'large.bin', 'wb') as handle:
        handle.truncate(1 << 30)  # sparse: tar reads it as 1 GiB of zeros
    for number in range(20000):
        (source / 'many' / f'{number:05d}.txt').write_text(f'{number}\n')
    small, large = tmp_path / 'small' / 'day1', tmp_path / 'large' / 'day1'
    forge.write_run(
        small, home, site.keys.alice, {'files': forge.tar_bytes([(forge.member('a'), b'a')])}
    )
    forge.write_run(
        large, home, site.keys.alice, {}, archives={'files': ['tar', '-C', str(source), '-c', '.']}
    )
    holder = ['--gnupghome', str(site.keys.holder)]
    tiny = peak_kib(site, 'list', str(small), '--files', '--json', *holder)
    big = peak_kib(site, 'list', str(large), '--files', '--json', *holder)
    assert big - tiny < 8 * 1024, f'listing 1 GiB peaked at {big} KiB, a tiny archive at {tiny} KiB'
    # The archive was that large: its listing names every member and the 1 GiB file.
    listed = subprocess.run(
        [sys.executable, str(REPO / 'ppbackup.py'), 'list', str(large), '--files', '--json', *holder],
        env=site.env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    members = json.loads(listed)['archives'][0]['members']
    assert len(members) == 20000 + 3  # ., many, large.bin and the small files
    assert max(member['size'] for member in members) == 1 << 30


@pytest.mark.parametrize('args', [['--files'], []])
def test_list_of_a_run_without_archives_says_so(site: Site, args: list[str]) -> None:
    site.write_config(BACKUP_FILES=None, BACKUP_BINARIES=None)
    slot = backed_up(site)
    listed = site.run('list', str(slot), *args, '--gnupghome', str(site.keys.holder))
    assert listed.returncode == 0, listed.stderr
    assert 'archive ' not in listed.stdout
    restored = site.root / 'restored'
    result = site.run(
        'restore', str(slot), '--files', str(restored), '--gnupghome', str(site.keys.holder)
    )
    assert result.returncode == 1
    assert 'holds no file archive' in result.stderr


def test_a_long_listing_or_extraction_shows_progress_on_a_terminal_and_is_silent_otherwise(
    site: Site, in_process: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    slot = backed_up(site)
    holder = ['--gnupghome', str(site.keys.holder)]
    quiet = site.run('list', str(slot), '--files', *holder)  # no terminal: as under cron
    assert quiet.returncode == 0 and quiet.stderr == ''
    monkeypatch.setattr(ppbackup, 'PROGRESS_EVERY', 0.0)  # every member: no long archive needed
    monkeypatch.setattr(sys.stderr, 'isatty', lambda: True)
    shown = in_process('list', str(slot), '--files', *holder)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r'^ppbackup:   assoc-files-\S+: .+ so far, .+/s$', shown.stderr, re.M)
    restored = in_process('restore', str(slot), '--files', str(site.root / 'restored'), *holder)
    assert restored.returncode == 0, restored.stderr
    assert re.search(r'^ppbackup:   assoc-files-\S+: .+ so far', restored.stderr, re.M)
