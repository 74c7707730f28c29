"""The operator's commands: check, status, verify, decrypt, demo and run --dry-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, InProcess, Site, drop_databases, psql, sh

import ppbackup


def tree(root: Path) -> dict[str, tuple[int, int, float]]:
    """Every path under root with its mode, size and mtime: what "writes nothing" compares."""
    found = {}
    for path in root.rglob('*'):
        info = path.lstat()
        found[str(path)] = (info.st_mode, info.st_size, info.st_mtime)
    return found


def test_help_lists_every_command(site: Site, in_process: InProcess) -> None:
    result = in_process('--help')
    assert result.returncode == 0
    for command in (
        'run',
        'check',
        'status',
        'verify',
        'decrypt',
        'demo',
        'watch',
        'restore',
        'drill',
    ):
        assert command in result.stdout


def test_dry_run_prints_the_plan_and_writes_and_mails_nothing(site: Site) -> None:
    assert site.run(faketime='@2027-01-04 03:00:00').returncode == 0
    before = tree(site.home)
    mails = len(site.mails())
    result = site.run('run', '--dry-run', faketime='@2027-01-11 04:00:00')
    assert result.returncode == 0, result.stderr
    assert tree(site.home) == before
    assert len(site.mails()) == mails
    out = result.stdout
    assert f'pg_dump --no-password --format=plain --dbname={site.pg_db} --create | zstd' in out
    assert 'mysqldump --single-transaction' in out and 'tar --create' in out
    assert 'rsync -a -H' in out
    assert 'slots: day1, wk2' in out
    # Last week's Monday run in day1 is what rotation would remove: four dumps and archives, the
    # PostgreSQL roles, the MariaDB users, the row counts and the manifest.
    assert 'rotation would remove 8 file(s)' in out
    assert 'pg_dumpall --no-password --globals-only' in out
    manifest = next((site.backups / 'day1').glob('assoc-*.sha256'))
    assert str(manifest) in out


def test_check_passes_on_a_good_setup(site: Site, in_process: InProcess) -> None:
    result = in_process('check')
    assert result.returncode == 0, result.stdout
    assert 'all is well' in result.stdout
    assert f'ok    PostgreSQL database {site.pg_db}: reachable' in result.stdout
    assert f'ok    MySQL database {site.my_db}: reachable' in result.stdout
    assert f'ok    remote {site.remote}: reachable' in result.stdout
    assert 'pg_dump (PostgreSQL)' in result.stdout  # versions are shown
    assert not (site.home / 'backups').exists() and site.mails() == []


def test_check_fails_on_a_missing_key_an_unreachable_remote_and_a_database(
    site: Site, in_process: InProcess
) -> None:
    missing = '89ABCDEF0123456789ABCDEF0123456789ABCDEF'
    site.write_config(
        BACKUP_GPG_RECIPIENT=f'"{site.keys.alice} {missing}"',
        BACKUP_REMOTE='root@127.0.0.1:/nowhere',
        BACKUP_PSQL_DB='ppbt_nope',
    )
    result = in_process('check', extra_env={'RSYNC_RSH': 'ssh -p 9'})
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any(line.startswith('FAIL') and missing in line for line in lines)
    assert any(
        line.startswith('FAIL') and 'remote root@127.0.0.1:/nowhere' in line for line in lines
    )
    assert any(line.startswith('FAIL') and 'ppbt_nope' in line for line in lines)
    assert '3 problem(s)' in result.stdout


def test_status_shows_slots_coverage_and_last_run(site: Site) -> None:
    for day in ('2027-01-04', '2027-01-05'):
        assert site.run(faketime=f'@{day} 03:00:00').returncode == 0
    result = site.run('status', faketime='@2027-01-05 09:00:00')
    assert result.returncode == 0
    out = result.stdout
    assert 'day1' in out and 'day2' in out and 'wk1' in out
    assert 'last 7 days:  12-30- 12-31- 01-01- 01-02- 01-03- 01-04+ 01-05+' in out
    assert 'weeks held:   1 of 53: wk1' in out
    assert 'last run:     succeeded' in out
    data = json.loads(site.run('status', '--json', faketime='@2027-01-05 09:00:00').stdout)
    assert (
        data['days_covered']['2027-01-05'] is True and data['days_covered']['2027-01-03'] is False
    )
    assert {row['slot'] for row in data['slots']} == {'day1', 'day2', 'wk1'}
    row = next(row for row in data['slots'] if row['slot'] == 'day2')
    # psql, mysql, files, binaries, and the PostgreSQL roles, MariaDB users and row counts
    assert row['files'] == 7 and row['bytes'] > 0
    assert len(row['recipients']) == 2  # read from the ciphertext, no private key needed
    assert data['last_result'] == 'succeeded' and data['last_transfer']


def test_verify_with_no_backup_at_all_is_not_all_is_well(site: Site, in_process: InProcess) -> None:
    result = in_process('verify')
    assert result.returncode == 1
    assert f'BAD  no backup found in {site.backups}' in result.stdout


def test_verify_catches_a_flipped_byte_locally_and_a_truncated_remote_copy(
    site: Site, in_process: InProcess
) -> None:
    assert in_process().returncode == 0
    good = in_process('verify', '--remote')
    assert good.returncode == 0 and 'all is well' in good.stdout
    day = next(site.backups.glob('day*'))
    victim = next(day.glob('*psql*'))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    bad = in_process('verify')
    assert bad.returncode == 1
    assert f'BAD  {day.name}/{victim.name}: SHA-256 does not match' in bad.stdout
    # Put it back; now truncate the remote copy of another file.
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    remote_file = site.remote / 'backups' / day.name / next(day.glob('*files*')).name
    remote_file.write_bytes(remote_file.read_bytes()[:100])
    assert in_process('verify').returncode == 0  # local copies are fine
    bad_remote = in_process('verify', '--remote')
    assert bad_remote.returncode == 1
    assert (
        f'remote copy of backups/{day.name}/{remote_file.name}: missing or differs'
        in bad_remote.stdout
    )


def test_verify_catches_a_file_addressed_to_other_keys(site: Site, in_process: InProcess) -> None:
    assert in_process().returncode == 0
    site.write_config(BACKUP_GPG_RECIPIENT=site.keys.alice)
    result = in_process('verify')
    assert result.returncode == 1
    assert 'addressed to an unexpected key' in result.stdout


def test_decrypt_round_trips_a_dump_into_a_restorable_database(site: Site) -> None:
    assert site.run().returncode == 0
    dump = next(site.backups.glob('day*/assoc-psql-*'))
    out = site.root / 'members.sql'
    site.decrypt(dump, out)
    restored = site.pg_db + '_dec'
    try:
        # The dump creates its own database (pg_dump --create): give it another name, as the
        # README's bare way says, and load it from the maintenance database.
        renamed = site.root / 'renamed.sql'
        renamed.write_text(out.read_text().replace(site.pg_db, restored))
        sh('psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', 'postgres', '-f', str(renamed))
        query = 'SELECT * FROM members ORDER BY id'
        assert psql(restored, query) == psql(site.pg_db, query)
    finally:
        drop_databases(restored)
    # To stdout, as a pipe into psql would use it.
    piped = subprocess.run(
        [
            sys.executable,
            str(REPO / 'ppbackup.py'),
            'decrypt',
            str(dump),
            '--gnupghome',
            str(site.keys.holder),
        ],
        capture_output=True,
        env=site.env,
        timeout=60,
    )
    assert piped.returncode == 0 and piped.stdout == out.read_bytes()


def test_decrypt_without_the_private_key_fails_with_a_sentence(
    site: Site, in_process: InProcess
) -> None:
    assert in_process().returncode == 0
    dump = next(site.backups.glob('day*/assoc-psql-*'))
    out = site.root / 'nope.sql'
    result = in_process('decrypt', str(dump), '-o', str(out))  # the host's keyring: public only
    assert result.returncode == 1
    assert 'cannot decrypt: no matching private key' in result.stderr
    assert 'Traceback' not in result.stderr
    assert not out.exists() and not list(site.root.glob('.ppbackup-tmp-*'))


def test_demo_runs_the_whole_cycle_and_leaves_no_trace(site: Site) -> None:
    before = tree(site.home)
    demo_dirs = set(Path('/tmp').glob('ppbackup-demo-*'))
    result = site.run('demo', timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert 'run: succeeded' in out
    assert '== ppbackup status' in out and 'day' in out
    assert 'all is well' in out  # verify --remote
    assert 'site/members.csv included' in out
    assert 'lines of SQL with the sample rows' in out  # a database was reachable here
    assert tree(site.home) == before
    assert set(Path('/tmp').glob('ppbackup-demo-*')) == demo_dirs
    leftover = psql(
        'postgres', "SELECT count(*) FROM pg_database WHERE datname LIKE 'ppbackup_demo_%'"
    )
    assert leftover.strip() == '0'


def test_progress_is_shown_on_a_terminal_only(site: Site) -> None:
    (site.home / 'site' / 'uploads' / 'big.bin').write_bytes(os.urandom(8 * 1024 * 1024))
    quiet = site.run()
    assert quiet.returncode == 0 and quiet.stderr == ''
    started = time.monotonic()
    loud = subprocess.run(
        ['script', '-qec', f'{sys.executable} {REPO / "ppbackup.py"} -v', '/dev/null'],
        env=site.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loud.returncode == 0, loud.stdout
    assert 'dump files' in loud.stdout and 'sync to' in loud.stdout
    assert time.monotonic() - started < 120
    assert ppbackup.human_size(3 * 1024 * 1024) == '3.0 MiB'
