"""Shared fixtures: a throwaway $HOME with real keys, real databases, real data and a mailx shim.

Everything runs against the real programs on this machine: PostgreSQL, MariaDB, gpg, tar, zstd and
rsync. Only mail delivery is a shim (it records what it was given), and faults that cannot be caused
for real are PATH shims written by the tests that need them.
"""

from __future__ import annotations

import atexit
import dataclasses
import fcntl
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import ppbackup  # noqa: E402

# How the suite starts the real command: ``python3 -P -m ppbackup``, the same file, compiled once
# for the session. These machines set PYTHONDONTWRITEBYTECODE, and a script is compiled at every
# start anyway: a tenth of a second for each of the suite's hundreds of runs. -P keeps the run's
# own folder (the site's home, which holds folders like "site") off sys.path. The demo, the README
# walk and CI's Debian runs still start the file itself, as users do.
PYCACHE = tempfile.mkdtemp(prefix='ppbt-pyc-')
atexit.register(shutil.rmtree, PYCACHE, True)
PPBACKUP = [sys.executable, '-P', '-m', 'ppbackup']
PPBACKUP_ENV = {
    'PYTHONPATH': str(REPO),
    'PYTHONPYCACHEPREFIX': PYCACHE,
    'PYTHONDONTWRITEBYTECODE': '',
}

# The environment the suite started with: its own credentials, before any test's $HOME or PG*.
ADMIN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(('PG', 'MYSQL'))}
CANARY = 'CANARY-' + secrets.token_hex(8)  # a marker that must never leave latest/ unencrypted


def scripted_pinentry(passphrase: str) -> str:
    """Return a pinentry script that answers GETPIN with ``passphrase``, as a person typing it
    would (the Assuan protocol): the one fake for a key holder at a terminal."""
    return f"""#!/bin/sh
echo "OK scripted pinentry"
while IFS= read -r line; do
  case "$line" in
    GETPIN*) printf 'D %s\\nOK\\n' '{passphrase}' ;;
    BYE*) echo OK; exit 0 ;;
    *) echo OK ;;
  esac
done
"""


# Where the drills of this test session make their servers' folders (TMPDIR for them): a check
# that a drill left nothing looks here, never at other sessions' drills on the same machine.
DRILL_TMP = Path(tempfile.gettempdir()) / f'ppbt-drills-{os.getpid()}'


def drill_env() -> dict[str, str]:
    """Return the environment a drill of this session runs with (its TMPDIR, made 0755)."""
    DRILL_TMP.mkdir(mode=0o755, exist_ok=True)
    DRILL_TMP.chmod(0o755)  # the drill's server user walks through it to its own folder
    return {'TMPDIR': str(DRILL_TMP)}


def drill_leftovers() -> list[str]:
    """Return the drill folders this session's drills left (none, after every drill)."""
    return sorted(str(path) for path in DRILL_TMP.glob('ppbackup-drill-*'))


