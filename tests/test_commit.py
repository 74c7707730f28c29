"""A failed run never costs an earlier backup (issue 9), and backups sharing folders keep apart
(FAULTS S1, S3 slot part, S7): the commit into slots, retention after the transfer, latest/ and the
24-hour plaintext bound, with the real command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import REPO, Site

import ppbackup


def at(day: str, hour: str = '03:00:00') -> str:
    """A faketime spec: the clock starts at that moment and runs on."""
    return f'@{day} {hour}'


def run_ok(site: Site, *args: str, **kwargs: object) -> None:
    result = site.run(*args, **kwargs)  # type: ignore[arg-type]
    assert result.returncode == 0, result.stderr


def runs_in(slot: Path, name: str = 'assoc') -> list[str]:
    """Return the run ids of a backup's manifests in a slot, oldest first."""
    return sorted(ppbackup.run_id_of(name, p.name) for p in slot.glob(f'{name}-*.sha256'))


def subject(mail: dict[str, object]) -> str:
    argv = mail['argv']
    assert isinstance(argv, list)
    return str(argv[argv.index('-s') + 1])


def mount_tmpfs(path: Path, mounts: list[Path], options: str) -> None:
    path.mkdir(mode=0o700, exist_ok=True)
    subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)], check=True)
    mounts.append(path)


def used_inodes(path: Path) -> int:
    info = os.statvfs(path)
    return info.f_files - info.f_ffree


# ---------------------------------------------------------------------------------------------------
# Issue 9, the three cases
# ---------------------------------------------------------------------------------------------------


def test_case1_a_commit_that_runs_out_of_room_keeps_the_earlier_run_whole(
    site: Site, mounts: list[Path]
) -> None:
    site.write_config(BACKUP_MYSQL_DB=None)
    mount_tmpfs(site.backups, mounts, 'size=64m,nr_inodes=1000,mode=0700')
    run_ok(site, faketime=at('2027-01-04'))  # Monday: day1, wk1
    before = site.snapshot(site.backups, site.remote)
    # Tuesday's run needs day2 (one inode) and its five ciphertexts (psql, its roles, the row
    # counts, files, binaries: five inodes): give it just those, so that the first file the commit
    # itself creates, the manifest, finds no room.
    used = used_inodes(site.backups)
    subprocess.run(
        ['mount', '-o', f'remount,nr_inodes={used + 1 + 5}', str(site.backups)], check=True
    )
    mails_before = len(site.mails())
    result = site.run(faketime=at('2027-01-05'))
    mail = site.assert_failed(result, 'commit', before, mails_before)
    assert 'No space left' in mail['body'] or 'disk full' in mail['body'], mail['body']
    # wk1 holds Monday's run whole: its files and manifest byte for byte, same inodes, nothing else.
    assert sorted(site.snapshot(site.backups)) == sorted(
        path for path in before if path.startswith(str(site.backups))
    )
    verify = site.run('verify')
    assert verify.returncode == 0, verify.stdout
    # With room again, the next run commits whole.
    subprocess.run(['mount', '-o', 'remount,nr_inodes=1000', str(site.backups)], check=True)
    run_ok(site, faketime=at('2027-01-05', '04:00:00'))
    assert len(runs_in(site.backups / 'day2')) == 1


