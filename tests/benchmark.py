#!/usr/bin/env python3
"""Benchmark: ``ppbackup run`` against the bare shell pipeline, the old bzip2 recipe and borg.

Run by hand, as root on a host with PostgreSQL and MariaDB running (as for the tests)::

    python3 tests/benchmark.py --size-mb 200
    python3 tests/benchmark.py --size-mb 1000 --rounds 3
    python3 tests/benchmark.py --size-mb 200 --compare /tmp/ppb-copy/ppbackup.py   # A/B a variant
    python3 tests/benchmark.py --size-mb 200 --quiet 0.2   # on a shared host: gate runs on idle CPUs
    python3 tests/benchmark.py --smoke   # tiny data, one round, ~10 s: does it still work? (CI)

It is not a test: pytest collects neither this file name nor anything in it. ``--smoke`` judges no
time; like every mode it exits 1 if a run failed or a run's files do not match its manifests.

What it does, in a throwaway folder that it removes at the end:

1. builds a dataset of --size-mb MiB of *raw* data: a PostgreSQL table (~43 %, measured as pg_dump
   output), a MariaDB table (~10 %, as mysqldump output), web-server logs (~25 %, compressible text),
   uploads (~20 %, os.urandom: incompressible) and binaries (~2 %, copies of this host's ELF files);
   the databases are named ppbench_* and dropped at the end;
2. makes a key holder's GnuPG home with an ed25519/cv25519 key, and a host GnuPG home with only its
   public key; a throwaway $HOME with a ppbackup.cfg (0600) pointing at a local "remote"; no mail;
3. times, alternating, ``python3 ppbackup.py run`` and the bare sequential shell pipeline that does
   the same work (dump | zstd -T0 -3, gpg --compress-algo none, ln, rsync -a -H), outputs cleared
   (and ``sync``-ed) before every round so each does the full work; after each ppbackup run, every
   file its manifests (``bench-RUNID.sha256`` in each slot) name must be in its slot here and on the
   remote with that SHA-256 (a run writes more than the four dumps: roles, users, row counts);
   in the same rounds, if ``borg`` is installed (Debian: borgbackup; ``--no-borg`` leaves it out),
   borg 1.2: ``borg create --compression zstd,3`` into a fresh ``repokey-blake2`` repository in the
   throwaway folder (``borg init``, not timed, each round: no deduplication against the last round),
   each dump piped in with ``--stdin-name`` as the bare pipeline pipes it into zstd, then one
   archive of the files, which borg reads itself (no tar); it makes no copy to a remote. Its CPU
   (children's rusage), wall time, repository bytes and the peak RSS of its largest ``borg``
   process (wait4) are reported;
4. times the old recipe (bzip2 everywhere, gpg with its default compression, rsync);
5. measures the peak resident memory (VmHWM) of the ppbackup Python process exactly: ppbackup runs
   under a small wrapper that calls ppbackup.main() and writes /proc/self/status's VmHWM at exit;
6. prints the summary table, the bare pipeline's per-step times and ppbackup's timeline (from its
   ``-v`` log lines, time-stamped as they arrive).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import hashlib
import json
import os
import random
import re
import resource
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PPBACKUP = REPO / 'ppbackup.py'
MIB = 1 << 20
SMOKE_MB = 2  # --smoke: the raw dataset size in MiB

# Shares of the raw dataset size (the rest of the 100 % is a few small files).
SHARES = {'psql': 0.43, 'mysql': 0.10, 'logs': 0.25, 'uploads': 0.20, 'binaries': 0.02}

ZSTD = 'zstd -q -T0 -3 -c'
# The same dump options as ppbackup.plan_artifacts, so that both sides dump the same bytes.
PG_DUMP = 'pg_dump --no-password --format=plain --dbname={db} --create'
MYSQLDUMP = (
    'mysqldump --single-transaction --quick --routines --events --triggers --hex-blob '
    '--default-character-set=utf8mb4 -- {db}'
)

# Runs ppbackup.main() in this process and writes, at exit, the exact peak RSS (VmHWM, kB) and the
# CPU seconds of this Python process itself (its children, gpg, zstd..., are not in them).
WRAPPER = r"""
import atexit, os, resource, sys
def _write_hwm():
    with open('/proc/self/status') as status:
        hwm = next(line.split()[1] for line in status if line.startswith('VmHWM:'))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open(os.environ['PPBENCH_HWM_FILE'], 'w') as out:
        out.write(f'{hwm} {usage.ru_utime + usage.ru_stime:.3f}')
atexit.register(_write_hwm)
script = sys.argv[1]
sys.argv = [script, *sys.argv[2:]]
sys.path.insert(0, os.path.dirname(script))
import ppbackup
sys.exit(ppbackup.main(sys.argv[1:]))
"""

# Runs a Python program (borg: a Python script) in this process and writes, at exit, its exact peak
# RSS (VmHWM, kB). Its wait4 ru_maxrss would not do: the kernel carries into it the RSS of the mm the
# child had before its exec, a copy of this benchmark's (hundreds of MiB after building the logs).
PEAK_WRAPPER = r"""
import atexit, os, runpy, sys
def _write_hwm():
    with open('/proc/self/status') as status:
        hwm = next(line.split()[1] for line in status if line.startswith('VmHWM:'))
    with open(os.environ['PPBENCH_HWM_FILE'], 'w') as out:
        out.write(hwm)
atexit.register(_write_hwm)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""

LOREM = (
    'the general assembly approved the annual accounts and thanked the volunteers for the '
    'summer festival the treasurer presented the budget for next year with a small increase '
    'of the membership fee the board will meet again in september to prepare the autumn '
    'campaign and the newsletter members asked for a second workshop on repairing bicycles '
    'and for more evening opening hours of the shared garden and the library '
)
FIRST = [
    'Ada',
    'Grace',
    'Émilie',
    'Alan',
    'Barbara',
    'Edsger',
    'Frances',
    'Hedy',
    'Ken',
    'Margaret',
    'Niklaus',
    'Radia',
]
LAST = [
    'Lovelace',
    'Hopper',
    'du Châtelet',
    'Turing',
    'Liskov',
    'Dijkstra',
    'Allen',
    'Lamarr',
    'Thompson',
    'Hamilton',
    'Wirth',
    'Perlman',
]
DOMAINS = ['example.org', 'mail.example.net', 'asso.example.fr']
STATUSES = ['paid', 'pending', 'shipped', 'refunded', 'cancelled']