def sh(
    *argv: str,
    input: str | bytes | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a helper command for a test and return its result (text)."""
    data = input.decode() if isinstance(input, bytes) else input
    return subprocess.run(
        list(argv),
        input=data,
        capture_output=True,
        text=True,
        check=check,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def leave_this_second() -> None:
    """Return once the wall clock has moved into the next whole second: a run started after this
    commits in another second than every run before it (rsync's quick check compares whole
    seconds). The condition itself, at most one second, on average half of one."""
    now = int(time.time())
    while int(time.time()) == now:
        time.sleep(0.005)


def wait_no_processes(user: str, timeout: float = 5) -> None:
    """Wait (bounded) until nothing runs as ``user`` any more: what userdel needs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(['pgrep', '-u', user], capture_output=True).returncode != 0:
            return
        time.sleep(0.02)


def gpg(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh(
        'gpg', '--homedir', str(home), '--batch', '--no-tty', '--passphrase', '', *args, check=check
    )


def make_key(home: Path, uid: str, *, expire: str = 'never', faked: str | None = None) -> str:
    """Make an ed25519 key with a cv25519 encryption subkey in ``home``; return its fingerprint."""
    extra = ['--faked-system-time', faked] if faked else []
    gpg(home, *extra, '--quick-gen-key', uid, 'ed25519', 'cert', expire)
    listing = gpg(home, '--with-colons', '--list-keys', uid).stdout
    fingerprint = next(
        line.split(':')[9] for line in listing.splitlines() if line.startswith('fpr:')
    )
    gpg(home, *extra, '--quick-add-key', fingerprint, 'cv25519', 'encr', expire)
    return fingerprint


@dataclasses.dataclass
class Keys:
    holder: Path  # a key holder's GnuPG home: the private keys
    alice: str
    bob: str
    expired: str
    public: dict[str, str]  # fingerprint -> armored public key


@pytest.fixture(scope='session')
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    holder = tmp_path_factory.mktemp('holder') / 'gnupg'
    holder.mkdir(mode=0o700)
    alice = make_key(holder, 'Alice <alice@example.org>')
    bob = make_key(holder, 'Bob <bob@example.org>')
    # Made three years ago with a one-day expiry: expired now, with no fake clock needed.
    expired = make_key(holder, 'Old <old@example.org>', expire='1d', faked='20230101T000000')
    public = {fpr: gpg(holder, '--armor', '--export', fpr).stdout for fpr in (alice, bob, expired)}
    yield Keys(holder, alice, bob, expired, public)
    sh('gpgconf', '--homedir', str(holder), '--kill', 'all', check=False)


def psql(db: str, sql: str) -> str:
    return sh('psql', '-X', '-q', '-A', '-t', '-v', 'ON_ERROR_STOP=1', '-d', db, '-c', sql).stdout


def mysql(db: str, sql: str) -> str:
    return sh('mysql', '--batch', '--skip-column-names', '-e', sql, '--', db).stdout


SEED_SQL = f"""
CREATE TABLE members (id integer PRIMARY KEY, name varchar(200), note varchar(200));
INSERT INTO members VALUES (1, 'Ada Lovelace', 'founder'), (2, 'Émilie du Châtelet', 'ünïcødé'),
  (3, 'Canary', '{CANARY}');
CREATE TABLE ballots (id integer PRIMARY KEY, choice varchar(20));
INSERT INTO ballots SELECT n, CASE WHEN n % 2 = 0 THEN 'yes' ELSE 'no' END FROM
"""


def seed_postgres(db: str, rows: int = 500) -> None:
    sh('createdb', '--', db)
    psql(db, SEED_SQL + f'generate_series(1, {rows}) AS n;')


def seed_mysql(db: str, rows: int = 500) -> None:
    sh('mysql', '-e', f'CREATE DATABASE `{db}`')
    mysql(db, SEED_SQL + f'(SELECT seq AS n FROM seq_1_to_{rows}) AS s;')


def drop_databases(*names: str) -> None:
    """Drop test databases, checked: ``--force`` ends sessions a killed client left behind (a
    killed psql's ``pg_sleep`` keeps running server-side and would otherwise block the drop)."""
    for name in names:
        # As the suite's own user, not through a test's ~/.my.cnf or PG* settings.
        sh('dropdb', '--if-exists', '--force', '--', name, env=ADMIN_ENV)
        sh('mysql', '-e', f'DROP DATABASE IF EXISTS `{name}`', env=ADMIN_ENV)


def terminate_sessions(db: str) -> None:
    """End every server-side session on ``db`` but our own (a killed client's backend lingers)."""
    psql(
        'postgres',
        'SELECT pg_terminate_backend(pid) FROM pg_stat_activity '
        f"WHERE datname = '{db}' AND pid <> pg_backend_pid();",
    )


def clean_stale_faketime() -> list[Path]:
    """Remove the shared memory of ``faketime`` wrappers that are gone (a killed wrapper leaves
    /dev/shm/faketime_shm_PID and sem.faketime_sem_PID, and a later wrapper that gets the same pid
    fails with ``sem_open: File exists``). Return what was removed."""
    removed = []
    for path in Path('/dev/shm').glob('*faketime_*_*'):
        pid = path.name.rsplit('_', 1)[-1]
        if pid.isdigit() and not Path(f'/proc/{pid}').exists():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@pytest.fixture(scope='session', autouse=True)
def no_stale_faketime() -> Iterator[None]:
    """The suite leaves no faketime shared memory behind, even from wrappers it killed."""
    clean_stale_faketime()
    yield
    clean_stale_faketime()


MAILX_SHIM = """#!/bin/sh
# Records each mail as one JSON file: argv and body. Exits $MAILX_EXIT (default 0).
dir="${MAILX_DIR:?}"
n=$(/bin/ls "$dir" | /usr/bin/wc -l)
PYTHON -c 'import json,sys; print(json.dumps({"argv": sys.argv[1:], "body": sys.stdin.read()}))' \
  "$@" > "$dir/mail-$n.json"
exit "${MAILX_EXIT:-0}"
"""


@dataclasses.dataclass
class Site:
    """One organisation's host: $HOME, config, keys, databases, data, remote and mail."""

    root: Path
    home: Path
    keys: Keys
    pg_db: str
    my_db: str
    shims: Path
    mails_dir: Path
    remote: Path
    env: dict[str, str]
    config: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def cfg(self) -> Path:
        return self.home / 'ppbackup.cfg'

    @property
    def backups(self) -> Path:
        return self.home / 'backups'

    @property
    def latest(self) -> Path:
        return self.home / 'backups.insecure' / 'latest'

    def write_config(self, **changes: str | None) -> None:
        """Write ppbackup.cfg from the defaults plus ``changes`` (None removes a key)."""
        for key, value in changes.items():
            if value is None:
                self.config.pop(key, None)
            else:
                self.config[key] = value
        text = ''.join(f'{key}={value}\n' for key, value in self.config.items())
        self.cfg.write_text(text)
        self.cfg.chmod(0o600)

    def shim(self, name: str, script: str) -> Path:
        """Put an executable ``name`` first on PATH with the given shell script."""
        path = self.shims / name
        path.write_text(textwrap.dedent(script))
        path.chmod(0o755)
        return path

    def run(
        self,
        *args: str,
        faketime: str | None = None,
        timeout: float = 300,
        extra_env: dict[str, str] | None = None,
        stdin: Any = subprocess.DEVNULL,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real ppbackup command in a subprocess, optionally under a faked clock."""
        argv = [*PPBACKUP, *args]
        if faketime:
            clean_stale_faketime()
            argv = ['faketime', '-f', faketime, *argv]
        env = {**self.env, **PPBACKUP_ENV, **(extra_env or {})}
        return subprocess.run(
            argv,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=stdin,
            cwd=self.home,
        )

    def start(self, *args: str) -> subprocess.Popen[str]:
        """Start the real command in the background, for a fault that strikes mid-run."""
        return subprocess.Popen(
            [*PPBACKUP, *args],
            env={**self.env, **PPBACKUP_ENV},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def mails(self) -> list[dict[str, Any]]:
        found = sorted(self.mails_dir.glob('mail-*.json'), key=lambda p: int(p.stem[5:]))
        return [json.loads(path.read_text()) for path in found]

    def subjects(self) -> list[str]:
        return [mail['argv'][mail['argv'].index('-s') + 1] for mail in self.mails()]

    def decrypt(self, path: Path, out: Path) -> None:
        """Decrypt and decompress a backup as the key holder would (the real command)."""
        result = self.run(
            'decrypt', str(path), '-o', str(out), '--gnupghome', str(self.keys.holder)
        )
        assert result.returncode == 0, result.stderr

    def temporaries(self) -> list[Path]:
        """Return leftovers of a run: temporary files and run folders, anywhere under $HOME."""
        return [
            path
            for path in self.home.rglob('*')
            if path.name.startswith(('.ppbackup-tmp-', '.ppbackup-run-'))
        ]

    def assert_failed(
        self,
        result: subprocess.CompletedProcess[str],
        step: str,
        before: dict[str, tuple[int, bytes]],
        mails_before: int = 0,
        code: int = 1,
        new_files_allowed: bool = False,
    ) -> dict[str, Any]:
        """Check the invariant of every failure: the exit code, exactly one FAILED mail naming
        the step, earlier backups (local and remote) byte-identical with the same inodes, nothing
        half-written under a final name, no temporaries, and the lock released. Return the mail."""
        assert result.returncode == code, result.stderr
        assert 'FAILED' in result.stderr
        mails = self.mails()[mails_before:]
        assert len(mails) == 1, mails
        subject = mails[0]['argv'][mails[0]['argv'].index('-s') + 1]
        assert 'FAILED' in subject and step in subject, (subject, mails[0]['body'])
        after = self.snapshot(self.backups, self.remote)
        for path, identity in before.items():  # earlier backups: same inode, same bytes
            assert after.get(path) == identity, f'{path} changed'
        if not new_files_allowed:  # failed before the slots were written: nothing new at all
            assert sorted(after) == sorted(before)
        assert ppbackup.tree_problems(self.backups, None, None) == []
        assert self.temporaries() == []
        lock = self.home / 'backups.insecure' / '.ppbackup.lock'
        if lock.exists():
            with open(lock) as handle:  # nobody holds it any more
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return mails[0]

    def snapshot(self, *roots: Path) -> dict[str, tuple[int, bytes]]:
        """Return {path: (inode, bytes)} for every file under ``roots``: earlier backups must keep
        both the same bytes and the same inode."""
        seen = {}
        for root in roots:
            for path in sorted(root.rglob('*')):
                if path.is_file() and not path.is_symlink():
                    seen[str(path)] = (path.stat().st_ino, path.read_bytes())
        return seen


@pytest.fixture
def site(tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    home = tmp_path / 'home'
    home.mkdir()
    gnupghome = home / '.gnupg'
    gnupghome.mkdir(mode=0o700)
    for fpr in (keys.alice, keys.bob):
        sh('gpg', '--homedir', str(gnupghome), '--batch', '--import', input=keys.public[fpr])
    data = home / 'site'
    (data / 'uploads').mkdir(parents=True)
    (data / 'index.php').write_text('<?php echo "hello"; ?>\n')
    (data / 'canary.txt').write_text(f'{CANARY}\n')
    (data / 'uploads' / 'photo.bin').write_bytes(os.urandom(64 * 1024))
    (home / 'my docs').mkdir()
    (home / 'my docs' / 'Ünïcødé rapport.txt').write_text('minutes of the meeting\n')
    (home / 'bin').mkdir()
    (home / 'bin' / 'tool').write_bytes(os.urandom(4096))
    suffix = secrets.token_hex(4)
    pg_db, my_db = f'ppbt_pg_{suffix}', f'ppbt_my_{suffix}'
    seed_postgres(pg_db)
    seed_mysql(my_db)
    shims = tmp_path / 'shims'
    shims.mkdir()
    mails_dir = tmp_path / 'mails'
    mails_dir.mkdir()
    remote = tmp_path / 'remote'
    remote.mkdir()
    (shims / 'mailx').write_text(MAILX_SHIM.replace('PYTHON', sys.executable))
    (shims / 'mailx').chmod(0o755)
    env = {
        **os.environ,
        'HOME': str(home),
        'PATH': f'{shims}:{os.environ["PATH"]}',
        'MAILX_DIR': str(mails_dir),
        'GNUPGHOME': str(gnupghome),
        'DONT_FAKE_MONOTONIC': '1',
    }
    env.pop('PPBACKUP_CONFIG', None)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv('PPBACKUP_CONFIG', raising=False)
    the_site = Site(tmp_path, home, keys, pg_db, my_db, shims, mails_dir, remote, env)
    the_site.write_config(
        BACKUP_NAME='assoc',
        BACKUP_REMOTE=str(remote),
        BACKUP_GPG_RECIPIENT=f'"{keys.alice} {keys.bob}"',
        BACKUP_FILES='"site \'my docs\'"',
        BACKUP_BINARIES='bin',
        BACKUP_PSQL_DB=pg_db,
        BACKUP_MYSQL_DB=my_db,
        BACKUP_ADMIN_EMAILS='admin@example.org,second@example.org',
    )
    yield the_site
    drop_databases(pg_db, my_db)
    sh('gpgconf', '--homedir', str(gnupghome), '--kill', 'all', check=False)
    subprocess.run(['chmod', '-R', 'u+rwX', str(tmp_path)], check=False)
    shutil.rmtree(tmp_path, ignore_errors=True)


InProcess = Callable[..., 'subprocess.CompletedProcess[str]']


@pytest.fixture
def in_process(
    site: Site, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[InProcess]:
    """``site.run`` without a new interpreter: ``ppbackup.main`` in this process, in the site's own
    environment (the ``site`` fixture set $HOME, PATH and the rest with monkeypatch) and folder,
    stdout and stderr captured. For what needs no faked clock, no signal and no other user.

    What main changes in the process is put back: the umask and signal handlers (main itself),
    ``extra_env`` (per call), and here the log handlers and the secrets it learnt to mask; no
    child process group of it may be left."""
    logger = ppbackup.log
    saved = (list(logger.handlers), logger.level, logger.propagate, set(ppbackup._known_secrets))
    monkeypatch.chdir(site.home)

    def run(
        *args: str, extra_env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        with monkeypatch.context() as env:
            for key, value in (extra_env or {}).items():
                env.setenv(key, value)
            capsys.readouterr()  # only this call's output
            code = ppbackup.main(list(args))
            out, err = capsys.readouterr()
        return subprocess.CompletedProcess(['ppbackup', *args], code, out, err)

    yield run
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
    ppbackup._known_secrets.clear()
    ppbackup._known_secrets.update(saved[3])
    assert ppbackup._live_groups == set(), 'main left a child process group behind'


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points a test made (a small tmpfs, a read-only bind); unmounted afterwards."""
    mounted: list[Path] = []
    yield mounted
    for path in reversed(mounted):
        subprocess.run(['umount', '-l', str(path)], check=False)