def test_case2_a_run_that_fails_at_sync_removes_nothing_and_says_what_it_kept(
    site: Site,
) -> None:
    site.write_config(BACKUP_MYSQL_DB=None)
    run_ok(site, faketime=at('2027-01-04'))
    run_ok(site, faketime=at('2027-01-04', '18:00:00'))
    assert len(runs_in(site.backups / 'day1')) == 2 and len(runs_in(site.backups / 'wk1')) == 1
    before = site.snapshot(site.backups, site.remote)
    # Tuesday, the remote is unreachable: its parent folder is gone.
    remote = site.config['BACKUP_REMOTE']
    site.write_config(BACKUP_REMOTE=str(site.root / 'gone' / 'remote'))
    mails_before = len(site.mails())
    result = site.run(faketime=at('2027-01-05'))
    mail = site.assert_failed(result, 'sync', before, mails_before, new_files_allowed=True)
    body = mail['body']
    assert 'removed by retention' not in body
    assert 'This run was committed to day2, wk1 and is kept there' in body
    assert 'Earlier backups were left untouched' in body
    # wk1 holds Monday 18:00 and Tuesday, each whole under its own manifest.
    assert len(runs_in(site.backups / 'wk1')) == 2
    assert ppbackup.tree_problems(site.backups, None, None) == []
    # Once the remote is back, the next run sends both and only then applies retention.
    site.write_config(BACKUP_REMOTE=remote)
    run_ok(site, faketime=at('2027-01-05', '05:00:00'))
    assert runs_in(site.backups / 'wk1') == runs_in(site.backups / 'day2')[-1:]
    assert len(runs_in(site.remote / 'backups' / 'day2')) == 2


def test_case3_a_daily_job_at_the_same_minute_that_fails_removes_yesterdays_plaintext(
    site: Site,
) -> None:
    site.write_config(BACKUP_MYSQL_DB=None)
    run_ok(site, faketime=at('2027-01-04'))
    assert list(site.latest.iterdir())
    site.write_config(BACKUP_GPG_RECIPIENT=f'"{site.keys.alice} {site.keys.expired}"')
    # Cron fires a day later at the same minute, even a moment *before* the plaintext's 24th hour;
    # the run then fails at once on the key.
    result = site.run(faketime=at('2027-01-05', '02:59:59'))
    assert result.returncode == 1
    assert not os.path.lexists(site.latest), "yesterday's plaintext outlived a failed run"
    # Plaintext younger than that stays for rollbacks, even when the run fails.
    site.write_config(BACKUP_GPG_RECIPIENT=f'"{site.keys.alice} {site.keys.bob}"')
    run_ok(site, faketime=at('2027-01-05', '03:00:00'))
    site.write_config(BACKUP_GPG_RECIPIENT=f'"{site.keys.alice} {site.keys.expired}"')
    assert site.run(faketime=at('2027-01-05', '23:00:00')).returncode == 1
    # psql, its roles, the row counts, files, binaries
    assert len(list(site.latest.iterdir())) == 5


# ---------------------------------------------------------------------------------------------------
# S1: two configs share the folders; S3: a stray file in a slot; S7: a wrong clock
# ---------------------------------------------------------------------------------------------------