def _proc_times(pid: int) -> float:
    """Return utime + stime + cutime + cstime (seconds) of a process: it and its reaped children."""
    with open(f'/proc/{pid}/stat') as stat:
        fields = stat.read().rsplit(')', 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf('SC_CLK_TCK')


def _database_servers() -> list[int]:
    """Return the pids of the PostgreSQL postmaster (it reaps each connection's backend, whose CPU
    then lands in its cutime) and of mariadbd/mysqld (one process, all threads)."""
    pids = []
    for entry in Path('/proc').iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / 'comm').read_text().strip()
            ppid = int((entry / 'stat').read_text().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if comm in ('mariadbd', 'mysqld') or (comm == 'postgres' and ppid == 1):
            pids.append(int(entry.name))
    return pids


class CpuMeter:
    """CPU core-seconds: ``ours`` is every process this benchmark waited for (a ppbackup run with all
    its children, or each shell step with its programs) plus the database servers; ``host`` is the
    whole machine, so that host - ours is the load of whatever else runs here."""

    def __init__(self) -> None:
        self.servers = _database_servers()

    def sample(self) -> tuple[float, float]:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours = usage.ru_utime + usage.ru_stime
        for pid in self.servers:
            with contextlib.suppress(OSError):
                ours += _proc_times(pid)
        with open('/proc/stat') as stat:
            fields = [int(value) for value in stat.readline().split()[1:9]]
        host = (sum(fields) - fields[3] - fields[4]) / os.sysconf('SC_CLK_TCK')
        return ours, host

    def since(self, before: tuple[float, float]) -> tuple[float, float]:
        now = self.sample()
        return now[0] - before[0], now[1] - before[1]


METER: CpuMeter | None = None


def meter() -> CpuMeter:
    global METER
    if METER is None:
        METER = CpuMeter()
    return METER


def background_load(seconds: float = 3.0) -> float:
    """Return how many cores other processes keep busy, measured over ``seconds`` of our idling."""
    before = meter().sample()
    time.sleep(seconds)
    ours, host = meter().since(before)
    return max(0.0, host - ours) / seconds


def wait_quiet(threshold: float, max_wait: float) -> None:
    """Wait (at most ``max_wait`` s) until other processes keep at most ``threshold`` cores busy
    for a whole second."""
    deadline = time.monotonic() + max_wait
    while background_load(1.0) > threshold and time.monotonic() < deadline:
        pass


def say(text: str) -> None:
    print(text, flush=True)


def sh(
    cmd: str,
    *,
    env: dict[str, str] | None = None,
    input_text: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a bash command line with pipefail; raise with its output if it fails."""
    result = subprocess.run(
        ['bash', '-o', 'pipefail', '-c', cmd],
        env=env,
        input=input_text,
        capture_output=True,
        text=True,
        check=False,
    )
    if check and result.returncode:
        raise RuntimeError(
            f'command failed ({result.returncode}): {cmd}\n{result.stdout[-2000:]}'
            f'{result.stderr[-2000:]}'
        )
    return result


def borg_command() -> list[str]:
    """Return how to run borg so that its exact peak RSS is written at exit: its Python interpreter
    (from the script's #! line) running PEAK_WRAPPER, the script; plain ``borg`` when it is not a
    Python script (a standalone binary: its peak is then wait4's upper bound)."""
    path = shutil.which('borg')
    if not path:
        return ['borg']
    with open(path, 'rb') as handle:
        first = handle.readline(200).decode(errors='replace')
    interpreter = first[2:].split() if first.startswith('#!') else []
    if interpreter and 'python' in Path(interpreter[-1]).name:
        return [*interpreter, '-c', PEAK_WRAPPER, path]
    return [path]


def run_piped(producer: str | None, argv: list[str], env: dict[str, str], cwd: Path) -> int:
    """Run ``argv`` with the output of the bash command ``producer`` (if any) as its stdin; raise with
    their output if either fails; return the ru_maxrss (kB) of ``argv``'s process from wait4 (the
    producer is not in it): an upper bound only, see PEAK_WRAPPER."""
    with tempfile.TemporaryFile() as feeder_err, tempfile.TemporaryFile() as err:
        feeder = None
        if producer:
            feeder = subprocess.Popen(
                ['bash', '-o', 'pipefail', '-c', producer],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=feeder_err,
            )
        proc = subprocess.Popen(
            argv,
            stdin=feeder.stdout if feeder else subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            env=env,
            cwd=cwd,
        )
        if feeder and feeder.stdout:
            feeder.stdout.close()  # only argv holds the pipe: it sees EOF, the producer SIGPIPE
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        feeder_code = feeder.wait() if feeder else 0
        for code, what, out in ((proc.returncode, argv, err), (feeder_code, producer, feeder_err)):
            if code:
                out.seek(0)
                text = out.read().decode(errors='replace')[-2000:]
                raise RuntimeError(f'command failed ({code}): {what}\n{text}')
    return usage.ru_maxrss


def q(value: object) -> str:
    return shlex.quote(str(value))


def sql_array(items: list[str]) -> str:
    return 'ARRAY[' + ','.join("'" + item.replace("'", "''") + "'" for item in items) + ']'


def sql_elt(items: list[str]) -> str:
    return (
        f'ELT(1 + FLOOR(RAND() * {len(items)}), '
        + ','.join("'" + item.replace("'", "''") + "'" for item in items)
        + ')'
    )


def psql(db: str, sql: str) -> str:
    return subprocess.run(
        ['psql', '-X', '-q', '-A', '-t', '-v', 'ON_ERROR_STOP=1', '-d', db],
        input=sql,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def mysql(db: str, sql: str) -> str:
    return subprocess.run(
        ['mysql', '--batch', '--skip-column-names', '--', db],
        input=sql,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


# ---------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------

PG_TABLE = """CREATE TABLE orders (id bigint PRIMARY KEY, created timestamptz NOT NULL,
  customer text NOT NULL, email text NOT NULL, status text NOT NULL, amount numeric(10,2) NOT NULL,
  token text NOT NULL, note text NOT NULL);"""


def pg_insert(lo: int, hi: int) -> str:
    n = len(FIRST) - 1
    return f"""INSERT INTO orders SELECT g,
  timestamptz '2021-01-01 00:00:00+00' + g * interval '13 seconds',
  ({sql_array(FIRST)})[1 + (random() * {n})::int] || ' ' || ({sql_array(LAST)})[1 + (random() * {n})::int],
  'member' || (random() * 50000)::int || '@' || ({sql_array(DOMAINS)})[1 + (random() * 2)::int],
  ({sql_array(STATUSES)})[1 + (random() * 4)::int],
  round((random() * 500)::numeric, 2),
  md5(random()::text),
  substr('{LOREM}', 1 + (random() * 300)::int, 20 + (random() * 100)::int)
FROM generate_series({lo}, {hi}) AS g;"""


# Bytes of one row in pg_dump's COPY text: the columns, 7 tabs and a newline.
PG_ROW_BYTES = """SELECT avg(octet_length(id::text) + octet_length(created::text) + octet_length(customer)
  + octet_length(email) + octet_length(status) + octet_length(amount::text) + octet_length(token)
  + octet_length(note) + 8) FROM orders;"""

MY_TABLE = """CREATE TABLE orders (id BIGINT PRIMARY KEY, created DATETIME NOT NULL,
  customer VARCHAR(80) NOT NULL, email VARCHAR(80) NOT NULL, status VARCHAR(16) NOT NULL,
  amount DECIMAL(10,2) NOT NULL, token CHAR(32) NOT NULL, note VARCHAR(255) NOT NULL)
  ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;"""


def my_insert(lo: int, hi: int) -> str:
    return f"""INSERT INTO orders SELECT seq, TIMESTAMP'2021-01-01 00:00:00' + INTERVAL seq * 13 SECOND,
  CONCAT({sql_elt(FIRST)}, ' ', {sql_elt(LAST)}),
  CONCAT('member', FLOOR(RAND() * 50000), '@', {sql_elt(DOMAINS)}),
  {sql_elt(STATUSES)}, ROUND(RAND() * 500, 2), MD5(RAND()),
  SUBSTRING('{LOREM}', 1 + FLOOR(RAND() * 300), 20 + FLOOR(RAND() * 100))
FROM seq_{lo}_to_{hi};"""


# Bytes of one row in mysqldump's extended INSERT: the columns, 12 quotes, 7 commas, (), and ",".
MY_ROW_BYTES = """SELECT AVG(LENGTH(id) + LENGTH(created) + LENGTH(customer) + LENGTH(email)
  + LENGTH(status) + LENGTH(amount) + LENGTH(token) + LENGTH(note) + 22) FROM orders;"""


def fill_table(
    target: int,
    row_bytes: Callable[[], float],
    insert: Callable[[int, int], object],
    chunk: int = 400_000,
) -> int:
    """Insert a calibration batch, then enough rows for ``target`` dump bytes; return the rows."""
    first = min(20_000, max(1_000, target // 200))  # a tiny dataset (--smoke) stays tiny
    insert(1, first)
    rows = max(first, int(target / row_bytes()))
    done = first
    while done < rows:
        hi = min(rows, done + chunk)
        insert(done + 1, hi)
        done = hi
    return rows


def build_postgres(db: str, target: int) -> int:
    subprocess.run(['createdb', '--', db], check=True)
    psql(db, PG_TABLE)
    rows = fill_table(
        target, lambda: float(psql(db, PG_ROW_BYTES)), lambda lo, hi: psql(db, pg_insert(lo, hi))
    )
    psql(db, 'VACUUM (FREEZE, ANALYZE) orders;')  # hint bits set now, not by the first timed dump
    return rows


def build_mysql(db: str, target: int) -> int:
    subprocess.run(['mysql', '-e', f'CREATE DATABASE `{db}` CHARACTER SET utf8mb4'], check=True)
    mysql(db, MY_TABLE)
    rows = fill_table(
        target,
        lambda: float(mysql(db, MY_ROW_BYTES)),
        lambda lo, hi: mysql(db, my_insert(lo, hi)),
        chunk=200_000,
    )
    mysql(db, 'ANALYZE TABLE orders;')
    return rows


LOG_PATHS = [
    '/',
    '/index.php',
    '/agenda',
    '/adherer',
    '/contact',
    '/wp-login.php',
    '/news/feed',
    '/static/css/site.css',
    '/static/js/app.js',
    '/images/logo.png',
    '/api/events',
    '/api/members/search',
    '/boutique/panier',
    '/forum/topic',
    '/galerie/photo',
]
AGENTS = [
    'Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0',
    (
        'Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) '
        'Chrome/126.0 Safari/537.36'
    ),
    (
        'Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, '
        'like Gecko) Version/17.5 Mobile/15E148 Safari/604.1'
    ),
    'Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)',
    'curl/7.88.1',
    'python-requests/2.31.0',
]
ERRORS = [
    'PHP Warning:  Undefined array key "page" in /var/www/site/index.php on line 42',
    'PHP Notice:  session_start(): Ignoring session_start() because a session is active',
    'upstream timed out (110: Connection timed out) while reading response header',
    'PHP Fatal error:  Allowed memory size of 134217728 bytes exhausted',
]


def write_logs(folder: Path, total: int, rng: random.Random) -> None:
    """Write ``total`` bytes of access and error logs: text that compresses like real logs."""
    folder.mkdir(parents=True)
    ips = [
        f'{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}'
        for _ in range(5000)
    ]
    t = 1_700_000_000.0
    stamp_second, stamp = -1, ''
    written, index = 0, 0
    file_size = 32 * MIB
    while written < total:
        want = min(file_size, total - written)
        lines: list[str] = []
        size = 0
        while size < want:
            t += rng.random() * 0.8
            if int(t) != stamp_second:
                stamp_second = int(t)
                stamp = dt.datetime.fromtimestamp(stamp_second, dt.UTC).strftime(
                    '%d/%b/%Y:%H:%M:%S +0000'
                )
            if rng.random() < 0.03:
                line = (
                    f'[{stamp}] [error] [client {rng.choice(ips)}] {rng.choice(ERRORS)}, '
                    f'request id {rng.getrandbits(48):012x}\n'
                )
            else:
                path = rng.choice(LOG_PATHS)
                if rng.random() < 0.5:
                    path += f'?id={rng.randrange(100000)}'
                line = (
                    f'{rng.choice(ips)} - - [{stamp}] "GET {path} HTTP/1.1" '
                    f'{rng.choice((200, 200, 200, 200, 304, 404, 302, 500))} '
                    f'{rng.randrange(200, 60000)} "-" "{rng.choice(AGENTS)}"\n'
                )
            lines.append(line)
            size += len(line)
        data = ''.join(lines).encode()[:want]
        (folder / f'access-{index:03d}.log').write_bytes(data)
        written += len(data)
        index += 1


def write_uploads(folder: Path, total: int, rng: random.Random) -> None:
    """Write ``total`` bytes of random files (photos, PDFs: already compressed) in month folders."""
    written, index = 0, 0
    while written < total:
        size = min(total - written, rng.randrange(64 * 1024, 6 * MIB))
        sub = folder / f'2024/{1 + index % 12:02d}'
        sub.mkdir(parents=True, exist_ok=True)
        with open(sub / f'upload-{index:05d}.jpg', 'wb') as handle:
            left = size
            while left:
                block = min(left, 4 * MIB)
                handle.write(os.urandom(block))
                left -= block
        written += size
        index += 1


def write_binaries(folder: Path, total: int) -> None:
    """Copy ``total`` bytes of this host's shared libraries and programs (real machine code)."""
    folder.mkdir(parents=True)
    written = 0
    for source_dir in (Path('/usr/lib/x86_64-linux-gnu'), Path('/usr/bin')):
        for source in sorted(source_dir.iterdir()):
            if written >= total:
                return
            if source.is_symlink() or not source.is_file():
                continue
            try:
                data = source.read_bytes()[: total - written]
            except OSError:
                continue
            (folder / source.name).write_bytes(data)
            written += len(data)


def measure(cmd: str) -> int:
    """Return the byte count a command writes (also warms the caches it reads)."""
    return int(sh(f'{cmd} | wc -c').stdout)


def sha256_of(path: Path) -> str:
    with open(path, 'rb') as handle:
        return hashlib.file_digest(handle, 'sha256').hexdigest()


def check_manifests(local: Path, remote: Path, name: str) -> dict[str, int]:
    """Check a run from its manifests, not from a fixed file count (a run writes what ppbackup
    decides: dumps, roles, users, row counts...). Every slot of ``local`` (a backups folder, cleared
    before the run) must hold at most one manifest NAME-RUNID.sha256, a day slot exactly one; every
    file a manifest names must be in its slot here and in the same slot of ``remote`` with that
    SHA-256; the remote must hold the same manifest; no .gpg file may be in a slot unnamed. Return
    the day slot's file count and encrypted bytes; raise RuntimeError on any mismatch."""
    pattern = re.compile(rf'{re.escape(name)}-\d{{8}}-\d{{6}}(?:-\d+)?\.sha256')
    problems: list[str] = []
    day_files, day_bytes, day_manifests = 0, 0, 0
    slots = sorted(path for path in local.iterdir() if path.is_dir()) if local.is_dir() else []
    for slot in slots:
        manifests = [path for path in slot.iterdir() if pattern.fullmatch(path.name)]
        if len(manifests) > 1:
            problems.append(f'{slot.name}: {len(manifests)} manifests, expected one run')
        named: set[str] = set()
        for manifest in manifests:
            entries = [line.split('  ', 1) for line in manifest.read_text().splitlines()]
            if not entries or any(len(entry) != 2 or len(entry[0]) != 64 for entry in entries):
                problems.append(f'{slot.name}/{manifest.name}: empty or not in sha256sum format')
                continue
            copy = remote / slot.name / manifest.name
            if not copy.is_file() or copy.read_bytes() != manifest.read_bytes():
                problems.append(f'{slot.name}/{manifest.name}: missing or different on the remote')
            for digest, file_name in entries:
                named.add(file_name)
                for where, folder in (('here', slot), ('on the remote', remote / slot.name)):
                    path = folder / file_name
                    if not path.is_file():
                        problems.append(f'{slot.name}/{file_name}: missing {where}')
                    elif sha256_of(path) != digest:
                        problems.append(f'{slot.name}/{file_name}: wrong SHA-256 {where}')
            if slot.name.startswith('day'):  # day* even across midnight
                day_manifests += 1
                day_files += len(entries)
                day_bytes += sum((slot / file_name).stat().st_size for _, file_name in entries)
        for folder in (slot, remote / slot.name):
            stray = sorted(p.name for p in folder.glob('*.gpg') if p.name not in named)
            if stray:
                problems.append(f'{folder}: .gpg files no manifest names: {", ".join(stray)}')
    if day_manifests != 1:
        problems.append(f'expected one manifest in a day slot of {local}, found {day_manifests}')
    if problems:
        raise RuntimeError(
            "the run's files do not match its manifests:\n  " + '\n  '.join(problems)
        )
    return {'files': day_files, 'encrypted': day_bytes}


# ---------------------------------------------------------------------------------------------------
# Keys and the site
# ---------------------------------------------------------------------------------------------------


def gpg(home: Path, *args: str) -> str:
    return subprocess.run(
        ['gpg', '--homedir', str(home), '--batch', '--no-tty', '--passphrase', '', *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def make_keys(holder: Path, host: Path) -> str:
    """Make an ed25519/cv25519 key in ``holder``, put only its public key in ``host``; return the
    fingerprint."""
    for home in (holder, host):
        home.mkdir(mode=0o700, parents=True)
    uid = 'ppbench <ppbench@example.invalid>'
    gpg(holder, '--quick-gen-key', uid, 'ed25519', 'cert', 'never')
    fpr = next(
        line.split(':')[9]
        for line in gpg(holder, '--with-colons', '--list-keys', uid).splitlines()
        if line.startswith('fpr:')
    )
    gpg(holder, '--quick-add-key', fpr, 'cv25519', 'encr', 'never')
    public = gpg(holder, '--armor', '--export', fpr)
    subprocess.run(
        ['gpg', '--homedir', str(host), '--batch', '--import'],
        input=public,
        text=True,
        capture_output=True,
        check=True,
    )
    return fpr


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size = args.size_mb * MIB
        self.root = Path(tempfile.mkdtemp(prefix='ppbench-', dir=args.tmpdir))
        suffix = secrets.token_hex(3)
        self.pg_db, self.my_db = f'ppbench_pg_{suffix}', f'ppbench_my_{suffix}'
        self.home = self.root / 'home'
        self.remote = self.root / 'remote'
        self.holder = self.root / 'holder-gnupg'
        self.gnupghome = self.home / '.gnupg'
        self.bare = self.root / 'bare'
        self.bare_remote = self.root / 'bare-remote'
        self.hwm_file = self.root / 'hwm'
        self.borg_repo = self.root / 'borg-repo'
        self.borg_base = self.root / 'borg-base'  # borg's cache, keys, security: thrown away too
        self.borg_env = {
            **os.environ,
            'BORG_PASSPHRASE': 'ppbench',
            'BORG_BASE_DIR': str(self.borg_base),
            'PPBENCH_HWM_FILE': str(self.hwm_file),
        }
        self.borg = borg_command()
        for name in ('BORG_REPO', 'BORG_PASSCOMMAND', 'BORG_PASSPHRASE_FD', 'BORG_KEY_FILE'):
            self.borg_env.pop(name, None)
        self.fpr = ''
        self.raw: dict[str, int] = {}
        self.env = {**os.environ, 'HOME': str(self.home), 'PPBENCH_HWM_FILE': str(self.hwm_file)}
        for name in ('PPBACKUP_CONFIG', 'GNUPGHOME'):
            self.env.pop(name, None)
        when = dt.datetime.now()
        self.day, self.week = f'day{when.isoweekday()}', f'wk{when.isocalendar().week}'

    # -- set-up ----------------------------------------------------------------------------------

    def build(self) -> None:
        start = time.perf_counter()
        self.home.mkdir()
        rng = random.Random(20240601)
        site = self.home / 'site'
        site.mkdir()
        (site / 'index.php').write_text('<?php require "app.php"; run(); ?>\n')
        say(f'building a {self.args.size_mb} MiB dataset in {self.root} ...')
        rows_pg = build_postgres(self.pg_db, int(self.size * SHARES['psql']))
        rows_my = build_mysql(self.my_db, int(self.size * SHARES['mysql']))
        write_logs(site / 'logs', int(self.size * SHARES['logs']), rng)
        write_uploads(site / 'uploads', int(self.size * SHARES['uploads']), rng)
        write_binaries(self.home / 'bin', int(self.size * SHARES['binaries']))
        self.fpr = make_keys(self.holder, self.gnupghome)
        self.remote.mkdir()
        cfg = self.home / 'ppbackup.cfg'
        cfg.write_text(
            'BACKUP_NAME=bench\n'
            f'BACKUP_REMOTE={q(self.remote)}\n'
            f'BACKUP_GPG_RECIPIENT={self.fpr}\n'
            'BACKUP_FILES=site\n'
            'BACKUP_BINARIES=bin\n'
            f'BACKUP_PSQL_DB={self.pg_db}\n'
            f'BACKUP_MYSQL_DB={self.my_db}\n'
            f'BACKUP_GNUPGHOME={q(self.gnupghome)}\n'
        )
        cfg.chmod(0o600)
        # Measure what each source really yields (this also warms every cache both sides read).
        self.raw = {
            'psql': measure(PG_DUMP.format(db=self.pg_db)),
            'mysql': measure(MYSQLDUMP.format(db=self.my_db)),
            'files': measure(f'tar -c -f - -C {q(self.home)} site'),
            'binaries': measure(f'tar -c -f - -C {q(self.home)} bin'),
        }
        os.sync()
        total = sum(self.raw.values())
        say(
            f'dataset built in {time.perf_counter() - start:.0f} s: {total / MIB:.0f} MiB raw '
            f'(pg_dump {self.raw["psql"] / MIB:.0f} MiB, {rows_pg} rows; mysqldump '
            f'{self.raw["mysql"] / MIB:.0f} MiB, {rows_my} rows; files tar '
            f'{self.raw["files"] / MIB:.0f} MiB; binaries tar {self.raw["binaries"] / MIB:.0f} MiB)'
        )

    def cleanup(self) -> None:
        for db in (self.pg_db, self.my_db):
            subprocess.run(['dropdb', '--if-exists', '--', db], capture_output=True, check=False)
            subprocess.run(
                ['mysql', '-e', f'DROP DATABASE IF EXISTS `{db}`'], capture_output=True, check=False
            )
        for home in (self.holder, self.gnupghome):
            subprocess.run(
                ['gpgconf', '--homedir', str(home), '--kill', 'all'],
                capture_output=True,
                check=False,
            )
        if self.args.keep:
            say(f'kept {self.root}')
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- ppbackup ---------------------------------------------------------------------------------

    def clear_ppbackup(self) -> None:
        for path in (self.home / 'backups', self.home / 'backups.insecure', self.remote):
            shutil.rmtree(path, ignore_errors=True)
        self.remote.mkdir()
        self.hwm_file.unlink(missing_ok=True)
        os.sync()

    def run_ppbackup(self, script: Path) -> dict[str, Any]:
        """Run ``script run`` (through the VmHWM wrapper) on cleared outputs; return its timings."""
        self.clear_ppbackup()
        events: list[tuple[float, str]] = []
        cpu = meter().sample()
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, '-c', WRAPPER, str(script), '-v', 'run'],
            env=self.env,
            cwd=self.home,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:  # time-stamped as they arrive: the run's timeline
            events.append((time.perf_counter() - start, line.rstrip('\n')))
        code = proc.wait()
        seconds = time.perf_counter() - start
        ours, host = meter().since(cpu)
        output = '\n'.join(line for _, line in events)
        if code != 0:
            raise RuntimeError(f'{script} run exited {code}:\n{output}')
        try:
            made = check_manifests(self.home / 'backups', self.remote / 'backups', 'bench')
        except RuntimeError as error:
            raise RuntimeError(f'{script} run: {error}\n{output}') from None
        plain = sum(
            p.stat().st_size for p in (self.home / 'backups.insecure' / 'latest').glob('bench-*')
        )
        hwm_kb, py_cpu = self.hwm_file.read_text().split()
        return {
            'seconds': seconds,
            'hwm_kb': int(hwm_kb),
            'py_cpu': float(py_cpu),
            'cpu': ours,
            'other_load': max(0.0, host - ours) / seconds,
            'events': events,
            'compressed': plain,
            'encrypted': made['encrypted'],
            'files': made['files'],
        }

    def baseline_hwm(self) -> int:
        """VmHWM (kB) of the interpreter after importing ppbackup, running nothing: the floor."""
        self.hwm_file.unlink(missing_ok=True)
        subprocess.run(
            [sys.executable, '-c', WRAPPER, str(PPBACKUP), '--version'],
            env=self.env,
            capture_output=True,
            check=True,
        )
        return int(self.hwm_file.read_text().split()[0])

    # -- the shell recipes ------------------------------------------------------------------------

    def recipe(self, old: bool) -> list[tuple[str, str]]:
        """Return the (step, bash command) list of the bare zstd pipeline or the old bzip2 one."""
        latest, backups = self.bare / 'latest', self.bare / 'backups'
        day, week = backups / self.day, backups / self.week
        comp, ext = ('bzip2', '.bz2') if old else (ZSTD, '.zst')
        names = {
            'psql': f'bench-psql.sql{ext}',
            'mysql': f'bench-mysql.sql{ext}',
            'files': f'bench-files.tar{ext}',
            'binaries': f'bench-binaries.tar{ext}',
        }
        steps = [
            ('dump pg', f'{PG_DUMP.format(db=self.pg_db)} | {comp} > {q(latest / names["psql"])}'),
            (
                'dump mysql',
                f'{MYSQLDUMP.format(db=self.my_db)} | {comp} > {q(latest / names["mysql"])}',
            ),
        ]
        for kind, folder in (('files', 'site'), ('binaries', 'bin')):
            out = q(latest / names[kind])
            if old:
                steps.append((f'tar {kind}', f'tar -c -j -f {out} -C {q(self.home)} {folder}'))
            else:
                steps.append(
                    (f'tar {kind}', f'tar -c -f - -C {q(self.home)} {folder} | {comp} > {out}')
                )
        gpg_opts = '' if old else ' --compress-algo none'
        for kind, name in names.items():
            steps.append(
                (
                    f'gpg {kind}',
                    (
                        f'gpg --homedir {q(self.gnupghome)} --batch --no-tty --trust-model always'
                        f'{gpg_opts} -r {self.fpr} -o {q(day / (name + ".gpg"))} -e {q(latest / name)}'
                    ),
                )
            )
        links = [
            f'ln {q(day / (names[k] + ".gpg"))} {q(week / (names[k] + ".gpg"))}'
            for k in ('psql', 'mysql', 'files')
        ]
        steps.append(('ln', ' && '.join(links)))
        steps.append(('rsync', f'rsync -a -H {q(backups)} {q(self.bare_remote)}'))
        return steps

    def clear_bare(self) -> None:
        for path in (self.bare, self.bare_remote):
            shutil.rmtree(path, ignore_errors=True)
        for path in (
            self.bare / 'latest',
            self.bare / 'backups' / self.day,
            self.bare / 'backups' / self.week,
            self.bare_remote,
        ):
            path.mkdir(parents=True, mode=0o700)
        os.sync()

    def run_recipe(self, old: bool) -> dict[str, Any]:
        self.clear_bare()
        steps: dict[str, float] = {}
        cpu: dict[str, float] = {}
        whole = meter().sample()
        start = time.perf_counter()
        for name, cmd in self.recipe(old):
            began, began_cpu = time.perf_counter(), meter().sample()
            sh(cmd)
            steps[name] = time.perf_counter() - began
            cpu[name] = meter().since(began_cpu)[0]
        seconds = time.perf_counter() - start
        ours, host = meter().since(whole)
        plain = sum(p.stat().st_size for p in (self.bare / 'latest').iterdir())
        encrypted = sum(p.stat().st_size for p in (self.bare / 'backups' / self.day).iterdir())
        return {
            'seconds': seconds,
            'steps': steps,
            'step_cpu': cpu,
            'cpu': ours,
            'other_load': max(0.0, host - ours) / seconds,
            'compressed': plain,
            'encrypted': encrypted,
        }

    # -- borg -------------------------------------------------------------------------------------

    def clear_borg(self) -> None:
        """A fresh repository (and cache) per round: borg then does the full work, as the others do,
        instead of deduplicating against the previous round. The init is not timed."""
        for path in (self.borg_repo, self.borg_base):
            shutil.rmtree(path, ignore_errors=True)
        self.borg_base.mkdir(mode=0o700)
        sh(f'borg init --encryption=repokey-blake2 {q(self.borg_repo)}', env=self.borg_env)
        os.sync()

    def borg_steps(self) -> list[tuple[str, str | None, list[str]]]:
        """Return (step, producer bash command or None, borg create arguments): each dump piped in
        with --stdin-name as the bare pipeline pipes it into zstd, the files read by borg itself
        (it needs no tar)."""
        create = [*self.borg, 'create', '--compression', 'zstd,3']
        repo = str(self.borg_repo)
        return [
            (
                'borg psql',
                PG_DUMP.format(db=self.pg_db),
                [*create, '--stdin-name', 'bench-psql.sql', f'{repo}::bench-psql', '-'],
            ),
            (
                'borg mysql',
                MYSQLDUMP.format(db=self.my_db),
                [*create, '--stdin-name', 'bench-mysql.sql', f'{repo}::bench-mysql', '-'],
            ),
            ('borg files', None, [*create, f'{repo}::bench-files', 'site', 'bin']),
        ]

    def run_borg(self) -> dict[str, Any]:
        """Run the borg create steps into a fresh repository; return their timings."""
        self.clear_borg()
        steps: dict[str, float] = {}
        cpu: dict[str, float] = {}
        peak_kb, all_exact = 0, True
        whole = meter().sample()
        start = time.perf_counter()
        for name, producer, argv in self.borg_steps():
            self.hwm_file.unlink(missing_ok=True)
            began, began_cpu = time.perf_counter(), meter().sample()
            maxrss = run_piped(producer, argv, env=self.borg_env, cwd=self.home)
            exact = self.hwm_file.is_file()
            peak_kb = max(peak_kb, int(self.hwm_file.read_text()) if exact else maxrss)
            all_exact = all_exact and exact
            steps[name] = time.perf_counter() - began
            cpu[name] = meter().since(began_cpu)[0]
        seconds = time.perf_counter() - start
        ours, host = meter().since(whole)
        archives = sh(f'borg list --short {q(self.borg_repo)}', env=self.borg_env).stdout.split()
        if sorted(archives) != ['bench-files', 'bench-mysql', 'bench-psql']:
            raise RuntimeError(f'borg: expected 3 archives, the repository lists {archives}')
        written = sum(p.stat().st_size for p in self.borg_repo.rglob('*') if p.is_file())
        return {
            'seconds': seconds,
            'steps': steps,
            'step_cpu': cpu,
            'cpu': ours,
            'other_load': max(0.0, host - ours) / seconds,
            'peak_kb': peak_kb,
            'peak_exact': all_exact,
            'encrypted': written,
        }


# ---------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------


def group_steps(steps: dict[str, float]) -> dict[str, float]:
    grouped: dict[str, float] = {}
    for name, seconds in steps.items():
        key = 'gpg (4 files)' if name.startswith('gpg') else name
        grouped[key] = grouped.get(key, 0.0) + seconds
    return grouped


def step_table(title: str, runs: list[dict[str, Any]]) -> list[str]:
    """Median wall seconds per step, its share, and the CPU busy during it (core-seconds, and
    as a share of the 2 (or n) cores: near 100 % means the step is CPU-bound)."""
    names = list(group_steps(runs[0]['steps']))
    medians = {
        name: statistics.median(group_steps(run['steps'])[name] for run in runs) for name in names
    }
    cpus = {
        name: statistics.median(group_steps(run['step_cpu'])[name] for run in runs)
        for name in names
    }
    total = sum(medians.values())
    ncpu = os.cpu_count() or 1
    lines = [title, f'  {"step":<16}{"median s":>10}{"share":>8}{"CPU core-s":>12}{"CPU use":>9}']
    lines += [
        f'  {name:<16}{medians[name]:>10.2f}{medians[name] / total:>8.0%}{cpus[name]:>12.2f}'
        f'{cpus[name] / max(medians[name], 1e-9) / ncpu:>9.0%}'
        for name in names
    ]
    cpu_total = sum(cpus.values())
    lines.append(
        f'  {"sum":<16}{total:>10.2f}{"":>8}{cpu_total:>12.2f}{cpu_total / total / ncpu:>9.0%}'
    )
    return lines


def med(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(run[key] for run in runs))


def listed(
    runs: list[dict[str, Any]], key: str = 'seconds', scale: float = 1, digits: int = 2
) -> str:
    return ', '.join(f'{run[key] / scale:.{digits}f}' for run in runs)


def timeline(run: dict[str, Any]) -> list[str]:
    lines = []
    for at, text in run['events']:
        lines.append(f'  {at:7.2f} s  {text}')
    lines.append(f'  {run["seconds"]:7.2f} s  (process exited)')
    return lines


def mark(ok: bool) -> str:
    return 'ok' if ok else 'MISSED'


def report(args: argparse.Namespace, results: dict[str, Any]) -> list[str]:
    """Return the printed report: the summary table, then details, per-step times, timeline."""
    main_runs, bare, old = results['ppbackup'], results['bare'], results['old']
    borg = results['borg']
    ncpu = os.cpu_count() or 1
    ppb_median, bare_median = med(main_runs, 'seconds'), med(bare, 'seconds')
    paired = statistics.median(p['seconds'] / b['seconds'] for p, b in zip(main_runs, bare))
    old_median = med(old, 'seconds') if old else float('nan')
    old_ratio = old_median / ppb_median
    borg_median = med(borg, 'seconds') if borg else float('nan')
    # borg/ppb as ppb/bare: the median of the ratios of each round's runs (side by side)
    borg_ratio = (
        statistics.median(b['seconds'] / p['seconds'] for b, p in zip(borg, main_runs))
        if borg
        else float('nan')
    )
    hwm = max(run['hwm_kb'] for run in main_runs) / 1024
    borg_rss = max(run['peak_kb'] for run in borg) / 1024 if borg else float('nan')
    raw = sum(results['raw_bytes'].values())
    loads = [run['other_load'] for run in main_runs + bare + borg]

    def cell(value: float, fmt: str, unit: str = '', present: bool = True) -> str:
        return f'{value:{fmt}}{unit}' if present else '-'

    marks = (
        f'  {"":>8} {"":>9} {"":>7} {"":>8} {"":>8} {mark(paired <= 0.85):>9} '
        f'{mark(old_ratio >= 10) if old else "-":>8} {"":>9} {mark(hwm <= 60):>8}'
    )
    if args.smoke:
        marks = '  (--smoke: tiny data, the times say nothing; no target is judged)'
    out = [
        '',
        (
            f'ppbackup benchmark: {raw / MIB:.0f} MiB raw data, {len(main_runs)} alternating '
            f'rounds, {ncpu} CPUs'
        ),
        (
            f'  {"size":>8} {"ppbackup":>9} {"bare":>7} {"old":>8} {"borg":>8} {"ppb/bare":>9} '
            f'{"old/ppb":>8} {"borg/ppb":>9} {"VmHWM":>8} {"borg RSS":>9}'
        ),
        (
            f'  {raw / MIB:>5.0f}MiB {ppb_median:>8.2f}s {bare_median:>6.2f}s '
            f'{cell(old_median, ".1f", "s", bool(old)):>8} '
            f'{cell(borg_median, ".2f", "s", bool(borg)):>8} {paired:>9.2f} '
            f'{cell(old_ratio, ".1f", "", bool(old)):>8} '
            f'{cell(borg_ratio, ".2f", "", bool(borg)):>9} {hwm:>5.1f}MiB '
            f'{cell(borg_rss, ".1f", "MiB", bool(borg)):>9}'
        ),
        (
            f'  {"target":>8} {"":>9} {"":>7} {"":>8} {"":>8} {"<= 0.85":>9} {">= 10":>8} '
            f'{"":>9} {"<= 60":>8}'
        ),
        marks,
        (
            f'  ppbackup runs: {listed(main_runs)} s; bare: {listed(bare)} s; ratio of medians '
            f'{ppb_median / bare_median:.2f}, median of paired ratios {paired:.2f} (the table), '
            f'best of each {min(r["seconds"] for r in main_runs) / min(r["seconds"] for r in bare):.2f}'
        ),
        (
            f'  CPU used (its processes + database servers, median): ppbackup '
            f'{med(main_runs, "cpu"):.2f} core-s = {med(main_runs, "cpu") / ppb_median / ncpu:.0%} '
            f'of {ncpu} cores, of which its Python process {med(main_runs, "py_cpu"):.2f} s; bare '
            f'{med(bare, "cpu"):.2f} core-s = {med(bare, "cpu") / bare_median / ncpu:.0%}'
        ),
        (
            f'  other load on this host (cores busy with processes not ours): before '
            f'{results["load_before"]:.2f}, during ppbackup runs {listed(main_runs, "other_load")}, '
            f'during bare runs {listed(bare, "other_load")}, after {results["load_after"]:.2f}'
            + (
                '  <-- NOISY: other processes competed; the times above are not trustworthy'
                if max(loads) > max(0.15, args.quiet)
                else ''
            )
            + (f' (this run at nice -{args.nice})' if args.nice else '')
        ),
        (
            f'  VmHWM per run: {listed(main_runs, "hwm_kb", 1024, 1)} MiB (interpreter + import '
            f'ppbackup alone: {results["baseline_vmhwm_kb"] / 1024:.1f} MiB)'
        ),
        (
            f'  sizes: compressed {main_runs[0]["compressed"] / MIB:.1f} MiB (bare '
            f'{bare[0]["compressed"] / MIB:.1f}), encrypted {main_runs[0]["encrypted"] / MIB:.1f} '
            f'MiB (bare {bare[0]["encrypted"] / MIB:.1f})'
            + (f', old recipe encrypted {old[0]["encrypted"] / MIB:.1f} MiB' if old else '')
            + (f', borg repository {borg[0]["encrypted"] / MIB:.1f} MiB' if borg else '')
            + f'; ppbackup wrote {main_runs[0]["files"]} files per day slot (from its manifest)'
        ),
    ]
    if borg:
        out.append(
            f'  borg (borg create --compression zstd,3 into a fresh repokey-blake2 repository, '
            f'no copy to a remote): runs {listed(borg)} s, CPU {med(borg, "cpu"):.2f} core-s = '
            f'{med(borg, "cpu") / borg_median / ncpu:.0%} of {ncpu} cores, wrote '
            f'{med(borg, "encrypted") / MIB:.1f} MiB, peak RSS (VmHWM) of its largest borg process '
            f'{listed(borg, "peak_kb", 1024, 1)} MiB'
            + ('' if all(run['peak_exact'] for run in borg) else ' (wait4: an upper bound)')
        )
    elif not args.no_borg:
        out.append('  borg: not installed, skipped')
    for script, runs in results['variants'].items():
        median = med(runs, 'seconds')
        pair = statistics.median(c['seconds'] / p['seconds'] for c, p in zip(runs, main_runs))
        out.append(
            f'  variant {script}: median {median:.2f} s (runs {listed(runs)}), '
            f'variant/ppbackup {pair:.2f}, /bare {median / bare_median:.2f}, CPU '
            f'{med(runs, "cpu"):.2f} core-s (Python {med(runs, "py_cpu"):.2f}), VmHWM '
            f'{max(r["hwm_kb"] for r in runs) / 1024:.1f} MiB'
        )
    out += ['', *step_table('bare pipeline, per step (sequential):', bare)]
    if borg:
        out += ['', *step_table('borg, per step (sequential):', borg)]
    if old:
        out += ['', *step_table('old recipe, per step:', old)]
    median_run = sorted(main_runs, key=lambda run: run['seconds'])[len(main_runs) // 2]
    out += ['', 'ppbackup timeline (median run, from its -v log lines):', *timeline(median_run)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--smoke',
        action='store_true',
        help=f'the whole benchmark on tiny data in seconds (--size-mb {SMOKE_MB}, one round) to '
        'check that it still works (CI runs it): the times mean nothing; exits 1 only if a run '
        'failed or its files do not match its manifests',
    )
    parser.add_argument(
        '--size-mb', type=int, help=f'raw dataset size in MiB (200; {SMOKE_MB} with --smoke)'
    )
    parser.add_argument(
        '--rounds',
        type=int,
        help='alternating rounds of ppbackup, the bare pipeline and borg (3; 1 with --smoke)',
    )
    parser.add_argument(
        '--old-rounds',
        type=int,
        default=1,
        help='runs of the old bzip2 recipe, after the rounds (1; 0 skips it)',
    )
    parser.add_argument('--ppbackup', type=Path, default=PPBACKUP, help='ppbackup.py to time')
    parser.add_argument(
        '--compare',
        type=Path,
        action='append',
        default=[],
        help='another ppbackup.py (a variant) to time in the same rounds',
    )
    parser.add_argument('--tmpdir', help='where to make the throwaway folder (default $TMPDIR)')
    parser.add_argument(
        '--keep',
        action='store_true',
        help='keep the throwaway folder (the databases are always dropped)',
    )
    parser.add_argument('--json', type=Path, help='also write the results as JSON here')
    parser.add_argument(
        '--nice',
        type=int,
        default=0,
        metavar='N',
        help='run at nice -N (root): favours both sides, not the database servers, '
        'over other load; little effect on load in another cgroup (0)',
    )
    parser.add_argument(
        '--quiet',
        type=float,
        default=0.0,
        metavar='CORES',
        help='on a shared host: before each run wait until other processes use '
        'at most CORES cores, and redo a run during which they used more (0: off)',
    )
    parser.add_argument('--retries', type=int, default=4, help='redos per run with --quiet (4)')
    parser.add_argument(
        '--max-wait',
        type=float,
        default=300,
        help='seconds to wait for a quiet host before each run with --quiet (300)',
    )
    parser.add_argument(
        '--no-borg', action='store_true', help='leave borg out (it is left out when not installed)'
    )
    args = parser.parse_args(argv)
    if args.size_mb is None:
        args.size_mb = SMOKE_MB if args.smoke else 200
    if args.rounds is None:
        args.rounds = 1 if args.smoke else 3
    args.borg = not args.no_borg and shutil.which('borg') is not None
    if not args.no_borg and not args.borg:
        say(
            'note: borg is not installed (Debian: apt-get install borgbackup); its column is skipped'
        )
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, -args.nice)  # every child inherits it
    if os.geteuid() != 0:
        say('note: not root; createdb/mysql must work for this user')

    bench = Bench(args)
    started = time.perf_counter()
    try:
        bench.build()
        baseline = bench.baseline_hwm()
        load_before = background_load()
        if load_before > 0.15:
            say(
                f'WARNING: other processes keep {load_before:.2f} of {os.cpu_count()} cores busy; '
                'the timings will be noisy'
            )
        scripts = [args.ppbackup, *args.compare]
        ppb: dict[Path, list[dict[str, Any]]] = {script: [] for script in scripts}
        bare: list[dict[str, Any]] = []
        borg: list[dict[str, Any]] = []
        old: list[dict[str, Any]] = []

        def timed(
            what: str, run: Callable[[], dict[str, Any]], slack: float = 0.0
        ) -> dict[str, Any]:
            """Run once; with --quiet, wait for a quiet host first and redo a run that other
            processes competed with (up to --retries times). ``slack``: cores the run leaves idle
            anyway (the old recipe's bzip2 uses one), so other load up to it does not count."""
            threshold = max(args.quiet, slack)
            for attempt in range(args.retries + 1):
                if args.quiet:
                    wait_quiet(threshold, args.max_wait)
                result = run()
                if not args.quiet or result['other_load'] <= threshold or attempt == args.retries:
                    break
                say(
                    f'  ({what}: {result["seconds"]:.2f} s discarded: other processes kept '
                    f'{result["other_load"]:.2f} cores busy)'
                )
            return result

        for round_ in range(1, args.rounds + 1):
            for script in scripts:
                label = script.name if script == PPBACKUP else str(script)
                result = timed(label, functools.partial(bench.run_ppbackup, script))
                ppb[script].append(result)
                say(
                    f'round {round_}: {label}: {result["seconds"]:.2f} s, {result["files"]} files '
                    'checked against the manifest here and on the remote, VmHWM '
                    f'{result["hwm_kb"] / 1024:.1f} MiB, other load {result["other_load"]:.2f}'
                )
            result = timed('bare', functools.partial(bench.run_recipe, old=False))
            bare.append(result)
            say(
                f'round {round_}: bare pipeline: {result["seconds"]:.2f} s, other load '
                f'{result["other_load"]:.2f}'
            )
            if args.borg:
                result = timed('borg', bench.run_borg)
                borg.append(result)
                say(
                    f'round {round_}: borg: {result["seconds"]:.2f} s, peak RSS '
                    f'{result["peak_kb"] / 1024:.1f} MiB, other load {result["other_load"]:.2f}'
                )
        for round_ in range(1, args.old_rounds + 1):
            result = timed('old', functools.partial(bench.run_recipe, old=True), slack=0.5)
            old.append(result)
            say(
                f'old recipe run {round_}: {result["seconds"]:.2f} s, other load '
                f'{result["other_load"]:.2f}'
            )

        load_after = background_load()
        results = {
            'ppbackup': ppb[args.ppbackup],
            'bare': bare,
            'borg': borg,
            'old': old,
            'variants': {str(script): ppb[script] for script in args.compare},
            'load_before': load_before,
            'load_after': load_after,
            'baseline_vmhwm_kb': baseline,
            'raw_bytes': bench.raw,
        }
        say('\n'.join(report(args, results)))
        if args.json:
            args.json.write_text(json.dumps({'size_mb': args.size_mb, **results}, indent=1))
        if args.smoke:
            say(f'smoke run: everything ran and matched, in {time.perf_counter() - started:.0f} s')
        return 0
    except RuntimeError as error:  # a run failed, or its files do not match its manifests
        say(f'benchmark FAILED: {error}')
        return 1
    finally:
        bench.cleanup()


if __name__ == '__main__':
    sys.exit(main())
