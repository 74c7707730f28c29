"""Faults caused for real during a run (FAULTS.md: C1, C2, K1, K2, P1-P4, N1, N2).

Every test runs the real command against the real databases, gpg, tar, zstd and rsync; a fault that
cannot be caused otherwise is a PATH shim. Besides its own promise each test checks the shared
invariant where it applies: the exit code, exactly one FAILED mail naming the step, earlier backups
untouched (same bytes, same inodes), no temporaries after the next run, the lock released (a next
run succeeds) and no child process left running.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import pytest
from conftest import ADMIN_ENV, CANARY, REPO, Site, leave_this_second, psql, sh

import ppbackup

COMMAND = [sys.executable, str(REPO / 'ppbackup.py')]
TEMP_PREFIXES = (ppbackup.TMP_PREFIX, ppbackup.RUN_PREFIX)
SUCCEEDED = '[ppbackup] assoc: succeeded'


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def insecure(site: Site) -> Path:
    return site.home / 'backups.insecure'


def temporaries(site: Site) -> list[str]:
    """Every leftover of an unfinished run: ppbackup's temporary names, and any other dot-file in the
    slots or on the remote (rsync's own temporaries and partial folder included)."""
    found = []
    roots = [insecure(site), site.backups, site.remote]
    for root in roots:
        if not root.exists():
            continue
        for path in root.rglob('*'):
            name = path.name
            the_lock = path.parent == insecure(site) and name == ppbackup.LOCK_NAME
            if name.startswith(TEMP_PREFIXES) or (name.startswith('.') and not the_lock):
                found.append(str(path))
    return found


def assert_untouched(site: Site, before: dict[str, tuple[int, bytes]]) -> None:
    """Earlier backups keep their bytes and inodes; anything new is only under a temporary name."""
    after = site.snapshot(site.backups, site.remote)
    vanished = [path for path in before if path not in after]
    changed = [path for path in before if path in after and after[path] != before[path]]
    new = [
        path
        for path in after
        if path not in before and not Path(path).name.startswith(TEMP_PREFIXES)
    ]
    assert not vanished, f'earlier backups removed: {vanished}'
    assert not changed, f'earlier backups rewritten (bytes or inode): {changed}'
    assert not new, f'files written under their final name by a run that did not finish: {new}'


def new_subjects(site: Site, before: int) -> list[str]:
    return site.subjects()[before:]


def assert_one_failed_mail(site: Site, before: int, step: str) -> dict[str, Any]:
    subjects = new_subjects(site, before)
    assert len(subjects) == 1, f'expected exactly one mail, got {subjects}'
    assert 'FAILED' in subjects[0] and step in subjects[0], subjects[0]
    return site.mails()[before]


def proc_stat(pid: int) -> tuple[str, int] | None:
    """Given a pid, return (state, session id), or None if it is gone."""
    try:
        data = Path(f'/proc/{pid}/stat').read_text()
    except OSError:
        return None
    fields = data[data.rindex(')') + 2 :].split()
    return fields[0], int(fields[3])


def cmdline(pid: int) -> str:
    try:
        return (
            Path(f'/proc/{pid}/cmdline')
            .read_bytes()
            .replace(b'\0', b' ')
            .decode('utf-8', 'replace')
            .strip()
        )
    except OSError:
        return ''


def live_in_sessions(sids: list[int]) -> list[str]:
    """Given session ids (one per ppbackup started with start_new_session), return the processes
    still running in them (zombies excluded): ppbackup's children keep its session."""
    alive = []
    for entry in Path('/proc').iterdir():
        if not entry.name.isdigit():
            continue
        info = proc_stat(int(entry.name))
        if info and info[1] in sids and info[0] != 'Z':
            alive.append(f'{entry.name}: {cmdline(int(entry.name))}')
    return alive


def live_matching(text: str) -> list[str]:
    alive = []
    for entry in Path('/proc').iterdir():
        if entry.name.isdigit() and text in cmdline(int(entry.name)):
            info = proc_stat(int(entry.name))
            if info and info[0] != 'Z' and int(entry.name) != os.getpid():
                alive.append(f'{entry.name}: {cmdline(int(entry.name))}')
    return alive


def wait_until_gone(sids: list[int], timeout: float) -> list[str]:
    """Wait up to ``timeout`` for every process of the sessions to end; return what is left."""
    deadline = time.monotonic() + timeout
    while True:
        alive = live_in_sessions(sids)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


@pytest.fixture
def sessions(site: Site) -> Iterator[list[int]]:
    """Session ids of the runs a test started; whatever is left in them is killed, by pid."""
    sids: list[int] = []
    yield sids
    for line in live_in_sessions(sids) + live_matching(str(site.shims)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split(':', 1)[0]), signal.SIGKILL)