def test_S1_two_backups_sharing_the_folders_never_touch_each_others_runs(site: Site) -> None:
    site.write_config(BACKUP_MYSQL_DB=None, BACKUP_BINARIES=None)
    shop = site.home / 'shop.cfg'
    shop.write_text(site.cfg.read_text().replace('BACKUP_NAME=assoc', 'BACKUP_NAME=shop'))
    shop.chmod(0o600)
    run_ok(site, faketime=at('2027-01-04'))
    run_ok(site, '--config', str(shop), 'run', faketime=at('2027-01-04', '03:30:00'))
    shop_mail = site.mails()[-1]
    assert 'removed by retention' not in shop_mail['body']
    assert len(runs_in(site.backups / 'wk1', 'assoc')) == 1
    assert len(runs_in(site.backups / 'wk1', 'shop')) == 1
    # A leftover of an interrupted shop commit: assoc's runs leave it to shop.
    leftover = site.backups / 'day1' / 'shop-psql-20270104-010000.sql.zst.gpg'
    leftover.write_bytes(b'half a commit')
    shop_files = site.snapshot(site.backups)
    shop_files = {path: value for path, value in shop_files.items() if '/shop-' in path}
    shop_latest = sorted(p.name for p in site.latest.glob('shop-*'))
    assert shop_latest
    # assoc runs again: the same week and day (a same-hour rerun), then next week's Monday.
    for when in (at('2027-01-04', '03:40:00'), at('2027-01-11')):
        run_ok(site, faketime=when)
        after = site.snapshot(site.backups)
        assert {path: after.get(path) for path in shop_files} == shop_files
        assert 'removed by retention' in site.mails()[-1]['body']
        if when.endswith('03:40:00'):  # assoc replaced its own plaintext, not shop's
            assert sorted(p.name for p in site.latest.glob('shop-*')) == shop_latest
            assert len(list(site.latest.glob('assoc-*'))) == 4  # psql, roles, row counts, files
    # A week later, shop's plaintext expired: the 24-hour bound holds for every backup's files.
    assert list(site.latest.glob('shop-*')) == []
    assert len(runs_in(site.backups / 'day1', 'assoc')) == 1
    # Each keeps its own state.
    states = sorted(p.name for p in (site.home / 'backups.insecure').glob('*.state.json'))
    assert states == ['assoc.state.json', 'shop.state.json']
    # shop's next run sweeps its own leftover.
    run_ok(site, '--config', str(shop), 'run', faketime=at('2027-01-11', '03:30:00'))
    assert not leftover.exists()
    assert runs_in(site.backups / 'day1', 'assoc') and runs_in(site.backups / 'day1', 'shop')


def test_S3_a_stray_file_in_a_slot_is_never_sent_and_verify_reports_it(site: Site) -> None:
    site.write_config(BACKUP_MYSQL_DB=None)
    run_ok(site, faketime=at('2027-01-04'))
    plain = next(site.latest.glob('assoc-files-*.tar.zst'))
    day1 = site.backups / 'day1'
    stray = day1 / 'site-copy.tar.zst'
    stray.write_bytes(plain.read_bytes())  # cp x.tar.zst ~/backups/day1/
    (site.backups / 'notes.txt').write_text('not a slot\n')
    verify = site.run('verify')
    assert verify.returncode == 1
    assert 'BAD  day1/site-copy.tar.zst: no manifest names it' in verify.stdout, verify.stdout
    assert 'BAD  notes.txt: not a slot' in verify.stdout
    run_ok(site, faketime=at('2027-01-04', '05:00:00'))
    remote = site.remote / 'backups'
    assert not (remote / 'day1' / stray.name).exists()
    assert not (remote / 'notes.txt').exists()
    assert len(runs_in(remote / 'day1')) == 2  # the runs themselves went
    assert stray.exists()  # not this backup's file: reported, never removed
    # A file of this backup that no manifest names (an unfinished commit) is reported, then swept.
    orphan = day1 / plain.name.replace('-files-', '-psql-').replace('.tar.', '.sql.')
    orphan.write_bytes(b'unfinished')
    verify = site.run('verify')
    assert f'BAD  day1/{orphan.name}: left by an interrupted run' in verify.stdout, verify.stdout
    run_ok(site, faketime=at('2027-01-04', '06:00:00'))
    assert not orphan.exists() and not (remote / 'day1' / orphan.name).exists()


