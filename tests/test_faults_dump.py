"""Dump, encryption, filesystem and input faults from FAULTS.md: one test per row, named by its id.

Faults are caused for real where one machine allows (a killed connection, a held table lock, an
expired key, a small tmpfs, a read-only bind mount); PATH shims only where nothing else can.
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import shutil
import subprocess
import tarfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from conftest import Site, gpg, make_key, mysql, psql, sh, terminate_sessions

import ppbackup


def first_run(site: Site) -> dict[str, tuple[int, bytes]]:
    """A good run, so that there are earlier backups to protect; return their snapshot."""
    result = site.run(faketime='@2027-01-04 03:00:00')
    assert result.returncode == 0, result.stderr
    return site.snapshot(site.backups, site.remote)


def later(site: Site, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """A run on the next day (a new day slot), so a failure there must not touch day1/wk1."""
    return site.run(*args, faketime='@2027-01-05 03:00:00', **kwargs)  # type: ignore[arg-type]


def no_process(pattern: str) -> bool:
    return subprocess.run(['pgrep', '-f', pattern], capture_output=True).returncode == 1


# --- Dump faults -------------------------------------------------------------------------------


@contextlib.contextmanager
def held_table_lock(site: Site) -> Iterator[None]:
    """Another session holds ACCESS EXCLUSIVE on a table: pg_dump waits on it until released."""
    locker = subprocess.Popen(
        [
            'psql',
            '-X',
            '-q',
            '-d',
            site.pg_db,
            '-c',
            'BEGIN; LOCK TABLE ballots IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(60);',
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        # Wait until the lock is granted, not for a guessed while: a dump started earlier would
        # simply finish.
        for _ in range(300):
            held = psql(
                site.pg_db,
                'SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation '
                "WHERE c.relname = 'ballots' AND l.mode = 'AccessExclusiveLock' AND l.granted "
                'AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())',
            )
            if held.strip() == '1':
                break
            assert locker.poll() is None, 'the locking psql ended'
            time.sleep(0.05)
        else:
            pytest.fail('the table lock was never granted')
        yield
    finally:
        locker.kill()
        locker.wait()
        terminate_sessions(site.pg_db)  # its pg_sleep outlives the client and holds the database


def test_D1_a_dump_killed_part_way_fails_the_run_naming_the_database(site: Site) -> None:
    before = first_run(site)
    # Another session's lock makes pg_dump wait mid-dump; then kill its connection server-side.
    with held_table_lock(site):
        run = site.start()
        for _ in range(100):
            killed = psql(
                site.pg_db,
                'SELECT pg_terminate_backend(pid) FROM pg_stat_activity '
                f"WHERE datname = '{site.pg_db}' AND application_name = "
                "'pg_dump'",
            )
            if 't' in killed:
                break
            time.sleep(0.1)
        else:
            pytest.fail('pg_dump never connected')
        out, err = run.communicate(timeout=60)
    result = subprocess.CompletedProcess(run.args, run.returncode, out, err)
    mail = site.assert_failed(result, f'dump psql {site.pg_db}', before, mails_before=1)
    assert 'pg_dump exited 1' in mail['body']
    assert 'terminat' in mail['body']  # the tail of pg_dump's own error output
    # No file from this dump under a final name: only the first run's copies exist.
    assert {p.parent.name for p in site.backups.rglob('*psql*')} == {'day1', 'wk1'}


def test_D1_a_dumper_that_dies_half_way_through_a_pipe_is_caught(site: Site) -> None:
    before = first_run(site)
    site.shim(
        'mysqldump',
        """#!/bin/sh
        echo '-- MariaDB dump'; echo 'CREATE TABLE t (x int);'
        echo 'mysqldump: Lost connection to server' >&2; exit 2
        """,
    )
    mail = site.assert_failed(later(site), f'dump mysql {site.my_db}', before, mails_before=1)
    assert 'mysqldump exited 2' in mail['body'] and 'Lost connection' in mail['body']


@pytest.mark.parametrize('output', ['', '-- PostgreSQL database dump\nCREATE TABLE members (\n'])
def test_D2_an_empty_or_truncated_dump_fails(site: Site, output: str) -> None:
    before = first_run(site)
    site.shim('pg_dump', f"#!/bin/sh\nprintf '{output}'\nexit 0\n")
    mail = site.assert_failed(later(site), 'dump psql', before, mails_before=1)
    assert ('empty' if not output else 'truncated') in mail['body']


def test_D2_a_truncated_mysql_dump_fails(site: Site) -> None:
    before = first_run(site)
    site.shim('mysqldump', '#!/bin/sh\n/usr/bin/mysqldump "$@" | head -n 20\n')
    mail = site.assert_failed(later(site), 'dump mysql', before, mails_before=1)
    assert 'truncated' in mail['body'] and '-- Dump completed' in mail['body']


def test_D3_a_wrong_database_fails_fast_without_prompting(site: Site) -> None:
    before = first_run(site)
    site.write_config(BACKUP_PSQL_DB='ppbt_does_not_exist')
    started = time.monotonic()
    mail = site.assert_failed(later(site), 'dump psql ppbt_does_not_exist', before, mails_before=1)
    assert time.monotonic() - started < 30
    assert 'does not exist' in mail['body']


def test_D3_a_pgpass_others_can_read_fails_fast(site: Site) -> None:
    before = first_run(site)
    pgpass = site.home / '.pgpass'
    pgpass.write_text(f'localhost:5432:{site.pg_db}:root:s3cret-pw\n')
    pgpass.chmod(0o644)
    mail = site.assert_failed(later(site), 'dump', before, mails_before=1)
    assert '.pgpass is readable by group or others' in mail['body']
    assert 's3cret-pw' not in mail['body']


def test_D4_a_hanging_dump_is_killed_by_the_timeout(site: Site) -> None:
    site.write_config(BACKUP_DUMP_TIMEOUT='3', BACKUP_MYSQL_DB=None)
    started = time.monotonic()
    with held_table_lock(site):
        result = site.run()
    assert time.monotonic() - started < 30
    mail = site.assert_failed(result, f'dump psql {site.pg_db}', {})
    assert 'timeout after 3 s' in mail['body']
    assert no_process(f'pg_dump --no-password --format=plain --dbname={site.pg_db}')


def test_D4_a_hanging_encryption_is_killed_by_the_same_timeout(site: Site) -> None:
    site.write_config(BACKUP_DUMP_TIMEOUT='3', BACKUP_MYSQL_DB=None)
    site.shim(
        'gpg',
        '#!/bin/sh\ncase "$*" in *--encrypt*) exec sleep 120;; esac\nexec /usr/bin/gpg "$@"\n',
    )
    started = time.monotonic()
    result = site.run()
    assert time.monotonic() - started < 30
    mail = site.assert_failed(result, 'encrypt', {})
    assert 'encryption timed out after 3 s' in mail['body']
    # One timeout, not one per artifact: those queued behind it were never started.
    assert 'not encrypted: an earlier encryption failed' in mail['body']
    assert mail['body'].count('encryption timed out') == 1
    assert no_process('sleep 120')


def test_D5_a_failing_compressor_fails_the_run_though_the_dumper_succeeded(site: Site) -> None:
    before = first_run(site)
    site.shim(
        'zstd', "#!/bin/sh\nhead -c 100 > /dev/null\necho 'zstd: out of memory' >&2\nexit 1\n"
    )
    mail = site.assert_failed(later(site), 'dump', before, mails_before=1)
    assert 'zstd exited 1' in mail['body'] and 'out of memory' in mail['body'], mail['body']


def test_D6_a_missing_path_fails_the_run_naming_it(site: Site) -> None:
    before = first_run(site)
    site.write_config(BACKUP_FILES='"site gone-folder"')
    mail = site.assert_failed(later(site), 'archive', before, mails_before=1)
    assert str(site.home / 'gone-folder') in mail['body']


def test_D6_a_file_changed_while_read_is_only_a_warning(site: Site) -> None:
    growing = site.home / 'site' / 'growing.log'
    growing.write_bytes(os.urandom(20 * 1024 * 1024))
    stop = threading.Event()

    def append() -> None:
        with open(growing, 'ab') as handle:
            while not stop.is_set():
                handle.write(b'log line\n' * 100)
                handle.flush()

    writer = threading.Thread(target=append)
    writer.start()
    try:
        site.write_config(
            BACKUP_MYSQL_DB=None,
            BACKUP_PSQL_DB=None,
            BACKUP_BINARIES=None,
            BACKUP_COMPRESSION='none',
        )
        result = site.run()
    finally:
        stop.set()
        writer.join()
    assert result.returncode == 0, result.stderr
    assert site.subjects() == ['[ppbackup] assoc: succeeded with 1 WARNING(s)']
    assert 'files changed while being read' in site.mails()[0]['body']


def test_D7_a_dump_that_shrank_by_half_warns_and_still_goes_to_the_week_slot(site: Site) -> None:
    first_run(site)
    psql(site.pg_db, 'DELETE FROM ballots')
    mysql(site.my_db, 'DELETE FROM ballots')
    result = later(site)
    assert result.returncode == 0
    subject = site.subjects()[-1]
    assert 'succeeded with 2 WARNING(s)' in subject
    body = site.mails()[-1]['body']
    assert f'psql {site.pg_db} shrank from' in body and f'mysql {site.my_db} shrank' in body
    assert list((site.backups / 'wk1').glob('*psql*'))[0].stat().st_nlink == 2


# --- Encryption faults -------------------------------------------------------------------------


def pg_dump_spy(site: Site) -> Path:
    """A pass-through pg_dump that leaves a mark: proves whether any dump started."""
    mark = site.root / 'pg_dump-ran'
    site.shim('pg_dump', f'#!/bin/sh\ntouch {mark}\nexec /usr/bin/pg_dump "$@"\n')
    return mark


@pytest.mark.parametrize('which', ['missing', 'expired', 'one of several'])
def test_E1_an_unusable_recipient_fails_before_any_dump(site: Site, which: str) -> None:
    before = first_run(site)
    mark = pg_dump_spy(site)
    missing = '89ABCDEF0123456789ABCDEF0123456789ABCDEF'
    if which == 'expired':
        sh(
            'gpg',
            '--homedir',
            str(site.home / '.gnupg'),
            '--batch',
            '--import',
            input=site.keys.public[site.keys.expired],
        )
        spec, named = site.keys.expired, site.keys.expired
    elif which == 'missing':
        spec, named = missing, missing
    else:
        spec, named = f'"{site.keys.alice} {missing} {site.keys.bob}"', missing
    site.write_config(BACKUP_GPG_RECIPIENT=spec)
    mail = site.assert_failed(later(site), 'keys', before, mails_before=1)
    assert named in mail['body']
    assert ('expired' if which == 'expired' else 'no such public key') in mail['body']
    assert not mark.exists()


def test_E1_a_user_id_recipient_must_be_valid(site: Site, tmp_path: Path) -> None:
    other = tmp_path / 'other-gnupg'
    other.mkdir(mode=0o700)
    make_key(other, 'Carol <carol@example.org>')
    sh(
        'gpg',
        '--homedir',
        str(site.home / '.gnupg'),
        '--batch',
        '--import',
        input=gpg(other, '--armor', '--export', 'carol@example.org').stdout,
    )
    site.write_config(BACKUP_GPG_RECIPIENT='carol@example.org')
    mail = site.assert_failed(site.run(), 'keys', {})
    assert 'is not valid in this keyring' in mail['body']
    sh('gpgconf', '--homedir', str(other), '--kill', 'all', check=False)


def test_E2_a_key_expiring_soon_warns_in_the_mail_and_in_check(site: Site, tmp_path: Path) -> None:
    home = tmp_path / 'soon'
    home.mkdir(mode=0o700)
    soon = make_key(home, 'Soon <soon@example.org>', expire='10d')
    sh(
        'gpg',
        '--homedir',
        str(site.home / '.gnupg'),
        '--batch',
        '--import',
        input=gpg(home, '--armor', '--export', soon).stdout,
    )
    site.write_config(BACKUP_GPG_RECIPIENT=f'"{site.keys.alice} {soon}"')
    assert site.run().returncode == 0
    assert 'WARNING' in site.subjects()[0]
    assert f'recipient key {soon}' in site.mails()[0]['body']
    assert 'expires in 9 days' in site.mails()[0]['body']
    check = site.run('check')
    assert f'WARN  recipient key {soon}' in check.stdout
    sh('gpgconf', '--homedir', str(home), '--kill', 'all', check=False)


def test_E3_without_gpg_it_fails_clearly_before_any_dump(site: Site) -> None:
    before = first_run(site)
    mark = pg_dump_spy(site)
    bare = site.root / 'bin-without-gpg'
    bare.mkdir()
    for program in ('pg_dump', 'mysqldump', 'tar', 'zstd', 'rsync', 'mailx', 'faketime'):
        real = shutil.which(program, path=site.env['PATH'])
        assert real
        (bare / program).symlink_to(real)
    result = later(site, extra_env={'PATH': str(bare)})
    mail = site.assert_failed(result, 'keys', before, mails_before=1)
    assert 'gpg is not installed' in mail['body']
    assert not mark.exists()


def test_E3_an_unreadable_gnupg_home_fails_clearly(site: Site) -> None:
    before = first_run(site)
    (site.home / '.gnupg').chmod(0o000)
    try:
        mail = site.assert_failed(later(site), 'keys', before, mails_before=1)
    finally:
        (site.home / '.gnupg').chmod(0o700)
    assert 'is not a readable folder' in mail['body']


def keyids(site: Site, path: Path) -> list[str]:
    return ppbackup.packet_recipients(path, site.keys.holder)


def subkey_of(site: Site, fingerprint: str) -> str:
    listing = gpg(site.keys.holder, '--with-colons', '--list-keys', fingerprint).stdout
    return next(line.split(':')[4] for line in listing.splitlines() if line.startswith('sub:'))


def test_E4_gpg_conf_cannot_add_a_recipient(site: Site) -> None:
    (site.home / '.gnupg' / 'gpg.conf').write_text(
        f'encrypt-to {site.keys.bob}\ndefault-recipient {site.keys.bob}\n'
    )
    site.write_config(BACKUP_GPG_RECIPIENT=site.keys.alice)
    assert site.run().returncode == 0
    for path in site.backups.rglob('*.gpg'):
        assert keyids(site, path) == [subkey_of(site, site.keys.alice)]


def test_E5_a_recipient_secret_key_on_the_host_is_a_warning(site: Site) -> None:
    secret = gpg(site.keys.holder, '--armor', '--export-secret-keys', site.keys.alice).stdout
    sh('gpg', '--homedir', str(site.home / '.gnupg'), '--batch', '--import', input=secret)
    assert site.run().returncode == 0
    assert 'WARNING' in site.subjects()[0]
    assert (
        f'the SECRET key of recipient {site.keys.alice} is on this host' in site.mails()[0]['body']
    )


def test_E6_gpg_dying_part_way_leaves_nothing_under_a_final_name(site: Site) -> None:
    before = first_run(site)
    # gpg writes part of its output, then dies as if killed or out of disk.
    site.shim(
        'gpg',
        """#!/bin/sh
        case "$*" in *--encrypt*)
          out=$(printf '%s\\n' "$@" | grep -A1 -x -- --output | tail -n 1)
          head -c 1000 /dev/urandom > "$out"; kill -9 $$;;
        esac
        exec /usr/bin/gpg "$@"
        """,
    )
    mail = site.assert_failed(later(site), 'encrypt', before, mails_before=1)
    assert 'gpg failed' in mail['body']


# --- Disk and filesystem -----------------------------------------------------------------------


def test_F1_disk_full_while_encrypting(site: Site, mounts: list[Path]) -> None:
    site.backups.mkdir()
    sh('mount', '-t', 'tmpfs', '-o', 'size=512k,mode=0700', 'tmpfs', str(site.backups))
    mounts.append(site.backups)
    site.write_config(BACKUP_MYSQL_DB=None, BACKUP_BINARIES=None)
    before = first_run(site)
    (site.home / 'site' / 'uploads' / 'big.bin').write_bytes(os.urandom(600 * 1024))
    mail = site.assert_failed(later(site), 'encrypt', before, mails_before=1)
    assert 'disk full' in mail['body']


def test_F1_disk_full_while_dumping(site: Site, mounts: list[Path]) -> None:
    before = first_run(site)
    insecure = site.home / 'backups.insecure'
    sh('mount', '-t', 'tmpfs', '-o', 'size=256k,mode=0700', 'tmpfs', str(insecure))
    mounts.append(insecure)
    (site.home / 'site' / 'uploads' / 'big.bin').write_bytes(os.urandom(400 * 1024))
    mail = site.assert_failed(later(site), 'dump', before, mails_before=1)
    assert 'disk full' in mail['body']


def test_F2_a_read_only_folder_fails_naming_the_path(site: Site, mounts: list[Path]) -> None:
    before = first_run(site)
    sh('mount', '--bind', '-o', 'ro', str(site.backups), str(site.backups))
    mounts.append(site.backups)
    mail = site.assert_failed(later(site), 'prepare', before, mails_before=1)
    assert str(site.backups / 'day2') in mail['body'] and 'Read-only' in mail['body']


def test_F3_rotation_property_many_days_with_random_faults(site: Site) -> None:
    """Drive 24 simulated days, a third of them failing at a random step. Afterwards the bounds
    hold, every file in every slot decrypts, and the newest successful run is always present."""
    site.write_config(BACKUP_MYSQL_DB=None, BACKUP_BINARIES=None, BACKUP_ADMIN_EMAILS=None)
    rng = random.Random(20271)
    faults = {
        'dump': ('pg_dump', '#!/bin/sh\necho partial; exit 1\n'),
        'compress': ('zstd', '#!/bin/sh\ncat > /dev/null; exit 1\n'),
        'encrypt': (
            'gpg',
            '#!/bin/sh\ncase "$*" in *--encrypt*) exit 2;; esac\nexec /usr/bin/gpg "$@"\n',
        ),
        'sync': ('rsync', '#!/bin/sh\nexit 12\n'),
    }
    start = time.mktime((2027, 3, 1, 3, 0, 0, 0, 0, -1))
    newest_success = None
    failed_at_sync = set()
    for day in range(24):
        when = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(start + day * 86400 * 3))
        fault = rng.choice([None, None, *faults]) if day else None
        for name in ('pg_dump', 'zstd', 'gpg', 'rsync'):
            (site.shims / name).unlink(missing_ok=True)
        if fault:
            site.shim(*faults[fault])
        result = site.run(faketime='@' + when)
        assert result.returncode == (1 if fault else 0), (fault, result.stderr)
        if fault in (None, 'sync'):  # a sync failure comes after the slots were written
            newest_success = when
        if fault == 'sync':
            failed_at_sync.add(
                time.strftime('%Y%m%d-%H%M', time.strptime(when, '%Y-%m-%d %H:%M:%S'))
            )
        # The newest successful run's slot is present and whole.
        assert newest_success is not None
        when_date = time.strptime(newest_success, '%Y-%m-%d %H:%M:%S')
        slot = site.backups / f'day{when_date.tm_wday + 1}'
        stamp = time.strftime('%Y%m%d-%H%M', when_date)
        assert list(slot.glob(f'assoc-{stamp}*.sha256'))
        assert ppbackup.tree_problems(site.backups, None, None) == []
    for name in ('pg_dump', 'zstd', 'gpg', 'rsync'):
        (site.shims / name).unlink(missing_ok=True)
    slots = [path.name for path in site.backups.iterdir()]
    assert len([s for s in slots if s.startswith('day')]) <= 7
    assert len([s for s in slots if s.startswith('wk')]) <= 53
    for slot in site.backups.iterdir():
        # One run per slot at 03:00 each day; a run that failed at sync removed nothing, so its
        # slots hold the earlier run beside it until a later run there succeeds.
        manifests = sorted(path.name for path in slot.glob('*.sha256'))
        assert len(manifests) == 1 or (
            len(manifests) == 2 and manifests[-1][len('assoc-') :][:13] in failed_at_sync
        ), manifests
    for path in site.backups.rglob('*.gpg'):
        site.decrypt(path, site.root / 'out')


def test_F4_rewriting_a_day_file_never_truncates_its_week_twin(site: Site) -> None:
    first_run(site)
    week1 = site.snapshot(site.backups / 'wk1')
    # Next Monday rewrites day1's files under the same names; same hour.
    assert site.run(faketime='@2027-01-11 03:00:00').returncode == 0
    assert site.snapshot(site.backups / 'wk1') == week1
    assert ppbackup.tree_problems(site.backups, None, None) == []
    # A rerun in the same hour replaces the day files and the week links together.
    assert site.run(faketime='@2027-01-11 03:30:00').returncode == 0
    assert ppbackup.tree_problems(site.backups, None, None) == []
    assert site.snapshot(site.backups / 'wk1') == week1


def test_F5_a_planted_symlink_is_never_followed(site: Site, tmp_path: Path) -> None:
    outside = tmp_path / 'outside'
    outside.mkdir()
    insecure = site.home / 'backups.insecure'
    insecure.mkdir(mode=0o700)
    (insecure / 'latest').symlink_to(outside)
    assert site.run().returncode == 0
    assert list(outside.iterdir()) == []
    assert site.latest.is_dir() and not site.latest.is_symlink()
    # A planted slot symlink is refused, not written through.
    sh('rm', '-rf', str(site.backups / 'day2'))
    (site.backups / 'day2').symlink_to(outside)
    result = later(site)
    assert result.returncode == 1 and 'symlink' in result.stderr
    assert list(outside.iterdir()) == []


# --- Bad input ---------------------------------------------------------------------------------


def test_B3_a_value_that_looks_like_an_option_is_a_name(site: Site, tmp_path: Path) -> None:
    odd = site.home / '--checkpoint-action=exec=touch PWNED'
    odd.mkdir()
    (odd / 'kept.txt').write_text('still a folder\n')
    site.write_config(BACKUP_FILES=f'"site \'{odd.name}\'"')
    assert site.run().returncode == 0
    assert not list(tmp_path.rglob('PWNED'))
    archive = site.root / 'files.tar'
    site.decrypt(next(site.backups.glob('day*/assoc-files-*')), archive)
    with tarfile.open(archive) as tar:
        assert tar.extractfile(f'{odd.name}/kept.txt').read() == b'still a folder\n'


def test_B5_names_with_spaces_quotes_and_non_ascii_work(site: Site) -> None:
    odd = site.home / 'l\'été "quoted" & spaced'
    odd.mkdir()
    (odd / 'ünïcødé.txt').write_text('ok\n')
    words = shlex.join(['site', 'my docs', odd.name])  # shell-style words inside the value
    site.write_config(BACKUP_FILES=shlex.quote(words))
    assert ppbackup.load_config(site.cfg).files == ('site', 'my docs', odd.name)
    assert site.run().returncode == 0
    archive = site.root / 'files.tar'
    site.decrypt(next(site.backups.glob('day*/assoc-files-*')), archive)
    with tarfile.open(archive) as tar:
        assert tar.extractfile(f'{odd.name}/ünïcødé.txt').read() == b'ok\n'