def start(
    site: Site, sids: list[int], *args: str, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start the real command in its own session (so its process group can be signalled)."""
    proc = subprocess.Popen(
        [*COMMAND, *args],
        env={**site.env, **(extra_env or {})},
        cwd=site.home,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    sids.append(proc.pid)
    return proc


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f'the run ended ({proc.returncode}) before {path.name}: {err}')
        assert time.monotonic() < deadline, f'timeout waiting for {path}'
        time.sleep(0.01)


def wait_until(
    condition: Callable[[], bool], proc: subprocess.Popen[str], what: str, timeout: float = 20
) -> None:
    """Poll ``condition`` until it holds (an observed point of the run, never a guessed while)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f'the run ended ({proc.returncode}) before {what}: {err}')
        assert time.monotonic() < deadline, f'timeout waiting for {what}'
        time.sleep(0.01)


def encrypted_by_the_slot(site: Site, proc: subprocess.Popen[str], kind: str) -> Callable[[], bool]:
    """The run's ``kind`` artifact lies encrypted by its slot (a temporary with bytes in it) and
    no gpg of the run is encrypting any more."""

    def done() -> bool:
        pattern = f'day*/{ppbackup.TMP_PREFIX}{proc.pid}-*-assoc-{kind}-*.gpg'
        written = [path for path in site.backups.glob(pattern) if path.stat().st_size > 0]
        return bool(written) and not any(
            '--encrypt' in line for line in live_in_sessions([proc.pid])
        )

    return done


def compressing(proc: subprocess.Popen[str]) -> Callable[[], bool]:
    """The hung dump's compressor runs: the run has settled into the dump's pipe."""
    return lambda: any(
        os.path.basename(line.split(': ', 1)[1].split(' ', 1)[0]) == 'zstd'
        for line in live_in_sessions([proc.pid])
    )


def sleeping_dump(site: Site, program: str = 'pg_dump') -> Path:
    """Make ``program`` a dump that prints a line, drops a marker, then hangs (sleeps 30 s).

    The sleeper is a link to sleep under the shims folder, so that its command line names the test.
    Return the marker path (removed first, so each run can wait for its own)."""
    marker = site.root / f'{program}.started'
    marker.unlink(missing_ok=True)
    sleeper = site.shims / 'ppbt-sleeper'
    if not sleeper.exists():
        sleeper.symlink_to('/bin/sleep')
    site.shim(
        program, f'#!/bin/sh\necho "-- a dump that hangs"\ntouch {marker}\nexec {sleeper} 30\n'
    )
    return marker


def baseline(site: Site, **run: Any) -> dict[str, tuple[int, bytes]]:
    """A first successful run; return the snapshot of the slots and the remote."""
    result = site.run(**run)
    assert result.returncode == 0, result.stderr
    assert list(site.backups.glob('day*/*.gpg')) and list(site.remote.rglob('*.gpg'))
    return site.snapshot(site.backups, site.remote)