def test_S7_a_wrong_clock_defeats_neither_the_plaintext_bound_nor_retention(site: Site) -> None:
    site.write_config(BACKUP_MYSQL_DB=None)
    run_ok(site, faketime='+30d')  # the clock is a month ahead
    assert list(site.latest.iterdir())
    site.write_config(BACKUP_GPG_RECIPIENT=f'"{site.keys.alice} {site.keys.expired}"')
    result = site.run(faketime='+2d')  # clock put right(er); the run fails
    assert result.returncode == 1
    assert not os.path.lexists(site.latest), 'plaintext dated in the future survived'
    # BACKUP_LIMIT_MB: a run dated in the future is no newer for that; it goes first.
    for path in site.backups.rglob('*'):
        if path.is_file():
            path.unlink()
    (site.home / 'site' / 'uploads' / 'big.bin').write_bytes(os.urandom(700 * 1024))
    site.write_config(
        BACKUP_GPG_RECIPIENT=f'"{site.keys.alice} {site.keys.bob}"',
        BACKUP_LIMIT_MB='2',
        BACKUP_BINARIES=None,
    )
    run_ok(site, faketime=at('2027-03-03'))  # under a wrong clock: a Wednesday a month ahead
    run_ok(site, faketime=at('2027-02-01'))  # the right clock: Monday
    run_ok(site, faketime=at('2027-02-02', '04:00:00'))  # Tuesday: three runs are over the limit
    # The run dated in the future went, not Monday's, though its date is the latest.
    assert runs_in(site.backups / 'day3') == []
    assert [run[:11] for run in runs_in(site.backups / 'day1')] == ['20270201-03']
    assert [run[:11] for run in runs_in(site.backups / 'day2')] == ['20270202-04']


# ---------------------------------------------------------------------------------------------------
# SIGTERM: the kill loop ends when the children are dead, not when its grace is over
# ---------------------------------------------------------------------------------------------------


def test_kill_group_returns_when_its_children_died_though_they_are_not_reaped() -> None:
    child = subprocess.Popen(['sleep', '600'], process_group=0)
    try:
        done = threading.Event()
        killer = threading.Thread(
            target=lambda: (ppbackup._kill_group(child.pid, grace=3600), done.set())
        )
        killer.start()
        # sleep dies of the SIGTERM at once, and stays a zombie: nobody waits for it yet. The old
        # loop saw the zombie as alive and waited out the whole grace (an hour here).
        killer.join(timeout=60)
        assert done.is_set(), '_kill_group waited out its grace on a dead child'
        assert child.wait(timeout=10) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_the_kill_loop_survives_a_faked_clock_that_breaks_time_sleep() -> None:
    """Under libfaketime with the monotonic clock left real, Python 3.11's time.sleep fails with
    EINVAL every time (its absolute deadline is mangled); under the suite's plain faketime, now and
    then. The kill loop must not stop half way: a child that ignores SIGTERM still gets SIGKILL."""
    env = {**os.environ, 'FAKETIME_DONT_FAKE_MONOTONIC': '1', 'PYTHONPATH': str(REPO)}
    faked = ['faketime', '-f', '@2027-01-05 03:00:00', sys.executable, '-c']
    broken = subprocess.run([*faked, 'import time; time.sleep(0.01)'], env=env, capture_output=True)
    assert b'Invalid argument' in broken.stderr  # what the old loop met
    code = (
        'import subprocess, ppbackup\n'
        "child = subprocess.Popen(['sh', '-c', 'trap \"\" TERM; sleep 30'], process_group=0)\n"
        'ppbackup.nap(0.3)  # the shell has set its trap\n'
        'ppbackup._kill_group(child.pid, grace=0.5)\n'
        'print(child.wait())  # killed: no need for a timeout, whose sleep would fail here\n'
    )
    result = subprocess.run([*faked, code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(-signal.SIGKILL)]


def test_sigterm_during_the_transfer_exits_143_and_leaves_no_child(site: Site) -> None:
    site.write_config(BACKUP_MYSQL_DB=None)
    started = site.root / 'rsync.started'
    site.shim('rsync', f'#!/bin/sh\necho $$ > {started}\nexec sleep 600\n')
    proc = site.start()
    deadline = time.monotonic() + 120
    while not started.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    pid = int(started.read_text().split()[0])
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert 'interrupted by SIGTERM' in err
    assert not Path(f'/proc/{pid}').exists() or 'Z' in Path(f'/proc/{pid}/stat').read_text()
    # SIGTERM after the commit: the run was kept whole, nothing was removed.
    assert ppbackup.tree_problems(site.backups, None, None) == []
    assert 'removed by retention' not in site.mails()[-1]['body']
