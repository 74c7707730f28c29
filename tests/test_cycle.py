"""The backup cycle, end to end, proven by restores: as the README describes it."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import tarfile
from pathlib import Path

from conftest import CANARY, Site, drop_databases, mysql, psql, sh

import ppbackup


def restore_postgres(site: Site, encrypted: Path, db: str) -> None:
    # The dump carries its database (pg_dump --create): restore it under another name.
    result = site.run(
        'restore',
        str(encrypted.parent),
        '--database',
        site.pg_db,
        '--as',
        db,
        '--gnupghome',
        str(site.keys.holder),
    )
    assert result.returncode == 0, result.stderr


def restore_mysql(site: Site, encrypted: Path, db: str) -> None:
    sql = site.root / f'{db}.sql'
    site.decrypt(encrypted, sql)
    sh('mysql', '-e', f'CREATE DATABASE `{db}`')
    with open(sql) as handle:
        subprocess.run(['mysql', '--', db], stdin=handle, check=True, timeout=120)


ROWS = 'SELECT id, name, note FROM members ORDER BY id'
BALLOTS = "SELECT count(*), sum(CASE WHEN choice = 'yes' THEN 1 ELSE 0 END) FROM ballots"


def test_a_run_backs_up_everything_and_every_copy_restores(site: Site) -> None:
    result = site.run()  # what cron runs: no arguments
    assert result.returncode == 0, result.stderr
    assert result.stdout == '' and result.stderr == ''  # quiet under cron on success

    day = next(site.backups.glob('day*'))
    week = next(site.backups.glob('wk*'))
    names = sorted(path.name for path in day.iterdir())
    # Every name carries the run id: the local time of the run's start, YYYYMMDD-HHMMSS.
    run = names[0].removeprefix('assoc-').removesuffix('.sha256')
    assert re.fullmatch(r'[0-9]{8}-[0-9]{6}', run), names
    assert names == sorted(
        [
            f'assoc-{run}.sha256',
            f'assoc-binaries-{run}.tar.zst.gpg',
            f'assoc-files-{run}.tar.zst.gpg',
            f'assoc-mariadb-users-{run}.sql.zst.gpg',
            f'assoc-mysql-{run}.sql.zst.gpg',
            f'assoc-pg-roles-{run}.sql.zst.gpg',
            f'assoc-psql-{run}.sql.zst.gpg',
            f'assoc-rowcounts-{run}.json.zst.gpg',
        ]
    )
    # The week slot holds hard links to the database and files copies, and no binaries.
    assert sorted(p.name for p in week.iterdir()) == [n for n in names if 'binaries' not in n]
    for path in week.glob('*.gpg'):
        assert path.stat().st_ino == (day / path.name).stat().st_ino

    # The manifest checks out with the standard tool, in both slots and on the remote.
    for slot in (day, week, site.remote / 'backups' / day.name):
        check = sh('sha256sum', '--strict', '-c', f'assoc-{run}.sha256', cwd=slot)
        assert check.stdout.count(': OK') == len(list(slot.glob('*.gpg')))

    # Restore each database into a fresh one and compare the rows.
    restored_pg, restored_my = site.pg_db + '_restored', site.my_db + '_restored'
    try:
        restore_postgres(site, day / f'assoc-psql-{run}.sql.zst.gpg', restored_pg)
        assert psql(restored_pg, ROWS) == psql(site.pg_db, ROWS)
        assert psql(restored_pg, BALLOTS) == psql(site.pg_db, BALLOTS) == '500|250\n'
        restore_mysql(site, day / f'assoc-mysql-{run}.sql.zst.gpg', restored_my)
        assert mysql(restored_my, ROWS) == mysql(site.my_db, ROWS)
        assert 'Émilie du Châtelet' in mysql(restored_my, ROWS)
        assert mysql(restored_my, BALLOTS) == mysql(site.my_db, BALLOTS) == '500\t250\n'
    finally:
        drop_databases(restored_pg, restored_my)

    # The files come back byte for byte, names with spaces and non-ASCII included.
    archive = site.root / 'files.tar'
    site.decrypt(week / f'assoc-files-{run}.tar.zst.gpg', archive)
    # Read members in place: Debian 12's Python 3.11.2 has no extractall(filter=...).
    with tarfile.open(archive) as tar:
        for original in [*(site.home / 'site').rglob('*'), *(site.home / 'my docs').rglob('*')]:
            if original.is_file():
                copy = tar.extractfile(str(original.relative_to(site.home)))
                assert copy is not None and copy.read() == original.read_bytes()
        assert 'crontab' in tar.getnames()  # the crontab travels with the files
    binaries = site.root / 'bin.tar'
    site.decrypt(day / f'assoc-binaries-{run}.tar.zst.gpg', binaries)
    with tarfile.open(binaries) as tar:
        assert tar.extractfile('bin/tool').read() == (site.home / 'bin' / 'tool').read_bytes()

    # Encrypted to exactly the configured keys, both of them.
    packets = sh(
        'gpg',
        '--homedir',
        str(site.keys.holder),
        '--batch',
        '--list-only',
        '--list-packets',
        str(day / f'assoc-psql-{run}.sql.zst.gpg'),
    ).stdout
    assert packets.count(':pubkey enc packet:') == 2

    # The remote holds the same bytes.
    for path in site.backups.rglob('*.gpg'):
        remote_copy = site.remote / path.relative_to(site.home)
        assert remote_copy.read_bytes() == path.read_bytes()

    # Plaintext only in latest/, private whatever the umask; never in backups/ or the mail.
    insecure = site.home / 'backups.insecure'
    assert stat.S_IMODE(insecure.stat().st_mode) == 0o700
    assert stat.S_IMODE(site.latest.stat().st_mode) == 0o700
    for path in site.latest.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for path in [*site.backups.rglob('*'), *site.remote.rglob('*')]:
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes()

    # Exactly one mail, to both admins, with what an admin wants to know.
    mails = site.mails()
    assert len(mails) == 1
    assert mails[0]['argv'][-2:] == ['admin@example.org', 'second@example.org']
    assert site.subjects() == ['[ppbackup] assoc: succeeded']
    body = mails[0]['body']
    for needed in (
        str(site.remote),
        site.keys.alice,
        site.keys.bob,
        day.name,
        week.name,
        f'assoc-psql-{run}.sql.zst.gpg',
        'duration',
    ):
        assert needed in body
    assert CANARY not in body


def test_several_databases_get_their_names_in_the_file_names(site: Site) -> None:
    second = site.pg_db + '_two'
    sh('createdb', '--', second)
    try:
        psql(second, 'CREATE TABLE t (x int); INSERT INTO t VALUES (42);')
        site.write_config(BACKUP_PSQL_DB=f'"{site.pg_db} {second}"', BACKUP_MYSQL_DB=None)
        assert site.run().returncode == 0
        day = next(site.backups.glob('day*'))
        names = [path.name for path in day.glob('*psql*')]
        assert len(names) == 2
        assert any(f'assoc-psql-{second}-' in name for name in names)
        dump = next(day.glob(f'assoc-psql-{second}-*'))
        site.decrypt(dump, site.root / 'second.sql')
        assert 'COPY public.t (x) FROM stdin;\n42\n' in (site.root / 'second.sql').read_text()
    finally:
        drop_databases(second)


def at(day: str, hour: str = '03:00:00') -> str:
    """A faketime spec: the clock starts at that moment and runs on."""
    return f'@{day} {hour}'


def slot_runs(slot: Path) -> list[str]:
    """Return the runs in a slot by their manifests, to the minute (a faked clock runs on)."""
    return sorted(path.name[: len('assoc-YYYYMMDD-HHMM')] for path in slot.glob('*.sha256'))


def test_rotation_over_days_and_weeks_with_a_faked_clock(site: Site) -> None:
    site.write_config(BACKUP_MYSQL_DB=None, BACKUP_BINARIES=None)
    for when in (
        at('2027-01-04'),
        at('2027-01-04', '14:00:00'),
        at('2027-01-05'),
        at('2027-01-11'),
        at('2027-01-12', '03:00:00'),
    ):
        result = site.run(faketime=when)
        assert result.returncode == 0, result.stderr
    backups = site.backups
    assert sorted(p.name for p in backups.iterdir()) == ['day1', 'day2', 'wk1', 'wk2']
    # day1 was used in week 1 (two runs) and again in week 2: last week's runs are gone.
    assert slot_runs(backups / 'day1') == ['assoc-20270111-0300']
    assert not list((backups / 'day1').glob('*20270104*'))
    # A week slot holds only its newest run: week 1's is Tuesday's.
    assert slot_runs(backups / 'wk1') == ['assoc-20270105-0300']
    wk1_psql = next((backups / 'wk1').glob('*psql*'))
    assert wk1_psql.stat().st_nlink == 1  # day2 of week 1 was replaced by week 2's Tuesday
    # Runs earlier the same day stay.
    site.run(faketime=at('2027-01-12', '15:00:00'))
    assert slot_runs(backups / 'day2') == [
        'assoc-20270112-0300',
        'assoc-20270112-1500',
    ]
    assert slot_runs(backups / 'wk2') == ['assoc-20270112-1500']
    # Every file left in every slot decrypts, and the remote got every run (it never deletes).
    for path in backups.rglob('*.gpg'):
        site.decrypt(path, site.root / 'check.out')
    assert slot_runs(site.remote / 'backups' / 'day1') == [
        'assoc-20270104-0300',
        'assoc-20270104-1400',
        'assoc-20270111-0300',
    ]


def test_only_one_day_keeps_just_the_latest_run(site: Site) -> None:
    site.write_config(ONLY_ONE_DAY='1', BACKUP_MYSQL_DB=None)
    for when in (at('2027-01-04'), at('2027-01-05', '04:00:00'), at('2027-01-12', '05:00:00')):
        assert site.run(faketime=when).returncode == 0
    assert [p.name for p in site.backups.iterdir()] == ['day0']
    day0 = site.backups / 'day0'
    assert slot_runs(day0) == ['assoc-20270112-0500']
    # psql, its roles, the row counts, files, binaries: no week copies anywhere
    assert len(list(day0.glob('*.gpg'))) == 5


def test_limit_mb_removes_whole_older_runs_but_never_the_latest(site: Site) -> None:
    (site.home / 'site' / 'uploads' / 'big.bin').write_bytes(os.urandom(700 * 1024))
    site.write_config(BACKUP_LIMIT_MB='2', BACKUP_MYSQL_DB=None, BACKUP_BINARIES=None)
    days = ['2027-01-04', '2027-01-05', '2027-01-06', '2027-01-07', '2027-01-08']
    for day in days:
        assert site.run(faketime=at(day)).returncode == 0
    used = {}
    for path in site.backups.rglob('*'):
        if path.is_file():
            used[path.stat().st_ino] = path.stat().st_blocks * 512
    assert sum(used.values()) <= 2 * 1024 * 1024
    # The latest run (Friday, day5, and its week copy) is complete; the oldest went first.
    assert slot_runs(site.backups / 'day5') == ['assoc-20270108-0300']
    # psql, its roles, the row counts, files
    assert len(list((site.backups / 'day5').glob('*.gpg'))) == 4
    assert not (site.backups / 'day1').exists() or not list((site.backups / 'day1').iterdir())
    # A limit smaller than one run keeps that run, whole.
    site.write_config(BACKUP_LIMIT_MB='1')
    assert site.run(faketime=at('2027-01-09')).returncode == 0
    assert len(list((site.backups / 'day6').glob('*.gpg'))) == 4


def test_main_is_callable_in_process(site: Site) -> None:
    assert ppbackup.main(['run']) == 0
    assert ppbackup.main([]) == 0  # no command is "run"
    assert len(site.mails()) == 2


def test_a_rerun_in_the_same_second_gets_its_own_id_and_replaces_the_first(site: Site) -> None:
    site.write_config(BACKUP_MYSQL_DB=None, BACKUP_BINARIES=None)
    frozen = '2027-01-04 03:00:00'  # no "@": the clock stands still, both runs share the second
    for _ in range(2):
        result = site.run(faketime=frozen)
        assert result.returncode == 0, result.stderr
    # The second run never wrote over the first one's files: it took the id ...-2, and the first
    # run went through retention (same hour), after the second one was whole.
    day1 = site.backups / 'day1'
    assert sorted(p.name for p in day1.iterdir()) == [
        'assoc-20270104-030000-2.sha256',
        'assoc-files-20270104-030000-2.tar.zst.gpg',
        'assoc-pg-roles-20270104-030000-2.sql.zst.gpg',
        'assoc-psql-20270104-030000-2.sql.zst.gpg',
        'assoc-rowcounts-20270104-030000-2.json.zst.gpg',
    ]
    assert sorted(p.name for p in (site.remote / 'backups' / 'day1').glob('*.sha256')) == [
        'assoc-20270104-030000-2.sha256',
        'assoc-20270104-030000.sha256',
    ]
    assert sorted(p.name for p in site.latest.iterdir()) == [
        'assoc-files-20270104-030000-2.tar.zst',
        'assoc-pg-roles-20270104-030000-2.sql.zst',
        'assoc-psql-20270104-030000-2.sql.zst',
        'assoc-rowcounts-20270104-030000-2.json.zst',
    ]