def assert_next_run_succeeds(site: Site, **run: Any) -> subprocess.CompletedProcess[str]:
    before = len(site.mails())
    result = site.run(**run)
    assert result.returncode == 0, f'the next run did not succeed: {result.stderr}'
    assert new_subjects(site, before) == [SUCCEEDED], site.mails()[-1]['body']
    leftovers = temporaries(site)
    assert not leftovers, f'temporaries left after the next run: {leftovers}'
    return result


class ProcSampler:
    """Read /proc/*/cmdline (and optionally /proc/*/environ) of every process every few ms, looking
    for ``needle``; also note which programs it saw, to prove it caught the interesting ones."""

    def __init__(
        self,
        needle: str,
        environ: bool = False,
        gate: Path | None = None,
        wanted: tuple[str, ...] = (),
    ) -> None:
        self.needle = needle.encode()
        self.environ = environ
        # gate/NAME is made once a whole sample read a process of a wanted program (its path).
        self.gate, self.wanted, self.sampled = gate, wanted, set[str]()
        self.hits: list[str] = []
        self.seen: set[str] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = str(os.getpid())
        while not self._stop.is_set():
            for entry in os.scandir('/proc'):
                if not entry.name.isdigit() or entry.name == me:
                    continue
                for part in ('cmdline', 'environ') if self.environ else ('cmdline',):
                    try:
                        with open(f'/proc/{entry.name}/{part}', 'rb') as handle:
                            data = handle.read()
                    except OSError:
                        continue
                    if part == 'cmdline' and data:
                        self.seen.update(
                            os.path.basename(word.decode('utf-8', 'replace'))
                            for word in data.split(b'\0')[:3]
                        )
                        self.sampled.update(w for w in self.wanted if w.encode() in data)
                    if self.needle in data:
                        shown = data[:300].replace(b'\0', b' ')
                        self.hits.append(f'/proc/{entry.name}/{part}: {shown!r}')
            self.samples += 1
            if self.gate:
                for path in self.sampled:
                    (self.gate / os.path.basename(path)).touch()
            time.sleep(0.002)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def files_containing(
    roots: list[Path],
    needle: bytes,
    *,
    skip: Callable[[Path], bool] = lambda p: False,
    newer_than: float | None = None,
) -> list[str]:
    found = []
    for root in roots:
        device = root.stat().st_dev
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            # Not into another filesystem mounted below (a chroot's /proc: its kmsg blocks a read).
            dirnames[:] = [
                name for name in dirnames if _device(Path(dirpath) / name) in (device, None)
            ]
            for name in filenames:
                path = Path(dirpath) / name
                if skip(path):
                    continue
                try:
                    info = path.lstat()
                    if not stat.S_ISREG(info.st_mode) or info.st_size > 64 << 20:
                        continue
                    if newer_than is not None and max(info.st_mtime, info.st_ctime) < newer_than:
                        continue
                    if needle in path.read_bytes():
                        found.append(str(path))
                except OSError:
                    continue
    return found


def _device(path: Path) -> int | None:
    try:
        return path.lstat().st_dev
    except OSError:
        return None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Concurrency, crashes, signals
# ---------------------------------------------------------------------------------------------------


def test_C1_second_run_exits_75_and_touches_nothing(site: Site, sessions: list[int]) -> None:
    baseline(site)
    # One database only, so that nothing else of the first run moves while the second one runs.
    site.write_config(BACKUP_MYSQL_DB=None, BACKUP_FILES=None, BACKUP_BINARIES=None)
    marker = sleeping_dump(site)
    first = start(site, sessions)
    try:
        wait_for(marker, first)
        mails_before = len(site.mails())
        before = site.snapshot(site.backups, site.remote, insecure(site))
        started = time.monotonic()
        second = site.run(timeout=30)
        elapsed = time.monotonic() - started
        assert second.returncode == ppbackup.EXIT_LOCKED, second.stderr
        assert elapsed < 5, f'the second run took {elapsed:.1f} s instead of exiting at once'
        assert 'another ppbackup run' in second.stderr
        assert second.stdout == ''
        after = site.snapshot(site.backups, site.remote, insecure(site))
        assert sorted(after) == sorted(before)
        assert [path for path in before if after[path] != before[path]] == []
        assert len(site.mails()) == mails_before, 'the locked-out run sent a mail'
        assert first.poll() is None, 'the second run disturbed the first one'
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    assert first.returncode == 128 + signal.SIGTERM
    assert wait_until_gone([first.pid], 2) == []
    (site.shims / 'pg_dump').unlink()
    assert_next_run_succeeds(site)  # the lock was released


