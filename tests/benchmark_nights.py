#!/usr/bin/env python3
"""Benchmark: seven nights of ``ppbackup run`` against duplicity on a small site that changes.

Run by hand, as root on a host with PostgreSQL and MariaDB running (as for the tests), with
faketime and duplicity installed (Debian: ``apt-get install -y faketime duplicity``)::

    python3 tests/benchmark_nights.py                      # 150 MiB of uploads, 7 nights
    python3 tests/benchmark_nights.py --uploads-mb 500 --json /tmp/nights.json
    python3 tests/benchmark_nights.py --smoke              # tiny data, 2 nights, seconds

It is not a test: pytest collects neither this file name nor anything in it. ``--smoke`` judges
no figure; like every mode it exits 1 if a run of either tool failed or did not leave what it
should (ppbackup: tonight's manifest and its files, here and on the remote, by SHA-256; duplicity:
one new manifest a night, and a chain of as many backup sets as nights at the end).

benchmark.py times one full run; this one asks what a site costs night after night, where
ppbackup sends whole runs (every night a new encrypted dump of each database and a new archive of
every file) and duplicity sends a full backup once, then increments (librsync deltas of what
changed since the last night). What it does, in a throwaway folder under $TMPDIR (or --tmpdir)
that it removes at the end:

1. builds a site in a throwaway $HOME: ``site/app`` (--source-files files of PHP, Python, JS,
   CSS and templates, 0.5 - 40 KiB each), ``site/venv`` (a fake virtualenv of --venv-mb MiB: .py
   modules, dist-info, and copies of this host's ELF libraries as extension modules), and
   ``site/uploads`` (--uploads-mb MiB of os.urandom files, incompressible, 30 KiB - 4 MiB each,
   log-uniform); a PostgreSQL database of --pg-rows rows and a MariaDB one of --my-rows rows
   (benchmark.py's orders table), named ppnights_* and dropped at the end;
2. makes a key holder's ed25519/cv25519 key (benchmark.make_keys); ppbackup's GnuPG home and a
   second one for duplicity (its gpg writes a trust database) hold only the public key;
3. runs nights 1 .. --nights (7) under a faked clock, ``faketime -f '@DATE 03:00:00'``, one day
   later each night from --start (the next Monday): ppbackup names its slots by ISO weekday, so
   the real clock would put every night in one day slot, whose retention drops the earlier run
   of the same hour; faked, the nights fill day1 .. day7 as a real week does (one week slot).
   The whole night of each tool runs under that clock, dumps included, so both pay the same
   libfaketime overhead. Before each night after the first the site changes: about 3 % of each
   database's rows updated, 2 % inserted, 0.5 % deleted; 2 - 4 new uploads (1 % of the uploads'
   size) and 1 - 2 uploads rewritten (0.5 %), one upload deleted and another renamed; changed
   files get the previous afternoon as their mtime;
4. each night runs, in alternating order (ppbackup first on odd nights):
   - ppbackup: ``faketime ... python3 ppbackup.py run`` with a ppbackup.cfg (0600) as
     benchmark.py writes one: BACKUP_FILES the three site folders, BACKUP_PSQL_DB,
     BACKUP_MYSQL_DB, BACKUP_REMOTE a local folder (rsync -a -H), no mail; then tonight's day
     slot must hold one manifest, and each file it names must be here and on the remote with its
     SHA-256;
   - duplicity (Debian's, 0.8): pg_dump and mysqldump (the same options as ppbackup's, the
     plain SQL that librsync deltas best) into ``$HOME/dumps``, mtime set to the night, then
     ``duplicity full`` (night 1) or ``duplicity incr`` with ``--encrypt-key FPR --gpg-options
     '--homedir=DIR --trust-model=always'`` (public key only: no passphrase, no signing),
     ``--include`` the three site folders and the dumps, ``--exclude '**'``, from $HOME to a
     ``file://`` target, its archive dir (signature cache) in the throwaway folder too;
     otherwise duplicity's defaults (gpg's own compression, 200 MB volumes, statistics printed:
     they are in the JSON).

What it measures, per night and tool:

- bytes sent: for ppbackup, the bytes of the files that are new in the remote folder that night,
  each inode once (rsync -H sends the week slot's hard links as links; the names are new each
  run, so rsync has no basis for a delta and sends each file whole); for duplicity, the bytes of
  the new files in its target; both split by kind (ppbackup: files archive, psql, mysql, the rest:
  roles, users, row counts, manifests; duplicity: difftar volumes, signatures, manifests);
- CPU seconds: user + system time of every process the night started, from os.wait4 of each
  command (the faketime wrapper, and through it ppbackup with its gpg, zstd, tar, pg_dump,
  mysqldump and rsync; or pg_dump, mysqldump and duplicity with its gpg); the database servers'
  own CPU (the postmaster's reaped backends and mariadbd) is reported beside it, not in it;
- wall seconds of the tool's night (for duplicity: its dumps, then duplicity);
- storage after the last night: the remote folder (ppbackup) and the target (duplicity), and
  locally ppbackup's ~/backups (hard-linked inodes once) and duplicity's archive dir.

It prints the table (night 1; nights 2-N as a mean a night; storage; ppbackup/duplicity ratios),
then every night, and with --json FILE writes the same as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark  # noqa: E402
from benchmark import MIB, say  # noqa: E402

KIB = 1 << 10
NAME = 'nights'  # BACKUP_NAME
SEED = 20261207

# Per night, as shares of the initial rows of each database and of the uploads' size.
UPDATE_SHARE, INSERT_SHARE, DELETE_SHARE = 0.03, 0.02, 0.005
NEW_SHARE, REWRITE_SHARE = 0.010, 0.005

DEFAULTS = {
    'uploads_mb': 150,
    'source_files': 300,
    'venv_mb': 12,
    'pg_rows': 100_000,
    'my_rows': 50_000,
    'nights': 7,
}
SMOKE = {
    'uploads_mb': 4,
    'source_files': 20,
    'venv_mb': 1,
    'pg_rows': 2_000,
    'my_rows': 1_000,
    'nights': 2,
}

# ppbackup's file names: NAME-KIND[-DB]-RUNID.EXT.gpg, and the manifest NAME-RUNID.sha256.
PPB_KIND = re.compile(rf'{NAME}-(?:(?P<kind>[a-z]+(?:-[a-z]+)*)-)?\d{{8}}-\d{{6}}')
PPB_GROUPS = {'files': 'files', 'psql': 'psql', 'mysql': 'mysql'}  # the rest: 'other'
DUP_KIND = re.compile(r'\.(?P<kind>difftar|sigtar|manifest)(?:\.|$)')

# --------------------------------------------------------------------------------------------------
# The site
# --------------------------------------------------------------------------------------------------

WORDS = [
    'member',
    'invoice',
    'event',
    'user',
    'session',
    'payment',
    'render',
    'template',
    'config',
    'request',
    'response',
    'error',
    'item',
    'count',
    'total',
    'email',
    'status',
    'query',
    'result',
    'page',
    'ballot',
    'roster',
    'meeting',
    'budget',
]
SOURCE_DIRS = {
    'php': ['app/controllers', 'app/models', 'lib'],
    'py': ['scripts', 'app/tasks'],
    'js': ['static/js', 'static/js/vendor'],
    'css': ['static/css'],
    'html': ['templates', 'templates/partials'],
}
PACKAGES = [
    'requests',
    'urllib3',
    'idna',
    'certifi',
    'charset_normalizer',
    'jinja2',
    'markupsafe',
    'werkzeug',
    'flask',
    'click',
    'itsdangerous',
    'sqlalchemy',
    'psycopg2',
    'pymysql',
    'dateutil',
    'pytz',
    'yaml',
    'PIL',
    'lxml',
    'gunicorn',
]


def code_line(rng: random.Random, ext: str) -> str:
    """Return one line of plausible source code in the language of ``ext``."""
    a, b, c, d = (rng.choice(WORDS) for _ in range(4))
    n = rng.randrange(1000)
    choices = {
        'php': [
            f'${a}_{b} = ${c}->get_{d}(${a});',
            f'if (${a} === null) {{ return {b}_{c}({n}); }}',
            f'function {a}_{b}(${c}, ${d} = {n}) {{',
            f"echo htmlspecialchars(${a}['{b}'], ENT_QUOTES);",
            '}',
            f'// {a}: the {b} of every {c} (see #{n})',
        ],
        'py': [
            f'def {a}_{b}({c}, {d}=None):',
            f'{a} = {b}.{c}_{d}({n})',
            f'if not {a}:',
            f'raise {a.title()}Error(f"{b} {{{c}}} has no {d}")',
            f'return {a}_{b}',
            f'# {a}: the {b} of each {c}',
            f'class {a.title()}{b.title()}({c.title()}):',
        ],
        'js': [
            f'const {a}{b.title()} = await fetch(`/api/{b}/${{{c}}}`);',
            f'function {a}{b.title()}({c}) {{',
            f'return {a}.{b}.filter(({c}) => {c}.{d} > {n});',
            '}',
            f'// {a} {b} {c}',
        ],
        'css': [
            f'.{a}-{b} {{ margin: {n % 40}px {n % 17}px; color: #{n:03x}; }}',
            f'.{a} .{b}:hover {{ display: flex; gap: {n % 9}px; }}',
        ],
        'html': [
            f'<div class="{a}-{b}">{{{{ {c}.{d} }}}}</div>',
            f'{{% if {a}.{b} %}}<a href="/{c}/{{{{ {d}.id }}}}">{b}</a>{{% endif %}}',
            f'<p>{benchmark.LOREM[n % 200 : n % 200 + 60]}</p>',
        ],
    }[ext]
    indent = '    ' * rng.randrange(4) if ext in ('php', 'py', 'js') else '  ' * rng.randrange(3)
    return indent + rng.choice(choices) + '\n'


def code_text(rng: random.Random, ext: str, size: int) -> str:
    lines, length = [], 0
    while length < size:
        line = code_line(rng, ext)
        lines.append(line)
        length += len(line)
    return ''.join(lines)


def log_uniform(rng: random.Random, low: float, high: float) -> int:
    return int(math.exp(rng.uniform(math.log(low), math.log(high))))


def past(rng: random.Random, before: dt.datetime, days: int) -> float:
    """Return a timestamp up to ``days`` days before ``before``."""
    return before.timestamp() - rng.uniform(3600, days * 86400)


def write_random(path: Path, size: int, mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'wb') as handle:
        left = size
        while left:
            block = min(left, 4 * MIB)
            handle.write(os.urandom(block))
            left -= block
    os.utime(path, (mtime, mtime))


def write_app(folder: Path, count: int, rng: random.Random, start: dt.datetime) -> None:
    """Write ``count`` source files, 0.5 - 40 KiB each, into the folders of a small web app."""
    exts = list(SOURCE_DIRS)
    for index in range(count):
        ext = exts[index % len(exts)]
        sub = folder / rng.choice(SOURCE_DIRS[ext])
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f'{rng.choice(WORDS)}_{rng.choice(WORDS)}_{index:03d}.{ext}'
        path.write_text(code_text(rng, ext, log_uniform(rng, 512, 40 * KIB)))
        mtime = past(rng, start, 400)
        os.utime(path, (mtime, mtime))


def write_venv(folder: Path, total: int, rng: random.Random, start: dt.datetime) -> None:
    """Write a fake virtualenv of about ``total`` bytes: 40 % Python modules and dist-info of
    the PACKAGES, 60 % extension modules (copies of this host's ELF libraries)."""
    (folder / 'bin').mkdir(parents=True)
    (folder / 'bin' / 'python3').symlink_to('/usr/bin/python3')
    (folder / 'bin' / 'python').symlink_to('python3')
    (folder / 'bin' / 'activate').write_text(
        f'# This file must be used with "source bin/activate"\nVIRTUAL_ENV={folder}\n'
        'export VIRTUAL_ENV\nPATH="$VIRTUAL_ENV/bin:$PATH"\nexport PATH\n'
    )
    (folder / 'pyvenv.cfg').write_text('home = /usr/bin\ninclude-system-site-packages = false\n')
    site = folder / 'lib' / 'python3.11' / 'site-packages'
    written, package = 0, 0
    while written < 0.4 * total:
        rounds = package // len(PACKAGES)
        name = PACKAGES[package % len(PACKAGES)] + (f'{rounds}' if rounds else '')
        pkg = site / name
        pkg.mkdir(parents=True)
        record = []
        for index in range(rng.randrange(4, 20)):
            module = pkg / ('__init__.py' if index == 0 else f'{rng.choice(WORDS)}_{index}.py')
            text = code_text(rng, 'py', log_uniform(rng, 300, 30 * KIB))
            module.write_text(text)
            record.append(f'{name}/{module.name},sha256={secrets.token_urlsafe(32)},{len(text)}')
            written += len(text)
        info = (
            site / f'{name}-{rng.randrange(1, 9)}.{rng.randrange(30)}.{rng.randrange(9)}.dist-info'
        )
        info.mkdir()
        (info / 'METADATA').write_text(
            f'Metadata-Version: 2.1\nName: {name}\n\n{benchmark.LOREM}\n'
        )
        (info / 'RECORD').write_text('\n'.join(record) + '\n')
        (info / 'WHEEL').write_text(
            'Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n'
        )
        package += 1
    staging = folder / '.native'
    benchmark.write_binaries(staging, max(0, total - written))
    for index, native in enumerate(sorted(staging.iterdir())):
        stem = native.name.split('.')[0].removeprefix('lib').replace('-', '_')
        target = site / PACKAGES[index % len(PACKAGES)]
        target.mkdir(exist_ok=True)
        native.rename(target / f'_{stem}{index}.cpython-311-x86_64-linux-gnu.so')
    staging.rmdir()
    for path in folder.rglob('*'):
        if not path.is_symlink():
            mtime = past(rng, start, 60)
            os.utime(path, (mtime, mtime))


def write_uploads(folder: Path, total: int, rng: random.Random, start: dt.datetime) -> int:
    """Write ``total`` bytes of random files (photos, scans: already compressed), 30 KiB - 4 MiB
    each, log-uniform, in year/month folders; return their number."""
    written, index = 0, 0
    while written < total:
        size = min(total - written, log_uniform(rng, 30 * KIB, 4 * MIB))
        ext = rng.choice(('jpg', 'jpg', 'jpg', 'png', 'pdf'))
        stem = 'scan' if ext == 'pdf' else 'IMG'
        year = 2023 + min(3, index * 4 // max(1, total // (830 * KIB)))  # 830 KiB: the mean
        sub = folder / f'{year}' / f'{1 + index % 12:02d}'
        write_random(sub / f'{stem}_{index:05d}.{ext}', size, past(rng, start, 900))
        written += size
        index += 1
    return index


# --------------------------------------------------------------------------------------------------
# Databases
# --------------------------------------------------------------------------------------------------


def pg_changes(update: int, delete: int) -> str:
    n = len(benchmark.STATUSES) - 1
    return f"""UPDATE orders SET
  status = ({benchmark.sql_array(benchmark.STATUSES)})[1 + (random() * {n})::int],
  amount = round((random() * 500)::numeric, 2),
  note = substr('{benchmark.LOREM}', 1 + (random() * 300)::int, 20 + (random() * 100)::int)
WHERE id IN (SELECT id FROM orders ORDER BY random() LIMIT {update});
DELETE FROM orders WHERE id IN (SELECT id FROM orders ORDER BY random() LIMIT {delete});"""


def my_changes(update: int, delete: int) -> str:
    return f"""UPDATE orders SET
  status = {benchmark.sql_elt(benchmark.STATUSES)},
  amount = ROUND(RAND() * 500, 2),
  note = SUBSTRING('{benchmark.LOREM}', 1 + FLOOR(RAND() * 300), 20 + FLOOR(RAND() * 100))
ORDER BY RAND() LIMIT {update};
DELETE FROM orders ORDER BY RAND() LIMIT {delete};"""


def database_cpu(servers: list[int]) -> float:
    """CPU seconds so far of the database servers: the postmaster with the backends it reaped,
    and mariadbd (one process, all threads)."""
    total = 0.0
    for pid in servers:
        with contextlib.suppress(OSError):
            total += benchmark._proc_times(pid)
    return total


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def inodes(folder: Path) -> dict[tuple[int, int], tuple[Path, int]]:
    """Return every regular file under ``folder``, by inode: (one of its paths, its size)."""
    found: dict[tuple[int, int], tuple[Path, int]] = {}
    for path in sorted(folder.rglob('*')) if folder.is_dir() else ():  # day slots before weeks
        info = path.lstat()
        if path.is_file() and not path.is_symlink():
            found.setdefault((info.st_dev, info.st_ino), (path, info.st_size))
    return found


def storage(folder: Path) -> int:
    """Bytes of the files under ``folder``, hard-linked inodes once."""
    return sum(size for _, size in inodes(folder).values())


def new_bytes(
    folder: Path, before: dict[tuple[int, int], tuple[Path, int]], kind_of: Any
) -> tuple[int, dict[str, int], list[str]]:
    """Return the bytes of the inodes under ``folder`` that ``before`` lacks, split by kind, and
    their names."""
    by_kind: dict[str, int] = {}
    names = []
    for key, (path, size) in sorted(inodes(folder).items(), key=lambda item: str(item[1][0])):
        if key not in before:
            kind = kind_of(path.name)
            by_kind[kind] = by_kind.get(kind, 0) + size
            names.append(str(path.relative_to(folder)))
    return sum(by_kind.values()), by_kind, names


def ppbackup_kind(name: str) -> str:
    match = PPB_KIND.match(name)
    if not match:
        return 'other'
    return PPB_GROUPS.get(match.group('kind') or 'manifest', 'other')


def duplicity_kind(name: str) -> str:
    match = DUP_KIND.search(name)
    return match.group('kind') if match else 'other'


def tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors='replace') if path.is_file() else ''
    return text[-chars:]


class Nights:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix='ppnights-', dir=args.tmpdir))
        suffix = secrets.token_hex(3)
        self.pg_db, self.my_db = f'ppnights_pg_{suffix}', f'ppnights_my_{suffix}'
        self.home = self.root / 'home'
        self.site = self.home / 'site'
        self.uploads = self.site / 'uploads'
        self.dumps = self.home / 'dumps'
        self.remote = self.root / 'remote'
        self.holder = self.root / 'holder-gnupg'
        self.gnupghome = self.home / '.gnupg'
        self.dup_gnupg = self.root / 'duplicity-gnupg'
        self.dup_target = self.root / 'duplicity-target'
        self.dup_archive = self.root / 'duplicity-archive'
        self.logs = self.root / 'logs'
        self.tmp = self.root / 'tmp'
        self.fpr = ''
        self.next_pg = self.next_my = 0  # the next id to insert
        self.servers: list[int] = []
        self.wrappers: list[int] = []  # faketime wrappers started: their shared memory is ours
        self.site_info: dict[str, Any] = {}
        self.env = {**os.environ, 'HOME': str(self.home), 'TMPDIR': str(self.tmp)}
        for name in list(self.env):
            if name.startswith(('FAKETIME', 'PPBACKUP_', 'GNUPG')) or name in (
                'LD_PRELOAD',
                'PASSPHRASE',
                'SIGN_PASSPHRASE',
            ):
                del self.env[name]

    # -- set-up ----------------------------------------------------------------------------------

    def night_time(self, night: int) -> dt.datetime:
        return dt.datetime.combine(self.args.start + dt.timedelta(days=night - 1), dt.time(3, 0, 0))

    def faked(self, night: int, argv: list[str], later: dt.timedelta | None = None) -> list[str]:
        when = self.night_time(night) + (later or dt.timedelta())
        return ['faketime', '-f', f'@{when:%Y-%m-%d %H:%M:%S}', *argv]

    def build(self) -> None:
        args = self.args
        began = time.perf_counter()
        start = self.night_time(1)
        for folder in (self.home, self.logs, self.tmp, self.dumps, self.remote):
            folder.mkdir(parents=True)
        rng = random.Random(SEED)
        say(f'building the site in {self.root} ...')
        write_app(self.site / 'app', args.source_files, rng, start)
        write_venv(self.site / 'venv', args.venv_mb * MIB, rng, start)
        uploads = write_uploads(self.uploads, args.uploads_mb * MIB, rng, start)
        subprocess.run(['createdb', '--', self.pg_db], check=True)
        benchmark.psql(self.pg_db, benchmark.PG_TABLE)
        benchmark.psql(self.pg_db, benchmark.pg_insert(1, args.pg_rows))
        benchmark.psql(self.pg_db, 'VACUUM (FREEZE, ANALYZE) orders;')
        subprocess.run(
            ['mysql', '-e', f'CREATE DATABASE `{self.my_db}` CHARACTER SET utf8mb4'], check=True
        )
        benchmark.mysql(self.my_db, benchmark.MY_TABLE)
        for lo in range(1, args.my_rows + 1, 100_000):
            benchmark.mysql(self.my_db, benchmark.my_insert(lo, min(args.my_rows, lo + 99_999)))
        benchmark.mysql(self.my_db, 'ANALYZE TABLE orders;')
        self.next_pg, self.next_my = args.pg_rows + 1, args.my_rows + 1
        self.servers = benchmark._database_servers()

        self.fpr = benchmark.make_keys(self.holder, self.gnupghome)
        self.dup_gnupg.mkdir(mode=0o700)
        subprocess.run(
            ['gpg', '--homedir', str(self.dup_gnupg), '--batch', '--import'],
            input=benchmark.gpg(self.gnupghome, '--armor', '--export', self.fpr).encode(),
            capture_output=True,
            check=True,
        )
        cfg = self.home / 'ppbackup.cfg'
        cfg.write_text(
            f'BACKUP_NAME={NAME}\n'
            f'BACKUP_REMOTE={benchmark.q(self.remote)}\n'
            f'BACKUP_GPG_RECIPIENT={self.fpr}\n'
            'BACKUP_FILES="site/app site/venv site/uploads"\n'
            f'BACKUP_PSQL_DB={self.pg_db}\n'
            f'BACKUP_MYSQL_DB={self.my_db}\n'
            f'BACKUP_GNUPGHOME={benchmark.q(self.gnupghome)}\n'
        )
        cfg.chmod(0o600)
        home = benchmark.q(self.home)
        raw = {
            'uploads': benchmark.measure(f'tar -c -f - -C {home} site/uploads'),
            'app': benchmark.measure(f'tar -c -f - -C {home} site/app'),
            'venv': benchmark.measure(f'tar -c -f - -C {home} site/venv'),
            'psql': benchmark.measure(benchmark.PG_DUMP.format(db=self.pg_db)),
            'mysql': benchmark.measure(benchmark.MYSQLDUMP.format(db=self.my_db)),
        }
        counts = {
            name: sum(1 for p in (self.site / name).rglob('*') if p.is_file())
            for name in ('app', 'venv')
        }
        self.site_info = {
            'raw_bytes': raw,
            'upload_files': uploads,
            'app_files': counts['app'],
            'venv_files': counts['venv'],
            'pg_rows': args.pg_rows,
            'my_rows': args.my_rows,
        }
        os.sync()
        say(
            f'site built in {time.perf_counter() - began:.0f} s: {sum(raw.values()) / MIB:.1f} MiB '
            f'raw (uploads {raw["uploads"] / MIB:.1f} MiB in {uploads} files, app '
            f'{raw["app"] / MIB:.1f} MiB in {counts["app"]} files, venv {raw["venv"] / MIB:.1f} '
            f'MiB in {counts["venv"]} files, pg_dump {raw["psql"] / MIB:.1f} MiB of '
            f'{args.pg_rows} rows, mysqldump {raw["mysql"] / MIB:.1f} MiB of {args.my_rows} rows)'
        )

    def cleanup(self) -> None:
        for db in (self.pg_db, self.my_db):
            subprocess.run(['dropdb', '--if-exists', '--', db], capture_output=True, check=False)
            subprocess.run(
                ['mysql', '-e', f'DROP DATABASE IF EXISTS `{db}`'], capture_output=True, check=False
            )
        for home in (self.holder, self.gnupghome, self.dup_gnupg):
            if home.is_dir():
                subprocess.run(
                    ['gpgconf', '--homedir', str(home), '--kill', 'all'],
                    capture_output=True,
                    check=False,
                )
        for pid in self.wrappers:  # a wrapper killed by --timeout leaves its shared memory
            if not Path(f'/proc/{pid}').exists():
                for name in (f'faketime_shm_{pid}', f'sem.faketime_sem_{pid}'):
                    (Path('/dev/shm') / name).unlink(missing_ok=True)
        if self.args.keep:
            say(f'kept {self.root}')
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- the site changes ------------------------------------------------------------------------

    def change(self, night: int) -> dict[str, Any]:
        """Change the site as a day does, before ``night``; return what changed."""
        rng = random.Random(SEED + night)
        day = (self.night_time(night) - dt.timedelta(hours=13)).timestamp()  # 14:00 the day before
        args = self.args
        pg = [max(1, round(args.pg_rows * share)) for share in (UPDATE_SHARE, INSERT_SHARE)]
        my = [max(1, round(args.my_rows * share)) for share in (UPDATE_SHARE, INSERT_SHARE)]
        pg_del = max(1, round(args.pg_rows * DELETE_SHARE))
        my_del = max(1, round(args.my_rows * DELETE_SHARE))
        benchmark.psql(self.pg_db, pg_changes(pg[0], pg_del))
        benchmark.psql(self.pg_db, benchmark.pg_insert(self.next_pg, self.next_pg + pg[1] - 1))
        self.next_pg += pg[1]
        benchmark.mysql(self.my_db, my_changes(my[0], my_del))
        benchmark.mysql(self.my_db, benchmark.my_insert(self.next_my, self.next_my + my[1] - 1))
        self.next_my += my[1]

        files = sorted(p for p in self.uploads.rglob('*') if p.is_file())
        sizes = {path: path.stat().st_size for path in files}
        total = sum(sizes.values())
        when = self.night_time(night) - dt.timedelta(days=1)
        added = 0
        count = rng.randint(2, 4)
        weights = [rng.uniform(0.5, 1.5) for _ in range(count)]
        for index, weight in enumerate(weights):
            size = max(KIB, int(total * NEW_SHARE * weight / sum(weights)))
            path = self.uploads / f'{when:%Y}' / f'{when:%m}' / f'IMG_{when:%Y%m%d}_{index}.jpg'
            write_random(path, size, day)
            added += size
        pool = list(files)
        rewritten = []
        count = rng.choice((1, 2))
        for _ in range(count):
            want = total * REWRITE_SHARE / count
            near = sorted(pool, key=lambda path: abs(sizes[path] - want))[:5]
            path = rng.choice(near)
            pool.remove(path)
            write_random(path, sizes[path], day)
            rewritten.append(sizes[path])
        gone = rng.choice(pool)
        pool.remove(gone)
        gone.unlink()
        moved = rng.choice(pool)
        moved.rename(moved.with_name(f'{moved.stem}-{night}{moved.suffix}'))
        return {
            'pg': {'updated': pg[0], 'inserted': pg[1], 'deleted': pg_del},
            'mysql': {'updated': my[0], 'inserted': my[1], 'deleted': my_del},
            'uploads_before': total,
            'added': added,
            'rewritten': sum(rewritten),
            'deleted': sizes[gone],
            'renamed': sizes[moved],
        }

    # -- running ---------------------------------------------------------------------------------

    def measured(
        self, argv: list[str], log: Path, stdout: Path | None = None
    ) -> tuple[float, float]:
        """Run ``argv`` (its output appended to ``log``, or its stdout into ``stdout``); return
        the CPU seconds of it and every descendant it reaped (wait4) and the wall seconds. Raise
        RuntimeError if it fails or outlives --timeout (its process group is then killed)."""
        killed = threading.Event()

        def kill(pgid: int) -> None:
            killed.set()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)

        with contextlib.ExitStack() as stack:
            err = stack.enter_context(open(log, 'ab'))
            err.write(f'$ {shlex.join(argv)}\n'.encode())
            err.flush()
            out = stack.enter_context(open(stdout, 'wb')) if stdout else err
            began = time.perf_counter()
            proc = subprocess.Popen(
                argv,
                env=self.env,
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            if argv[0] == 'faketime':
                self.wrappers.append(proc.pid)
            timer = threading.Timer(self.args.timeout, kill, (proc.pid,))
            timer.daemon = True
            timer.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:  # Ctrl-C: it runs in a session of its own, so end it here
                kill(proc.pid)
                os.waitpid(proc.pid, 0)
                raise
            finally:
                timer.cancel()
            proc.returncode = os.waitstatus_to_exitcode(status)
            wall = time.perf_counter() - began
        if proc.returncode:
            why = f' (killed after --timeout {self.args.timeout} s)' if killed.is_set() else ''
            raise RuntimeError(
                f'{shlex.join(argv)} exited {proc.returncode}{why}; its log {log} ends:\n'
                f'{tail(log)}'
            )
        return usage.ru_utime + usage.ru_stime, wall

    def night_ppbackup(self, night: int) -> dict[str, Any]:
        log = self.logs / f'night{night}-ppbackup.log'
        before = inodes(self.remote)
        db_before = database_cpu(self.servers)
        cpu, wall = self.measured(
            self.faked(night, [sys.executable, str(self.args.ppbackup), 'run']), log
        )
        db_cpu = database_cpu(self.servers) - db_before
        sent, by_kind, names = new_bytes(self.remote, before, ppbackup_kind)
        files = self.check_ppbackup(night, log)
        return {
            'sent': sent,
            'sent_by_kind': by_kind,
            'cpu': cpu,
            'wall': wall,
            'db_cpu': db_cpu,
            'new_files': names,
            'run_files': files,
        }

    def check_ppbackup(self, night: int, log: Path) -> int:
        """Tonight's day slot (the faked weekday's) must hold one manifest of tonight, and every
        file it names must be here and on the remote with its SHA-256; return their number."""
        when = self.night_time(night)
        slot = f'day{when.isoweekday()}'
        local = self.home / 'backups' / slot
        remote = self.remote / 'backups' / slot
        pattern = re.compile(rf'{NAME}-{when:%Y%m%d}-\d{{6}}(?:-\d+)?\.sha256')
        manifests = (
            [p for p in local.iterdir() if pattern.fullmatch(p.name)] if local.is_dir() else []
        )
        problems = []
        if len(manifests) != 1:
            problems.append(f'{local}: {len(manifests)} manifests of {when:%Y-%m-%d}, expected 1')
        entries: list[list[str]] = []
        for manifest in manifests:
            entries = [line.split('  ', 1) for line in manifest.read_text().splitlines()]
            copy = remote / manifest.name
            if not copy.is_file() or copy.read_bytes() != manifest.read_bytes():
                problems.append(f'{slot}/{manifest.name}: missing or different on the remote')
            for digest, name in entries:
                for where, folder in (('here', local), ('on the remote', remote)):
                    path = folder / name
                    if not path.is_file() or benchmark.sha256_of(path) != digest:
                        problems.append(f'{slot}/{name}: missing or wrong SHA-256 {where}')
        if problems:
            raise RuntimeError(
                f'ppbackup night {night}:\n  ' + '\n  '.join(problems) + f'\n{tail(log)}'
            )
        return len(entries)

    def duplicity_argv(self, action: str) -> list[str]:
        includes = []
        for folder in (self.site / 'app', self.site / 'venv', self.uploads, self.dumps):
            includes += ['--include', str(folder)]
        return [
            'duplicity',
            action,
            '--encrypt-key',
            self.fpr,
            '--gpg-options',
            f'--homedir={self.dup_gnupg} --trust-model=always',
            '--archive-dir',
            str(self.dup_archive),
            '--name',
            NAME,
            '--tempdir',
            str(self.tmp),
            *includes,
            '--exclude',
            '**',
            str(self.home),
            f'file://{self.dup_target}',
        ]

    def night_duplicity(self, night: int) -> dict[str, Any]:
        log = self.logs / f'night{night}-duplicity.log'
        self.dup_target.mkdir(exist_ok=True)
        before = inodes(self.dup_target)
        db_before = database_cpu(self.servers)
        stamp = self.night_time(night).timestamp()
        cpu = wall = 0.0
        for db, template in ((self.pg_db, benchmark.PG_DUMP), (self.my_db, benchmark.MYSQLDUMP)):
            dump = self.dumps / f'{db}.sql'
            used, took = self.measured(
                self.faked(night, shlex.split(template.format(db=db))), log, stdout=dump
            )
            os.utime(dump, (stamp, stamp))
            cpu, wall = cpu + used, wall + took
        db_cpu = database_cpu(self.servers) - db_before
        action = 'full' if night == 1 else 'incr'
        offset = log.stat().st_size
        used, took = self.measured(self.faked(night, self.duplicity_argv(action)), log)
        cpu, wall = cpu + used, wall + took
        sent, by_kind, names = new_bytes(self.dup_target, before, duplicity_kind)
        prefix = 'duplicity-full.' if action == 'full' else 'duplicity-inc.'
        manifests = [n for n in names if n.startswith(prefix) and n.endswith('.manifest.gpg')]
        if len(manifests) != 1:
            raise RuntimeError(
                f'duplicity night {night}: {len(manifests)} new {action} manifests in '
                f'{self.dup_target}, expected 1 (new files: {", ".join(names)})\n{tail(log)}'
            )
        with open(log, 'rb') as handle:
            handle.seek(offset)
            output = handle.read().decode(errors='replace')
        stats = {}
        for line in output.split('[ Backup Statistics ]', 1)[-1].splitlines():
            words = line.split()
            if len(words) >= 2 and words[0].isalpha():
                with contextlib.suppress(ValueError):
                    stats[words[0]] = float(words[1])
        return {
            'sent': sent,
            'sent_by_kind': by_kind,
            'cpu': cpu,
            'wall': wall,
            'db_cpu': db_cpu,
            'new_files': names,
            'statistics': stats,
        }

    def check_duplicity_chain(self, nights: int) -> None:
        """duplicity's own view at the end: one chain of ``nights`` backup sets (not timed)."""
        log = self.logs / 'duplicity-collection-status.log'
        argv = [
            'duplicity',
            'collection-status',
            '--archive-dir',
            str(self.dup_archive),
            '--name',
            NAME,
            '--gpg-options',
            f'--homedir={self.dup_gnupg} --trust-model=always',
            f'file://{self.dup_target}',
        ]
        self.measured(self.faked(nights, argv, dt.timedelta(hours=1)), log)
        found = re.findall(r'Number of contained backup sets: (\d+)', log.read_text())
        if found != [str(nights)]:
            raise RuntimeError(
                f'duplicity collection-status: expected one chain of {nights} backup sets, found '
                f'{found or "none"}:\n{tail(log)}'
            )

    def run(self) -> dict[str, Any]:
        nights: list[dict[str, Any]] = []
        for night in range(1, self.args.nights + 1):
            when = self.night_time(night)
            record: dict[str, Any] = {
                'night': night,
                'clock': f'{when:%Y-%m-%d %H:%M:%S}',
                'slot': f'day{when.isoweekday()}',
                'changes': self.change(night) if night > 1 else None,
            }
            order = ('ppbackup', 'duplicity') if night % 2 else ('duplicity', 'ppbackup')
            for tool in order:
                os.sync()
                record[tool] = (
                    self.night_ppbackup(night)
                    if tool == 'ppbackup'
                    else self.night_duplicity(night)
                )
            record['order'] = list(order)
            nights.append(record)
            ppb, dup = record['ppbackup'], record['duplicity']
            say(
                f'night {night} ({record["clock"]}, {record["slot"]}): ppbackup sent '
                f'{ppb["sent"] / MIB:.2f} MiB, CPU {ppb["cpu"]:.2f} s, wall {ppb["wall"]:.2f} s; '
                f'duplicity sent {dup["sent"] / MIB:.2f} MiB, CPU {dup["cpu"]:.2f} s, wall '
                f'{dup["wall"]:.2f} s'
            )
        self.check_duplicity_chain(self.args.nights)
        latest = self.home / 'backups.insecure'
        return {
            'nights': nights,
            'storage': {
                'ppbackup': {
                    'remote': storage(self.remote),
                    'local_backups': storage(self.home / 'backups'),
                    'local_plaintext': storage(latest),
                },
                'duplicity': {
                    'remote': storage(self.dup_target),
                    'local_archive_dir': storage(self.dup_archive),
                    'local_dumps': storage(self.dumps),
                },
            },
        }


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def mib(value: float) -> str:
    return f'{value / MIB:.2f} MiB'


def ratio(a: float, b: float) -> str:
    return f'{a / b:.2f}' if b else '-'


def summary(results: dict[str, Any]) -> dict[str, Any]:
    nights = results['nights']
    later = nights[1:]
    out: dict[str, Any] = {}
    for tool in ('ppbackup', 'duplicity'):
        first = nights[0][tool]
        out[tool] = {
            'night1': {key: first[key] for key in ('sent', 'cpu', 'wall', 'db_cpu')},
            'later_mean': {
                key: statistics.mean(night[tool][key] for night in later)
                for key in ('sent', 'cpu', 'wall', 'db_cpu')
            },
        }
    return out


def report(args: argparse.Namespace, info: dict[str, Any], results: dict[str, Any]) -> list[str]:
    nights = results['nights']
    n = len(nights)
    means = summary(results)
    raw = info['raw_bytes']
    store = results['storage']
    ppb, dup = means['ppbackup'], means['duplicity']
    later = f'nights 2-{n}' if n > 2 else 'night 2'
    rows = [
        ('night 1: bytes sent', ppb['night1']['sent'], dup['night1']['sent'], mib),
        ('night 1: CPU seconds', ppb['night1']['cpu'], dup['night1']['cpu'], '{:.2f} s'.format),
        ('night 1: wall seconds', ppb['night1']['wall'], dup['night1']['wall'], '{:.2f} s'.format),
        (
            f'{later}: bytes sent a night',
            ppb['later_mean']['sent'],
            dup['later_mean']['sent'],
            mib,
        ),
        (
            f'{later}: CPU seconds a night',
            ppb['later_mean']['cpu'],
            dup['later_mean']['cpu'],
            '{:.2f} s'.format,
        ),
        (
            f'{later}: wall seconds a night',
            ppb['later_mean']['wall'],
            dup['later_mean']['wall'],
            '{:.2f} s'.format,
        ),
        (
            f'storage after {n} nights: remote',
            store['ppbackup']['remote'],
            store['duplicity']['remote'],
            mib,
        ),
        (
            f'storage after {n} nights: local',
            store['ppbackup']['local_backups'],
            store['duplicity']['local_archive_dir'],
            mib,
        ),
    ]
    out = [
        '',
        (
            f'ppbackup against duplicity, {n} nights on {os.cpu_count()} CPUs: site '
            f'{sum(raw.values()) / MIB:.1f} MiB raw (uploads {raw["uploads"] / MIB:.1f} MiB in '
            f'{info["upload_files"]} files, app {raw["app"] / MIB:.1f} MiB in {info["app_files"]}, '
            f'venv {raw["venv"] / MIB:.1f} MiB in {info["venv_files"]}, pg_dump '
            f'{raw["psql"] / MIB:.1f} MiB of {info["pg_rows"]} rows, mysqldump '
            f'{raw["mysql"] / MIB:.1f} MiB of {info["my_rows"]} rows)'
        ),
        f'  faked nights {nights[0]["clock"]} .. {nights[-1]["clock"]} (faketime), ppbackup first '
        'on odd nights, duplicity on even ones',
        f'  {"":<38}{"ppbackup":>14}{"duplicity":>14}{"ppb/dup":>9}',
    ]
    for label, a, b, fmt in rows:
        out.append(f'  {label:<38}{fmt(a):>14}{fmt(b):>14}{ratio(a, b):>9}')
    out.append(
        '  (local: ppbackup ~/backups, hard links once; duplicity its archive dir, the signature '
        'cache;'
    )
    out.append(
        f'   beside them ppbackup keeps {mib(store["ppbackup"]["local_plaintext"])} of plaintext '
        f'in ~/backups.insecure, duplicity {mib(store["duplicity"]["local_dumps"])} of dumps)'
    )
    out.append(
        f"  database servers' CPU a night (not in the CPU above), {later}: ppbackup "
        f'{ppb["later_mean"]["db_cpu"]:.2f} s (dumps, row counts, roles, users), duplicity '
        f'{dup["later_mean"]["db_cpu"]:.2f} s (dumps)'
    )
    changes = [night['changes'] for night in nights if night['changes']]
    if changes:
        c = changes[0]
        out.append(
            f'  before each night after the first: PostgreSQL {c["pg"]["updated"]} rows updated, '
            f'{c["pg"]["inserted"]} inserted, {c["pg"]["deleted"]} deleted; MariaDB '
            f'{c["mysql"]["updated"]}/{c["mysql"]["inserted"]}/{c["mysql"]["deleted"]}; uploads '
            f'mean {statistics.mean(x["added"] for x in changes) / MIB:.2f} MiB added, '
            f'{statistics.mean(x["rewritten"] for x in changes) / MIB:.2f} MiB rewritten, '
            f'{statistics.mean(x["deleted"] for x in changes) / MIB:.2f} MiB deleted, '
            f'{statistics.mean(x["renamed"] for x in changes) / MIB:.2f} MiB renamed'
        )
    load = results['load_before'], results['load_after']
    out.append(
        f'  other load on this host (cores busy with processes not ours): before {load[0]:.2f}, '
        f'after {load[1]:.2f}'
        + ('  <-- NOISY: the wall seconds are not trustworthy' if max(load) > 0.15 else '')
    )
    if args.smoke:
        out.append('  (--smoke: tiny data, the figures say nothing; no figure is judged)')
    columns = (
        (
            'ppbackup',
            ('files', 'psql', 'mysql', 'other'),
            'the files archive, psql, mysql, the rest',
        ),
        ('duplicity', ('difftar', 'sigtar', 'manifest'), 'volumes, signatures, manifests'),
    )
    for tool, kinds, what in columns:
        out += [
            '',
            f'{tool}, every night (MiB sent, and of it {what}):',
            f'  {"night":<7}{"clock":<16}{"slot":<6}{"sent":>8}'
            + ''.join(f'{kind:>9}' for kind in kinds)
            + f'{"CPU s":>8}{"wall s":>8}{"db CPU s":>10}',
        ]
        for night in nights:
            run = night[tool]
            clock = dt.datetime.fromisoformat(night['clock'])
            out.append(
                f'  {night["night"]:<7}{clock:%a %Y-%m-%d} {night["slot"]:<6}'
                f'{run["sent"] / MIB:>8.2f}'
                + ''.join(f'{run["sent_by_kind"].get(kind, 0) / MIB:>9.2f}' for kind in kinds)
                + f'{run["cpu"]:>8.2f}{run["wall"]:>8.2f}{run["db_cpu"]:>10.2f}'
            )
    return out


def next_monday() -> dt.date:
    today = dt.date.today()
    return today + dt.timedelta(days=7 - today.weekday())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--smoke',
        action='store_true',
        help='tiny data (4 MiB of uploads, 2000 + 1000 rows), 2 nights, in seconds: does it still '
        'work? No figure is judged; exits 1 if a run fails',
    )
    sizes = (
        ('--uploads-mb', 'uploads_mb', 'MiB of uploads (os.urandom)'),
        ('--source-files', 'source_files', 'source files of the app'),
        ('--venv-mb', 'venv_mb', 'MiB of the fake virtualenv'),
        ('--pg-rows', 'pg_rows', 'rows of the PostgreSQL database'),
        ('--my-rows', 'my_rows', 'rows of the MariaDB database'),
        ('--nights', 'nights', 'nights (at least 2)'),
    )
    for flag, key, text in sizes:
        parser.add_argument(
            flag, type=int, help=f'{text} ({DEFAULTS[key]}; {SMOKE[key]} with --smoke)'
        )
    parser.add_argument(
        '--start',
        type=dt.date.fromisoformat,
        default=next_monday(),
        help='the date of night 1, YYYY-MM-DD, after today: gpg refuses a key created after the '
        '(faked) clock (default: the next Monday, so that the nights fill day1 .. day7)',
    )
    parser.add_argument(
        '--ppbackup', type=Path, default=benchmark.PPBACKUP, help='ppbackup.py to run'
    )
    parser.add_argument('--tmpdir', help='where to make the throwaway folder (default $TMPDIR)')
    parser.add_argument(
        '--keep', action='store_true', help='keep the throwaway folder (the databases are dropped)'
    )
    parser.add_argument('--json', type=Path, help='also write the results as JSON here')
    parser.add_argument(
        '--timeout',
        type=float,
        default=3600,
        help='seconds a command may take before it is killed and the benchmark fails (3600)',
    )
    args = parser.parse_args(argv)
    for _, key, _ in sizes:
        if getattr(args, key) is None:
            setattr(args, key, (SMOKE if args.smoke else DEFAULTS)[key])
    if args.nights < 2:
        parser.error('--nights must be at least 2')
    if args.start <= dt.date.today():
        parser.error('--start must be after today (the key is made now)')
    missing = [
        program
        for program in (
            'faketime',
            'duplicity',
            'gpg',
            'zstd',
            'tar',
            'rsync',
            'pg_dump',
            'mysqldump',
        )
        if shutil.which(program) is None
    ]
    if missing:
        say(f'missing: {", ".join(missing)} (Debian: apt-get install -y faketime duplicity ...)')
        return 1
    if os.geteuid() != 0:
        say('note: not root; createdb/mysql must work for this user')

    nights = Nights(args)
    started = time.perf_counter()
    try:
        nights.build()
        load_before = benchmark.background_load()
        results = nights.run()
        results['load_before'] = load_before
        results['load_after'] = benchmark.background_load()
        say('\n'.join(report(args, nights.site_info, results)))
        if args.json:
            document = {
                'args': {
                    k: str(v) if isinstance(v, (Path, dt.date)) else v
                    for k, v in vars(args).items()
                },
                'site': nights.site_info,
                'summary': summary(results),
                **results,
            }
            args.json.write_text(json.dumps(document, indent=1))
        seconds = time.perf_counter() - started
        say(f'{"smoke run" if args.smoke else "benchmark"}: every night ran, in {seconds:.0f} s')
        return 0
    except (RuntimeError, subprocess.CalledProcessError) as error:
        detail = getattr(error, 'stderr', None)
        say(f'benchmark FAILED: {error}' + (f'\n{detail}' if detail else ''))
        return 1
    finally:
        nights.cleanup()


if __name__ == '__main__':
    sys.exit(main())