def test_C2_lock_left_by_kill_9_does_not_block_the_next_run(
    site: Site, sessions: list[int]
) -> None:
    before = baseline(site)
    marker = sleeping_dump(site)
    victim = start(site, sessions)
    wait_for(marker, victim)
    # The other artifacts are on their way too: the MariaDB dump lies encrypted by the slot.
    wait_until(encrypted_by_the_slot(site, victim, 'mysql'), victim, 'the mysql artifact')
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=10)
    assert victim.returncode == -signal.SIGKILL
    assert_untouched(site, before)
    (site.shims / 'pg_dump').unlink()
    started = time.monotonic()
    result = assert_next_run_succeeds(site)  # flock died with the process: no 75, no wait
    assert result.returncode != ppbackup.EXIT_LOCKED
    assert time.monotonic() - started < 20
    # Nothing of the killed run may still be running (its hung dump least of all).
    lingering = live_in_sessions([victim.pid])
    assert lingering == [], f'children of the killed run are still running: {lingering}'


def test_K1_sigkill_at_any_point_next_run_succeeds_without_temporaries(
    site: Site, sessions: list[int]
) -> None:
    baseline(site)
    # Kill the run's process group at points spread over a whole run, each one observed in the
    # steps it reports (-v): its run folder made (before any dump), a dump and an encryption at the
    # start, in the middle and at the end, and the transfer (after the commit).
    killed_at = time.time()
    for step in (
        'run folder',
        'dump mysql',
        'encrypt mysql',
        'dump files',
        'encrypt binaries',
        'encrypt row counts',
        'sync to',
    ):
        victim = start(site, sessions, '-v')
        assert victim.stderr
        seen = []
        rundir = insecure(site) / f'{ppbackup.RUN_PREFIX}{victim.pid}'
        if step == 'run folder':
            wait_until(rundir.exists, victim, 'the run folder')
        while step != 'run folder' and not (seen and seen[-1].startswith(f'ppbackup: {step}')):
            line = victim.stderr.readline()
            assert line, f'the run ended before {step!r}: {seen}'
            seen.append(line)
        os.killpg(victim.pid, signal.SIGKILL)
        killed_at = time.time()
        victim.communicate(timeout=10)
        # Real programs die of EOF or SIGPIPE once ppbackup is gone.
        assert wait_until_gone([victim.pid], 5) == [], f'orphans after a kill at {step!r}'
        # No file under its final name is half-written: each matches a manifest, or decrypts whole.
        for slot in site.backups.glob('*'):
            digests = {}
            for manifest in slot.glob('*.sha256'):
                digests.update(ppbackup.read_manifest(manifest))
            for path in slot.glob('*.gpg'):
                if not path.name.startswith('.') and digests.get(path.name) != sha256(path):
                    site.decrypt(path, site.root / 'whole.out')
    # Not the same second as a killed run's commit (rsync compares whole seconds): wait for the
    # clock to leave it, which the checks above have mostly done already.
    if int(time.time()) == int(killed_at):
        leave_this_second()
    assert_next_run_succeeds(site)
    verify = site.run('verify', '--remote')
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # And the worst point: a real pg_dump hung on a table lock (D4) when the run is killed.
    before = site.snapshot(site.backups, site.remote)
    locker = subprocess.Popen(
        ['psql', '-X', '-q', '-A', '-t', '-d', site.pg_db],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert locker.stdin and locker.stdout
        locker.stdin.write('BEGIN; LOCK TABLE members IN ACCESS EXCLUSIVE MODE; SELECT 42;\n')
        locker.stdin.flush()
        assert locker.stdout.readline().strip() == '42'
        victim = start(site, sessions)
        deadline = time.monotonic() + 20
        waiting = (
            'SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() '
            "AND application_name = 'pg_dump' AND wait_event_type = 'Lock'"
        )
        while psql(site.pg_db, waiting).strip() != '1':
            assert victim.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.communicate(timeout=10)
        assert_untouched(site, before)
        lingering = wait_until_gone([victim.pid], 3)
    finally:
        if locker.stdin:
            locker.stdin.close()  # ends the transaction: the lock goes
        locker.wait(timeout=30)
    assert_next_run_succeeds(site)
    assert lingering == [], f'a hung dump outlived the killed run: {lingering}'


def test_K2_sigterm_and_sigint_stop_children_and_remove_temporaries(
    site: Site, sessions: list[int]
) -> None:
    before = baseline(site)
    tar_started = site.root / 'tar.started'
    site.shim('tar', f'#!/bin/sh\necho "$$" >> {tar_started}\nexec /usr/bin/tar "$@"\n')
    problems = []
    # SIGTERM while the first dump hangs (the others still wait their turn); Ctrl-C (SIGINT to the
    # foreground group) while a later dump hangs and earlier artifacts lie encrypted by the slot.
    for sig, hanging, earlier in (
        (signal.SIGTERM, ('mysqldump',), ()),
        (signal.SIGINT, ('pg_dump',), ('mysql',)),
    ):
        markers = [sleeping_dump(site, program) for program in hanging]
        mails_before = len(site.mails())
        proc = start(site, sessions)
        for marker in markers:
            wait_for(marker, proc)
        wait_until(compressing(proc), proc, "the hung dump's compressor")
        for kind in earlier:
            wait_until(encrypted_by_the_slot(site, proc, kind), proc, f'the {kind} artifact')
        tar_before = tar_started.read_text() if tar_started.exists() else ''
        signalled = time.monotonic()
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - signalled
        assert proc.returncode == 128 + sig, (sig.name, proc.returncode, err)
        assert f'interrupted by {sig.name}' in err
        assert took < 10, f'{sig.name}: exit took {took:.1f} s'
        assert live_in_sessions([proc.pid]) == [], f'{sig.name}: children still running'
        mail = assert_one_failed_mail(site, mails_before, 'dump')
        assert sig.name in mail['body']
        assert_untouched(site, before)
        tar_after = tar_started.read_text() if tar_started.exists() else ''
        if tar_after != tar_before:
            problems.append(f'{sig.name}: new children (tar) were started after the signal')
        leftovers = temporaries(site)
        if leftovers:
            problems.append(f'{sig.name}: temporaries left: {leftovers}')
            for path in leftovers:  # so that the next case is judged on its own
                ppbackup.remove_path(Path(path))
        for program in hanging:
            (site.shims / program).unlink()
    assert_next_run_succeeds(site)
    assert problems == []


# ---------------------------------------------------------------------------------------------------
# Privacy
# ---------------------------------------------------------------------------------------------------


def test_P1_canary_never_leaves_latest(site: Site) -> None:
    tmpdir = site.root / 'tmpdir'
    tmpdir.mkdir()
    started = time.time() - 1
    with ProcSampler(CANARY) as sampler:
        result = site.run(extra_env={'TMPDIR': str(tmpdir)})
    assert result.returncode == 0, result.stderr
    assert sampler.samples > 20 and {'pg_dump', 'mysqldump', 'zstd', 'gpg'} & sampler.seen
    assert sampler.hits == [], 'the canary was on a command line'
    needle = CANARY.encode()
    assert CANARY not in result.stdout + result.stderr
    mails = site.mails()
    assert len(mails) == 1 and all(CANARY not in str(mail) for mail in mails)
    latest = site.latest.resolve()
    # Nothing outside latest/ holds it in clear: slots, remote, state, temp files, /tmp.
    assert (
        files_containing(
            [site.backups, site.remote, insecure(site), tmpdir],
            needle,
            skip=lambda p: latest in p.parents,
        )
        == []
    )
    source = site.home / 'site'
    assert (
        files_containing(
            [Path('/tmp'), Path('/var/tmp'), Path('/dev/shm')],
            needle,
            newer_than=started,
            skip=lambda p: latest in p.parents or source in p.parents,
        )
        == []
    )
    # latest/ has it (after decompression) in both dumps and the files archive, and nowhere else.
    holders = set()
    for path in latest.iterdir():
        if path.suffix == '.zst':
            plain = subprocess.run(
                ['zstd', '-q', '-d', '-c', str(path)], capture_output=True, check=True
            ).stdout
        else:
            plain = path.read_bytes()
        if needle in plain:
            holders.add(path.name.split('-')[1])
    assert holders == {'psql', 'mysql', 'files'}
    # ... and, encrypted, the slots.
    dump = next(site.backups.glob('day*/assoc-psql-*.gpg'))
    site.decrypt(dump, site.root / 'psql.sql')
    assert needle in (site.root / 'psql.sql').read_bytes()


def traversable_ancestors(path: Path) -> list[tuple[Path, int]]:
    """Let other users walk down to ``path`` (o+x); return what to restore."""
    changed = []
    for folder in [path, *path.parents]:
        mode = stat.S_IMODE(folder.stat().st_mode)
        if not mode & 0o001:
            folder.chmod(mode | 0o001)
            changed.append((folder, mode))
    return changed


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ['setpriv', '--reuid=nobody', '--regid=nogroup', '--clear-groups', *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_P2_plaintext_is_private_whatever_the_umask(site: Site) -> None:
    folder = insecure(site)
    folder.mkdir(mode=0o755)  # as an admin with umask 022 might have made it
    folder.chmod(0o755)
    restore = traversable_ancestors(site.home)
    try:
        # A control file anyone may read (whatever umask this process has by now), beside
        # the private folder: if nobody can read it, the checks below prove something.
        control = site.home / 'readable-by-all.txt'
        control.write_text('public\n')
        control.chmod(0o644)
        assert as_nobody('cat', str(control)).returncode == 0, 'the check itself cannot work'
        for umask in (0o022, 0o000):
            if umask == 0:  # the second run in another second (rsync compares seconds)
                leave_this_second()
            result = subprocess.run(
                COMMAND,
                env=site.env,
                cwd=site.home,
                capture_output=True,
                text=True,
                timeout=120,
                stdin=subprocess.DEVNULL,
                check=False,
                preexec_fn=lambda: os.umask(umask),
            )  # noqa: B023
            assert result.returncode == 0, result.stderr
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700
            entries = list(folder.rglob('*'))
            assert any(path.parent == site.latest for path in entries)
            for path in entries:
                info = path.lstat()
                want = 0o700 if stat.S_ISDIR(info.st_mode) else 0o600
                assert stat.S_IMODE(info.st_mode) == want, (
                    oct(umask),
                    str(path),
                    oct(info.st_mode),
                )
                if stat.S_ISREG(info.st_mode):
                    read = as_nobody('cat', str(path))
                    assert read.returncode != 0 and read.stdout == '', str(path)
            assert as_nobody('ls', str(folder)).returncode != 0
            assert as_nobody('ls', str(site.latest)).returncode != 0
    finally:
        for path, mode in restore:
            path.chmod(mode)


def test_P3_passwords_never_on_a_command_line_environment_or_log(site: Site) -> None:
    password = 'Pw-' + secrets.token_hex(10)
    user = 'ppbt_u_' + secrets.token_hex(4)
    # MariaDB: a real password account, so that the password is actually used; PostgreSQL runs
    # with trust here, so libpq only reads .pgpass (it must still never end up anywhere visible).
    sh(
        'mysql',
        input=f"CREATE USER '{user}'@'localhost' IDENTIFIED BY '{password}';\n"
        f"GRANT ALL ON `{site.my_db}`.* TO '{user}'@'localhost';\n",
    )
    try:
        pgpass = site.home / '.pgpass'
        pgpass.write_text(f'*:*:*:*:{password}\n')
        pgpass.chmod(0o600)
        mycnf = site.home / '.my.cnf'
        mycnf.write_text(f'[client]\nuser={user}\npassword={password}\n')
        mycnf.chmod(0o600)
        # Dumpers that wait until the sampler has read them, arguments and environment (bounded:
        # 10 s), then become the real ones with both.
        gate = site.root / 'sampled'
        gate.mkdir()
        for dumper in ('pg_dump', 'mysqldump'):
            site.shim(
                dumper,
                f'#!/bin/sh\nn=0\nwhile [ ! -e {gate}/{dumper} ] && [ $n -lt 1000 ]; do\n'
                f'  sleep 0.01; n=$((n + 1))\ndone\nexec /usr/bin/{dumper} "$@"\n',
            )
        wanted = (str(site.shims / 'pg_dump'), str(site.shims / 'mysqldump'))
        with ProcSampler(password, environ=True, gate=gate, wanted=wanted) as sampler:
            result = site.run()
        assert result.returncode == 0, result.stderr
        assert {'pg_dump', 'mysqldump'} <= sampler.seen, sampler.seen
        assert sampler.hits == [], 'a password was visible in /proc'
        assert password not in result.stdout + result.stderr
        assert all(password not in str(mail) for mail in site.mails())
        # A dumper that prints credentials in its error: the mail and stderr show them masked.
        mails_before = len(site.mails())
        url = f'postgresql://backup:{password}@db.example.org/shop'
        site.shim(
            'pg_dump',
            f'#!/bin/sh\necho "pg_dump: error: connection to {url} failed" >&2\n'
            f'echo "pg_dump: detail: password={password}" >&2\nexit 1\n',
        )
        failed = site.run()
        assert failed.returncode == 1
        mail = assert_one_failed_mail(site, mails_before, 'psql')
        assert 'db.example.org' in mail['body']  # the error is there...
        assert password not in mail['body'] and password not in str(mail['argv'])  # ...masked
        assert password not in failed.stdout + failed.stderr
        state = (insecure(site) / ('assoc' + ppbackup.STATE_SUFFIX)).read_text()
        assert password not in state
    finally:
        # As the suite's own user: the site's ~/.my.cnf logs in as this very user.
        sh('mysql', input=f"DROP USER IF EXISTS '{user}'@'localhost';\n", env=ADMIN_ENV)


def test_P4_plaintext_older_than_24_hours_goes_even_when_the_run_fails(site: Site) -> None:
    before = baseline(site, faketime='@2027-01-04 03:00:00')
    assert list(site.latest.iterdir())
    recipients = site.config['BACKUP_GPG_RECIPIENT']
    # Two days later the run fails before any dump: a recipient key is not in the keyring.
    site.write_config(BACKUP_GPG_RECIPIENT=f'"{site.keys.alice} {site.keys.expired}"')
    mails_before = len(site.mails())
    result = site.run(faketime='@2027-01-06 03:00:00')
    assert result.returncode == 1, result.stderr
    assert_one_failed_mail(site, mails_before, 'keys')
    assert not os.path.lexists(site.latest), 'two-day-old plaintext survived a failed run'
    assert sorted(p.name for p in insecure(site).iterdir()) == [
        ppbackup.LOCK_NAME,
        'assoc' + ppbackup.STATE_SUFFIX,
    ]
    assert_untouched(site, before)
    # The same when the failure is in the dump itself (the files in latest/ aged two days by their
    # mtimes, which is all the sweep looks at; the real clock is quicker than a faked one).
    site.write_config(BACKUP_GPG_RECIPIENT=recipients)
    assert_next_run_succeeds(site)
    two_days_ago = time.time() - 48 * 3600
    for path in site.latest.iterdir():
        os.utime(path, (two_days_ago, two_days_ago))
    before = site.snapshot(site.backups, site.remote)
    site.shim('pg_dump', '#!/bin/sh\necho "-- part of a dump"\nexit 1\n')
    mails_before = len(site.mails())
    result = site.run()
    assert result.returncode == 1
    assert_one_failed_mail(site, mails_before, 'psql')
    assert not os.path.lexists(site.latest), 'two-day-old plaintext survived a failed dump'
    assert sorted(p.name for p in insecure(site).iterdir()) == [
        ppbackup.LOCK_NAME,
        'assoc' + ppbackup.STATE_SUFFIX,
    ]
    assert_untouched(site, before)
    assert temporaries(site) == []


# ---------------------------------------------------------------------------------------------------
# Notification
# ---------------------------------------------------------------------------------------------------


def test_N1_failed_mail_makes_the_run_fail_loudly(site: Site) -> None:
    result = site.run(extra_env={'MAILX_EXIT': '1'})
    assert result.returncode == ppbackup.EXIT_FAILED
    assert 'mail' in result.stderr and 'could not be sent' in result.stderr, result.stderr
    # The backup itself was made and sent; only the report failed.
    assert site.subjects() == [SUCCEEDED], site.mails()[0]['body']
    assert list(site.backups.glob('day*/*.sha256'))
    assert list((site.remote / 'backups').glob('day*/*.sha256'))
    assert temporaries(site) == []
    # A failed run whose mail fails too: still 1, and stderr carries both.
    site.shim('pg_dump', '#!/bin/sh\nexit 1\n')
    failed = site.run(extra_env={'MAILX_EXIT': '1'})
    assert failed.returncode == ppbackup.EXIT_FAILED
    assert 'FAILED' in failed.stderr and 'could not be sent' in failed.stderr
    (site.shims / 'pg_dump').unlink()
    assert_next_run_succeeds(site)


def test_N2_mail_status_matches_every_step(site: Site) -> None:
    psql(site.pg_db, "INSERT INTO ballots SELECT n, 'yes' FROM generate_series(501, 20500) AS n;")
    result = site.run()
    assert result.returncode == 0, result.stderr
    assert site.subjects() == [SUCCEEDED]
    # The dump shrinks to a fraction: a warning, in the subject; the run still succeeds.
    psql(site.pg_db, 'DELETE FROM ballots WHERE id > 100;')
    leave_this_second()  # not the same second as the last run (rsync compares whole seconds)
    warned = site.run()
    assert warned.returncode == 0, warned.stderr
    subjects = site.subjects()
    assert len(subjects) == 2
    assert 'WARNING' in subjects[1] and 'FAILED' not in subjects[1], subjects[1]
    assert f'psql {site.pg_db} shrank' in site.mails()[1]['body']
    assert list(site.backups.glob('wk*/assoc-psql-*.sql.zst.gpg'))  # the weekly copy too
    # Every dump fine, but a later step (the transfer) fails: FAILED, naming it; never success.
    site.write_config(BACKUP_REMOTE=f'/nonexistent-{secrets.token_hex(4)}/deeper/backups')
    failed = site.run()
    assert failed.returncode == ppbackup.EXIT_FAILED
    mail = assert_one_failed_mail(site, 2, 'sync')
    assert 'succeeded' not in mail['argv'][mail['argv'].index('-s') + 1]
    # A failed dump: FAILED, naming the database.
    site.write_config(BACKUP_REMOTE=str(site.remote))
    site.shim('mysqldump', '#!/bin/sh\necho "mysqldump: Got error: 2002" >&2\nexit 2\n')
    failed = site.run()
    assert failed.returncode == ppbackup.EXIT_FAILED
    assert_one_failed_mail(site, 3, f'mysql {site.my_db}')
    (site.shims / 'mysqldump').unlink()
    assert_next_run_succeeds(site)
