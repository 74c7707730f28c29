#!/usr/bin/env python3
"""ppbackup: privacy-preserving backups for small organisations.

One nightly cycle, every step checked:

1. dump each MySQL/MariaDB and PostgreSQL database and tar the chosen folders, compressed as they
   stream, into ``~/backups.insecure/latest`` (0700/0600, kept at most 24 hours, for rollbacks);
2. encrypt each file to the *public* keys of the configured recipients into ``~/backups/dayN``, with
   hard links in ``~/backups/wkM`` and a SHA-256 manifest per run: this host cannot read its history;
3. rsync what the manifests name to the remote, check the copy against them, and only then apply
   retention (each backup name to its own runs);
4. mail the admins the outcome.

Three people run it, each with commands of their own:

- the web host's admin: ``ppbackup`` (same as ``ppbackup run``) from cron, ``check``, ``status``,
  ``verify [--remote]``, ``run --dry-run``, ``restore latest`` to roll back within 24 hours, and
  ``demo``; the remote is rsync (a folder, or ssh to a write-only rrsync account) or rclone;
- the backup host: ``watch DIR...``, which keeps what arrived out of the sender's reach, checks it,
  applies retention by its own clock and exports when each run arrived (``first-seen.json``);
- a key holder, with the private key: ``decrypt``, ``list`` (what a run holds), ``restore`` (all,
  some databases, or only files: ``--files DIR [--path P]``) and the weekly ``drill``, on servers
  of its own. After a break-in every run is the attacker's: a run is data, never instructions.

The configuration is the shell-style ``~/ppbackup.cfg`` (``KEY=value``); it is parsed and never
executed. ``ppbackup --help`` lists the commands, ``ppbackup COMMAND --help`` their options.

Exit codes: 0 success, 1 the run failed, 2 bad configuration or usage, 3 a bug (with traceback),
75 another run holds the lock, 130/143 interrupted by SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import difflib
import errno
import fcntl
import functools
import grp
import hashlib
import http.client
import io
import itertools
import json
import logging
import logging.handlers
import math
import os
import posixpath
import pwd
import re
import secrets
import select
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, NoReturn, Sequence

try:
    import gnupg
except ImportError:  # say how to install it rather than show a traceback; nothing was done: 2
    print(
        'ppbackup: python-gnupg is missing: apt-get install python3-gnupg (Debian, Ubuntu), '
        'or pip install python-gnupg',
        file=sys.stderr,
    )
    raise SystemExit(2) from None

__version__ = '1.0.0'

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BUG = 3
EXIT_LOCKED = 75  # EX_TEMPFAIL: cron may simply try again later

BLOCK = 1 << 20  # Python touches bytes, where it must, a MiB at a time
TAIL_BYTES = 4096  # enough of a dump's end to find its trailer
STDERR_TAIL_LINES = 15
PROGRESS_EVERY = 3.0  # seconds between two progress lines of a long stream, on a terminal only
# The promise is no plaintext older than 24 hours. Every invocation removes what is older than an hour
# under that, so that a daily cron job firing at the same minute removes yesterday's plaintext even
# when it then fails (at exactly 24 hours, whether it went would be decided by fractions of a
# second, and it would live until the day after).
PLAINTEXT_EXPIRES = 23 * 3600
CLOCK_SLACK = 300  # a file dated further ahead of the clock than this was made under a wrong clock
KEY_EXPIRY_WARN_DAYS = 30
SHRINK_WARN_RATIO = 0.5
SSH_CONNECT_TIMEOUT = 20
RSYNC_IO_TIMEOUT = 300
KILL_GRACE = 5.0
DUMPS_AT_ONCE = 1  # see make_all: measured on 2 cores, more only adds contention
TMP_PREFIX = '.ppbackup-tmp-'
ATOMIC_SUFFIX = '.tmp'
# How a name is opened relative to a folder fd: never through a symlink, never blocking on a FIFO.
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_OPEN_DIR = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
_OPEN_PATH_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # a configured folder: may be a link
RUN_PREFIX = '.ppbackup-run-'
LOCK_NAME = '.ppbackup.lock'
STATE_SUFFIX = '.state.json'  # one state file per BACKUP_NAME: NAME.state.json
MANIFEST_SUFFIX = '.sha256'
DEFAULT_CONFIG = '~/ppbackup.cfg'
# Debian 12's python3-gnupg; setup.cfg's install_requires says the same.
MIN_PYTHON_GNUPG = (0, 4, 9)
PING_TIMEOUT = 10.0  # seconds a monitoring ping may take, in all; then the run goes on without it
# What in a GnuPG home decides whom we encrypt to (keyrings, trust, options; keyboxd's database).
GNUPG_TRUSTED_FILES = (
    'pubring.kbx',
    'pubring.gpg',
    'trustdb.gpg',
    'gpg.conf',
    'common.conf',
    'tofu.db',
    'public-keys.d',
    'public-keys.d/pubring.db',
)
MAX_TIMEOUT = 7 * 24 * 3600  # a step that needs longer than a week is stuck

# The end-of-dump lines that prove a dump ran to completion (a truncated dump lacks them).
TRAILERS = {
    'psql': b'-- PostgreSQL database dump complete',
    'mysql': b'-- Dump completed',
}
DATABASE_KINDS = tuple(TRAILERS)  # a database's own dump: a shrink is worth a warning
# The artifacts that carry what a database needs around it, and the run's index with row counts.
PG_ROLES = 'pg-roles'
PG_ROLES_TRAILER = b'-- PostgreSQL database cluster dump complete'
MYSQL_USERS = 'mariadb-users'
RUN_INDEX = 'rowcounts'  # the run's index: what each artifact holds, with every table's row count
MYSQL_USERS_SOURCE = '.ppbackup-mariadb-users.sql'
RUN_INDEX_SOURCE = '.ppbackup-rowcounts.json'
INDEX_FORMAT = 1
COMPRESSORS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    # name: (compress argv, decompress argv, file extension)
    'zstd': (('zstd', '-q', '-T0', '-3', '-c'), ('zstd', '-q', '-d', '-c'), '.zst'),
    'gzip': (('gzip', '-c', '-6'), ('gzip', '-d', '-c'), '.gz'),
    'bzip2': (('bzip2', '-c', '-9'), ('bzip2', '-d', '-c'), '.bz2'),
    'xz': (('xz', '-T0', '-c', '-3'), ('xz', '-d', '-c'), '.xz'),
    'none': ((), (), ''),
}
MANIFEST_MAX_ENTRIES = 10000  # a run writes a handful; more is not a manifest ppbackup wrote
MANIFEST_MAX_LINE = 8192  # a longer line is skipped, never held whole


MANIFEST_MAX_BYTES = 1 << 20


# What must never reach a mail or a log even when a program prints it: a value after a key that
# looks like a password (typos too: a .my.cnf "pasword=" comes back as "unknown variable"), the
# value of any option line a client echoes back, "identified by", and a URL's password. "(using
# password: YES)" says only that one was given: it stays.
SECRET_PATTERNS = (
    re.compile(r'(?i)(unknown (?:variable|option) \'[^\'=]*=)([^\']*)(\')'),
    re.compile(r'(?i)\b([A-Za-z][\w-]*)(\s*[=:]\s*)(?!(?:YES|NO)\)|\*\*\*)(\S+)'),
    re.compile(r'(?i)(identified\s+by\s+)(\'[^\']*\'|"[^"]*"|\S+)'),
    re.compile(r'(://[^:/@\s]+:)([^@\s]+)(@)'),
)
SECRET_WORDS = ('pass', 'pwd', 'secret', 'token')
MIN_SECRET_LENGTH = 3  # a shorter "password" would mask every "a" in a message

log = logging.getLogger('ppbackup')


# ---------------------------------------------------------------------------------------------------
# Errors: one type a failed step raises, naming the step; what a message may never say.
# ---------------------------------------------------------------------------------------------------


class BackupError(Exception):
    """A failure the user can act on: ``step`` names where, the message says what and what to do."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, step: str = '', detail: str = '') -> None:
        super().__init__(message)
        self.step = step
        self.detail = detail


class ConfigError(BackupError):
    """Bad configuration or usage: nothing was done."""

    exit_code = EXIT_USAGE


class LockedError(BackupError):
    """Another run holds the lock."""

    exit_code = EXIT_LOCKED


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def os_reason(error: OSError, folder: Path | None = None) -> str:
    """Given an OSError (and the folder written to, where the errno may not say it), return its
    reason for a sentence, with "(disk full)" when the disk is: the one OSError conversion."""
    full = error.errno == errno.ENOSPC or (folder is not None and disk_full(folder))
    return f'{error.strerror or error}' + (' (disk full)' if full else '')


def disk_full(folder: Path) -> bool:
    """Given a folder, return True if its filesystem has (almost) no space left."""
    with contextlib.suppress(OSError):
        info = os.statvfs(folder)
        return info.f_bavail * info.f_frsize < BLOCK
    return False


_known_secrets: set[str] = set()


def secret_like(key: str) -> bool:
    """Given an option name, return True if its value is (probably) a password: typos included."""
    key = key.lower()
    return any(word in key for word in SECRET_WORDS) or (
        difflib.SequenceMatcher(None, key, 'password').ratio() >= 0.75
    )


def remember_secrets(home: Path) -> None:
    """Given $HOME, remember the passwords of ~/.my.cnf, ~/.pgpass and the environment, so that
    mask_secrets hides them wherever a program echoes them, under whatever (misspelt) name."""
    values = [os.environ.get(name, '') for name in ('PGPASSWORD', 'MYSQL_PWD')]
    pgpass = Path(os.environ.get('PGPASSFILE') or home / '.pgpass')
    for path, split in ((home / '.my.cnf', '='), (pgpass, ':')):
        with contextlib.suppress(OSError), open(path, encoding='utf-8', errors='replace') as handle:
            for line in itertools.islice(handle, 1000):
                line = line.strip()
                if split == ':':  # host:port:database:user:password, ":" escaped as "\:"
                    fields = re.split(r'(?<!\\):', line)
                    values.append(fields[-1].replace('\\:', ':') if len(fields) >= 5 else '')
                elif '=' in line and secret_like(line.split('=', 1)[0].strip()):
                    values.append(line.split('=', 1)[1].strip().strip('"\''))
    _known_secrets.update(value for value in values if len(value) >= MIN_SECRET_LENGTH)


def mask_secrets(text: str) -> str:
    """Given text from a program, return it with passwords and tokens replaced by ``***``."""
    for secret in sorted(_known_secrets, key=len, reverse=True):
        text = text.replace(secret, '***')
    text = SECRET_PATTERNS[0].sub(lambda m: m.group(1) + '***' + m.group(3), text)
    text = SECRET_PATTERNS[1].sub(
        lambda m: m.group(1) + m.group(2) + '***' if secret_like(m.group(1)) else m.group(0), text
    )
    text = SECRET_PATTERNS[2].sub(lambda m: m.group(1) + '***', text)
    return SECRET_PATTERNS[3].sub(lambda m: m.group(1) + '***' + m.group(3), text)


def human_size(size: float) -> str:
    """Given a byte count, return it as B, KiB, MiB or GiB."""
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if size < 1024 or unit == 'GiB':
            return f'{size:.0f} {unit}' if unit == 'B' else f'{size:.1f} {unit}'
        size /= 1024
    return f'{size:.1f} TiB'  # pragma: no cover


# ---------------------------------------------------------------------------------------------------
# Configuration: one table of keys; the parser, the errors, the example file and the README follow it.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Key:
    name: str
    field: str  # the Config attribute it fills
    kind: str  # text, words, emails, bool, int, choice, path, path? (empty: None)
    default: str
    required: bool
    help: str
    maximum: int = 0  # for int keys: the largest value that makes sense (a timer takes no more)


KEYS: tuple[Key, ...] = (
    Key(
        'BACKUP_NAME',
        'name',
        'text',
        '',
        True,
        'Name of this backup; it starts every file name (letters, digits, ".", "_", "-").',
    ),
    Key(
        'BACKUP_REMOTE',
        'remote',
        'text',
        '',
        True,
        'rsync destination for ~/backups: user@host:folder or a local folder; or '
        'rclone:REMOTE:PATH for object storage, REMOTE being a remote of rclone.conf.',
    ),
    Key(
        'BACKUP_GPG_RECIPIENT',
        'recipients',
        'words',
        '',
        True,
        'Public keys to encrypt to: full fingerprints (pinned) or user ids/emails (must be valid).',
    ),
    Key(
        'BACKUP_FILES',
        'files',
        'words',
        '',
        False,
        'Folders and files to archive, relative to $HOME or absolute; the crontab is added.',
    ),
    Key(
        'BACKUP_BINARIES',
        'binaries',
        'words',
        '',
        False,
        'Folders archived separately, kept in day slots only (not in week slots).',
    ),
    Key(
        'BACKUP_MYSQL_DB',
        'mysql_dbs',
        'words',
        '',
        False,
        'MySQL/MariaDB databases to dump; credentials come from ~/.my.cnf.',
    ),
    Key(
        'BACKUP_PSQL_DB',
        'psql_dbs',
        'words',
        '',
        False,
        'PostgreSQL databases to dump; credentials come from ~/.pgpass or the PG* variables.',
    ),
    Key(
        'BACKUP_ADMIN_EMAILS',
        'admin_emails',
        'emails',
        '',
        False,
        'Comma-separated addresses that get a mail after every run (via mailx).',
    ),
    Key(
        'ONLY_ONE_DAY',
        'only_one_day',
        'bool',
        '0',
        False,
        '1: keep only the latest run, in backups/day0, with no week slots.',
    ),
    Key(
        'BACKUP_LIMIT_MB',
        'limit_mb',
        'int',
        '0',
        False,
        'Remove whole older runs, oldest first, until ~/backups fits in this many MB (0: no limit).',
        maximum=1 << 30,
    ),
    Key(
        'BACKUP_COMPRESSION',
        'compression',
        'choice:zstd,gzip,bzip2,xz,none',
        'zstd',
        False,
        'Compressor applied as each dump streams.',
    ),
    Key(
        'BACKUP_DIR',
        'backup_dir',
        'path',
        '~/backups',
        False,
        'Folder of encrypted slots (dayN, wkM); this is what goes to the remote.',
    ),
    Key(
        'BACKUP_INSECURE_DIR',
        'insecure_dir',
        'path',
        '~/backups.insecure',
        False,
        'Private folder (0700) for the latest plaintext, kept at most 24 hours.',
    ),
    Key(
        'BACKUP_GNUPGHOME',
        'gnupghome',
        'path',
        '',
        False,
        "GnuPG home holding the recipients' public keys (default: $GNUPGHOME or ~/.gnupg).",
    ),
    Key(
        'BACKUP_MAIL_ON_SUCCESS',
        'mail_on_success',
        'bool',
        '1',
        False,
        '0: mail only on failure or warnings.',
    ),
    Key(
        'BACKUP_DUMP_TIMEOUT',
        'dump_timeout',
        'int',
        '21600',
        False,
        'Seconds one dump (with its row counts) or archive may take, and then its encryption, before '
        'it is killed.',
        maximum=MAX_TIMEOUT,
    ),
    Key(
        'BACKUP_SYNC_TIMEOUT',
        'sync_timeout',
        'int',
        '21600',
        False,
        'Seconds the transfer to the remote may take before it is killed.',
        maximum=MAX_TIMEOUT,
    ),
    Key(
        'BACKUP_SYNC_BWLIMIT',
        'sync_bwlimit',
        'int',
        '0',
        False,
        'Upload bandwidth limit in KiB/s, for rsync and rclone alike (0: no limit).',
        maximum=1 << 30,
    ),
    Key('BACKUP_SYSLOG', 'syslog', 'bool', '0', False, '1: also log to syslog.'),
    Key(
        'BACKUP_METRICS_FILE',
        'metrics_file',
        'path?',
        '',
        False,
        "Prometheus text file rewritten after every run, e.g. for node_exporter's textfile "
        'collector: /var/lib/prometheus/node-exporter/ppbackup.prom (empty: none).',
    ),
    Key(
        'BACKUP_PING_URL',
        'ping_url',
        'text',
        '',
        False,
        'Monitoring URL pinged as healthchecks.io expects: URL/start, then URL or URL/fail '
        '(empty: none).',
    ),
)
KEYS_BY_NAME = {key.name: key for key in KEYS}
NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*$')
EMAIL_RE = re.compile(r'^[^@\s,\-][^@\s,]*@[^@\s,]+$')
FINGERPRINT_RE = re.compile(r'^(0x)?[0-9A-Fa-f]{40}$')
# libpq's settings that cron does not give: accepted in the config (KEY=value or export KEY=value)
# and passed to pg_dump and psql alone. Passwords never: they belong in ~/.pgpass (or ~/.my.cnf).
CLIENT_VARIABLES = (
    'PGHOST',
    'PGHOSTADDR',
    'PGPORT',
    'PGUSER',
    'PGPASSFILE',
    'PGSERVICE',
    'PGSERVICEFILE',
    'PGSSLMODE',
    'PGSSLROOTCERT',
    'PGSSLCERT',
    'PGSSLKEY',
    'PGCONNECT_TIMEOUT',
    'PGAPPNAME',
)
SECRET_VARIABLES = {'PGPASSWORD': '~/.pgpass', 'MYSQL_PWD': '~/.my.cnf'}
# rclone:REMOTE:PATH, REMOTE a name from rclone.conf: never a connection string (":s3,key=..."),
# which would put credentials on rclone's command line and in this file.
RCLONE_REMOTE_RE = re.compile(r'^rclone:([A-Za-z0-9_][A-Za-z0-9_.+@ -]*):([^\n\r]*)$')
VARIABLE_RE = re.compile(r'\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))')


@dataclasses.dataclass(frozen=True)
class Config:
    """The configuration as ``load_config`` made it: a field for each of KEYS (whose table holds
    the defaults; none are repeated here), the file it came from and the user's home."""

    path: Path
    home: Path
    name: str
    remote: str
    recipients: tuple[str, ...]
    files: tuple[str, ...]
    binaries: tuple[str, ...]
    mysql_dbs: tuple[str, ...]
    psql_dbs: tuple[str, ...]
    admin_emails: tuple[str, ...]
    only_one_day: bool
    limit_mb: int
    compression: str
    backup_dir: Path
    insecure_dir: Path
    gnupghome: Path
    mail_on_success: bool
    dump_timeout: int
    sync_timeout: int
    sync_bwlimit: int
    syslog: bool
    metrics_file: Path | None
    ping_url: str
    client_env: tuple[tuple[str, str], ...]  # CLIENT_VARIABLES set in the config


def _scan_value(text: str, pos: int, line: int, known: Mapping[str, str]) -> tuple[str, int, int]:
    """Given config text at the start of a value, return (value, end position, end line).

    Quotes, backslashes and $VAR/${VAR} of known names are honoured as a shell would; anything that
    would run code is refused. Raise ValueError with the reason.
    """
    out: list[str] = []
    quote = ''
    while pos < len(text):
        char = text[pos]
        # Inside quotes every character is literal, except that "..." still sees \, $ and `.
        if quote == "'" or (quote == '"' and char not in '\\$`'):
            if char == quote:
                quote = ''
            else:
                out.append(char)
                line += char == '\n'
            pos += 1
            continue
        if char == '`':
            raise ValueError('backticks would run a command; ppbackup never runs the config')
        if char == '\\':
            nxt = text[pos + 1 : pos + 2]
            if quote == '"' and nxt not in ('$', '`', '"', '\\', '\n'):
                out.append('\\' + nxt)  # inside double quotes a backslash stays, as in sh
            elif nxt != '\n':
                out.append(nxt)
            line += nxt == '\n'
            pos += 2
            continue
        if char == '$':
            match = VARIABLE_RE.match(text, pos)
            if text.startswith('$(', pos):
                raise ValueError('$(...) would run a command; ppbackup never runs the config')
            if text.startswith('${', pos) and not match:
                raise ValueError('only plain ${NAME} expansion is supported')
            if match:
                var = match.group(1) or match.group(2)
                if var not in known:
                    raise ValueError(f'${var} is not an earlier key, HOME or USER')
                out.append(known[var])
                pos = match.end()
                continue
            out.append(char)
            pos += 1
            continue
        if char in '"\'':
            quote = char
            pos += 1
            continue
        if char in ' \t\n#':
            break
        if char in ';&|<>()':
            raise ValueError(f'unquoted {char!r}: quote the value')
        out.append(char)
        pos += 1
    if quote:
        raise ValueError(f'unterminated {quote} quote')
    return ''.join(out), pos, line


def parse_assignments(
    text: str, environ: Mapping[str, str]
) -> tuple[list[tuple[str, str, int]], list[tuple[int, str]]]:
    """Given shell-style config text, return ([(key, value, line)], [(line, error)]).

    Supports KEY=value, export, quotes, comments and $VAR of earlier keys, HOME and USER.
    """
    assignments: list[tuple[str, str, int]] = []
    errors: list[tuple[int, str]] = []
    known = {name: environ[name] for name in ('HOME', 'USER') if name in environ}
    assign_re = re.compile(r'[ \t]*(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_]*)=')
    pos, line = 0, 1
    while pos < len(text):
        end_of_line = text.find('\n', pos)
        end_of_line = len(text) if end_of_line < 0 else end_of_line
        stripped = text[pos:end_of_line].strip()
        if not stripped or stripped.startswith('#'):
            pos, line = end_of_line + 1, line + 1
            continue
        match = assign_re.match(text, pos)
        if not match:
            errors.append((line, f'not a KEY=value assignment: {stripped[:60]!r}'))
            pos, line = end_of_line + 1, line + 1
            continue
        start_line = line
        try:
            value, pos, line = _scan_value(text, match.end(), line, known)
            rest_end = text.find('\n', pos)
            rest = text[pos : len(text) if rest_end < 0 else rest_end]
            if rest.strip() and not rest.strip().startswith('#'):
                raise ValueError('a space in an unquoted value: quote the whole value')
            # A trailing comment needs whitespace before it, as in the shell: a#b is one word.
            if rest.strip().startswith('#') and rest[:1] not in (' ', '\t'):
                raise ValueError('"#" inside an unquoted value: quote the value')
        except ValueError as error:
            errors.append((start_line, f'{match.group(1)}: {error}'))
            rest_end = text.find('\n', match.end())
            pos = len(text) if rest_end < 0 else rest_end + 1
            line = start_line + 1
            continue
        assignments.append((match.group(1), value, start_line))
        known[match.group(1)] = value
        pos = len(text) if rest_end < 0 else rest_end + 1
        line += 1
    return assignments, errors


def _convert(key: Key, raw: str, home: Path) -> tuple[Any, str]:
    """Given a key and its raw string, return (typed value, error or '')."""
    kind = key.kind
    if kind == 'text':
        return raw.strip(), ''
    if kind == 'words':
        try:
            return tuple(shlex.split(raw)), ''
        except ValueError as error:
            return (), f'cannot split into words: {error}'
    if kind == 'emails':
        emails = tuple(part.strip() for part in raw.split(',') if part.strip())
        bad = [email for email in emails if not EMAIL_RE.match(email)]
        return emails, f'not an email address: {", ".join(bad)}' if bad else ''
    if kind == 'bool':
        lowered = raw.strip().lower()
        if lowered in ('1', 'yes', 'true', 'on'):
            return True, ''
        if lowered in ('', '0', 'no', 'false', 'off'):
            return False, ''
        return False, f'expected 1 or 0, got {raw!r}'
    if kind == 'int':
        if not re.fullmatch(r'[0-9]+', raw.strip()):
            return 0, f'expected a whole number, got {raw!r}'
        digits = raw.strip().lstrip('0') or '0'
        if key.maximum and (len(digits) > len(str(key.maximum)) or int(digits) > key.maximum):
            return 0, f'at most {key.maximum}, got {digits[:30]}'
        return int(digits), ''
    if kind.startswith('choice:'):
        choices = kind.split(':', 1)[1].split(',')
        if raw.strip() not in choices:
            return raw, f'expected one of {", ".join(choices)}, got {raw!r}'
        return raw.strip(), ''
    if kind == 'path?' and not raw.strip():
        return None, ''
    if kind in ('path', 'path?'):
        text = raw.strip()
        if text.startswith('~/') or text == '~':
            return home / text[2:], ''
        return home / text, ''  # an absolute path stays absolute
    raise AssertionError(f'unknown kind {kind}')  # pragma: no cover


def config_path_from(argument: str | None) -> Path:
    """Given --config (or None), return the config path: the argument, $PPBACKUP_CONFIG or ~/..."""
    chosen = argument or os.environ.get('PPBACKUP_CONFIG') or DEFAULT_CONFIG
    return Path(os.path.expanduser(chosen))


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Given a config path, return the validated Config. Raise ConfigError listing every problem."""
    environ = os.environ if environ is None else environ
    home = Path(environ.get('HOME') or os.path.expanduser('~'))
    env = {'HOME': str(home), 'USER': environ.get('USER') or pwd.getpwuid(os.getuid()).pw_name}
    try:
        text = path.read_text(encoding='utf-8-sig')  # an editor's byte-order mark is not a key
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(
            f'cannot read config {path}: {error}. Copy ppbackup.cfg.example there, '
            'or name another file with --config.',
            step='config',
        ) from error
    problems = [
        f'{problem} (whoever can change the config can redirect the backups; refusing it)'
        for problem in changers_of(path, (os.getuid(),))
    ]
    for number, line_text in enumerate(text.split('\n'), 1):
        # A NUL cannot reach an argv (ValueError), and other control bytes are never meant.
        if re.search(r'[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]', line_text):
            problems.append(f'{path}:{number}: a control character (a NUL byte?) in the line')
    assignments, errors = parse_assignments(text, env)
    problems += [f'{path}:{line}: {message}' for line, message in errors]
    raw: dict[str, str] = {}
    client_env: dict[str, str] = {}
    for name, value, line in assignments:
        if name in CLIENT_VARIABLES:
            client_env[name] = value
            continue
        if name in SECRET_VARIABLES:
            problems.append(
                f'{path}:{line}: {name}: a password never goes in the config (it would show in '
                f'the environment of every dump); put it in {SECRET_VARIABLES[name]}, chmod 600'
            )
            continue
        if name not in KEYS_BY_NAME:
            known_names = [*KEYS_BY_NAME, *CLIENT_VARIABLES]
            close = difflib.get_close_matches(name, known_names, n=1, cutoff=0.6)
            hint = f'; did you mean {close[0]}?' if close else ''
            problems.append(f'{path}:{line}: unknown key {name}{hint}')
            continue
        raw[name] = value
    values: dict[str, Any] = {}
    for key in KEYS:
        text_value = raw.get(key.name, key.default)
        if key.required and not text_value.strip():
            problems.append(f'{path}: {key.name} is required: {key.help}')
            continue
        value, message = _convert(key, text_value, home)
        if message:
            problems.append(f'{path}: {key.name}: {message}')
        values[key.name] = value
    if not problems:
        problems += _check_values(values)
    if problems:
        raise ConfigError(
            f'{len(problems)} problem(s) in the configuration',
            step='config',
            detail='\n'.join(problems),
        )
    gnupghome = (
        values['BACKUP_GNUPGHOME']
        if raw.get('BACKUP_GNUPGHOME', '').strip()
        else Path(environ.get('GNUPGHOME') or home / '.gnupg')
    )
    fields = {key.field: values[key.name] for key in KEYS}
    fields['gnupghome'] = gnupghome
    return Config(path=path, home=home, client_env=tuple(sorted(client_env.items())), **fields)


def client_environ(config: Config) -> dict[str, str] | None:
    """Return the environment for a database client: ours plus the config's PG* settings (None:
    ours unchanged)."""
    return {**os.environ, **dict(config.client_env)} if config.client_env else None


def _check_values(values: Mapping[str, Any]) -> list[str]:
    """Given typed config values, return the problems that involve their meaning."""
    problems = []
    if not NAME_RE.match(values['BACKUP_NAME']):
        problems.append('BACKUP_NAME: use letters, digits, ".", "_" and "-", not starting with "-"')
    if values['BACKUP_REMOTE'].startswith('-'):
        problems.append('BACKUP_REMOTE: must not start with "-" (it would be taken as an option)')
    if values['BACKUP_REMOTE'].startswith('rclone:') and not RCLONE_REMOTE_RE.match(
        values['BACKUP_REMOTE']
    ):
        problems.append(
            'BACKUP_REMOTE: write rclone:REMOTE:PATH, REMOTE being the name of a remote in '
            "rclone.conf (letters, digits, '_', '-', '.'); its credentials belong in rclone.conf, "
            'never in this file'
        )
    for name in ('BACKUP_MYSQL_DB', 'BACKUP_PSQL_DB', 'BACKUP_GPG_RECIPIENT'):
        for word in values[name]:
            # pg_dump takes "a=b ..." and "postgresql://..." as a connection string: its password
            # would reach argv, file names, manifest, mail and state. The word is not repeated.
            if name == 'BACKUP_PSQL_DB' and ('=' in word or re.match(r'(?i)postgres(ql)?:', word)):
                problems.append(
                    'BACKUP_PSQL_DB: a connection string is not a database name; give the name '
                    'only and put the password in ~/.pgpass (chmod 600)'
                )
                continue
            if word.startswith('-'):
                problems.append(f'{name}: {word!r} must not start with "-"')
            if name != 'BACKUP_GPG_RECIPIENT' and '/' in word:
                problems.append(f'{name}: {word!r} must not contain "/"')
    if not (values['BACKUP_FILES'] or values['BACKUP_MYSQL_DB'] or values['BACKUP_PSQL_DB']):
        problems.append('nothing to back up: set BACKUP_FILES, BACKUP_MYSQL_DB or BACKUP_PSQL_DB')
    # Resolved: through a symlinked parent the plaintext could sit inside what is synced.
    backup_dir = Path(os.path.realpath(values['BACKUP_DIR']))
    insecure_dir = Path(os.path.realpath(values['BACKUP_INSECURE_DIR']))
    if (
        backup_dir == insecure_dir
        or insecure_dir in backup_dir.parents
        or backup_dir in insecure_dir.parents
    ):
        problems.append(
            'BACKUP_DIR and BACKUP_INSECURE_DIR must be separate folders: plaintext '
            'must never be synced'
        )
    for name in ('BACKUP_DUMP_TIMEOUT', 'BACKUP_SYNC_TIMEOUT'):
        if values[name] < 1:
            problems.append(f'{name}: must be at least 1 second')
    ping_url = values['BACKUP_PING_URL']
    if ping_url and not re.match(r'(?i)https?://[^/\s]+', ping_url):
        problems.append('BACKUP_PING_URL: give an http:// or https:// URL')
    return problems


# ---------------------------------------------------------------------------------------------------
# Processes: every child goes through here. Argv lists only; each pipeline gets its own process group
# so that a timeout or a signal stops all of it; every exit status is checked. GnuPG (python-gnupg)
# runs its gpg inside the caller's Pipeline, so that it is timed and killed like any other child.
# ---------------------------------------------------------------------------------------------------


_live_groups: set[int] = set()
_live_lock = threading.Lock()


def _group_alive(pgid: int) -> bool:
    """Given a process group, return True while a member of it still runs. A zombie does not count:
    it is dead and waits only to be reaped, which Pipeline does after the kill."""
    try:
        entries = os.listdir('/proc')
    except OSError:
        entries = []
    if not entries:  # no /proc: ask the kernel, which counts zombies too
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat', 'rb') as handle:
                fields = handle.read().rsplit(b')', 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        # After the command name: state, ppid, pgrp.
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b'Z', b'X'):
            return True
    return False


def nap(seconds: float) -> None:
    """Sleep a moment, through poll(2) and its relative timeout. Python 3.11's time.sleep waits for
    an absolute deadline (clock_nanosleep, TIMER_ABSTIME), which a faked clock (libfaketime, as in
    the tests) can turn into EINVAL: the kill loop below must never fail half way."""
    select.poll().poll(seconds * 1000)


def _kill_group(pgid: int, grace: float = KILL_GRACE) -> None:
    """Given a process group, send SIGTERM, then SIGKILL to whatever still runs after ``grace``.
    Children that die at once end the wait at once."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not _group_alive(pgid):
                return
            nap(0.02)
        os.killpg(pgid, signal.SIGKILL)


def kill_all_children() -> None:
    """Stop every process group this run started (used on signals and fatal errors)."""
    with _live_lock:
        groups = list(_live_groups)
    for pgid in groups:
        _kill_group(pgid, grace=1.0)


def _dies_with_us(argv: Sequence[str]) -> list[str]:
    """Given an argv, return it run through ``setpriv --pdeathsig KILL``: the child is killed by the
    kernel when ppbackup dies, even by kill -9 (no Python runs between fork and exec)."""
    if shutil.which('setpriv'):
        return ['setpriv', '--pdeathsig', 'KILL', '--', *argv]
    return list(argv)


def _program_missing(program: str) -> BackupError:
    return BackupError(
        f'{program} is not installed or not on PATH; install it (see README '
        '"Prerequisites") or fix PATH'
    )


class Pipeline:
    """Processes started in one process group, killed together, each one's stderr kept for errors.

    Use as a context manager: leaving it kills whatever still runs. ``check()`` waits for every
    process and raises BackupError naming the first real failure, with the tail of its stderr.
    """

    def __init__(self, what: str, step: str, timeout: float | None = None) -> None:
        self.what = what
        self.step = step
        self.timeout = timeout
        self.pgid = 0
        self.procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
        self.names: list[str] = []  # each process's program, for messages
        self.timed_out = False
        self._timer: threading.Timer | None = None

    def start(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Given an argv and Popen arguments, start it in this pipeline's group and return it."""
        if not shutil.which(argv[0]):
            raise _program_missing(argv[0])
        stderr = tempfile.TemporaryFile()
        kwargs.setdefault('stdin', subprocess.DEVNULL)
        try:
            proc = subprocess.Popen(
                _dies_with_us(argv), stderr=stderr, process_group=self.pgid, **kwargs
            )
        except OSError as error:
            stderr.close()
            raise BackupError(f'cannot start {argv[0]}: {error}', step=self.step) from error
        self._track(proc, stderr, Path(argv[0]).name)
        return proc

    def adopt(self, proc: subprocess.Popen[bytes], name: str) -> None:
        """Given a process that leads a group of its own, started elsewhere (python-gnupg's gpg),
        track it as this pipeline's: its timeout and signals reach it."""
        self._track(proc, tempfile.TemporaryFile(), name)

    def _track(self, proc: subprocess.Popen[bytes], stderr: IO[bytes], name: str) -> None:
        if not self.pgid:  # the first process leads the group; the clock starts with it
            self.pgid = proc.pid
            with _live_lock:
                _live_groups.add(self.pgid)
            if self.timeout:
                self._timer = threading.Timer(self.timeout, self._expire)
                self._timer.daemon = True
                self._timer.start()
        self.procs.append((proc, stderr))
        self.names.append(name)

    def _expire(self) -> None:
        self.timed_out = True
        if self.pgid:
            _kill_group(self.pgid)

    def stderr_tail(self, proc_index: int) -> str:
        """Given a process index, return the last lines of its stderr, secrets masked."""
        stderr = self.procs[proc_index][1]
        stderr.seek(0, os.SEEK_END)
        stderr.seek(max(0, stderr.tell() - 8192))
        lines = stderr.read().decode('utf-8', 'replace').splitlines()[-STDERR_TAIL_LINES:]
        return mask_secrets('\n'.join(lines))

    def check(
        self, allowed: Mapping[int, Sequence[int]] | None = None, downstream_broke: bool = False
    ) -> list[int]:
        """Wait for every process; return their exit codes, or raise BackupError for a failure.

        ``allowed`` maps a process index to extra exit codes that count as success (tar's 1).
        The first failure upstream is the cause, unless ``downstream_broke`` (a reader died and
        its writer only got EPIPE) or the upstream one was merely killed by SIGPIPE.
        """
        codes = [proc.wait() for proc, _ in self.procs]
        if self.timed_out:
            raise BackupError(
                f'{self.what}: timeout after {self.timeout:.0f} s; the process group was killed',
                step=self.step,
                detail=self._all_tails(),
            )
        allowed = allowed or {}
        failed = [
            index
            for index, code in enumerate(codes)
            if code != 0 and code not in allowed.get(index, ())
        ]
        causes = [index for index in failed if codes[index] != -signal.SIGPIPE] or failed
        if downstream_broke:
            causes.reverse()
        if causes:
            index = causes[0]
            program = self.names[index]
            code = codes[index]
            how = f'was killed by {signal.Signals(-code).name}' if code < 0 else f'exited {code}'
            tail = self.stderr_tail(index)
            hint = ' (disk full)' if 'No space left' in tail else ''
            raise BackupError(f'{self.what}: {program} {how}{hint}', step=self.step, detail=tail)
        return codes

    def _all_tails(self) -> str:
        return '\n'.join(self.stderr_tail(index) for index in range(len(self.procs)))

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer:
            self._timer.cancel()
        if self.pgid:
            if any(proc.poll() is None for proc, _ in self.procs):
                _kill_group(self.pgid)
            for proc, _ in self.procs:
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    proc.wait(timeout=KILL_GRACE)
            with _live_lock:
                _live_groups.discard(self.pgid)
        for proc, stderr in self.procs:
            stderr.close()
            for stream in (proc.stdin, proc.stdout):
                if stream:
                    with contextlib.suppress(OSError):
                        stream.close()


def run_command(
    argv: Sequence[str],
    *,
    what: str,
    step: str,
    timeout: float = 60,
    input_bytes: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    ok_codes: Sequence[int] = (0,),
) -> tuple[int, str]:
    """Given an argv, run it to completion; return (exit code, stdout text).

    Raise BackupError when it exits with a code outside ``ok_codes`` or outlives ``timeout``.
    """
    with Pipeline(what, step, timeout) as pipe:
        proc = pipe.start(
            argv,
            stdin=subprocess.PIPE if input_bytes is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
        out, _ = proc.communicate(input_bytes)
        codes = pipe.check({0: [code for code in ok_codes if code]})
        return codes[0], out.decode('utf-8', 'replace')


def _widen_pipe(stream: IO[bytes] | None) -> None:
    # Larger pipes mean fewer wake-ups per MiB; not every kernel lets us, and that is fine.
    if stream is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, BLOCK)


@dataclasses.dataclass
class Streamed:
    raw_bytes: int
    tail: bytes
    codes: list[int]


def stream_to_file(
    producer: Sequence[str],
    compressor: Sequence[str],
    out_fd: int,
    *,
    what: str,
    step: str,
    timeout: float,
    cwd: Path | None = None,
    allowed: Sequence[int] = (),
    env: Mapping[str, str] | None = None,
) -> Streamed:
    """Given a producer argv and a compressor argv, stream producer | compressor into ``out_fd``.

    Python sits between the two only to count the bytes, keep the last few KiB (for the trailer check)
    and report progress; it copies in large blocks. Raise BackupError if any process fails.
    """
    with Pipeline(what, step, timeout) as pipe:
        source = pipe.start(producer, stdout=subprocess.PIPE, cwd=cwd, env=env)
        sink = pipe.start(compressor, stdin=subprocess.PIPE, stdout=out_fd) if compressor else None
        assert source.stdout is not None
        _widen_pipe(source.stdout)
        dest_fd = sink.stdin.fileno() if sink and sink.stdin else out_fd
        if sink:
            _widen_pipe(sink.stdin)
        count, tail = 0, b''
        progress = Progress(what)
        broken = False
        try:
            while block := os.read(source.stdout.fileno(), BLOCK):
                count += len(block)
                tail = (tail + block[-TAIL_BYTES:])[-TAIL_BYTES:]
                view = memoryview(block)
                while view:
                    view = view[os.write(dest_fd, view) :]
                progress.update(count)
        except BrokenPipeError:
            broken = True  # the compressor died; check() names it
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            raise BackupError(f'{what}: cannot write: {os_reason(error)}', step=step) from error
        finally:
            progress.done(count)
            if sink and sink.stdin:
                with contextlib.suppress(OSError):
                    sink.stdin.close()
            if broken or pipe.timed_out:
                source.stdout.close()
        codes = pipe.check({0: allowed}, downstream_broke=broken)
        return Streamed(count, tail, codes)


class Progress:
    """On a terminal, log bytes so far and the rate every few seconds; under cron, nothing."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.start = self.last = time.monotonic()
        self.enabled = log.isEnabledFor(logging.INFO) and sys.stderr.isatty()

    def update(self, count: int) -> None:
        now = time.monotonic()
        if self.enabled and now - self.last >= PROGRESS_EVERY:
            self.last = now
            log.info(
                '  %s: %s so far, %s/s',
                self.what,
                human_size(count),
                human_size(count / max(now - self.start, 1e-6)),
            )

    def done(self, count: int) -> None:
        if self.enabled and time.monotonic() - self.start >= PROGRESS_EVERY:
            self.update(count)


_thread_pipeline = threading.local()


class GnuPG(gnupg.GPG):  # type: ignore[misc]
    """python-gnupg, with its gpg children in a tracked process group (for timeouts and signals)."""

    def _open_subprocess(
        self, args: list[str], passphrase: bool = False
    ) -> subprocess.Popen[bytes]:
        if not shutil.which(self.gpgbinary):
            raise _program_missing(self.gpgbinary)
        proc = subprocess.Popen(
            _dies_with_us(self.make_args(args, passphrase)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=getattr(self, 'env', None),  # python-gnupg < 0.5.1 has no env: inherit ours
            process_group=0,
        )
        pipeline: Pipeline | None = getattr(_thread_pipeline, 'current', None)
        if pipeline is not None:  # encryption: under the artifact's timeout
            pipeline.adopt(proc, 'gpg')
            return proc
        with _live_lock:
            _live_groups.add(proc.pid)
        threading.Thread(target=self._forget_group, args=(proc,), daemon=True).start()
        return proc

    @staticmethod
    def _forget_group(proc: subprocess.Popen[bytes]) -> None:
        proc.wait()
        with _live_lock:
            _live_groups.discard(proc.pid)


# ---------------------------------------------------------------------------------------------------
# Files: private by construction, symlinks never followed, one atomic writer, one hasher, the lock.
# ---------------------------------------------------------------------------------------------------


def ensure_private_dir(path: Path) -> None:
    """Given a folder, create it if needed and make it 0700. Raise BackupError if it is a symlink
    or not ours: plaintext must not land anywhere else."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
    except OSError as error:
        raise BackupError(f'cannot create {path}: {os_reason(error)}', step='prepare') from error
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise BackupError(
            f'{path} is a symlink or not a folder; refusing to follow it. Remove it and run again',
            step='prepare',
        )
    if info.st_uid != os.getuid():
        raise BackupError(f'{path} is owned by uid {info.st_uid}, not by this user', step='prepare')
    if stat.S_IMODE(info.st_mode) != 0o700:
        try:
            os.chmod(path, 0o700)
        except OSError as error:
            raise BackupError(f'cannot chmod {path}: {error.strerror}', step='prepare') from error


def create_private_file(path: Path) -> int:
    """Given a path, create it new (never through a symlink), 0600, and return its fd."""
    try:
        return os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except OSError as error:
        raise BackupError(f'cannot create {path}: {os_reason(error)}', step='prepare') from error


def temp_name(final: Path) -> Path:
    """Given a final path, return a unique temporary path beside it that a later run sweeps."""
    return final.with_name(f'{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{final.name}')


def temp_target(name: str) -> str:
    """Given a temporary's name (see ``temp_name``), return the final name it was made for."""
    parts = name[len(TMP_PREFIX) :].removesuffix(ATOMIC_SUFFIX).split('-', 2)
    return parts[2] if name.startswith(TMP_PREFIX) and len(parts) == 3 else ''


def atomic_temp_name(final: Path) -> Path:
    """The temporary ``write_atomically`` writes: not *.prom (node_exporter's textfile collector
    reads every *.prom file in its folder, a temporary too)."""
    tmp = temp_name(final)
    return tmp.with_name(tmp.name + ATOMIC_SUFFIX)


def write_atomically(
    folder: Path | int, name: str, data: bytes, *, mode: int = 0o600, mtime: float | None = None
) -> None:
    """Given a folder (a path, or an fd opened O_NOFOLLOW) and a name in it, replace that name with
    ``data`` whole: the one atomic writer. Raise OSError; the temporary is gone by then.

    Order: a new temporary beside it (O_EXCL, never through a symlink; a later run sweeps it if
    we die), ``mode``, ``mtime``, fsync, rename over the name, fsync of the folder. A reader opens
    the old inode or the new one, never half of one, and after a crash the name holds one of them.
    """
    dir_fd = folder if isinstance(folder, int) else os.open(folder, _OPEN_PATH_DIR)
    tmp = atomic_temp_name(Path(name)).name
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
        with os.fdopen(fd, 'wb') as handle:
            os.fchmod(fd, mode)  # our umask is 077; the metrics file is 0644
            handle.write(data)
            handle.flush()
            if mtime is not None:
                os.utime(fd, (mtime, mtime))
            os.fsync(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    finally:
        if not isinstance(folder, int):
            os.close(dir_fd)


def fsync_dir(folder: Path) -> None:
    """Given a folder, make the renames and links in it durable."""
    fd = os.open(folder, _OPEN_PATH_DIR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digests(file: Path | int, names: Iterable[str] = ('sha256',)) -> dict[str, str]:
    """Given a file (a path, or an fd read from its start) and hash names (sha256, md5, sha1),
    return {name: hex digest}, the file read once, a block at a time: the one hasher."""
    hashers = {name: hashlib.new(name) for name in names}
    fd = file if isinstance(file, int) else os.open(file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        while block := os.read(fd, BLOCK):
            for hasher in hashers.values():
                hasher.update(block)
    finally:
        if not isinstance(file, int):
            os.close(fd)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def sha256_of(file: Path | int) -> str:
    return file_digests(file)['sha256']


def remove_path(path: Path) -> None:
    """Given a path, remove it (a folder recursively) without following symlinks; ignore missing."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)


def _open_in(dir_fd: int, name: str, flags: int = _OPEN_FILE) -> int:
    """Given a folder fd and a name in it, open it without following a symlink; raise OSError."""
    return os.open(name, flags, dir_fd=dir_fd)


class OpenFolder:
    """A subfolder's fd, opened O_NOFOLLOW relative to its parent's fd (and made 0700 first if
    ``create``), for a ``with`` block that closes it. It opens when made, not when entered: an
    OSError from making it is the folder's, one from inside the block is the block's."""

    def __init__(self, parent_fd: int, name: str, create: bool = False) -> None:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=parent_fd)
        self.fd = _open_in(parent_fd, name, _OPEN_DIR)

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *_: object) -> None:
        os.close(self.fd)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _has_acl(path: Path) -> bool:
    """Whether ``path`` has a POSIX access ACL: then its group bits bound named users too."""
    try:
        return 'system.posix_acl_access' in os.listxattr(path)
    except OSError:
        return False


def _can_search(writers: _Writers, folder: os.stat_result, trusted: set[int], acl: bool) -> bool:
    """Whether ``writers`` may search (enter) a folder. Conservative where a person's groups are
    not known: someone outside the folder's group uses its other bits, someone in it its group
    bits, and a writer might be either unless the folder's group is the very group they are (or
    are not) in. The folder's owner (if not trusted) might be one of them."""
    if folder.st_uid not in trusted:
        return True
    mode = folder.st_mode
    if acl or writers.kind == 'anyone' or folder.st_gid != writers.gid:
        return bool(mode & 0o011)
    return bool(mode & (0o010 if writers.kind == 'group' else 0o001))


def _changers(path: Path, info: os.stat_result, trusted: set[int], what: str) -> str:
    """Given a real path and its stat, return the sentence naming who but its owner and root can
    write it and reach it (search every folder from / down to it), or ''."""
    mode = stat.S_IMODE(info.st_mode)
    if not mode & 0o022 or (stat.S_ISDIR(info.st_mode) and mode & stat.S_ISVTX):
        return ''  # in a sticky folder others may add names, not replace ours
    group = _group_name(info.st_gid)
    writers = []
    if mode & 0o020:
        if _has_acl(path):
            writers.append(_Writers('the users and groups its ACL names', 'anyone', info.st_gid))
        else:
            writers.append(_Writers(f'members of group {group}', 'group', info.st_gid))
    if mode & 0o002:
        writers.append(_Writers('others', 'others', info.st_gid))
    if mode & 0o022 == 0o022:
        written = f'group or others (group {group}, mode {mode:o})'
    else:
        written = f'group {group} (mode {mode:o})' if mode & 0o020 else f'others (mode {mode:o})'
    fix = f'chmod {"go" if mode & 0o022 == 0o022 else "g" if mode & 0o020 else "o"}-w {path}'
    parents = list(reversed(path.parents))  # from / down
    folders = [(parent, parent.stat()) for parent in parents]
    reached = [
        who
        for who in writers
        if all(
            _can_search(who, folder, trusted, _has_acl(name) and bool(folder.st_mode & 0o010))
            for name, folder in folders
        )
    ]
    if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
        reach = f'it has {info.st_nlink} names (hard links), which others may reach elsewhere'
    elif not reached:
        return ''
    else:
        through = (
            f' through {folders[-1][0]} (mode {stat.S_IMODE(folders[-1][1].st_mode):o})'
            if folders
            else ''
        )
        reach = f'{" and ".join(who.text for who in reached)} can reach it{through}'
    return f'{path} is writable by {written} and {reach}{what}: {fix}'


def changers_of(path: Path, owners: Sequence[int]) -> list[str]:
    """Given a path and the uids that may own it, return one sentence for each way that someone
    but its owner and root could change it (each says who, and the chmod that ends it).

    Access, not bits: a path is changed by whoever owns it, or can write it AND reach it (search
    every folder from / down to it: a group-writable keyring inside a 0700 ~/.gnupg is no way in),
    or can write (and reach) a folder on the way, without the sticky bit, and so swap what is below;
    every folder on the way must be owned by an owner or root. Folders are those of the path as
    written and as resolved (a symlink on the way is replaced by whoever writes its folder); reach
    is judged on the resolved path. Group memberships are not looked up (they change): a writer
    may be in any group but the one whose bits say otherwise (see _can_search), and anyone may
    be named by an ACL. A file with more than one name (hard link) is taken as reachable."""
    trusted = {*owners, 0}
    written = Path(os.path.abspath(path))
    real = Path(os.path.realpath(path))
    try:
        info = real.stat()
    except FileNotFoundError:
        return []
    except OSError as error:
        return [f'{path}: {error.strerror}']
    if info.st_uid not in owners:
        return [f'{path} is owned by uid {info.st_uid}, not by this user']
    chain = set(real.parents)
    for folder in written.parents:  # a symlink on the way: its folder, and where it leads
        resolved = Path(os.path.realpath(folder))
        chain |= {resolved, *resolved.parents}
    folders = sorted(chain, key=lambda folder: (len(folder.parts), str(folder)))
    problems: list[str] = []
    try:
        for folder in folders:
            folder_info = folder.stat()
            if folder_info.st_uid not in trusted:
                problems.append(
                    f'{folder} is owned by uid {folder_info.st_uid}, who can replace what is in it'
                )
                continue
            problems.append(
                _changers(folder, folder_info, trusted, ', so they can replace what is in it')
            )
        problems.append(_changers(real, info, trusted, ''))
    except OSError as error:
        return [f'{path}: a folder on the way cannot be looked at: {error}']
    return [problem for problem in problems if problem]


@contextlib.contextmanager
def run_lock(config: Config) -> Iterator[None]:
    """Hold the run lock (flock, released by the kernel if we die). Raise LockedError if taken."""
    ensure_private_dir(config.insecure_dir)
    lock_path = config.insecure_dir / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as error:  # out of inodes or space, read-only, a planted symlink...
        raise BackupError(
            f'cannot create the lock {lock_path}: {os_reason(error)}', step='lock'
        ) from error
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise LockedError(
                f'another ppbackup run holds {lock_path}; nothing was done', step='lock'
            ) from error
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------
# Runs and slots: run ids, slot names, and manifests read and written. One set of names serves
# the lenient reader (the web host reading its own) and the strict one (what arrived is untrusted).
# ---------------------------------------------------------------------------------------------------


# A run id is YYYYMMDD-HHMMSS[-N]; HHxx is the hour-only id of runs made before run ids existed.
# The one set of names that runs and slots are read by, leniently (retention, verify, the sender)
# and strictly (watch, restore: what arrived is untrusted).
RUN_ID_PATTERN = r'[0-9]{8}-[0-9]{6}(?:-[0-9]+)?|[0-9]{2}xx'
SLOT_RE = re.compile(r'(day|wk)[0-9]+')
SHA256_RE = re.compile(r'[0-9a-f]{64}')
MANIFEST_LINE_RE = re.compile(r'([0-9a-f]{64}) [ *](.*)')  # sha256sum's "DIGEST  NAME"
RUN_NAME_RE = re.compile(rf'(.+?)-(?:{RUN_ID_PATTERN}){re.escape(MANIFEST_SUFFIX)}')
ARTIFACT_KINDS = ('mysql', 'psql', 'files', 'binaries', PG_ROLES, MYSQL_USERS, RUN_INDEX)


def slot_names(config: Config, when: dt.datetime) -> tuple[str, str | None]:
    """Given the run's time, return (day slot, week slot or None with ONLY_ONE_DAY)."""
    if config.only_one_day:
        return 'day0', None
    return f'day{when.isoweekday()}', f'wk{when.isocalendar().week}'


@functools.lru_cache(maxsize=8)
def _own_names(name: str) -> re.Pattern[str]:
    return re.compile(
        rf'{re.escape(name)}-(?:(?P<manifest>{RUN_ID_PATTERN}){re.escape(MANIFEST_SUFFIX)}'
        rf'|(?:{"|".join(ARTIFACT_KINDS)})(?:-.+)?-(?P<artifact>{RUN_ID_PATTERN})\.(?:sql|tar|json)'
        rf'(?:{"|".join(re.escape(ext) for _, _, ext in COMPRESSORS.values() if ext)})?'
        r'(?:\.gpg)?)',
        re.DOTALL,
    )


def run_id_of(name: str, filename: str) -> str:
    """Given a BACKUP_NAME and a file name, return the run id if the file is one that backup writes
    (a manifest NAME-ID.sha256, an artifact NAME-KIND[-DB]-ID.EXT[.gpg] or its plaintext), else ''.
    Retention, sweeping and latest/ touch only such files: configs sharing a folder keep apart."""
    match = _own_names(name).fullmatch(filename)
    return (match.group('manifest') or match.group('artifact')) if match else ''


def choose_run_id(config: Config, when: dt.datetime, folders: Sequence[Path]) -> str:
    """Given the run's start and the folders it writes to, return its id, YYYYMMDD-HHMMSS (local
    time), with a -N suffix if a file of this backup in one of them already carries that id: an
    earlier run's files are never renamed over, whatever the clock says."""
    base = f'{when:%Y%m%d-%H%M%S}'
    run_id, number = base, 1
    while any(
        (folder / f'{config.name}-{run_id}{MANIFEST_SUFFIX}').exists()
        or any(folder.glob(f'{config.name}-*-{run_id}.*'))
        for folder in folders
        if folder.is_dir()
    ):
        number += 1
        run_id = f'{base}-{number}'
    return run_id


def artifact_name(config: Config, kind: str, run_id: str, suffix: str) -> str:
    """Given a kind (pg-roles, rowcounts...) and the run id, return its plaintext file name."""
    return f'{config.name}-{kind}-{run_id}{suffix}'


def manifest_name(config: Config, run_id: str) -> str:
    return f'{config.name}-{run_id}{MANIFEST_SUFFIX}'


def shown(name: str) -> str:
    """Given a name from the received side, return it safe to print: as is if plain, else quoted."""
    if name.isprintable() and name.strip() == name and name:
        return name
    return repr(name)


def plain_name_problem(name: str) -> str:
    """Given a file name from a manifest, return '' if it is a plain file name, else why not."""
    if not name or name in ('.', '..'):
        return 'an empty name, "." or ".."'
    if '/' in name or '\0' in name or '\n' in name or '\r' in name:
        return 'a path, not a file name (it holds "/", NUL or a line break)'
    if name.startswith(('-', '.')):
        return 'it starts with "-" or "."'
    return ''


def iter_manifest(path: Path) -> Iterator[tuple[str, str]]:
    """Given a manifest, yield its (file name, sha256) lines, streamed: whatever its size, only one
    bounded line is in memory at a time; a longer line is skipped."""
    with open(path, 'rb') as handle:
        while line := handle.readline(MANIFEST_MAX_LINE):
            if not line.endswith(b'\n') and len(line) == MANIFEST_MAX_LINE:
                while (rest := handle.readline(MANIFEST_MAX_LINE)) and not rest.endswith(b'\n'):
                    pass  # the rest of an over-long line: not a name ppbackup wrote
                continue
            text = line.decode('utf-8', 'replace').rstrip('\n').removesuffix('\r')
            match = MANIFEST_LINE_RE.fullmatch(text)
            if match and match.group(2):
                yield match.group(2), match.group(1)


def read_manifest(path: Path) -> dict[str, str]:
    """Given a manifest, return {file name: sha256}, at most MANIFEST_MAX_ENTRIES of them (a run
    writes a handful): memory stays bounded even for a huge or hostile manifest."""
    return dict(itertools.islice(iter_manifest(path), MANIFEST_MAX_ENTRIES))


def manifest_bytes(entries: Mapping[str, str]) -> bytes:
    return ''.join(f'{digest}  {name}\n' for name, digest in sorted(entries.items())).encode()


def _read_manifest_fd(fd: int, where: str) -> tuple[dict[str, str], list[str]]:
    """Given an open manifest, return ({plain file name: sha256}, problems), each problem named."""
    data = b''
    while len(data) <= MANIFEST_MAX_BYTES and (block := os.read(fd, MANIFEST_MAX_BYTES + 1)):
        data += block
    if len(data) > MANIFEST_MAX_BYTES:
        return {}, [f'{where}: larger than {MANIFEST_MAX_BYTES} bytes; not a manifest']
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError:
        return {}, [f'{where}: not UTF-8 text; not a manifest']
    entries: dict[str, str] = {}
    problems = []
    # Only "\n" ends a line: a name holding "\r" or another separator stays one (refused) name.
    for number, line in enumerate(text.split('\n'), 1):
        if not line:
            continue
        match = MANIFEST_LINE_RE.fullmatch(line)
        if not match:
            problems.append(f'{where}:{number}: not a "SHA-256  name" line: {shown(line[:80])}')
            continue
        why = plain_name_problem(match.group(2))
        if why:
            problems.append(f'{where}:{number}: refuses the name {shown(match.group(2))}: {why}')
            continue
        entries[match.group(2)] = match.group(1)
    if not entries and not problems:
        problems.append(f'{where}: names no file')
    return entries, problems


@dataclasses.dataclass
class SlotRun:
    slot: Path
    manifest: Path
    files: list[str]
    time: float


def slot_runs(slot: Path) -> list[SlotRun]:
    """Given a slot folder, return its runs (one per manifest), oldest first."""
    runs = []
    if slot.is_dir() and not slot.is_symlink():
        for manifest in slot.glob('*' + MANIFEST_SUFFIX):
            if manifest.name.startswith('.') or not manifest.is_file():
                continue
            runs.append(
                SlotRun(slot, manifest, sorted(read_manifest(manifest)), manifest.lstat().st_mtime)
            )
    return sorted(runs, key=lambda run: run.time)


def all_slots(backup_dir: Path) -> list[Path]:
    """Given the backups folder, return its dayN/wkM slot folders."""
    if not backup_dir.is_dir():
        return []
    return sorted(
        (
            p
            for p in backup_dir.iterdir()
            if SLOT_RE.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
        ),
        key=lambda p: (p.name[0], len(p.name), p.name),
    )


def own_runs(config: Config, slot: Path) -> list[SlotRun]:
    """Given a slot, return this backup's runs in it (manifests NAME-ID.sha256), oldest first."""
    return [run for run in slot_runs(slot) if run_id_of(config.name, run.manifest.name)]


def run_started(config: Config, run: SlotRun) -> dt.datetime:
    """Given a run, return its start as its id says (the manifest's time for an hour-only id)."""
    run_id = run_id_of(config.name, run.manifest.name) or ''
    with contextlib.suppress(ValueError):
        return dt.datetime.strptime(run_id[:15], '%Y%m%d-%H%M%S')
    return dt.datetime.fromtimestamp(run.time)


# ---------------------------------------------------------------------------------------------------
# Keys: every recipient is resolved to one fingerprint and checked before the first dump.
# ---------------------------------------------------------------------------------------------------


def python_gnupg_problem(version: str) -> str:
    """Given python-gnupg's version string, return '' if ppbackup works with it, else what to do."""
    numbers = tuple(int(part) for part in re.findall(r'[0-9]+', version)[:3])
    if numbers >= MIN_PYTHON_GNUPG:
        return ''
    need = '.'.join(map(str, MIN_PYTHON_GNUPG))
    return (
        f'python-gnupg {version or "(unknown version)"} is too old: ppbackup needs {need} or '
        "later. Install your distribution's (apt-get install python3-gnupg on Debian 12 or "
        'later, Ubuntu 24.04 or later) or pip install -U python-gnupg'
    )


@dataclasses.dataclass(frozen=True)
class Recipient:
    spec: str
    fingerprint: str
    uid: str
    expires: dt.datetime | None
    encryption_keyids: frozenset[str]
    keygrips: frozenset[str]


def open_gnupg(gnupghome: Path) -> GnuPG:
    """Given a GnuPG home, return a GnuPG handle. Raise BackupError if gpg or the home is unusable."""
    if not shutil.which('gpg'):
        raise BackupError('gpg is not installed or not on PATH; install gnupg', step='keys')
    try:
        info = gnupghome.stat()
    except OSError as error:
        raise BackupError(
            f'GnuPG home {gnupghome} is missing or unreadable: {error}; import the '
            "recipients' public keys there, or set BACKUP_GNUPGHOME",
            step='keys',
        ) from error
    # root reads any folder, so look at the mode too: a home chmod-ed 000 is a broken set-up.
    if (
        not stat.S_ISDIR(info.st_mode)
        or (info.st_mode & 0o500) != 0o500
        or not os.access(gnupghome, os.R_OK | os.X_OK)
    ):
        raise BackupError(
            f'GnuPG home {gnupghome} is not a readable folder (mode '
            f'{stat.S_IMODE(info.st_mode):o}); chmod 700 it',
            step='keys',
        )
    check_gnupg_home(gnupghome)
    try:
        gpg = GnuPG(gpgbinary='gpg', gnupghome=str(gnupghome))
    except (OSError, ValueError, RuntimeError) as error:
        raise BackupError(f'gpg cannot use {gnupghome}: {error}', step='keys') from error
    gpg.buffer_size = BLOCK  # python-gnupg's 16 KiB default makes encryption CPU-bound in Python
    return gpg


@dataclasses.dataclass(frozen=True)
class _Writers:
    """Who but a path's owner and root its mode lets write it: one of its mode's classes."""

    text: str  # 'members of group site', 'others', ...
    kind: str  # 'group' (members of gid), 'others' (everyone outside gid), 'anyone'
    gid: int


def check_gnupg_home(gnupghome: Path) -> None:
    """Given the GnuPG home, raise BackupError if anyone but us can change its keyrings, trust or
    options: like a config others can write, they could swap the recipients for their own keys.
    The home, its keyrings and options, and its parents (which root may own) are looked at."""
    ours = (os.getuid(),)
    problems = changers_of(gnupghome, ours)
    for name in GNUPG_TRUSTED_FILES:
        problems += changers_of(gnupghome / name, ours)
    problems = list(dict.fromkeys(problems))  # a folder above them all is named once
    if problems:
        raise BackupError(
            f'the GnuPG home {gnupghome} could be changed by others, who could then make the '
            'backups readable to themselves: ' + '; '.join(problems),
            step='keys',
        )


def _timestamp(value: str) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(int(value)) if value and value.isdigit() else None


def resolve_recipients(gpg: GnuPG, specs: Sequence[str]) -> tuple[list[Recipient], list[str]]:
    """Given recipient specs, return (resolved recipients, warnings).

    A full fingerprint is pinned; a user id or email must match one key that gpg holds valid. Raise
    BackupError naming each key that is missing, expired, revoked or cannot encrypt.
    """
    keys = gpg.list_keys()
    problems: list[str] = []
    recipients: list[Recipient] = []
    duplicates: list[str] = []
    for spec in specs:
        key, problem = key_named(keys, spec)
        twin = next(
            (rec for rec in recipients if key and rec.fingerprint == key['fingerprint']), None
        )
        if twin is not None:  # gpg encrypts to a key once, however often it is named
            duplicates.append(
                f'recipients {twin.spec} and {spec} are the same key {twin.fingerprint}: '
                'it is used once; list it once'
            )
            continue
        recipient, problem = recipient_of(spec, key) if key else (None, problem)
        if recipient:
            recipients.append(recipient)
        else:
            problems.append(problem)
    if problems:
        raise BackupError(
            '; '.join(problems),
            step='keys',
            detail='The run stopped before any dump: it never encrypts to fewer '
            'recipients than configured.',
        )
    return recipients, duplicates + key_warnings(recipients, Path(gpg.gnupghome))


def key_named(keys: Sequence[dict[str, Any]], spec: str) -> tuple[dict[str, Any] | None, str]:
    """Given gpg's public keys and a spec (a full fingerprint, or part of a user id), return (the
    one key it names, '') or (None, why there is not exactly one)."""
    if FINGERPRINT_RE.match(spec):
        wanted = spec.upper().removeprefix('0X')
        matches = [key for key in keys if key['fingerprint'] == wanted]
    else:
        matches = [key for key in keys if any(spec.lower() in uid.lower() for uid in key['uids'])]
    if not matches:
        return None, f'recipient {spec}: no such public key in the keyring; import it'
    if len(matches) > 1:
        return None, f'recipient {spec}: matches {len(matches)} keys; give a full fingerprint'
    return matches[0], ''


KEY_VALIDITY = {'r': 'revoked', 'e': 'expired', 'i': 'invalid', 'd': 'disabled', 'n': 'not valid'}


def recipient_of(spec: str, key: dict[str, Any]) -> tuple[Recipient | None, str]:
    """Given a spec and the key it names, return (its Recipient, '') or (None, why ppbackup will
    not encrypt to it): not valid (an unpinned key needs gpg's full or ultimate validity), or no
    encryption (sub)key that is neither expired nor revoked."""
    validity = key.get('trust', '')
    if validity in KEY_VALIDITY:
        return None, f'recipient {spec} ({key["fingerprint"]}): key is {KEY_VALIDITY[validity]}'
    if not FINGERPRINT_RE.match(spec) and validity not in ('f', 'u'):
        return None, (
            f'recipient {spec}: key {key["fingerprint"]} is not valid in this keyring '
            '(gpg would refuse it); give its full fingerprint to pin it, or sign it'
        )
    now = dt.datetime.now()
    subkeys = list(key.get('subkey_info', {}).values())
    usable = [
        sub
        for sub in subkeys
        if 'e' in sub.get('cap', '')
        and sub.get('trust', '') not in ('r', 'e', 'i', 'd')
        and not (_timestamp(sub.get('expires', '')) or dt.datetime.max) <= now
    ]
    if 'e' in key.get('cap', '') and 'E' in key.get('cap', ''):
        usable.append(
            {
                'keyid': key['keyid'],
                'expires': key.get('expires', ''),
                'keygrip': key.get('keygrip', ''),
            }
        )
    if 'E' not in key.get('cap', '') or not usable:
        return None, (
            f'recipient {spec} ({key["fingerprint"]}): no usable encryption key '
            '(expired, revoked or missing subkey)'
        )
    sub_expiry = [_timestamp(sub.get('expires', '')) for sub in usable]
    latest_sub = None if None in sub_expiry else max(exp for exp in sub_expiry if exp is not None)
    expiries = [exp for exp in (_timestamp(key.get('expires', '')), latest_sub) if exp is not None]
    grips = {sub.get('keygrip', '') for sub in subkeys} | {key.get('keygrip', '')}
    return Recipient(
        spec=spec,
        fingerprint=key['fingerprint'],
        uid=(key['uids'] or [''])[0],
        expires=min(expiries) if expiries else None,
        encryption_keyids=frozenset(sub['keyid'].upper() for sub in usable),
        keygrips=frozenset(grip for grip in grips if grip),
    ), ''


def key_warnings(recipients: Sequence[Recipient], gnupghome: Path) -> list[str]:
    """Given resolved recipients, return warnings: keys expiring soon, secret keys on this host."""
    warnings = []
    soon = dt.datetime.now() + dt.timedelta(days=KEY_EXPIRY_WARN_DAYS)
    for recipient in recipients:
        if recipient.expires and recipient.expires <= soon:
            days = max(0, (recipient.expires - dt.datetime.now()).days)
            warnings.append(
                f'recipient key {recipient.fingerprint} ({recipient.uid}) expires in '
                f'{days} days, on {recipient.expires:%Y-%m-%d}: extend it and re-import'
            )
        # gpg keeps each secret key as private-keys-v1.d/KEYGRIP.key; looking there needs no agent.
        if any(
            (gnupghome / 'private-keys-v1.d' / f'{grip}.key').exists()
            for grip in recipient.keygrips
        ):
            warnings.append(
                f'the SECRET key of recipient {recipient.fingerprint} is on this host: '
                'anyone with this host can read its backup history; move it off'
            )
    return warnings


def packet_recipients(path: Path, gnupghome: Path) -> list[str]:
    """Given an encrypted file, return the key ids its public-key packets are addressed to.

    Raise BackupError if gpg cannot parse the file as OpenPGP data.
    """
    code, out = run_command(
        [
            'gpg',
            '--homedir',
            str(gnupghome),
            '--batch',
            '--no-tty',
            '--list-only',
            '--list-packets',
            '--',
            str(path),
        ],
        what=f'gpg --list-packets {path.name}',
        step='verify',
        timeout=120,
    )
    keyids = re.findall(r':pubkey enc packet: .*keyid ([0-9A-Fa-f]{16})', out)
    if ':encrypted data packet:' not in out and ':aead encrypted packet:' not in out:
        raise BackupError(
            f'{path.name}: no encrypted data packet: not an OpenPGP backup', step='verify'
        )
    return [keyid.upper() for keyid in keyids]


def addressed_to_problem(keyids: Sequence[str], recipients: Sequence[Recipient]) -> str:
    """Given packet key ids and the recipients, return '' if they match one to one, else why not."""
    unmatched = list(recipients)
    for keyid in keyids:
        owner = next((rec for rec in unmatched if keyid in rec.encryption_keyids), None)
        if owner is None:
            return f'addressed to an unexpected key {keyid}'
        unmatched.remove(owner)
    if unmatched:
        return 'not addressed to ' + ', '.join(rec.fingerprint for rec in unmatched)
    return ''


# ---------------------------------------------------------------------------------------------------
# Database clients: how ppbackup reaches a server, and what it asks of one, on either side.
# ---------------------------------------------------------------------------------------------------


def pg_client(db: str) -> list[str]:
    """Given a database, return psql's argv: no prompt, no psqlrc, unaligned tab-separated."""
    return ['psql', '--no-password', '-X', '-q', '-A', '-t', '-F', '\t', f'--dbname={db}']


def mysql_client(defaults: str | None, *, reads_backup: bool = False) -> list[str]:
    """Given an optional option file naming the server, return the mysql client's argv start.

    ``reads_backup``: the client is fed a backup's text, which after a break-in is the attacker's
    (a run is data, never instructions): its sandbox mode refuses ``\\!``, ``system``, ``source``
    and ``tee``, and ``--local-infile=0`` keeps LOAD DATA LOCAL from sending a file of ours."""
    argv = ['mysql', *mysql_defaults_args(defaults), '--batch']
    return [*argv, '--sandbox', '--local-infile=0'] if reads_backup else argv


DRILL_MYSQL_DEFAULTS = 'ppbackup-drill-client.cnf'  # the drill's option file for its own server


def mysql_defaults_args(defaults: str | None) -> list[str]:
    """Given an optional option file naming the server, return the client options that read it:
    the key holder's own (``--mysql-defaults``) on top of their usual ones, the drill's alone (a
    ~/.my.cnf, perhaps the site's backup user, must not send the drill's clients elsewhere)."""
    if not defaults:
        return []
    alone = os.path.basename(defaults) == DRILL_MYSQL_DEFAULTS
    return [f'--defaults-{"file" if alone else "extra-file"}={defaults}']


def sql_literal(text: str) -> str:
    """Given text, return it as a standard SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def backtick(name: str) -> str:
    """Given a MariaDB identifier, return it quoted."""
    return '`' + name.replace('`', '``') + '`'


def pg_ident(name: str) -> str:
    """Given a PostgreSQL name, return it as a quoted identifier."""
    return '"' + name.replace('"', '""') + '"'


PG_IDENT = rb'("(?:[^"]|"")*"|[^\s;"]+)'


PG_COUNT_SQL = r"""
SELECT n.nspname || '.' || c.relname,
  (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I',
    n.nspname, c.relname), false, true, '')))[1]::text
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'm') AND c.relpersistence <> 't'
  AND (c.relkind <> 'm' OR c.relispopulated)
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\_%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
    AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1
"""
MYSQL_TABLES_SQL = (
    'SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE() '
    "AND table_type = 'BASE TABLE' ORDER BY 1"
)


def parse_counts(lines: Iterable[str]) -> dict[str, int]:
    """Given a client's "table<TAB>count" lines, return {table: count}."""
    counts = {}
    for line in lines:
        name, _, count = line.rpartition('\t')
        if name:
            counts[name] = int(count)
    return counts


def mysql_count_query(tables: Sequence[str]) -> str:
    """Given MariaDB tables, return one query giving each one's name and exact row count."""
    return ' UNION ALL '.join(
        f'SELECT {sql_literal(table)}, COUNT(*) FROM {backtick(table)}' for table in tables
    )


# Each object's owner and grants, as {object: "owner R; grants A B ..."} in one JSON line: the
# database, schemas, tables, views, sequences, columns, functions, types, default privileges and
# large objects (what an extension made is the extension's). A NULL ACL is written as the default
# it stands for and the items are sorted, so that a restore that brought the same grants back
# reads the same. Names are not quoted: search_path is pg_catalog's (PG_GRANTS_SET).
PG_GRANTS_SET = 'SET search_path = pg_catalog'
PG_GRANTS_SQL = r"""
SELECT coalesce(json_object_agg(o.what, 'owner ' || coalesce(pg_get_userbyid(o.owner), '-')
    || '; grants ' || coalesce((SELECT string_agg(a::text, ' ' ORDER BY a::text)
      FROM unnest(coalesce(o.acl, acldefault(o.def, o.owner))) AS a), '')
    ORDER BY o.what), '{}')
FROM (
  SELECT 'database' AS what, datdba AS owner, datacl AS acl, 'd'::"char" AS def
    FROM pg_database WHERE datname = current_database()
  UNION ALL SELECT 'schema ' || n.nspname, n.nspowner, n.nspacl, 'n' FROM pg_namespace n
    WHERE n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\_%'
      AND NOT EXISTS (SELECT FROM pg_depend e WHERE e.classid = 'pg_namespace'::regclass
        AND e.objid = n.oid AND e.deptype = 'e')
  UNION ALL SELECT CASE c.relkind WHEN 'v' THEN 'view ' WHEN 'm' THEN 'materialized view '
      WHEN 'S' THEN 'sequence ' WHEN 'f' THEN 'foreign table ' ELSE 'table ' END
      || n.nspname || '.' || c.relname, c.relowner, c.relacl,
      (CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END)::"char"
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND c.relpersistence <> 't'
      AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\_%'
      AND NOT EXISTS (SELECT FROM pg_depend e WHERE e.classid = 'pg_class'::regclass
        AND e.objid = c.oid AND e.deptype = 'e')
  UNION ALL SELECT 'column ' || n.nspname || '.' || c.relname || '.' || a.attname, c.relowner,
      a.attacl, 'c'
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
      JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE a.attnum > 0 AND NOT a.attisdropped AND cardinality(a.attacl) > 0
      AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND c.relpersistence <> 't'
      AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\_%'
      AND NOT EXISTS (SELECT FROM pg_depend e WHERE e.classid = 'pg_class'::regclass
        AND e.objid = c.oid AND e.deptype = 'e')
  UNION ALL SELECT CASE p.prokind WHEN 'p' THEN 'procedure ' WHEN 'a' THEN 'aggregate '
      ELSE 'function ' END || n.nspname || '.' || p.proname || '('
      || pg_get_function_identity_arguments(p.oid) || ')', p.proowner, p.proacl, 'f'
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\_%'
      AND NOT EXISTS (SELECT FROM pg_depend e WHERE e.classid = 'pg_proc'::regclass
        AND e.objid = p.oid AND e.deptype = 'e')
  UNION ALL SELECT 'type ' || n.nspname || '.' || t.typname, t.typowner, t.typacl, 'T'
    FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE (t.typtype IN ('d', 'e', 'r', 'm')
        OR t.typtype = 'c' AND (SELECT c.relkind FROM pg_class c WHERE c.oid = t.typrelid) = 'c')
      AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\_%'
      AND NOT EXISTS (SELECT FROM pg_depend e WHERE e.classid = 'pg_type'::regclass
        AND e.objid = t.oid AND e.deptype = 'e')
  UNION ALL SELECT 'default privileges of ' || pg_get_userbyid(d.defaclrole)
      || coalesce(' in schema ' || n.nspname, '') || ' on ' || CASE d.defaclobjtype
      WHEN 'r' THEN 'tables' WHEN 'S' THEN 'sequences' WHEN 'f' THEN 'functions'
      WHEN 'T' THEN 'types' WHEN 'n' THEN 'schemas' ELSE d.defaclobjtype::text END,
      d.defaclrole, d.defaclacl, 'r'
    FROM pg_default_acl d LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace
  UNION ALL SELECT 'large object ' || l.oid, l.lomowner, l.lomacl, 'L'
    FROM pg_largeobject_metadata l
) AS o
"""
MYSQL_DB_PRIVS_SQL = (
    "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = 'mysql' "
    "AND TABLE_NAME = 'db' AND COLUMN_NAME LIKE '%\\_priv' ORDER BY ORDINAL_POSITION"
)
# The grants on the database's objects, as "object to `user`@`host`<TAB>privileges" lines (a grant
# on a wildcard-escaped name of the database too); {privs} lists mysql.db's privilege columns.
MYSQL_GRANTS_SQL = r"""
SELECT CONCAT('database to `', User, '`@`', Host, '`'), CONCAT_WS(',', {privs})
  FROM mysql.db WHERE {where}
UNION ALL SELECT CONCAT('table ', Table_name, ' to `', User, '`@`', Host, '`'),
  CONCAT('table ', Table_priv, '; columns ', Column_priv) FROM mysql.tables_priv WHERE {where}
UNION ALL SELECT CONCAT('column ', Table_name, '.', Column_name, ' to `', User, '`@`', Host, '`'),
  Column_priv FROM mysql.columns_priv WHERE {where}
UNION ALL SELECT CONCAT(LOWER(Routine_type), ' ', Routine_name, ' to `', User, '`@`', Host, '`'),
  Proc_priv FROM mysql.procs_priv WHERE {where}
""".replace('{where}', "Db IN (DATABASE(), REPLACE(REPLACE(DATABASE(), '_', '\\_'), '%', '\\%'))")


PG_RELATION_KINDS = ('table ', 'view ', 'materialized view ', 'foreign table ')
PG_ACL_PRIVILEGES_RE = re.compile(r'=([A-Za-z*]*)/')


def parse_pg_grants(lines: Sequence[str]) -> dict[str, str]:
    """Given PG_GRANTS_SQL's output, return {object: owner and grants}. A relation's MAINTAIN
    (PostgreSQL 17's "m", in its owner's defaults and in GRANT ALL there) is left out: a drill on a
    newer server than the site's then reads what an older one did, for the same grants."""
    text = ''.join(lines).strip()
    try:
        grants = json.loads(text or '{}')
    except ValueError as error:
        raise BackupError(f'the grants query gave no JSON: {text[:200]!r}', step='dump') from error
    found = {}
    for what, value in grants.items():
        what, value = str(what), str(value)
        if what.startswith(PG_RELATION_KINDS) or what.endswith(' on tables'):
            value = PG_ACL_PRIVILEGES_RE.sub(
                lambda match: '=' + re.sub(r'm\*?', '', match[1]) + '/', value
            )
        found[what] = value
    return found


def pg_grants(db: str) -> dict[str, str]:
    """Given a restored PostgreSQL database, return its objects' owners and grants, for the drill
    (a run takes them in its dump's snapshot: DumpSnapshot)."""
    _, out = run_command(
        [*pg_client(db), '-c', PG_GRANTS_SET, '-c', PG_GRANTS_SQL],
        what=f'grants of {db}',
        step='drill',
        timeout=600,
    )
    return parse_pg_grants(out.splitlines())


def mysql_grants(ask: Callable[[str], Sequence[str]]) -> dict[str, str]:
    """Given a way to run a query in a MariaDB database (returning its batch lines), return
    {object to user: privileges} from the grant tables (MYSQL_GRANTS_SQL)."""
    columns = [line for line in ask(MYSQL_DB_PRIVS_SQL) if line]
    privs = ', '.join(
        f"IF({backtick(column)} = 'Y', {sql_literal(column.removesuffix('_priv'))}, NULL)"
        for column in columns
    )
    lines = ask(MYSQL_GRANTS_SQL.replace('{privs}', privs or "''"))
    pairs = [line.partition('\t') for line in lines]
    # Every privilege of the database written ALL, as GRANT ALL gives it: a drill on a newer server
    # (with privileges the site's does not know) then reads the same for the same grant.
    every = {column.removesuffix('_priv') for column in columns} - {'Grant'}
    found = {}
    for what, tab, privileges in pairs:
        if not tab:
            continue
        given = set(privileges.split(','))
        if what.startswith('database to ') and every and every <= given:
            privileges = ','.join(['ALL', *sorted(given - every)])
        found[what] = privileges
    return found


# ---------------------------------------------------------------------------------------------------
# The web host's admin: `run` dumps, encrypts, commits, sends and reports; `check`, `status`,
# `verify` and `run --dry-run` tell what it would do or did.
# ---------------------------------------------------------------------------------------------------


# -- Artifacts: what one run makes ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Artifact:
    kind: str  # mysql, psql, files, binaries
    label: str  # what messages call it: "psql shop", "files"
    filename: str  # plaintext name in latest/: NAME-KIND-RUNID.EXT
    argv: tuple[str, ...]
    cwd: Path | None = None
    trailer: bytes | None = None
    weekly: bool = True
    tar_warning_ok: bool = False


@dataclasses.dataclass
class Made:
    artifact: Artifact
    plain_path: Path
    raw_bytes: int
    encrypted_tmp: Path
    encrypted_name: str
    size: int = 0
    sha256: str = ''
    warnings: list[str] = dataclasses.field(default_factory=list)
    compressed_bytes: int = 0  # the plaintext file in latest/, as the compressor left it


def plan_artifacts(
    config: Config,
    run_id: str,
    rundir: Path,
    *,
    pg_superuser: bool = True,
    mysql_users: bool = True,
) -> list[Artifact]:
    """Given the config and the run id, return what to dump or archive, in order.

    ``pg_superuser`` False: the backup user cannot read password hashes, so roles go without them;
    ``mysql_users`` False: it cannot read MariaDB's grant tables, so users are not backed up.
    """
    ext = COMPRESSORS[config.compression][2]
    artifacts = []
    for kind, dbs in (('mysql', config.mysql_dbs), ('psql', config.psql_dbs)):
        for db in dbs:
            name_kind = kind if len(dbs) == 1 else f'{kind}-{db}'
            argv: tuple[str, ...]
            if kind == 'mysql':
                # --single-transaction: a consistent InnoDB snapshot without locking the site.
                argv = (
                    'mysqldump',
                    '--single-transaction',
                    '--quick',
                    '--routines',
                    '--events',
                    '--triggers',
                    '--hex-blob',
                    '--default-character-set=utf8mb4',
                    '--',
                    db,
                )
            else:
                # --no-password: fail at once instead of waiting on a prompt nobody sees.
                # --create: the database's own owner, settings, grants and comment come along.
                argv = (
                    'pg_dump',
                    '--no-password',
                    '--format=plain',
                    f'--dbname={db}',
                    '--create',
                )
            artifacts.append(
                Artifact(
                    kind,
                    f'{kind} {db}',
                    f'{config.name}-{name_kind}-{run_id}.sql{ext}',
                    argv,
                    trailer=TRAILERS[kind],
                )
            )
    for kind, paths in (('files', config.files), ('binaries', config.binaries)):
        if not paths:
            continue
        argv = ('tar', '--create', '--file=-', *tar_sources(config, paths, rundir, kind == 'files'))
        artifacts.append(
            Artifact(
                kind,
                kind,
                f'{config.name}-{kind}-{run_id}.tar{ext}',
                argv,
                cwd=config.home,
                weekly=kind == 'files',
                tar_warning_ok=True,
            )
        )
    # What a database needs around it on a new server, and the proof that it came back whole.
    if config.psql_dbs:
        argv = (
            'pg_dumpall',
            '--no-password',
            '--globals-only',
            f'--database={config.psql_dbs[0]}',
            *(() if pg_superuser else ('--no-role-passwords',)),
        )
        name = artifact_name(config, 'pg-roles', run_id, f'.sql{ext}')
        artifacts.append(Artifact(PG_ROLES, 'pg roles', name, argv, trailer=PG_ROLES_TRAILER))
    if config.mysql_dbs and mysql_users:
        name = artifact_name(config, 'mariadb-users', run_id, f'.sql{ext}')
        source = ('cat', '--', str(rundir / MYSQL_USERS_SOURCE))
        artifacts.append(
            Artifact(MYSQL_USERS, 'mariadb users', name, source, trailer=TRAILERS['mysql'])
        )
    if config.psql_dbs or config.mysql_dbs:
        name = artifact_name(config, RUN_INDEX, run_id, f'.json{ext}')
        source = ('cat', '--', str(rundir / RUN_INDEX_SOURCE))
        artifacts.append(Artifact(RUN_INDEX, 'row counts', name, source))  # the metrics label
    return artifacts


def own_folders(config: Config) -> list[Path]:
    """Return, resolved, every folder ppbackup writes: the slots, the plaintext, a local remote."""
    folders = [config.backup_dir, config.insecure_dir]
    if ':' not in config.remote.split('/', 1)[0]:
        folders.append(config.home / config.remote)
    return [Path(os.path.realpath(folder)) for folder in folders]


def _tar_regex(text: str, delimiter: str) -> str:
    return re.sub(r'([\\.\[\]*^$' + re.escape(delimiter) + '])', r'\\\1', text)


def tar_sources(config: Config, paths: Sequence[str], rundir: Path, crontab: bool) -> list[str]:
    """Given BACKUP_FILES or BACKUP_BINARIES, return tar's arguments after ``--create``.

    An entry that is a symlink is followed at the top only (tar's --dereference would follow every
    link inside too): tar reads its resolved target, stored under the configured name. Whatever
    ppbackup itself writes (slots, plaintext, a local remote) is excluded, so that "." never
    archives the backups themselves.
    """
    own = own_folders(config)
    # Anchored, literal: each exclude is one exact member name, never a pattern matching others.
    head = ['--anchored', '--no-wildcards']
    followed: list[str] = []
    direct: list[str] = []
    for entry in paths:
        full = config.home / entry
        real = Path(os.path.realpath(full))
        if os.path.islink(full):
            member = str(real).lstrip('/') or '.'
            stored = entry.strip('/') or '.'
            delimiter = next(c for c in ',|#@%;~!' if c not in member + stored)
            replacement = re.sub(r'([\\&' + re.escape(delimiter) + '])', r'\\\1', stored)
            head.append(
                f'--transform=s{delimiter}^{_tar_regex(member, delimiter)}\\(/\\|$\\)'
                f'{delimiter}{replacement}\\1{delimiter}S'
            )
            followed += ['--directory=/', f'--add-file={member}']
        else:
            member = entry.rstrip('/') or '/'  # tar matches excludes before it strips a "/"
            direct.append(entry)
        for folder in own:
            if folder == real or real in folder.parents:
                inner = folder.relative_to(real)
                for name in dict.fromkeys(
                    [f'{member}/{inner}', os.path.normpath(f'{member}/{inner}')]
                ):
                    head.append(f'--exclude={name.removesuffix("/.")}')
    # The crontab travels with the files, as the old script did.
    head += ['--directory', str(rundir), 'crontab'] if crontab else []
    # After "--" a name is a name, even one that looks like --checkpoint-action=...
    return [*head, *followed, '--directory', str(config.home), '--', *direct]


def check_paths(config: Config) -> None:
    """Raise BackupError naming every configured path that does not exist (or, a symlink, whose
    target does not)."""
    missing = [
        path for path in (*config.files, *config.binaries) if not os.path.exists(config.home / path)
    ]
    if missing:
        raise BackupError(
            'missing path(s) in BACKUP_FILES/BACKUP_BINARIES: '
            + ', '.join(str(config.home / path) for path in missing),
            step='archive',
        )


def check_credential_files(config: Config) -> None:
    """Raise BackupError if ~/.pgpass or ~/.my.cnf is readable by others: its passwords would leak,
    and libpq ignores such a .pgpass, which would then fail at the prompt."""
    for name, used in (('.pgpass', config.psql_dbs), ('.my.cnf', config.mysql_dbs)):
        path = (
            Path(
                dict(config.client_env).get('PGPASSFILE')
                or os.environ.get('PGPASSFILE')
                or config.home / name
            )
            if name == '.pgpass'
            else config.home / name
        )
        if not used or not path.exists():
            continue
        # By its bits: libpq ignores a .pgpass that group or others could read, wherever it is.
        if path.stat().st_mode & 0o077:
            raise BackupError(
                f'{path} is readable by group or others: chmod 600 {path}', step='dump'
            )
        changers = changers_of(path, (os.getuid(),))
        if changers:  # it chooses the server the dump reads, and the client's options
            raise BackupError(
                '; '.join(changers) + ' (whoever can change it chooses what the dump reads)',
                step='dump',
            )


def save_crontab(rundir: Path) -> None:
    """Write the user's crontab (empty if none) into the run folder for the files archive."""
    text = ''
    if shutil.which('crontab'):
        with contextlib.suppress(BackupError):
            code, text = run_command(
                ['crontab', '-l'], what='crontab -l', step='archive', timeout=30, ok_codes=(0, 1)
            )
            text = text if code == 0 else ''
    fd = create_private_file(rundir / 'crontab')
    with os.fdopen(fd, 'w') as handle:
        handle.write(text)


# -- Dumps: a consistent snapshot, the database's surroundings, and the run index -------------------


class DumpSnapshot:
    """A client session of the database, kept open on pipes while its dump runs, whose transaction
    the row counts and the objects' owners and grants are taken in: a drill compares a restore with
    them, so they must be of what the dump holds, however busy the site is.

    PostgreSQL: the session exports its snapshot and pg_dump imports it (``--snapshot``): the dump
    and the counts see exactly the same rows. MariaDB cannot share a snapshot between sessions: the
    session starts its consistent snapshot just before mysqldump starts its own, so only a write in
    those milliseconds can make the counts differ from the dump.
    """

    MARKER = 'ppbackup-end-of-answer'

    def __init__(self, kind: str, db: str, config: Config) -> None:
        self.kind = kind
        self.db = db
        self.snapshot = ''
        self.pipe = Pipeline(f'row counts of {db}', f'dump {kind} {db}', config.dump_timeout)
        if kind == 'psql':
            argv = [*pg_client(db), '-v', 'ON_ERROR_STOP=1']
            begin = 'BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SELECT pg_export_snapshot();'
        else:
            argv = [*mysql_client(None), '--unbuffered', '--skip-column-names', '--', db]
            begin = (
                'SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ; '
                'START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY;'
            )
        env = client_environ(config) if kind == 'psql' else None
        self.proc = self.pipe.start(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(env) if env else None
        )
        try:
            answer = self.ask(begin)
        except BaseException:
            self.pipe.__exit__()
            raise
        self.snapshot = answer[0] if kind == 'psql' and answer else ''

    def ask(self, sql: str) -> list[str]:
        """Given statements, run them in the session; return the lines they printed."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(f"{sql}\nSELECT '{self.MARKER}';\n".encode())
            self.proc.stdin.flush()
        lines: list[str] = []
        while line := self.proc.stdout.readline():
            text = line.decode('utf-8', 'replace').rstrip('\n')
            if text == self.MARKER:
                return lines
            lines.append(text)
        # The client ended: an error (ON_ERROR_STOP), or the timeout killed it.
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        self.pipe.check()
        raise BackupError(f'{self.pipe.what}: the client ended early', step=self.pipe.step)

    def dump_argv(self, argv: Sequence[str]) -> tuple[str, ...]:
        """Given the dump's argv, return it taking this session's snapshot (PostgreSQL)."""
        return (*argv, f'--snapshot={self.snapshot}') if self.snapshot else tuple(argv)

    def row_counts(self) -> dict[str, int]:
        """Return {table: exact row count} in the session's snapshot."""
        if self.kind == 'psql':
            return parse_counts(self.ask(PG_COUNT_SQL.strip() + ';'))
        tables = [line for line in self.ask(MYSQL_TABLES_SQL + ';') if line]
        return parse_counts(self.ask(mysql_count_query(tables) + ';') if tables else [])

    def grants(self) -> dict[str, str]:
        """Return each object's owner and grants in the session's snapshot (PG_GRANTS_SQL), or
        MariaDB's grants on the database's objects (MYSQL_GRANTS_SQL: the grant tables must be
        readable)."""
        if self.kind == 'psql':
            return parse_pg_grants(self.ask(f'{PG_GRANTS_SET}; {PG_GRANTS_SQL.strip()};'))
        return mysql_grants(lambda sql: self.ask(sql.strip() + ';'))

    def __enter__(self) -> DumpSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None and self.proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    self.proc.stdin.write(b'COMMIT;\n')
                self.proc.stdin.close()
                self.pipe.check()
        finally:
            self.pipe.__exit__()


def pg_database_owner(db: str, env: Mapping[str, str] | None = None) -> str:
    """Given a PostgreSQL database, return the name of its owner."""
    _, out = run_command(
        [
            *pg_client(db),
            '-c',
            'SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()',
        ],
        what=f'owner of {db}',
        step='dump',
        env=env,
    )
    return out.strip()


def database_limits(config: Config) -> tuple[bool, bool, list[str]]:
    """Return (PostgreSQL backup user is a superuser, it can read MariaDB's users, warnings), the
    warnings naming what a restore from this backup will lack. A server that cannot be reached
    here fails its dump, which names it: no error here."""
    pg_superuser, mysql_users, warnings = True, True, []
    if config.psql_dbs:
        with contextlib.suppress(BackupError):
            _, out = run_command(
                [*pg_client(config.psql_dbs[0]), '-c', PG_SUPERUSER_SQL],
                what=f'psql {config.psql_dbs[0]}',
                step='prepare',
                env=client_environ(config),
            )
            pg_superuser = out.strip() != 'f'
    if not pg_superuser:
        warnings.append(
            'the PostgreSQL backup user is not a superuser: roles are backed up WITHOUT '
            "their passwords, so a restore on a new server must set each login's "
            'password again (ALTER ROLE ... PASSWORD); back up as a superuser to keep them'
        )
    if config.mysql_dbs:
        mysql_users = False
        with contextlib.suppress(BackupError):
            run_command(
                [*mysql_client(None), '-e', MYSQL_USERS_PROBE, '--', config.mysql_dbs[0]],
                what=f'mysql {config.mysql_dbs[0]}',
                step='prepare',
            )
            mysql_users = True
    if not mysql_users:
        warnings.append(
            'the MariaDB backup user cannot read its grant tables: users and grants are '
            "NOT backed up, so a restore on a new server lacks the application's login "
            'and every definer; grant it SELECT ON mysql.* to keep them'
        )
    return pg_superuser, mysql_users, warnings


MYSQL_GRANT_AUTH_RE = re.compile(r' IDENTIFIED (?:BY|VIA|WITH) .*?(?= WITH |$)')
PG_SUPERUSER_SQL = 'SELECT rolsuper FROM pg_roles WHERE rolname = current_user'
MYSQL_USERS_PROBE = (
    'SELECT 1 FROM mysql.global_priv, mysql.db, mysql.tables_priv, mysql.columns_priv, '
    'mysql.procs_priv LIMIT 1'
)
MYSQL_USERS_SQL = """
SELECT DISTINCT User, Host FROM (
  SELECT User, Host FROM mysql.db WHERE Db IN ({dbs})
  UNION SELECT User, Host FROM mysql.tables_priv WHERE Db IN ({dbs})
  UNION SELECT User, Host FROM mysql.columns_priv WHERE Db IN ({dbs})
  UNION SELECT User, Host FROM mysql.procs_priv WHERE Db IN ({dbs})
  UNION SELECT SUBSTRING_INDEX(DEFINER, '@', 1), SUBSTRING_INDEX(DEFINER, '@', -1)
    FROM information_schema.VIEWS WHERE TABLE_SCHEMA IN ({dbs})
  UNION SELECT SUBSTRING_INDEX(DEFINER, '@', 1), SUBSTRING_INDEX(DEFINER, '@', -1)
    FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA IN ({dbs})
  UNION SELECT SUBSTRING_INDEX(DEFINER, '@', 1), SUBSTRING_INDEX(DEFINER, '@', -1)
    FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA IN ({dbs})
  UNION SELECT SUBSTRING_INDEX(DEFINER, '@', 1), SUBSTRING_INDEX(DEFINER, '@', -1)
    FROM information_schema.EVENTS WHERE EVENT_SCHEMA IN ({dbs})
) AS needed WHERE User <> '' AND (User, Host) IN (SELECT User, Host FROM mysql.user)
ORDER BY 1, 2
"""


def mysql_users_script(dbs: Sequence[str], defaults: str | None = None) -> str:
    """Given MariaDB databases, return SQL that recreates the users they need: those with grants
    on them and the definers of their views, routines, triggers and events, each with its
    password hash and all of its grants. Users that exist already are left as they are."""
    listed = ', '.join(sql_literal(db) for db in dbs)
    client = [*mysql_client(defaults), '--skip-column-names', '--raw']
    _, out = run_command(
        [*client, '-e', MYSQL_USERS_SQL.format(dbs=listed)], what='mariadb users', step='dump'
    )
    users = [line.split('\t') for line in out.splitlines() if line.count('\t') == 1]
    lines = ['-- MariaDB users and grants needed by: ' + ', '.join(dbs)]
    if users:
        queries = ''.join(
            f'SHOW CREATE USER {sql_literal(user)}@{sql_literal(host)}; '
            f'SHOW GRANTS FOR {sql_literal(user)}@{sql_literal(host)}; '
            for user, host in users
        )
        _, out = run_command([*client, '-e', queries], what='mariadb grants', step='dump')
        for statement in out.splitlines():
            if statement.startswith('CREATE USER '):
                statement = 'CREATE USER IF NOT EXISTS ' + statement[len('CREATE USER ') :]
            elif statement.startswith('GRANT '):
                # The password is CREATE USER's: a GRANT must not reset an existing user's.
                statement = MYSQL_GRANT_AUTH_RE.sub('', statement)
            if statement:
                lines.append(statement + ';')
    lines.append('-- Dump completed')
    return '\n'.join(lines) + '\n'


def dump_generated(
    artifact: Artifact,
    artifacts: Sequence[Artifact],
    config: Config,
    rundir: Path,
    lacks: Sequence[str],
    counts: Mapping[str, Mapping[str, int]],
    grants: Mapping[str, Mapping[str, str]] | None = None,
) -> tuple[Path, int, list[str]]:
    """Given the MariaDB users or the index artifact, write its source from the databases, then
    compress it like any dump. Return as dump_artifact does."""
    if artifact.kind == MYSQL_USERS:
        script = mysql_users_script(config.mysql_dbs)
        with os.fdopen(create_private_file(rundir / MYSQL_USERS_SOURCE), 'w') as handle:
            handle.write(script)
    else:
        write_run_index(config, artifacts, rundir, lacks, counts, grants or {})
    try:
        return dump_artifact(artifact, config, rundir)
    finally:  # latest/ keeps the compressed copy only
        for source in (MYSQL_USERS_SOURCE, RUN_INDEX_SOURCE):
            remove_path(rundir / source)


def write_run_index(
    config: Config,
    artifacts: Sequence[Artifact],
    rundir: Path,
    lacks: Sequence[str],
    counts: Mapping[str, Mapping[str, int]],
    grants: Mapping[str, Mapping[str, str]] | None = None,
) -> None:
    """Write the run's index into the run folder, to be encrypted as an artifact of its own: what
    each file holds, each table's row count and each object's owner and grants in the dump's
    snapshot (``counts`` and ``grants``, by label; see DumpSnapshot; no grants for MariaDB when the
    backup user cannot read its grant tables), and what a restore will lack. A drill compares the
    counts and grants with a restore."""
    grants = grants or {}
    databases = []
    for artifact in artifacts:
        if artifact.kind == 'psql':
            db = artifact.label.split(' ', 1)[1]
            # libpq's settings from the config reach this as they reach pg_dump.
            owner = pg_database_owner(db, client_environ(config))
            databases.append(
                {
                    'kind': 'psql',
                    'database': db,
                    'file': artifact.filename,
                    'owner': owner,
                    'rows': dict(counts[artifact.label]),
                    **(
                        {'grants': dict(grants[artifact.label])} if artifact.label in grants else {}
                    ),
                }
            )
        elif artifact.kind == 'mysql':
            db = artifact.label.split(' ', 1)[1]
            databases.append(
                {
                    'kind': 'mysql',
                    'database': db,
                    'file': artifact.filename,
                    'rows': dict(counts[artifact.label]),
                    **(
                        {'grants': dict(grants[artifact.label])} if artifact.label in grants else {}
                    ),
                }
            )
    by_kind = {artifact.kind: artifact.filename for artifact in artifacts}
    index = {
        'format': INDEX_FORMAT,
        'name': config.name,
        'databases': databases,
        'pg_roles': by_kind.get(PG_ROLES) if config.psql_dbs else None,
        'mariadb_users': by_kind.get(MYSQL_USERS) if config.mysql_dbs else None,
        'archives': [a.filename for a in artifacts if a.kind in ('files', 'binaries')],
        'lacks': list(lacks),
    }
    with os.fdopen(create_private_file(rundir / RUN_INDEX_SOURCE), 'w') as handle:
        json.dump(index, handle, indent=1, sort_keys=True)


def dump_artifact(
    artifact: Artifact,
    config: Config,
    rundir: Path,
    counts: dict[str, dict[str, int]] | None = None,
    grants: dict[str, dict[str, str]] | None = None,
) -> tuple[Path, int, list[str]]:
    """Given an artifact, stream it through the compressor into the run folder; a database's row
    counts go into ``counts`` (by label), and its objects' owners and grants into ``grants`` if
    given, taken in the dump's own snapshot.

    Return (plaintext path, uncompressed bytes, warnings). Raise BackupError if any process fails,
    or a dump lacks its end-of-dump trailer.
    """
    if counts is not None and artifact.kind in ('psql', 'mysql'):
        with DumpSnapshot(artifact.kind, artifact.label.split(' ', 1)[1], config) as snapshot:
            argv = snapshot.dump_argv(artifact.argv)
            dumped = dump_artifact(dataclasses.replace(artifact, argv=argv), config, rundir)
            counts[artifact.label] = snapshot.row_counts()
            if grants is not None:
                grants[artifact.label] = snapshot.grants()
        return dumped
    log.info('dump %s', artifact.label)
    path = rundir / artifact.filename
    fd = create_private_file(path)
    try:
        streamed = stream_to_file(
            artifact.argv,
            COMPRESSORS[config.compression][0],
            fd,
            what=artifact.label,
            step=f'dump {artifact.label}',
            timeout=config.dump_timeout,
            cwd=artifact.cwd,
            allowed=(1,) if artifact.tar_warning_ok else (),
            env=client_environ(config) if artifact.trailer else None,
        )
    except OSError as error:
        raise BackupError(
            f'{artifact.label}: cannot write {path}: {os_reason(error)}',
            step=f'dump {artifact.label}',
        ) from error
    finally:
        os.close(fd)
    warnings = []
    if artifact.trailer is not None:
        if streamed.raw_bytes == 0:
            raise BackupError(f'{artifact.label}: the dump is empty', step=f'dump {artifact.label}')
        if artifact.trailer not in streamed.tail:
            raise BackupError(
                f'{artifact.label}: the dump is truncated (no end-of-dump line '
                f'{artifact.trailer.decode()!r})',
                step=f'dump {artifact.label}',
            )
    if streamed.codes and streamed.codes[0] == 1:
        warnings.append(f'{artifact.label}: tar warned that files changed while being read')
    return path, streamed.raw_bytes, warnings


# -- Encryption: to the resolved fingerprints only, checked in the ciphertext -----------------------


@contextlib.contextmanager
def _gpg_write_errors(label: str, step: str, folder: Path) -> Iterator[None]:
    """Turn an OSError from python-gnupg's copying thread (gpg died under it) into a BackupError."""
    try:
        yield
    except OSError as error:
        raise BackupError(
            f'{label}: gpg failed while encrypting: {os_reason(error, folder)}', step=step
        ) from error


def gpg_encrypt_args(fingerprints: Sequence[str], plain: Path, encrypted: Path) -> list[str]:
    """Given fingerprints, return gpg's arguments that encrypt ``plain`` to exactly them into
    ``encrypted`` (an existing file of ours: --yes); python-gnupg puts its own before them (see
    ``GnuPG.make_args``). ``run --dry-run`` prints the same."""
    return [
        '--encrypt',
        *(word for fingerprint in fingerprints for word in ('--recipient', fingerprint)),
        '--yes',
        '--output',
        str(encrypted),
        '--trust-model',
        'always',  # every key was checked by resolve_recipients
        # gpg compresses by default, and compressing zstd output again only burns CPU.
        '--compress-algo',
        'none',
        # gpg.conf must not add anyone: no encrypt-to, no hidden key ids.
        '--no-encrypt-to',
        '--no-throw-keyids',
        '--',
        str(plain),  # gpg reads the file itself: no Python thread copies the bytes
    ]


def encrypt_artifact(
    plain: Path,
    encrypted: Path,
    gpg: GnuPG,
    recipients: Sequence[Recipient],
    timeout: float,
    label: str,
) -> tuple[int, str]:
    """Given a plaintext file, encrypt it to exactly ``recipients`` into ``encrypted``.

    Return (size, SHA-256). Raise BackupError if gpg fails or the result is addressed to anyone else.
    """
    step = f'encrypt {label}'
    os.close(create_private_file(encrypted))  # gpg --yes overwrites our own new file, not a symlink
    pipe = Pipeline(f'gpg {label}', step, timeout)
    _thread_pipeline.current = pipe
    try:
        with pipe, _gpg_write_errors(label, step, encrypted.parent):
            # What encrypt_file does, with the arguments built by gpg_encrypt_args: the very
            # ones run --dry-run prints.
            result = gpg.result_map['crypt'](gpg)
            gpg._handle_io(
                gpg_encrypt_args([rec.fingerprint for rec in recipients], plain, encrypted),
                io.BytesIO(b''),
                result,
                binary=True,
            )
            if pipe.timed_out:
                raise BackupError(f'{label}: encryption timed out after {timeout} s', step=step)
    finally:
        _thread_pipeline.current = None
    if not result.ok or getattr(result, 'returncode', None):
        tail = mask_secrets('\n'.join((result.stderr or '').splitlines()[-STDERR_TAIL_LINES:]))
        hint = ' (disk full)' if 'No space left' in tail or disk_full(encrypted.parent) else ''
        raise BackupError(f'{label}: gpg failed: {result.status}{hint}', step=step, detail=tail)
    mismatch = addressed_to_problem(packet_recipients(encrypted, Path(gpg.gnupghome)), recipients)
    if mismatch:
        raise BackupError(f'{label}: ciphertext {mismatch}; refusing it', step=step)
    with open(encrypted, 'rb') as handle:
        digest = sha256_of(handle.fileno())
        # On disk before rotation may delete an older copy (the plaintext needs no such care).
        os.fsync(handle.fileno())
    return encrypted.stat().st_size, digest


def encrypt_made(made: Made, config: Config, gpg: GnuPG, recipients: Sequence[Recipient]) -> Made:
    """Given a dumped artifact, encrypt it beside its day slot; return it with size and SHA-256."""
    log.info('encrypt %s', made.artifact.label)
    try:
        made.size, made.sha256 = encrypt_artifact(
            made.plain_path,
            made.encrypted_tmp,
            gpg,
            recipients,
            config.dump_timeout,
            made.artifact.label,
        )
    except BaseException:
        remove_path(made.encrypted_tmp)
        raise
    return made


# -- Commit: a run enters its slots whole or not at all ---------------------------------------------


def make_all(
    config: Config, report: Report, gpg: GnuPG, rundir: Path, day_dir: Path, run_id: str
) -> list[Made]:
    """Dump every artifact, one after another, while the previous one is encrypted: each dump
    already keeps both cores busy (dumper, server, zstd -T0), so two at once only contend, but gpg
    uses one core and fits beside the next dump. Raise the first BackupError after all finished."""
    pg_superuser, mysql_users, lacks = database_limits(config)
    report.warnings += lacks
    artifacts = plan_artifacts(
        config, run_id, rundir, pg_superuser=pg_superuser, mysql_users=mysql_users
    )
    if config.files:
        save_crontab(rundir)
    errors: list[BackupError] = []
    encrypting: list[concurrent.futures.Future[Made]] = []
    made: list[Made] = []
    # The index and the MariaDB users are made once every dump succeeded. Each database's rows are
    # counted in its dump's own snapshot (DumpSnapshot), right after the dump, so that a drill
    # compares a restore with what the dump really held, and a dump that lost rows shows.
    counts: dict[str, dict[str, int]] = {}
    # Grants likewise: PostgreSQL's catalogs are readable by any user, MariaDB's grant tables only
    # if the backup user was given them (else a warning said so, and the index has none).
    grants: dict[str, dict[str, str]] = {}
    generated = (MYSQL_USERS, RUN_INDEX)
    # One failed encryption fails the run: the ones queued behind it are skipped, not each left to
    # run into the same hang (gpg that never returns would cost a timeout per artifact).
    encryption_failed = threading.Event()

    def encrypt_unless_failed(item: Made) -> Made:
        if encryption_failed.is_set():
            raise BackupError(
                f'{item.artifact.label}: not encrypted: an earlier encryption failed',
                step=f'encrypt {item.artifact.label}',
            )
        try:
            return encrypt_made(item, config, gpg, report.recipients)
        except BackupError:
            encryption_failed.set()
            raise

    main = [artifact for artifact in artifacts if artifact.kind not in generated]
    late = [artifact for artifact in artifacts if artifact.kind in generated]
    with (
        concurrent.futures.ThreadPoolExecutor(DUMPS_AT_ONCE) as dumps,
        concurrent.futures.ThreadPoolExecutor(1) as encryptions,
    ):
        dumping = [
            dumps.submit(
                dump_artifact,
                artifact,
                config,
                rundir,
                counts,
                grants if artifact.kind == 'psql' or mysql_users else None,
            )
            for artifact in main
        ]

        def encrypt_next(artifact: Artifact, future: concurrent.futures.Future[Any]) -> None:
            try:
                plain, raw_bytes, warnings = future.result()
            except BackupError as error:
                log.error('%s', error)
                errors.append(error)
                return
            name = artifact.filename + '.gpg'
            item = Made(
                artifact,
                plain,
                raw_bytes,
                temp_name(day_dir / name),
                name,
                warnings=warnings,
                compressed_bytes=plain.stat().st_size,
            )
            encrypting.append(encryptions.submit(encrypt_unless_failed, item))

        try:
            for artifact, future in zip(main, dumping):
                encrypt_next(artifact, future)
            for artifact in late if not errors else []:
                dumping.append(
                    dumps.submit(
                        dump_generated, artifact, artifacts, config, rundir, lacks, counts, grants
                    )
                )
                encrypt_next(artifact, dumping[-1])
            for encrypted in encrypting:
                try:
                    made.append(encrypted.result())
                except BackupError as error:
                    log.error('%s', error)
                    errors.append(error)
        except BaseException:
            for pending in dumping:
                pending.cancel()  # artifacts not started yet never start
            for queued in encrypting:
                queued.cancel()
            kill_all_children()
            raise
    report.made = made
    if errors:
        first = errors[0]
        if len(errors) > 1:
            first.detail = '\n'.join([first.detail, *(f'also: {err}' for err in errors[1:])])
        raise first
    return made


def shrink_warnings(made: Sequence[Made], state: Mapping[str, Any]) -> list[str]:
    """Given this run's artifacts and the last run's sizes, warn on a database dump under half its
    size. Not the roles or users files: they follow the whole server's accounts, not the data."""
    previous = state.get('raw_sizes', {})
    warnings = []
    for item in made:
        before = previous.get(item.artifact.label)
        if (
            item.artifact.kind in DATABASE_KINDS
            and before
            and item.raw_bytes < before * SHRINK_WARN_RATIO
        ):
            warnings.append(
                f'{item.artifact.label} shrank from {human_size(before)} to '
                f'{human_size(item.raw_bytes)} since the last run: check the data'
            )
    return warnings


def commit_slots(
    config: Config,
    report: Report,
    made: Sequence[Made],
    when: dt.datetime,
    run_id: str,
    stamp: float,
) -> set[Path]:
    """Put the run's encrypted files into its day slot (and the weekly ones into its week slot),
    then commit each slot by writing its manifest. Return every path this run wrote.

    The order, and why a crash at any instant (kill -9, power loss, ENOSPC) is safe:
    1. each ciphertext is already whole and fsynced under a temporary name in the day slot;
    2. it gets its final name by link + unlink, and the weekly ones a hard link in the week slot:
       names carry the run id, so no earlier run's file is ever renamed over, and a link that
       would replace one fails instead (EEXIST);
    3. fsync both slot folders: every name is durable before any manifest names it;
    4. write the day manifest (temporary name, fsync, rename, fsync of the folder): the rename is
       the day slot's commit point; then the same for the week manifest.
    A slot holds this run only once its manifest is there; until then the run's files in it are
    "uncommitted": no manifest names them, ``sweep_uncommitted`` removes them under the lock at the
    next invocation (and here, on any failure), ``verify`` reports them, ``sync`` never sends them.
    The earlier runs' files and manifests are never written to: they go only by retention, after
    the transfer of this run was checked.
    """
    report.step = 'commit'
    day_name, week_name = slot_names(config, when)
    day_dir = config.backup_dir / day_name
    week_dir = config.backup_dir / week_name if week_name else None
    written: set[Path] = set()
    manifest = manifest_name(config, run_id)
    try:
        if week_dir:
            ensure_private_dir(week_dir)
        for item in made:
            final = day_dir / item.encrypted_name
            os.utime(item.encrypted_tmp, (stamp, stamp))
            os.link(item.encrypted_tmp, final)
            written.add(final)
            os.unlink(item.encrypted_tmp)
            if week_dir and item.artifact.weekly:
                # hard links: the weekly copy costs no disk
                os.link(final, week_dir / item.encrypted_name)
                written.add(week_dir / item.encrypted_name)
        for slot in (day_dir, week_dir):
            if slot:
                fsync_dir(slot)
        slots = [(day_dir, made)]
        if week_dir:
            slots.append((week_dir, [item for item in made if item.artifact.weekly]))
        for slot, items in slots:
            write_atomically(
                slot,
                manifest,
                manifest_bytes({item.encrypted_name: item.sha256 for item in items}),
                mtime=stamp,
            )
            written.add(slot / manifest)
            report.slots.append(slot.name)
    except BaseException as error:
        # Roll back to the earlier state: a slot without this run's manifest drops its files.
        sweep_uncommitted(config, [day_dir, *([week_dir] if week_dir else [])])
        if isinstance(error, BackupError):
            error.step = 'commit'
        if not isinstance(error, OSError):
            raise
        raise BackupError(
            f'cannot commit the run into {error.filename or day_dir}: {os_reason(error)}; '
            'the slots keep their earlier runs',
            step='commit',
        ) from error
    return written


def replace_latest(config: Config, rundir: Path, made: Sequence[Made], stamp: float) -> None:
    """Move this run's plaintext into ``latest``, aged from ``stamp``, then remove this backup's
    earlier plaintext there (another BACKUP_NAME's files stay: each config replaces only its own)."""
    latest = config.insecure_dir / 'latest'
    if latest.is_symlink() or (os.path.lexists(latest) and not latest.is_dir()):
        remove_path(latest)  # never followed
    ensure_private_dir(latest)
    mine = {item.plain_path.name for item in made}
    for name in sorted(mine):
        os.utime(rundir / name, (stamp, stamp))  # its age is what the expiry looks at
        try:
            os.rename(rundir / name, latest / name)
        except FileNotFoundError:  # an invocation removed the empty latest/ meanwhile
            ensure_private_dir(latest)
            os.rename(rundir / name, latest / name)
    for entry in latest.iterdir():
        if entry.name not in mine and run_id_of(config.name, entry.name):
            remove_path(entry)
    remove_path(rundir)


# -- Retention: runs in slots, identified by their manifests, removed only after a successful run ---


def retention_plan(config: Config, when: dt.datetime, keep: set[Path]) -> list[Path]:
    """Given this run's start and files (never removed), return the files retention removes: whole
    runs of this backup only, each manifest before its files (a run stops being a run first).

    A day slot drops its runs of other days and an earlier run of this same hour (a same-hour rerun
    replaces it; other hours the same day stay); a week slot and ONLY_ONE_DAY's day0 keep only this
    run; BACKUP_LIMIT_MB then drops whole runs, oldest first, until the folder fits. A run dated
    after this one was made under a wrong clock: it is no newer for that, and goes like an old one.
    """
    day_name, week_name = slot_names(config, when)
    doomed: list[Path] = []
    for slot_name in (day_name, week_name):
        if slot_name is None:
            continue
        slot = config.backup_dir / slot_name
        runs = own_runs(config, slot)
        kept: set[str] = set()
        going: list[SlotRun] = []
        for run in runs:
            started = run_started(config, run)
            stays = run.manifest in keep or (
                slot_name == day_name
                and not config.only_one_day
                and started.date() == when.date()
                and started.hour != when.hour
                and started <= when
            )
            if stays:
                kept |= {run.manifest.name, *run.files}
            else:
                going.append(run)
        for run in going:
            for name in (run.manifest.name, *run.files):
                path = slot / name
                if name not in kept and path not in doomed and os.path.lexists(path):
                    doomed.append(path)
    if config.limit_mb:
        doomed += _over_limit(config, when, keep, set(doomed))
    return doomed


def _over_limit(
    config: Config, when: dt.datetime, keep: set[Path], doomed: set[Path]
) -> list[Path]:
    """Return whole runs of this backup to remove, oldest first (a run dated in the future first),
    until the folder's disk use fits BACKUP_LIMIT_MB. The other backups' files count, never go."""

    def usage(excluded: set[Path]) -> int:
        seen: set[tuple[int, int]] = set()
        total = 0
        for slot in all_slots(config.backup_dir):
            for entry in slot.iterdir():
                if entry in excluded or not entry.is_file() or entry.is_symlink():
                    continue
                info = entry.lstat()
                if (info.st_dev, info.st_ino) not in seen:  # hard links count once
                    seen.add((info.st_dev, info.st_ino))
                    total += info.st_blocks * 512
        return total

    def age_order(run: SlotRun) -> tuple[bool, dt.datetime]:
        started = run_started(config, run)
        return (started <= when, started)

    limit = config.limit_mb * 1024 * 1024
    removed = set(doomed)
    extra: list[Path] = []
    runs = sorted(
        (run for slot in all_slots(config.backup_dir) for run in own_runs(config, slot)),
        key=age_order,
    )
    for run in runs:
        if usage(removed) <= limit:
            break
        paths = [run.manifest, *(run.slot / name for name in run.files)]
        if any(path in keep for path in paths):
            continue  # the latest run is never pruned
        new = [path for path in paths if path not in removed and os.path.lexists(path)]
        removed.update(new)
        extra += new
    return extra


def sweep_uncommitted(config: Config, slots: Sequence[Path]) -> list[str]:
    """Given slots, remove this backup's files that no manifest there names (a commit that never
    got its manifest: see ``commit_slots``); return what went. Only under the run lock."""
    removed = []
    for slot in slots:
        if not slot.is_dir() or slot.is_symlink():
            continue
        named = {name for run in slot_runs(slot) for name in (run.manifest.name, *run.files)}
        for entry in slot.iterdir():
            if entry.name not in named and run_id_of(config.name, entry.name):
                remove_path(entry)
                removed.append(str(entry))
    return removed


def plaintext_expired(info: os.stat_result, now: float) -> bool:
    """Given a plaintext file's stat, return True if every invocation must remove it now: dated more
    than PLAINTEXT_EXPIRES ago, or ahead of the clock (written under a wrong clock: its real age is
    unknown, and waiting for its date would keep it for as long as the clock was off)."""
    return now - info.st_mtime > PLAINTEXT_EXPIRES or info.st_mtime - now > CLOCK_SLACK


def expired_plaintext(insecure_dir: Path) -> list[Path]:
    """Given the private folder, return the files in ``latest`` that expired (see above)."""
    latest = insecure_dir / 'latest'
    if insecure_dir.is_symlink() or latest.is_symlink() or not latest.is_dir():
        return []
    now = time.time()
    expired = []
    for entry in sorted(latest.iterdir()):
        with contextlib.suppress(FileNotFoundError):
            if plaintext_expired(entry.lstat(), now):
                expired.append(entry)
    return expired


def remove_expired_plaintext(insecure_dir: Path) -> list[str]:
    """Given the private folder, remove from ``latest`` every file that expired (whichever backup it
    belongs to: the bound is a promise for all plaintext), ``latest`` itself once empty, or all of
    it if it is a planted symlink; return what went. Every invocation does this first, even one
    that then fails."""
    latest = insecure_dir / 'latest'
    if insecure_dir.is_symlink() or not os.path.lexists(latest):
        return []
    if latest.is_symlink() or not latest.is_dir():
        remove_path(latest)  # a planted symlink is removed, never followed
        return [str(latest)]
    removed = []
    for entry in expired_plaintext(insecure_dir):
        remove_path(entry)
        removed.append(str(entry))
    with contextlib.suppress(OSError):
        latest.rmdir()  # only if empty: nothing left to roll back to
        removed.append(str(latest))
    return removed


def expire_plaintext(insecure_dir: Path) -> list[str]:
    """Remove expired plaintext as ``remove_expired_plaintext`` does, and log each removal; raise
    BackupError if one cannot go (a read-only or broken disk): the 24-hour bound is broken then,
    and the admins must hear of it."""
    try:
        removed = remove_expired_plaintext(insecure_dir)
    except OSError as error:
        raise BackupError(
            f'cannot remove plaintext older than 24 hours: {error.filename or insecure_dir}: '
            f'{error.strerror}; remove it by hand',
            step='expire plaintext',
        ) from error
    for path in removed:
        log.info('removed plaintext older than 24 hours: %s', path)
    return removed


def sweep_temporaries(config: Config) -> list[str]:
    """Remove what killed runs of this backup left: temporaries, run folders, and files of a commit
    that never got its manifest. Return what went. Only under the run lock; another BACKUP_NAME's
    files in a shared folder are left alone (its own runs sweep them)."""
    removed = []
    if config.insecure_dir.is_dir() and not config.insecure_dir.is_symlink():
        for entry in config.insecure_dir.iterdir():
            if entry.name.startswith((RUN_PREFIX, TMP_PREFIX)):
                remove_path(entry)
                removed.append(str(entry))
    if config.backup_dir.is_dir() and not config.backup_dir.is_symlink():
        slots = all_slots(config.backup_dir)
        for slot in [config.backup_dir, *slots]:
            for entry in slot.iterdir():
                if run_id_of(config.name, temp_target(entry.name)):
                    remove_path(entry)
                    removed.append(str(entry))
        removed += sweep_uncommitted(config, slots)
    return removed


# -- Transfer: one interface, rsync or rclone, chosen once per run; every copy proved by checksum ---


def rsync_base(config: Config, hard_links: bool = True) -> list[str]:
    """Return rsync's argv start: archive mode, hard links kept (the remote week copy costs no
    disk either), and an ssh that fails fast.

    No --partial-dir: the README's forced command (rrsync -no-overwrite) refuses it, and a file cut
    short is better sent again whole than resumed into a remote that never rewrites what it holds.
    """
    argv = [
        'rsync',
        '-a',
        *(['-H'] if hard_links else []),
        f'--timeout={RSYNC_IO_TIMEOUT}',
        *([f'--bwlimit={config.sync_bwlimit}'] if config.sync_bwlimit else []),  # KiB/s
    ]
    if ':' in config.remote.split('/', 1)[0]:
        rsh = os.environ.get('RSYNC_RSH', '').strip() or 'ssh'  # empty: rsync's own default
        try:
            words = shlex.split(rsh)
        except ValueError as error:
            raise BackupError(
                f'RSYNC_RSH cannot be split into words ({error}): fix its quotes or unset it',
                step='prepare',
            ) from error
        if not words or not words[0]:
            raise BackupError('RSYNC_RSH names no program: fix it or unset it', step='prepare')
        if Path(words[0]).name == 'ssh':
            # BatchMode: never wait on a password or host-key prompt under cron.
            rsh += f' -o BatchMode=yes -o ConnectTimeout={SSH_CONNECT_TIMEOUT}'
        argv += ['-e', rsh]
    return argv


def committed_files(config: Config) -> list[str]:
    """Return what the manifests name (see ``manifest_files``), relative to the backups folder: each
    committed run's files and manifest, in every slot, whichever backup made them. A file no
    manifest names (a stray copy, plaintext dropped into a slot, an unfinished commit) is not in
    it: what is sent is what the manifests vouch for."""
    return list(manifest_files(config))


@dataclasses.dataclass
class RemoteCheck:
    """How the remote copies compared with the manifests."""

    bad: list[str]  # in the transport's own naming (see Transport.name_of): missing or different
    hash_type: str  # the backend's hash that was compared ('' if it has none, or rsync's checksum)
    size_only: list[str]  # present with the right size, but the backend gave no hash for them


class Transport:
    """How a run sends the backups folder to BACKUP_REMOTE and proves the copy: rsync or rclone,
    chosen once by ``transport_for``. Names are what the messages show (``name_of``); every argv
    is built by an ``argv_*`` method, which ``run --dry-run`` prints as the run executes it."""

    program = ''  # what the run starts, and what status calls the transport
    via = ''  # what status adds to the remote's name

    def __init__(self, config: Config) -> None:
        self.config = config

    def name_of(self, relative: str) -> str:
        """Given slot/name (relative to the backups folder), return the name messages use."""
        raise NotImplementedError

    def check_setup(self) -> None:
        """The run's pre-flight (and check's): raise BackupError if the remote cannot be used as
        configured. Starts nothing."""

    def probe(self) -> tuple[bool | None, str]:
        """check's look at the remote: return (mark, text), text '' if ``check_setup`` already
        said what is wrong. Raise BackupError if the remote cannot be reached."""
        raise NotImplementedError

    def send(self, run_files: Sequence[str]) -> list[str]:
        """Given this run's files (in ``name_of`` naming), send them and whatever committed run
        the remote lacks; return what is to be checked after. Raise BackupError on failure."""
        raise NotImplementedError

    def resend(self, names: Sequence[str]) -> None:
        """Given files found to differ, send them again whatever their times."""
        raise NotImplementedError

    def mismatches(self, names: Sequence[str] | None) -> RemoteCheck:
        """Given files (None: every file a manifest names), return which remote copies are missing
        or differ. Raise BackupError if the remote cannot be reached."""
        raise NotImplementedError

    def summary(self, checked: Sequence[str], check: RemoteCheck | None) -> tuple[str, list[str]]:
        """Return the mail's transfer line ('' for none) and warnings on how the copy was checked
        (``check`` None: it was not)."""
        return '', []

    def plan(self) -> list[tuple[list[str], str]]:
        """Return the run's transfer commands, each with what it is given: for run --dry-run."""
        raise NotImplementedError

    def shown(self, argv: Sequence[str]) -> str:
        """Given one of its argv, return it as run --dry-run prints it (a password masked: an
        RSYNC_RSH or a remote may name one)."""
        return mask_secrets(shlex.join(argv))


def transport_for(config: Config) -> Transport:
    """Return the run's transport: the only place that asks which kind BACKUP_REMOTE is."""
    if config.remote.startswith('rclone:'):
        return RcloneTransport(config)
    return RsyncTransport(config)


def file_list(names: Sequence[str]) -> bytes:
    """Given names, return them as a --files-from list on stdin."""
    return ''.join(name + '\n' for name in names).encode()


def transfer(transport: Transport, report: Report, written: set[Path]) -> None:
    """Send this run's files (and what the remote lacks), then check them and everything just
    sent against the manifests; send a differing copy once more. Raise BackupError if one still
    differs, naming the remote."""
    config = transport.config
    checked = transport.send(
        sorted(transport.name_of(f'{path.parent.name}/{path.name}') for path in written)
    )
    report.transfer = transport.summary(checked, None)[0]
    report.step = 'verify remote'
    check = transport.mismatches(checked)
    if check.bad:
        # rsync's quick check (size and mtime) misses a file rewritten with the same size in the
        # same second, and a copy corrupted on the remote: send exactly those again.
        report.warnings.append(
            f'{len(check.bad)} remote cop(ies) differed from the manifest after the transfer and '
            f'were sent again: {", ".join(check.bad)}'
        )
        transport.resend(check.bad)
        check = transport.mismatches(checked)
    if check.bad:
        raise BackupError(
            f'the copy on {config.remote} differs from the manifest: {", ".join(check.bad)}',
            step='verify remote',
        )
    report.transfer, warnings = transport.summary(checked, check)
    report.warnings += warnings


class RsyncTransport(Transport):
    """rsync -a to a local folder or over ssh (possibly a write-only rrsync remote), then its
    --checksum dry run of this run's files."""

    program = 'rsync'

    def name_of(self, relative: str) -> str:
        return f'{self.config.backup_dir.name}/{relative}'  # relative to the folder's parent

    def argv_send(self, ignore_times: bool = False) -> list[str]:
        """rsync of the files named on stdin (``ignore_times``: a copy found to differ)."""
        return [
            *rsync_base(self.config),
            *(['--ignore-times'] if ignore_times else []),
            '--files-from=-',
            '--',
            str(self.config.backup_dir.parent) + '/',
            self.config.remote,
        ]

    def argv_check(self) -> list[str]:
        """rsync's checksum dry run of the files named on stdin. Without -H: a hard-linked week
        copy must be checked as a file of its own, not as a link."""
        return [
            *rsync_base(self.config, hard_links=False),
            '--dry-run',
            '--checksum',
            '--itemize-changes',
            '--files-from=-',
            '--',
            str(self.config.backup_dir.parent) + '/',
            self.config.remote,
        ]

    def argv_probe(self, empty: str) -> list[str]:
        return [*rsync_base(self.config), '--dry-run', '--', empty + '/', self.config.remote]

    def check_setup(self) -> None:
        """Raise BackupError if $RSYNC_RSH cannot be used (rsync_base builds it)."""
        rsync_base(self.config)

    def parent_missing(self, step: str) -> None:
        """Raise BackupError if the remote is a local folder whose parent does not exist: rsync
        would fail with a bare change_dir#3. Not a pre-flight check of the run: a remote that is
        gone tonight still leaves tonight's backup in the local slots (T1)."""
        parent = missing_remote_parent(self.config)
        if parent is not None:
            raise BackupError(
                f'BACKUP_REMOTE {self.config.remote} is a local folder whose parent {parent} does '
                f'not exist: make it with mkdir -p {shlex.quote(str(parent))}',
                step=step,
            )

    def probe(self) -> tuple[bool | None, str]:
        try:
            self.parent_missing('check')
        except BackupError as error:
            return False, f'remote: {error}'
        with tempfile.TemporaryDirectory() as empty:
            run_command(
                self.argv_probe(empty),
                what=f'rsync probe of {self.config.remote}',
                step='check',
                timeout=90,
            )
        return True, f'remote {self.config.remote}: reachable'

    def _send(self, names: Sequence[str], ignore_times: bool) -> None:
        self.parent_missing('sync')
        run_command(
            self.argv_send(ignore_times),
            what=f'rsync to {self.config.remote}',
            step='sync',
            timeout=self.config.sync_timeout,
            input_bytes=file_list(names),
        )

    def send(self, run_files: Sequence[str]) -> list[str]:
        """Send every committed run (see ``committed_files``): rsync's quick check leaves out
        what the remote holds; check this run's files."""
        self._send([self.name_of(name) for name in committed_files(self.config)], False)
        return list(run_files)

    def resend(self, names: Sequence[str]) -> None:
        self._send(names, True)

    def mismatches(self, names: Sequence[str] | None) -> RemoteCheck:
        if names is None:
            names = [self.name_of(name) for name in committed_files(self.config)]
        _, out = run_command(
            self.argv_check(),
            what=f'rsync --checksum check of {self.config.remote}',
            step='verify remote',
            timeout=self.config.sync_timeout,
            input_bytes=file_list(names),
        )
        bad = []
        for line in out.splitlines():
            # "<f"/">f" means rsync would send the file: missing or different on the remote.
            if len(line) > 12 and line[0] in '<>c' and line[1] == 'f':
                bad.append(line[12:].strip())
        return RemoteCheck(bad, 'checksum', [])

    def plan(self) -> list[tuple[list[str], str]]:
        return [
            (self.argv_send(), 'every file that manifests name, on stdin'),
            (self.argv_check(), "this run's files, on stdin: the checksum check"),
        ]


# Object storage through rclone (BACKUP_REMOTE=rclone:REMOTE:PATH). The remote's credentials stay in
# the user's rclone.conf; ppbackup never writes it and never puts a credential on a command line.
# rclone only ever copies: nothing is deleted remotely (retention there is the bucket's lifecycle
# rule), and it needs a key that may write and list, never one that may read or delete.


def rclone_target(config: Config, folder: str = '') -> str:
    """Return REMOTE:PATH/<backups folder>[/folder]: the same layout rsync makes."""
    match = RCLONE_REMOTE_RE.match(config.remote)
    assert match, 'load_config checked BACKUP_REMOTE'
    path = '/'.join(
        part for part in (match.group(2).rstrip('/'), config.backup_dir.name, folder) if part
    )
    return f'{match.group(1)}:{path}'


def rclone_base(config: Config) -> list[str]:
    """Return rclone's argv start: never a prompt, bounded waits, few retries (the next run
    retries), and no call that a key which may only write and list is refused."""
    return [
        'rclone',
        '--ask-password=false',
        f'--contimeout={SSH_CONNECT_TIMEOUT}s',
        f'--timeout={RSYNC_IO_TIMEOUT}s',
        '--retries=2',
        '--low-level-retries=3',
        # S3: no bucket creation or check, and no HEAD after an upload (a HEAD needs read access;
        # the upload's own MD5 check and the listing below prove the copy instead).
        '--s3-no-check-bucket',
        '--s3-no-head',
        # S3: up to 5 GiB in one PUT, so that the listing's ETag is the MD5 of the whole file; a
        # multipart object's MD5 sits in metadata, which only a key that may read can see.
        '--s3-upload-cutoff=5Gi',
        *([f'--bwlimit={config.sync_bwlimit}K'] if config.sync_bwlimit else []),
    ]


def run_rclone(
    config: Config,
    args: Sequence[str],
    *,
    step: str,
    input_bytes: bytes | None = None,
    ok_codes: Sequence[int] = (0,),
    timeout: float | None = None,
) -> tuple[int, str]:
    """Given rclone arguments, run rclone under ``timeout`` (default BACKUP_SYNC_TIMEOUT); return
    (exit code, stdout). Raise BackupError naming the remote if it fails."""
    return run_command(
        [*rclone_base(config), *args],
        what=f'rclone {args[0]} {config.remote}',
        step=step,
        timeout=timeout or config.sync_timeout,
        input_bytes=input_bytes,
        ok_codes=ok_codes,
    )


def rclone_list_args(config: Config, folder: str, hash_type: str) -> list[str]:
    """rclone's listing of a folder below the remote's backups folder ('' for all, recursively)."""
    args = ['lsjson', '--files-only', '--no-modtime', '--no-mimetype']  # mod times need reads
    args += [f'--hash-type={hash_type}'] if hash_type else []
    args += ['--recursive'] if not folder else []
    return [*args, '--', rclone_target(config, folder)]


def rclone_list(
    config: Config, folder: str, hash_type: str, step: str = 'sync'
) -> dict[str, tuple[int, str]]:
    """Given a folder below the remote's backups folder ('' for all of it, recursively), return
    {path relative to it: (size, hash or '')}; a folder not there yet is empty."""
    code, out = run_rclone(
        config, rclone_list_args(config, folder, hash_type), step=step, ok_codes=(0, 3)
    )
    if code == 3:  # rclone's "directory not found": nothing was sent there yet
        return {}
    try:
        entries = json.loads(out)
        prefix = f'{folder}/' if folder else ''
        return {
            prefix + entry['Path']: (
                int(entry['Size']),
                str((entry.get('Hashes') or {}).get(hash_type) or '').lower(),
            )
            for entry in entries
        }
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise BackupError(
            f'rclone lsjson {config.remote} gave a listing ppbackup cannot read: {error}',
            step=step,
        ) from error


def rclone_hash_type(config: Config, step: str = 'sync') -> str:
    """Return the strongest hash the remote's backend lists (sha256, md5, sha1), or ''."""
    _, out = run_rclone(config, ['backend', 'features', '--', rclone_target(config)], step=step)
    try:
        hashes = json.loads(out).get('Hashes') or []
    except (ValueError, AttributeError):
        hashes = []
    return next((name for name in ('sha256', 'md5', 'sha1') if name in hashes), '')


def manifest_files(config: Config) -> dict[str, str]:
    """Return {slot/name: sha256} for every file a local manifest names, then the manifests
    themselves (with ''): data first, so that a manifest is sent only after its files."""
    data: dict[str, str] = {}
    manifests: dict[str, str] = {}
    for slot in all_slots(config.backup_dir):
        for run in slot_runs(slot):
            for name, digest in read_manifest(run.manifest).items():
                if '/' not in name and not name.startswith('.') and (slot / name).is_file():
                    data[f'{slot.name}/{name}'] = digest
            manifests[f'{slot.name}/{run.manifest.name}'] = ''
    return {**data, **manifests}


class RcloneTransport(Transport):
    """rclone copy, never delete, then the listing's hashes compared with the manifests."""

    program = 'rclone'
    via = ' (through rclone)'

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.sent: list[str] = []

    def name_of(self, relative: str) -> str:
        return relative  # relative to the backups folder, as on the remote

    def argv_copy(self) -> list[str]:
        """rclone copy of the files named on stdin, whatever the remote holds."""
        return [
            *rclone_base(self.config),
            'copy',
            '--ignore-times',
            '--files-from-raw=-',
            '--',
            str(self.config.backup_dir),
            rclone_target(self.config),
        ]

    def argv_list(self, folder: str = '', hash_type: str = '') -> list[str]:
        return [*rclone_base(self.config), *rclone_list_args(self.config, folder, hash_type)]

    def probe(self) -> tuple[bool | None, str]:
        """Say whether rclone knows the remote, can list it, and which hash the copies will be
        checked by. Lists only: a key that may only write and list passes."""
        config = self.config
        match = RCLONE_REMOTE_RE.match(config.remote)
        assert match, 'load_config checked BACKUP_REMOTE'
        _, out = run_command(
            ['rclone', '--ask-password=false', 'listremotes'], what='rclone', step='check'
        )
        if f'{match.group(1)}:' not in out.split():
            missing = (
                f'remote {config.remote}: rclone.conf has no remote named {match.group(1)!r} '
                '(rclone config file shows which file; RCLONE_CONFIG names another)'
            )
            return False, missing
        # Listing the top of the backups folder proves the address and the key; a folder not
        # there yet (exit 3) is fine: the first run makes it.
        run_rclone(
            config,
            ['lsjson', '--max-depth=1', '--no-modtime', '--no-mimetype', '--']
            + [rclone_target(config)],
            step='check',
            ok_codes=(0, 3),
            timeout=90,
        )
        hash_type = rclone_hash_type(config, step='check')
        return (
            True if hash_type else None,
            f'remote {config.remote}: reachable through rclone; copies checked by '
            + (hash_type.upper() if hash_type else 'size only (the backend gives no hash)'),
        )

    def resend(self, names: Sequence[str]) -> None:
        """Upload the files whatever the remote holds: first the data, then the manifests naming
        it. rclone copy never deletes anything remotely."""
        data = [name for name in names if not name.endswith(MANIFEST_SUFFIX)]
        manifests = [name for name in names if name.endswith(MANIFEST_SUFFIX)]
        for group in (data, manifests):
            if group:
                run_command(
                    self.argv_copy(),
                    what=f'rclone copy {self.config.remote}',
                    step='sync',
                    timeout=self.config.sync_timeout,
                    input_bytes=file_list(group),
                )

    def send(self, run_files: Sequence[str]) -> list[str]:
        """Upload this run's files, and every file an earlier manifest names that the remote
        lacks or holds at another size (a run whose transfer failed or was cut off); check both."""
        config = self.config
        remote = rclone_list(config, '', '')
        wanted = set(run_files)
        self.sent = [
            name
            for name in manifest_files(config)
            if name in wanted
            or remote.get(name, (-1, ''))[0] != (config.backup_dir / name).stat().st_size
        ]
        self.resend(self.sent)
        return sorted(set(run_files) | set(self.sent))

    def mismatches(self, names: Sequence[str] | None) -> RemoteCheck:
        """Compare each remote copy with the manifest: by SHA-256 where the backend has it, else
        by its MD5 or SHA-1 computed here from the local file once that file matched the
        manifest's SHA-256, else by size alone (reported: a key that cannot read cannot prove
        more)."""
        config = self.config
        expected = manifest_files(config)
        names = sorted(expected if names is None else names)
        hash_type = rclone_hash_type(config, step='verify remote')
        check = RemoteCheck([], hash_type, [])
        for slot in sorted({name.split('/', 1)[0] for name in names}):
            listing = rclone_list(config, slot, hash_type, step='verify remote')
            for name in (name for name in names if name.startswith(slot + '/')):
                local = config.backup_dir / name
                size, remote_digest = listing.get(name, (-1, ''))
                if size != local.stat().st_size:
                    check.bad.append(name)
                    continue
                if not remote_digest:
                    check.size_only.append(name)
                    continue
                digests = file_digests(local, {'sha256', hash_type})
                if expected.get(name) and digests['sha256'] != expected[name]:
                    check.bad.append(name)  # the local file itself is damaged: verify names it
                elif digests[hash_type] != remote_digest:
                    check.bad.append(name)
        return check

    def summary(self, checked: Sequence[str], check: RemoteCheck | None) -> tuple[str, list[str]]:
        config = self.config
        line = f'rclone copy to {config.remote}: {len(self.sent)} file(s) sent'
        if check is None:
            return line, []
        hashed = len(checked) - len(check.size_only)
        line += f'; {len(checked)} checked against the manifests' + (
            f', {hashed} of them by {check.hash_type.upper()}' if hashed else ', by size only'
        )
        warnings = []
        if check.size_only:
            warnings.append(
                f'{config.remote} gives no hash for {len(check.size_only)} file(s), so only their '
                f'size was checked ({", ".join(check.size_only[:5])}); see README, "Object storage"'
            )
        return line, warnings

    def shown(self, argv: Sequence[str]) -> str:
        # No credential is ever on rclone's command line (RCLONE_REMOTE_RE), and masking would
        # turn --ask-password=false into a secret.
        return shlex.join(argv)

    def plan(self) -> list[tuple[list[str], str]]:
        return [
            (self.argv_list(), 'what the remote holds, by size'),
            (
                self.argv_copy(),
                (
                    'the files that manifests name and the remote lacks, data then manifests, '
                    'on stdin; never deletes remotely'
                ),
            ),
            (self.argv_list('SLOT', 'HASH'), "each slot's hashes: the check after the transfer"),
        ]


# -- Monitoring: one mail per run through mailx, a ping, a Prometheus text file ---------------------


def send_mail(addresses: Sequence[str], subject: str, body: str) -> None:
    """Given addresses, mail them through mailx. Raise BackupError if mailx fails."""
    if not addresses:
        return
    run_command(
        ['mailx', '-s', subject, '--', *addresses],
        what='mailx',
        step='mail',
        timeout=120,
        input_bytes=body.encode('utf-8'),
    )


# A ping and a metrics file may neither fail nor hold up a backup: what goes wrong with them is a
# warning in the mail.
def ping_target(url: str, endpoint: str) -> str:
    """Given the ping URL and an endpoint ('' for success, 'start', 'fail', 'log'), return the URL
    to request: the endpoint extends the path, a query string stays as it was."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rstrip('/') + (f'/{endpoint}' if endpoint else '')
    return urllib.parse.urlunsplit(parts._replace(path=path))


def ping_shown(url: str, endpoint: str) -> str:
    """Given the ping URL and an endpoint, return what messages show: scheme, host and endpoint;
    the path is the check's secret token, so it is left out."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition('@')[2]
    return f'{parts.scheme}://{host}/...' + (f'/{endpoint}' if endpoint else '')


def send_ping(url: str, endpoint: str, text: str) -> str:
    """Given the ping URL, an endpoint and a short plain text, POST the text there. Return '' if
    the server answered 2xx, else a warning naming what went wrong. Never raise, and never take
    longer than PING_TIMEOUT in all."""
    shown = ping_shown(url, endpoint)
    outcome: list[str] = []

    def post() -> None:
        request = urllib.request.Request(
            ping_target(url, endpoint),
            data=text.encode('utf-8'),
            method='POST',
            headers={
                'Content-Type': 'text/plain; charset=utf-8',
                'User-Agent': f'ppbackup/{__version__}',
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=PING_TIMEOUT) as response:
                response.read(4096)
            outcome.append('')
        except urllib.error.HTTPError as error:
            error.close()
            outcome.append(f'HTTP {error.code} {error.reason}')
        except (OSError, ValueError, http.client.HTTPException) as error:
            reason = getattr(error, 'reason', None) or error  # URLError wraps the cause
            silent = isinstance(reason, TimeoutError)
            outcome.append(f'no answer within {PING_TIMEOUT:g} s' if silent else str(reason))

    # A thread of its own: urllib's timeout bounds each socket operation, not the whole request
    # nor the name lookup. A ping still hanging after PING_TIMEOUT is left behind, a daemon.
    sender = threading.Thread(target=post, name='ppbackup-ping', daemon=True)
    sender.start()
    sender.join(PING_TIMEOUT)
    problem = outcome[0] if outcome else f'no answer within {PING_TIMEOUT:g} s'
    return mask_secrets(f'monitoring ping {shown} failed: {problem}') if problem else ''


def ping_run(config: Config, endpoint: str, text: str) -> list[str]:
    """Given a run's endpoint (start, '' or fail) and text, ping BACKUP_PING_URL if set; return the
    warnings for the mail (a failed ping never fails the run)."""
    problem = send_ping(config.ping_url, endpoint, text) if config.ping_url else ''
    return [f'{problem}; the backup itself is not affected'] if problem else []


Sample = tuple[Mapping[str, str], float]


def _label_value(text: str) -> str:
    return text.replace('\\', '\\\\').replace('"', '\\"').replace('\n', '\\n')


def _sample_value(value: float) -> str:
    if math.isnan(value):
        return 'NaN'
    if math.isinf(value):
        return '+Inf' if value > 0 else '-Inf'
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def prometheus_text(families: Sequence[tuple[str, str, Sequence[Sample]]]) -> str:
    """Given gauge families as (name, help, [(labels, value)]), return them in Prometheus's text
    exposition format, label values escaped."""
    lines = []
    for name, help_text, samples in families:
        lines += [f'# HELP {name} {help_text}', f'# TYPE {name} gauge']
        for labels, value in samples:
            pairs = ','.join(f'{key}="{_label_value(text)}"' for key, text in labels.items())
            lines.append(f'{name}{{{pairs}}} {_sample_value(value)}')
    return '\n'.join(lines) + '\n'


def write_metrics(path: Path, text: str) -> None:
    """Given the metrics file and its text, replace the file whole. Raise BackupError naming the
    path if it cannot be written.

    0644: node_exporter runs as another user. A reader opens the old inode or the new one, never
    half of one (see ``write_atomically``)."""
    try:
        write_atomically(path.parent, path.name, text.encode(), mode=0o644)
    except OSError as error:
        raise BackupError(
            f'cannot write the metrics file {path}: {os_reason(error)}', step='metrics'
        ) from error


def metrics_folder_problem(path: Path) -> str:
    """Given the metrics file, return '' if a temporary can be made beside it (as write_metrics
    does), else why not. Writes nothing else."""
    tmp = atomic_temp_name(path)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        os.unlink(tmp)
    except OSError as error:
        return f'cannot write in {path.parent}: {error.strerror or error}'
    if path.is_symlink() or (path.exists() and not path.is_file()):
        return f'{path} is a symlink or not a file'
    return ''


# -- The run ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
    """What one run did: the mail body and the state file are both made from it."""

    config: Config
    started: float = dataclasses.field(default_factory=time.time)
    step: str = 'start'
    made: list[Made] = dataclasses.field(default_factory=list)
    slots: list[str] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)
    recipients: list[Recipient] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    error: BackupError | None = None
    transfer: str = ''  # what the transfer sent and how the remote copies were checked

    def subject(self) -> str:
        name = self.config.name
        if self.error:
            return f'[ppbackup] {name}: FAILED at {self.error.step or self.step}'
        if self.warnings:
            return f'[ppbackup] {name}: succeeded with {len(self.warnings)} WARNING(s)'
        return f'[ppbackup] {name}: succeeded'

    def body(self) -> str:
        lines = [
            f'backup:      {self.config.name}',
            f'host:        {os.uname().nodename}',
            f'remote:      {self.config.remote}',
            f'started:     {dt.datetime.fromtimestamp(self.started):%Y-%m-%d %H:%M:%S}',
            f'duration:    {time.time() - self.started:.1f} s',
        ]
        if self.error:
            lines += [
                '',
                f'FAILED at step: {self.error.step or self.step}',
                f'error: {mask_secrets(str(self.error))}',
            ]
            if self.error.detail:
                lines += [
                    '',
                    'last lines of its error output:',
                    *('  ' + line for line in mask_secrets(self.error.detail).splitlines()),
                ]
            lines.append('')
            if self.slots:
                lines.append(
                    f'This run was committed to {", ".join(self.slots)} and is kept there; the '
                    'next run sends the remote what it lacks.'
                )
            if not self.removed:
                lines.append(
                    'Earlier backups were left untouched, here and on the remote: retention runs '
                    'only after a checked transfer.'
                )
            lines.append('See README, "What happens when things go wrong".')
        if self.warnings:
            lines += ['', 'WARNINGS:', *(f'  - {warning}' for warning in self.warnings)]
        if self.made and not self.error:
            lines += ['', 'files:']
            lines += [f'  {made.encrypted_name}  {human_size(made.size)}' for made in self.made]
        if self.slots:
            lines += ['', 'slots written: ' + ', '.join(self.slots)]
        if self.removed:
            lines += [f'removed by retention: {len(self.removed)} file(s)']
        if self.transfer:
            lines += [f'transfer: {self.transfer}']
        if self.recipients:
            lines += [
                '',
                'encrypted to:',
                *(f'  {rec.fingerprint}  {rec.uid}' for rec in self.recipients),
            ]
        return '\n'.join(lines) + '\n'

    def ping_text(self) -> str:
        """Return the monitoring ping's short text: the outcome, the step and the error (masked),
        never a program's output, which may quote data."""
        name = self.config.name
        if self.error:
            text = f'{name}: FAILED at {self.error.step or self.step}: {self.error}'
            return mask_secrets(text)[:1000]
        return (
            f'{name}: succeeded in {time.time() - self.started:.0f} s, {len(self.made)} file(s), '
            f'{len(self.warnings)} warning(s)'
        )


def newest_run_time(config: Config) -> float | None:
    """Return the time of this backup's newest run in any slot (its manifest's), or None."""
    # Only this BACKUP_NAME's manifests: another config may share the folder (S1).
    own = re.compile(re.escape(config.name) + r'-[0-9][0-9x-]*' + re.escape(MANIFEST_SUFFIX))
    times = [
        entry.lstat().st_mtime
        for slot in all_slots(config.backup_dir)
        for entry in slot.iterdir()
        if own.fullmatch(entry.name) and entry.is_file()
    ]
    return max(times, default=None)


def run_metrics(report: Report, code: int, state: Mapping[str, Any]) -> str:
    """Given a finished run, its exit code and the state, return the metrics file's text: gauges
    labelled with the backup's name (and each artifact's), as node_exporter's textfile collector
    reads them."""
    backup = {'backup': report.config.name}
    newest = newest_run_time(report.config)
    artifacts = [
        ({**backup, 'artifact': made.artifact.label, 'kind': made.artifact.kind}, made)
        for made in report.made
    ]
    return prometheus_text(
        [
            (
                'ppbackup_last_run_start_timestamp_seconds',
                'When the last run started (Unix time).',
                [(backup, report.started)],
            ),
            (
                'ppbackup_last_run_duration_seconds',
                'How long the last run took.',
                [(backup, round(time.time() - report.started, 3))],
            ),
            (
                'ppbackup_last_run_exit_code',
                'Exit code of the last run: 0 success, 1 failed, 3 a bug, 130/143 interrupted.',
                [(backup, code)],
            ),
            (
                'ppbackup_last_success_timestamp_seconds',
                'When the last successful run finished (Unix time; 0: never).',
                [(backup, float(state.get('last_success') or 0))],
            ),
            (
                'ppbackup_last_run_warnings',
                'Warnings of the last run (they are in its mail).',
                [(backup, len(report.warnings))],
            ),
            (
                'ppbackup_newest_run_age_seconds',
                'Age of the newest run in the backup slots (+Inf: there is none).',
                [(backup, math.inf if newest is None else round(time.time() - newest, 3))],
            ),
            (
                'ppbackup_artifact_raw_bytes',
                'Bytes each artifact of the last run had before compression.',
                [(labels, made.raw_bytes) for labels, made in artifacts],
            ),
            (
                'ppbackup_artifact_compressed_bytes',
                'Bytes of each artifact of the last run after compression.',
                [(labels, made.compressed_bytes) for labels, made in artifacts],
            ),
            (
                'ppbackup_artifact_encrypted_bytes',
                'Bytes of each artifact of the last run as encrypted into the slots.',
                [(labels, made.size) for labels, made in artifacts],
            ),
        ]
    )


def state_path(config: Config) -> Path:
    """Return this backup's state file: one per BACKUP_NAME, so that configs sharing the private
    folder keep their own last run, sizes and transfer."""
    return config.insecure_dir / f'{config.name}{STATE_SUFFIX}'


def load_state(config: Config) -> dict[str, Any]:
    try:
        data = json.loads(state_path(config).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_state(config: Config, state: Mapping[str, Any]) -> None:
    path = state_path(config)
    with contextlib.suppress(OSError):
        write_atomically(
            path.parent, path.name, json.dumps(state, indent=1, sort_keys=True).encode()
        )


def needed_programs(config: Config) -> list[str]:
    """Return the programs this config's run starts (mailx aside: its failure is reported apart)."""
    needed = ['gpg', transport_for(config).program]
    needed += ['tar'] if config.files or config.binaries else []
    needed += ['mysqldump'] if config.mysql_dbs else []
    needed += ['pg_dump'] if config.psql_dbs else []
    needed += [COMPRESSORS[config.compression][0][0]] if config.compression != 'none' else []
    return needed


def check_programs(config: Config) -> None:
    """Raise BackupError naming the programs the run needs that are not on PATH."""
    missing = [program for program in needed_programs(config) if not shutil.which(program)]
    if missing:
        raise _program_missing(', '.join(missing))


def check_private_folders(config: Config) -> None:
    """Raise BackupError if the plaintext or slot folder exists but is a symlink or not ours."""
    for folder in (config.insecure_dir, config.backup_dir):
        if not os.path.lexists(folder):
            continue
        info = folder.lstat()
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            raise BackupError(
                f'{folder} is a symlink or not a folder; refusing to follow it. Remove it and '
                'run again',
                step='prepare',
            )
        if info.st_uid != os.getuid():
            raise BackupError(
                f'{folder} is owned by uid {info.st_uid}, not by this user', step='prepare'
            )
        # The run makes the folder itself 0700; who can write (and reach) a folder above it could
        # put another one in its place.
        changers = changers_of(folder.parent, (os.getuid(), 0))
        if changers:
            raise BackupError(
                '; '.join(changers) + f' (whoever can change it can swap {folder})',
                step='prepare',
            )


def missing_remote_parent(config: Config) -> Path | None:
    """Given the config, return the parent of a local-folder remote if it does not exist (rsync
    makes the remote folder itself, not the folders above it), else None."""
    if ':' in config.remote.split('/', 1)[0]:
        return None  # host:path or rclone:
    parent = (config.home / config.remote).parent
    return None if os.path.isdir(parent) else parent


def check_remote_shell(config: Config) -> None:
    """Raise BackupError if the transport cannot be used as configured (see check_setup)."""
    transport_for(config).check_setup()


# The checks of the run that need no key: `check` runs these very functions, so that a `check`
# that says all is well means a run will not fail on its set-up.
RUN_CHECKS: tuple[tuple[str, Callable[[Config], None]], ...] = (
    ('programs', check_programs),
    ('folders', check_private_folders),
    ('paths', check_paths),
    ('credentials', check_credential_files),
    ('remote', check_remote_shell),
)


def preflight(config: Config, report: Report) -> GnuPG:
    """Check keys, programs, folders, paths and credentials before any dump. Raise BackupError
    if unfit."""
    report.step = 'keys'
    gpg = open_gnupg(config.gnupghome)
    report.recipients, warnings = resolve_recipients(gpg, config.recipients)
    report.warnings += warnings
    report.step = 'prepare'
    for _, check in RUN_CHECKS:
        check(config)
    return gpg


def run_backup(config: Config, report: Report) -> None:
    """Run the whole cycle. Raise BackupError at the first failed step. Retention comes last, once
    the transfer was checked: a run that fails at any step removes nothing."""
    when = dt.datetime.fromtimestamp(report.started)
    stamp = report.started
    state = load_state(config)
    gpg = preflight(config, report)
    report.step = 'prepare'
    ensure_private_dir(config.backup_dir)
    day_name, week_name = slot_names(config, when)
    day_dir = config.backup_dir / day_name
    week_dir = config.backup_dir / week_name if week_name else None
    new_slots = [slot for slot in (day_dir, week_dir) if slot and not os.path.lexists(slot)]
    ensure_private_dir(day_dir)
    run_id = choose_run_id(
        config, when, [day_dir, config.insecure_dir / 'latest', *([week_dir] if week_dir else [])]
    )
    rundir = config.insecure_dir / f'{RUN_PREFIX}{os.getpid()}'
    ensure_private_dir(rundir)
    try:
        report.step = 'dump'
        made = make_all(config, report, gpg, rundir, day_dir, run_id)
        report.warnings += [warning for item in made for warning in item.warnings]
        report.warnings += shrink_warnings(made, state)
        written = commit_slots(config, report, made, when, run_id, stamp)
        report.step = 'latest'
        replace_latest(config, rundir, made, stamp)
    except BaseException:
        for item in report.made:
            remove_path(item.encrypted_tmp)
        # A signal leaves make_all before report.made is set: sweep this process's temporaries.
        for entry in day_dir.glob(f'{TMP_PREFIX}{os.getpid()}-*'):
            remove_path(entry)
        remove_path(rundir)
        for slot in new_slots:
            with contextlib.suppress(OSError):
                slot.rmdir()  # an empty slot would look like a lost backup in status
        raise
    state.update(
        last_run=stamp,
        raw_sizes={item.artifact.label: item.raw_bytes for item in made},
    )
    report.step = 'sync'
    log.info('sync to %s', config.remote)
    transfer(transport_for(config), report, written)
    state['last_transfer'] = time.time()
    save_state(config, state)
    # Only now, with this run whole here and checked on the remote, may earlier runs go; the mail
    # comes after and cannot undo it. Each run goes manifest first: see retention_plan.
    report.step = 'rotate'
    for path in retention_plan(config, when, written):
        remove_path(path)
        report.removed.append(str(path))


def _run_and_record(config: Config, report: Report) -> int:
    """Under the lock: sweep, run the cycle, record the outcome in the state; return the code."""
    code = EXIT_OK
    try:
        for path in sweep_temporaries(config):
            log.info('removed %s', path)
        report.warnings += ping_run(config, 'start', '')
        run_backup(config, report)
    except BackupError as error:
        report.error = error
        code = EXIT_FAILED
    except OSError as error:  # disk full, read-only folder...: name the path
        report.error = BackupError(f'{error.filename or ""}: {os_reason(error)}', step=report.step)
        code = EXIT_FAILED
    except Interrupted as interrupt:
        kill_all_children()
        report.error = BackupError(f'interrupted by {interrupt}', step=report.step)
        code = 128 + interrupt.signum
    except Exception as error:  # a bug: still exactly one FAILED mail, then exit 3
        kill_all_children()
        report.error = BackupError(
            f'internal error: {error!r}', step=report.step, detail=traceback.format_exc()
        )
        code = EXIT_BUG
    state = load_state(config)
    state['last_result'] = 'failed' if report.error else 'succeeded'
    state['last_result_time'] = time.time()
    state['last_error'] = mask_secrets(str(report.error)) if report.error else ''
    if not report.error:
        state['last_success'] = time.time()  # carried across failed runs, for the metrics
    save_state(config, state)
    _record_outcome(config, report, code, state)
    return code


def _record_outcome(config: Config, report: Report, code: int, state: Mapping[str, Any]) -> None:
    """Tell monitoring how the run ended: the ping's end point and the metrics file, if set."""
    report.warnings += ping_run(config, 'fail' if report.error else '', report.ping_text())
    if config.metrics_file:
        try:
            write_metrics(config.metrics_file, run_metrics(report, code, state))
        except BackupError as error:
            report.warnings.append(str(error))


def command_run(config: Config, dry_run: bool) -> int:
    """Run one backup cycle under the lock and mail the outcome. Return the exit code."""
    if dry_run:
        return print_plan(config)
    report = Report(config)
    # Every failure from here on is mailed: the config is read, so the admins can be told, even
    # when the private folder is unfit or has no inode left for the lock. Only "locked" is quiet.
    try:
        expire_plaintext(config.insecure_dir)  # first, even if the run then fails or is locked out
        with run_lock(config):
            code = _run_and_record(config, report)
    except LockedError:
        raise
    except (BackupError, OSError) as error:  # before the lock: _run_and_record never ran
        if isinstance(error, BackupError):
            report.error = error
        else:
            report.error = BackupError(f'{error.filename or ""}: {os_reason(error)}', step='lock')
        code = EXIT_FAILED
        _record_outcome(config, report, code, load_state(config))  # read only: never saved there
    if report.error:
        print(
            f'ppbackup: {config.name}: FAILED at {report.error.step or report.step}: '
            f'{mask_secrets(str(report.error))}',
            file=sys.stderr,
        )
        if report.error.detail:
            print(mask_secrets(report.error.detail), file=sys.stderr)
    for warning in report.warnings:
        log.warning('warning: %s', warning)
    if report.error or report.warnings or config.mail_on_success:
        try:
            send_mail(config.admin_emails, report.subject(), report.body())
        except BackupError as error:
            print(
                f'ppbackup: the report mail could not be sent: {error}\n{error.detail}',
                file=sys.stderr,
            )
            code = code or EXIT_FAILED
    if not report.error:
        log.info('done in %.1f s: %s', time.time() - report.started, ', '.join(report.slots))
    return code


# -- check, status, verify and the dry run ----------------------------------------------------------


# A line of `check`: True is ok, None a warning, False a problem (check then exits 1).
CheckLine = tuple[bool | None, str]


def command_check(config: Config) -> int:
    """Pre-flight: print one line per item with a mark; return 0 only if everything is fine. The
    lines come as each item is checked, a slow remote last but one."""
    failures = 0
    for ok, text in itertools.chain(
        [(True, f'config {config.path}')],
        run_check_lines(config),
        program_lines(config),
        database_lines(config),
        recipient_lines(config),
        folder_lines(config),
        remote_lines(config),
        report_lines(config),
    ):
        failures += ok is False
        print(f'{"ok  " if ok else "WARN" if ok is None else "FAIL"}  {mask_secrets(text)}')
    print('all is well' if not failures else f'{failures} problem(s)')
    return EXIT_OK if not failures else EXIT_FAILED


def run_check_lines(config: Config) -> Iterator[CheckLine]:
    """The run's own checks first: if they pass here, the run does not fail on them."""
    for label, run_check in RUN_CHECKS:
        try:
            run_check(config)
        except BackupError as error:
            yield False, f'{label}: {error}'


def program_lines(config: Config) -> Iterator[CheckLine]:
    """Each program the run calls, with its version (a missing one the run's own check named)."""
    for program in needed_programs(config):
        if shutil.which(program):
            try:
                _, out = run_command(
                    [program, '--version'], what=program, step='check', timeout=20,
                    ok_codes=range(256),
                )  # fmt: skip
                yield True, f'{program}: {(out.strip().splitlines() or ["found"])[0]}'
            except BackupError as error:
                yield False, f'{program}: {error}'


def database_lines(config: Config) -> Iterator[CheckLine]:
    """Each database, reached by the client the run's own queries use; what a restore will lack."""
    clients = [
        ('PostgreSQL', db, [*pg_client(db), '-c', 'select 1'], client_environ(config))
        for db in config.psql_dbs
    ] + [
        ('MySQL', db, [*mysql_client(None), '-e', 'select 1', '--', db], None)
        for db in config.mysql_dbs
    ]
    for kind, db, argv, env in clients:
        try:
            run_command(argv, what=f'{argv[0]} {db}', step='check', timeout=30, env=env)
            yield True, f'{kind} database {db}: reachable'
        except BackupError as error:
            yield False, f'{kind} database {db}: {error} {error.detail.strip()[-200:]}'
    if config.client_env:
        settings = ', '.join(f'{name}={value}' for name, value in config.client_env)
        yield True, f'PostgreSQL client settings from the config, for pg_dump and psql: {settings}'
    # The run's own prediction of what a restore will lack: its mail warns of the same.
    for warning in database_limits(config)[2]:
        yield None, f'a run will warn: {warning}'


def recipient_lines(config: Config) -> Iterator[CheckLine]:
    try:
        recipients, warnings = resolve_recipients(open_gnupg(config.gnupghome), config.recipients)
    except BackupError as error:
        yield False, f'recipients: {error}'
        return
    for rec in recipients:
        expiry = f'expires {rec.expires:%Y-%m-%d}' if rec.expires else 'no expiry'
        yield True, f'recipient {rec.spec}: {rec.fingerprint} {rec.uid}, {expiry}'
    for warning in warnings:
        yield None, warning


def folder_lines(config: Config) -> Iterator[CheckLine]:
    """The two folders (a symlink or a non-folder the run's own check named), expired plaintext,
    and the configured paths that are symlinks."""
    for folder in (config.insecure_dir, config.backup_dir):
        if not os.path.lexists(folder):  # normal before the first run: nothing to warn about
            yield True, f'{folder}: not there yet; the first run creates it (0700)'
        elif not folder.is_symlink() and folder.is_dir():
            mode = stat.S_IMODE(folder.stat().st_mode)
            fine = mode & 0o077 == 0
            yield (
                fine or None,
                f'{folder}: mode {mode:o}' + ('' if fine else ' (the next run makes it 0700)'),
            )
    for expired in expired_plaintext(config.insecure_dir):
        yield False, f'{expired}: expired plaintext (any invocation but check removes it)'
    for path in (*config.files, *config.binaries):
        full = config.home / path
        if os.path.islink(full) and os.path.exists(full):
            yield (
                True,
                (
                    f'path {full}: a symlink to {os.path.realpath(full)}; its contents are archived '
                    '(followed here only, never inside)'
                ),
            )


def remote_lines(config: Config) -> Iterator[CheckLine]:
    try:
        ok, text = transport_for(config).probe()
        if text:
            yield ok, text
    except BackupError as error:
        yield False, f'remote {config.remote}: {error} {error.detail.strip()[-300:]}'


def report_lines(config: Config) -> Iterator[CheckLine]:
    """Mail, the metrics file and the ping: check sends no mail and neither starts nor ends a run
    at the ping's end point (URL/log is recorded in the check's log without counting a run)."""
    mailx = shutil.which('mailx')
    if not mailx:
        yield False if config.admin_emails else None, 'mailx: not found on PATH'
    else:  # mailx has no harmless version flag: never risk sending a mail
        yield True, f'mailx: {mailx}'
    if mailx and config.admin_emails:
        # It can only see that mailx is there, and an MTA for it to hand to.
        mta = Path('/usr/sbin/sendmail')
        yield (
            mta.exists() or None,
            (
                f'mail to {", ".join(config.admin_emails)}: mailx found'
                + ('' if mta.exists() else f', but no {mta} (an MTA) for it to hand mail to')
                + "; no mail was sent, so delivery is untested: the first run's mail shows it"
            ),
        )
    if config.metrics_file:
        problem = metrics_folder_problem(config.metrics_file)
        yield (
            not problem,
            f'metrics file {config.metrics_file}: {problem or "its folder is writable"}',
        )
    if config.ping_url:
        node = os.uname().nodename
        problem = send_ping(
            config.ping_url, 'log', f'{config.name}: ppbackup check on {node} (not a run)'
        )
        yield (
            not problem,
            problem or f'monitoring ping {ping_shown(config.ping_url, "log")}: answers',
        )


def describe_slots(config: Config, gnupghome: Path | None = None) -> list[dict[str, Any]]:
    """Return one dict per run in every slot: slot, time, files, size, recipients' key ids."""
    rows = []
    for slot in all_slots(config.backup_dir):
        for run in slot_runs(slot):
            size = 0
            keyids: set[str] = set()
            for name in run.files:
                path = slot / name
                if path.is_file():
                    size += path.stat().st_size
            if run.files and (slot / run.files[0]).is_file():
                with contextlib.suppress(BackupError):
                    keyids.update(
                        packet_recipients(slot / run.files[0], gnupghome or config.gnupghome)
                    )
            rows.append(
                {
                    'slot': slot.name,
                    'run': run.manifest.name,
                    'time': run.time,
                    'files': len(run.files),
                    'bytes': size,
                    'recipients': sorted(keyids),
                }
            )
    return rows


def configured_fingerprints(config: Config) -> dict[str, str]:
    """Return {encryption key id: configured fingerprint} for the recipients gpg can resolve now
    (empty if it cannot): status names the keys as the config does, not by their subkey ids."""
    with contextlib.suppress(BackupError):
        recipients, _ = resolve_recipients(open_gnupg(config.gnupghome), config.recipients)
        return {keyid: rec.fingerprint for rec in recipients for keyid in rec.encryption_keyids}
    return {}


def command_status(config: Config, as_json: bool) -> int:
    """Print what exists: slots, latest plaintext, last run, last transfer, coverage."""
    rows = describe_slots(config)
    fingerprints = configured_fingerprints(config)
    for row in rows:
        row['recipient_fingerprints'] = sorted(
            fingerprints.get(keyid, f'unknown key {keyid}') for keyid in row['recipients']
        )
    state = load_state(config)
    latest = config.insecure_dir / 'latest'
    latest_time = None
    if latest.is_dir() and not latest.is_symlink():  # this backup's newest plaintext
        latest_time = max(
            (p.lstat().st_mtime for p in latest.iterdir() if run_id_of(config.name, p.name)),
            default=None,
        )
    now = time.time()
    today = dt.date.today()
    days = [(today - dt.timedelta(days=back)) for back in range(7)]
    day_covered = {}
    for day in days:
        slot = 'day0' if config.only_one_day else f'day{day.isoweekday()}'
        day_covered[day.isoformat()] = any(
            row['slot'] == slot and dt.date.fromtimestamp(row['time']) == day for row in rows
        )
    weeks_present = sorted(
        {row['slot'] for row in rows if row['slot'].startswith('wk')},
        key=lambda name: int(name[2:]),
    )
    data = {
        'name': config.name,
        'remote': config.remote,
        'transport': transport_for(config).program,
        'slots': rows,
        'latest_plaintext': latest_time,
        'last_result': state.get('last_result'),
        'last_result_time': state.get('last_result_time'),
        'last_error': state.get('last_error'),
        'last_transfer': state.get('last_transfer'),
        'days_covered': day_covered,
        'weeks_present': weeks_present,
    }
    if as_json:
        print(json.dumps(data, indent=2))
        return EXIT_OK

    def age(then: float | None) -> str:
        if not then:
            return 'never'
        hours = (now - then) / 3600
        return f'{dt.datetime.fromtimestamp(then):%Y-%m-%d %H:%M} ({hours:.1f} h ago)'

    print(f'{config.name} -> {config.remote}{transport_for(config).via}')
    print(f'{"slot":<6} {"run":<28} {"time":<30} {"files":>5} {"size":>10}  recipients')
    for row in rows:
        print(
            f'{row["slot"]:<6} {row["run"]:<28} {age(row["time"]):<30} {row["files"]:>5} '
            f'{human_size(row["bytes"]):>10}  {" ".join(row["recipient_fingerprints"])}'
        )
    print(
        'last 7 days:  '
        + ' '.join(f'{day[5:]}{"+" if ok else "-"}' for day, ok in sorted(day_covered.items()))
    )
    print(f'weeks held:   {len(weeks_present)} of 53: {" ".join(weeks_present) or "none"}')
    print(f'latest plaintext: {age(latest_time)}')
    print(
        f'last run:     {state.get("last_result", "never")} at {age(state.get("last_result_time"))}'
        + (f': {state["last_error"]}' if state.get('last_error') else '')
    )
    print(f'last transfer: {age(state.get("last_transfer"))}')
    return EXIT_OK


def tree_problems(
    root: Path, recipients: Sequence[Recipient] | None, gnupghome: Path | None
) -> list[str]:
    """Given a folder of slots, check every manifest's files: present, SHA-256, and (with
    recipients) whole OpenPGP data addressed to exactly them. Return the problems, each named."""
    problems = []
    for slot in all_slots(root):
        for run in slot_runs(slot):
            entries = read_manifest(run.manifest)
            if len(entries) >= MANIFEST_MAX_ENTRIES:
                problems.append(
                    f'{slot.name}/{run.manifest.name}: names {MANIFEST_MAX_ENTRIES} files or more; '
                    'not a manifest ppbackup wrote (only the first ones are checked)'
                )
            for name, digest in entries.items():
                path = slot / name
                if not path.is_file():
                    problems.append(f'{slot.name}/{name}: missing')
                    continue
                if sha256_of(path) != digest:
                    problems.append(
                        f'{slot.name}/{name}: SHA-256 does not match the manifest '
                        '(altered or truncated)'
                    )
                    continue
                if recipients is not None and gnupghome is not None:
                    try:
                        mismatch = addressed_to_problem(
                            packet_recipients(path, gnupghome), recipients
                        )
                    except BackupError as error:
                        mismatch = str(error)
                    if mismatch:
                        problems.append(f'{slot.name}/{name}: {mismatch}')
    return problems


def uncommitted_report(config: Config) -> list[str]:
    """Return, for ``verify``, every entry under the backups folder that no manifest vouches for:
    it is never sent; this backup's leftovers of an interrupted commit go at its next run."""
    problems: list[str] = []
    root = config.backup_dir
    if not root.is_dir() or root.is_symlink():
        return problems
    slots = set(all_slots(root))
    for entry in sorted(root.iterdir()):
        if entry not in slots:
            problems.append(f'{entry.name}: not a slot; it is never sent to the remote')
    for slot in sorted(slots):
        named = {name for run in slot_runs(slot) for name in (run.manifest.name, *run.files)}
        for entry in sorted(slot.iterdir()):
            if entry.name in named:
                continue
            if run_id_of(config.name, entry.name) or temp_target(entry.name):
                why = 'left by an interrupted run; the next run of its backup removes it'
            else:
                why = 'no manifest names it; it is never sent to the remote. Remove it'
            problems.append(f'{slot.name}/{entry.name}: {why}')
    return problems


def command_verify(config: Config, remote: bool) -> int:
    """Check every local slot (and with --remote the remote copies) without a private key."""
    gpg = open_gnupg(config.gnupghome)
    recipients, _ = resolve_recipients(gpg, config.recipients)
    problems = tree_problems(config.backup_dir, recipients, config.gnupghome)
    try:
        with run_lock(config):  # a run in progress has files no manifest names yet
            problems += uncommitted_report(config)
    except LockedError:
        print('note: a run is in progress; files not yet named by a manifest were not checked')
    if remote:
        check = transport_for(config).mismatches(None)
        problems += [f'remote copy of {name}: missing or differs' for name in check.bad]
        for name in check.size_only:
            print(f'NOTE {name}: {config.remote} gives no hash for it; only its size was checked')
    runs = sum(len(slot_runs(slot)) for slot in all_slots(config.backup_dir))
    if not runs:  # nothing to check is not "all is well"
        problems.append(f'no backup found in {config.backup_dir}')
    for problem in problems:
        print(f'BAD  {problem}')
    print(
        f'{runs} run(s) checked'
        + (', remote included' if remote else '')
        + (': all is well' if not problems else f': {len(problems)} problem(s)')
    )
    return EXIT_OK if not problems else EXIT_FAILED


def print_plan(config: Config) -> int:
    """Print what a run would do (commands, slots, removals) and write nothing."""
    when = dt.datetime.now()
    day_name, week_name = slot_names(config, when)
    rundir = config.insecure_dir / f'{RUN_PREFIX}PID'
    run_id = f'{when:%Y%m%d-%H%M%S}'
    print(
        f'ppbackup run --dry-run: {config.name} at {when:%Y-%m-%d %H:%M}; nothing will be written'
    )
    compressor = COMPRESSORS[config.compression][0]
    # gpg's argv as the run builds it: python-gnupg's options, then gpg_encrypt_args. The keys
    # are not listed (gpg's lock would touch the GnuPG home): the run resolves each recipient to
    # its fingerprint, which a fingerprint in the config already is.
    try:
        gpg = open_gnupg(config.gnupghome)

        def gpg_argv(args: list[str]) -> list[str]:
            return list(gpg.make_args(args, False))

        gpg_notes = []
    except BackupError as error:

        def gpg_argv(args: list[str]) -> list[str]:
            return ['gpg', '--homedir', str(config.gnupghome), *args]

        gpg_notes = [f'gpg cannot be used as it is: {error}']
    if not all(FINGERPRINT_RE.match(spec) for spec in config.recipients):
        gpg_notes.append('the run gives each --recipient as its fingerprint')
    transport = transport_for(config)
    print('commands:')
    for artifact in plan_artifacts(config, run_id, rundir):
        pipeline = shlex.join(artifact.argv) + (
            ' | ' + shlex.join(compressor) if compressor else ''
        )
        print(f'  {mask_secrets(pipeline)} > {rundir.parent / "latest" / artifact.filename}')
        if artifact.kind == 'psql':
            print(
                "    (plus --snapshot=ID: a psql session's, which counts each table's rows in it)"
            )
        elif artifact.kind == 'mysql':
            print(
                "    (a mysql session starts its snapshot just before, and counts each table's rows)"
            )
        final = config.backup_dir / day_name / (artifact.filename + '.gpg')
        encrypted = final.with_name(f'{TMP_PREFIX}PID-RANDOM-{final.name}')  # see temp_name
        args = gpg_encrypt_args(config.recipients, rundir / artifact.filename, encrypted)
        print(f'  {shlex.join(gpg_argv(args))}')
        for note in gpg_notes:
            print(f'    ({note})')
    for argv, given in transport.plan():
        print(f'  {transport.shown(argv)}')
        print(f'    ({given})')
    print('slots: ' + ', '.join(name for name in (day_name, week_name) if name))
    names = {
        config.backup_dir / day_name / (a.filename + '.gpg')
        for a in plan_artifacts(config, run_id, rundir)
    }
    names.add(config.backup_dir / day_name / manifest_name(config, run_id))
    if week_name:
        names |= {
            config.backup_dir / week_name / (a.filename + '.gpg')
            for a in plan_artifacts(config, run_id, rundir)
            if a.weekly
        }
        names.add(config.backup_dir / week_name / manifest_name(config, run_id))
    doomed = retention_plan(config, when, names)
    print(f'rotation would remove {len(doomed)} file(s):')
    for path in doomed:
        print(f'  {path}')
    for path in expired_plaintext(config.insecure_dir):
        print(f'expired plaintext would be removed: {path}')
    print(f'mail to: {", ".join(config.admin_emails) or "(nobody)"}')
    if config.ping_url:
        print(f'ping: {ping_shown(config.ping_url, "start")}, then /... or /.../fail')
    if config.metrics_file:
        print(f'metrics: {config.metrics_file}')
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------
# The backup host: `watch` keeps what arrived out of the sender's reach, checks it, applies
# retention.
#
# A sender's folder DIR (root's, or the watch user's) holds ``incoming/``, the receiving account's
# rrsync folder, and ``kept/``, watch's own. Everything under incoming/ is the sender's word and is
# treated as hostile: names are data, symlinks are never followed (every open is O_NOFOLLOW and
# relative to a folder fd), mtimes are ignored. A run (a manifest and the files it names) that
# passes the SHA-256 check is made read-only and owned by watch, and hard-linked into kept/, where the
# receiving account cannot reach it; retention counts from when watch first saw a run.
# ---------------------------------------------------------------------------------------------------


WATCH_INCOMING = 'incoming'
WATCH_KEPT = 'kept'
WATCH_STATE = '.ppbackup-watch.json'
WATCH_FIRST_SEEN = 'first-seen.json'  # kept/TREE/first-seen.json, for the key holder
WATCH_FIRST_SEEN_FORMAT = 'ppbackup-first-seen'
WATCH_DAY_KEEP = 7 * 86400  # a day run: at least 7 days after it arrived
WATCH_WEEK_KEEP = 53 * 7 * 86400  # the newest week-slot run of an ISO week: 53 weeks
WATCH_FUTURE_SLACK = 3600  # a clock this far ahead of ours is a lie, not drift
WATCH_FLOOD_RUNS = 10  # more runs than this arriving within a day is reported
WATCH_MAX_LINKS = 2  # names of one received inode in incoming/: a day run's file and its week twin
WATCH_SCRUB_EVERY = 7 * 86400  # each kept run is read again and hashed this often (disk rot, T4)
# The alert mail is bounded whatever arrived (H8): its subject names a few folders and a few backup
# names in each, its body a few problems of each folder, each line cut short; stderr has them all.
WATCH_MAIL_TREES = 3
WATCH_MAIL_NAMES = 3
WATCH_MAIL_NAME_WIDTH = 40
WATCH_MAIL_PROBLEMS = 20
WATCH_MAIL_LINE_WIDTH = 300


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + '...'


def _a_few(items: Sequence[str], limit: int, width: int) -> str:
    """Given items, return the first ``limit`` of them, each cut to ``width``, then "and N more"."""
    more = f' and {len(items) - limit} more' if len(items) > limit else ''
    return ', '.join(_cut(item, width) for item in items[:limit]) + more


def _when(stamp: float) -> str:
    """Given a time from the received side, return it as local time, or the number if absurd."""
    try:
        return f'{dt.datetime.fromtimestamp(stamp):%Y-%m-%d %H:%M}'
    except (OverflowError, ValueError, OSError):
        return f'{stamp:.0f} s after 1970'


@dataclasses.dataclass
class TreeReport:
    """What watch found in one sender's folder: the report, --json and --metrics are made from it."""

    folder: Path
    names: set[str] = dataclasses.field(default_factory=set)  # BACKUP_NAMEs seen in manifests
    problems: list[str] = dataclasses.field(default_factory=list)  # tampering, damage: FAILED
    stale: list[str] = dataclasses.field(default_factory=list)  # nothing arrived: ALERT
    newest: str = ''
    newest_time: float | None = None
    runs_kept: int = 0
    bytes_kept: int = 0
    kept_now: list[str] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)

    def label(self) -> str:
        """The folder and a few of the backup names seen in it (the names are the sender's: a
        flood of long ones must not make a subject too long for mailx's argv, H8)."""
        names = _a_few(sorted(self.names), WATCH_MAIL_NAMES, WATCH_MAIL_NAME_WIDTH)
        return f'{self.folder} ({names or "no backup name seen"})'


# A file of a run as watch opened it: (its fd, its stat through that fd, its SHA-256).
OpenedFile = tuple[int, os.stat_result, str]
Opened = Mapping[str, OpenedFile]


@dataclasses.dataclass(frozen=True)
class RunKey:
    """Where a kept run is: kept/TREE/SLOT/MANIFEST. Its text, "TREE/SLOT/MANIFEST", keys the
    state file and names the run in reports."""

    tree: str
    slot: str
    manifest: str

    @classmethod
    def parse(cls, text: str) -> RunKey:
        """Given a key of the state file, return it; raise ValueError if it is not one."""
        parts = text.split('/')
        if len(parts) != 3:
            raise ValueError(f'{shown(text)}: not a "TREE/SLOT/MANIFEST" key')
        return cls(parts[0], parts[1], parts[2])

    def __str__(self) -> str:
        return f'{self.tree}/{self.slot}/{self.manifest}'

    def rel(self, name: str) -> str:
        """Given a name in this run's slot, return its path under kept/ (or incoming/)."""
        return f'{self.tree}/{self.slot}/{name}'


def _state_number(entry: Mapping[str, object], field: str, default: float | None = None) -> float:
    value = entry.get(field, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f'"{field}" is not a number')
    return value


@dataclasses.dataclass
class KeptRun:
    """One run watch keeps: the digests its manifest lists, as they passed the check, and the
    times that are watch's own (never the sender's dates, H4). It is one entry of the state file's
    "runs", under its key."""

    key: RunKey
    manifest_sha256: str  # of the manifest as it arrived
    files: dict[str, str]  # each file the manifest names: its SHA-256, as listed
    first_seen: float  # when watch first saw the run: retention and freshness count from it
    hashed: float  # when its kept files were last read and found sound (the scrub)
    size: int  # bytes in the manifest and its files

    @property
    def names(self) -> list[str]:
        """The run's names in its slot: the manifest, then the files it names."""
        return [self.key.manifest, *self.files]

    @property
    def digests(self) -> dict[str, str]:
        """{each of the run's names: the SHA-256 it must have}."""
        return {self.key.manifest: self.manifest_sha256, **self.files}

    @property
    def backup_name(self) -> str:
        """The BACKUP_NAME in the manifest's name ('' if it is not in the usual form)."""
        match = RUN_NAME_RE.fullmatch(self.key.manifest)
        return match.group(1) if match else ''

    @classmethod
    def from_json(cls, key: str, entry: object) -> KeptRun:
        """Given a key and its entry in the state file's "runs", return the run; raise ValueError
        if it is not one. An entry written before the scrub existed has no "hashed": its files
        were last hashed when it was kept."""
        try:
            if not isinstance(entry, dict):
                raise ValueError('not an object')
            run_key = RunKey.parse(key)
            first_seen = _state_number(entry, 'first_seen')
            hashed = _state_number(entry, 'hashed', first_seen)
            size = entry.get('bytes', 0)
            files = entry.get('files')
            digest = entry.get('manifest_sha256')
            if entry.get('manifest_name') != run_key.manifest:
                raise ValueError('"manifest_name" is not the manifest of its key')
            if not isinstance(digest, str) or not isinstance(size, int):
                raise ValueError('"manifest_sha256" or "bytes" is malformed')
            if not isinstance(files, dict) or not all(
                isinstance(name, str) and isinstance(sha, str) for name, sha in files.items()
            ):
                raise ValueError('"files" is not {name: SHA-256}')
        except ValueError as error:
            raise ValueError(f'the run {shown(key)}: {error}') from None
        return cls(run_key, digest, dict(files), float(first_seen), float(hashed), size)

    def to_json(self) -> dict[str, Any]:
        """Return the run as its entry in the state file's "runs" (the format from_json reads)."""
        return {
            'first_seen': self.first_seen,
            'hashed': self.hashed,
            'manifest_name': self.key.manifest,
            'manifest_sha256': self.manifest_sha256,
            'files': dict(self.files),
            'bytes': self.size,
        }


def runs_from_state(data: object) -> dict[RunKey, KeptRun]:
    """Given the state file's JSON, return its runs by key; raise ValueError if a run is malformed
    (a document that is not an object, or whose "runs" is not one, holds none, as it always has)."""
    entries = data.get('runs', {}) if isinstance(data, dict) else {}
    if not isinstance(entries, dict):
        return {}
    runs = [KeptRun.from_json(key, entry) for key, entry in entries.items()]
    return {run.key: run for run in runs}


def state_bytes(runs: Iterable[KeptRun]) -> bytes:
    """Given the kept runs, return the state file's bytes (version 1; runs_from_state reads it)."""
    document = {'version': 1, 'runs': {str(run.key): run.to_json() for run in runs}}
    return json.dumps(document, indent=1, sort_keys=True).encode()


def expired(runs: Sequence[KeptRun], now: float) -> list[KeptRun]:
    """Given the kept runs and the time now, return those whose time is up, in the order of their
    keys' text. Only the times watch recorded count (H4): a run stays 7 days after watch first saw
    it; the newest week-slot run of each ISO week (per tree and backup name) stays 53 weeks; the
    newest run stays always. A first_seen in the future is a young run: it stays."""
    if not runs:
        return []
    newest = max(runs, key=lambda run: run.first_seen)
    newest_of_week: dict[tuple[str, str, tuple[int, int]], RunKey] = {}
    for run in sorted(runs, key=lambda run: run.first_seen):  # a later run of the week wins
        if run.key.slot.startswith('wk'):
            iso = dt.datetime.fromtimestamp(run.first_seen).isocalendar()
            newest_of_week[run.key.tree, run.backup_name, (iso[0], iso[1])] = run.key
    weekly = set(newest_of_week.values())
    expiring = []
    for run in runs:
        age = now - run.first_seen
        if run.key == newest.key or age <= WATCH_DAY_KEEP:
            continue
        if run.key in weekly and age <= WATCH_WEEK_KEEP:
            continue
        expiring.append(run)
    return sorted(expiring, key=lambda run: str(run.key))


def names_to_remove(
    expiring: Sequence[KeptRun], staying: Iterable[KeptRun]
) -> dict[RunKey, list[str]]:
    """Given the runs that expire and those that stay, return {each expiring run: its names to
    remove from its slot}: a name that a run staying names too stays (H7; claims are refused as
    they arrive, but a state from before that was so may hold such a pair). Two expiring runs
    naming one name both list it."""
    kept_names = {run.key.rel(name) for run in staying for name in run.names}
    return {
        run.key: [name for name in run.names if run.key.rel(name) not in kept_names]
        for run in expiring
    }


class WatchTree:
    """One sender's folder: its incoming/ (hostile), its kept/ and the state watch keeps there."""

    def __init__(self, folder: Path, now: float, dry_run: bool) -> None:
        self.folder = folder
        self.now = now
        self.dry_run = dry_run
        self.report = TreeReport(folder)
        self.runs: dict[RunKey, KeptRun] = {}  # every run kept, as the state file lists them
        self.kept_fd = -1
        self.incoming_fd = -1
        self.receiver_uid = -1
        self.kept_inodes: set[tuple[int, int]] = set()
        # Each inode is read once per watch run, however many names it has (H8): its SHA-256 by
        # (device, inode, size, ctime); a write, chmod or link changes the ctime.
        self.digest_of: dict[tuple[int, int, int, int], str] = {}
        self.links_reported: set[tuple[int, int]] = set()
        self.copied_to: dict[tuple[int, int, int, int], str] = {}  # a copied inode: its kept name
        self.copy_instead = False  # without CAP_CHOWN the kept copy is a copy, not a link
        self.state_as_read = b''  # the state as read: written again only when it changed

    # -- folders, and the lock ---------------------------------------------------------------------

    def open_folders(self) -> bool:
        """Open DIR, kept/ and incoming/; return False (with a problem) if DIR is unsafe or absent."""
        try:
            info = self.folder.lstat()
        except OSError as error:
            raise ConfigError(f'{self.folder}: {error.strerror}', step='watch') from error
        if not stat.S_ISDIR(info.st_mode):
            raise ConfigError(f'{self.folder}: not a folder (or a symlink)', step='watch')
        if info.st_uid not in (0, os.geteuid()) or info.st_mode & 0o022:
            self.report.problems.append(
                f'{self.folder}: owned by uid {info.st_uid} or writable by others (mode '
                f'{stat.S_IMODE(info.st_mode):o}): the receiving account could swap kept/ out. '
                f'chown root {self.folder}; chmod 755 {self.folder}'
            )
            return False
        dir_fd = os.open(self.folder, _OPEN_DIR)
        try:
            if not self.dry_run:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(WATCH_KEPT, 0o700, dir_fd=dir_fd)
            try:
                self.kept_fd = _open_in(dir_fd, WATCH_KEPT, _OPEN_DIR)
            except FileNotFoundError:
                pass  # a dry run before the first real one
            except OSError as error:
                self.report.problems.append(
                    f'{self.folder}/{WATCH_KEPT}: not a folder, or a symlink ({error.strerror})'
                )
                return False
            if self.kept_fd >= 0:
                fcntl.flock(self.kept_fd, fcntl.LOCK_EX)  # one watch at a time per folder
            kept = os.fstat(self.kept_fd) if self.kept_fd >= 0 else None
            if kept and (kept.st_uid != os.geteuid() or kept.st_mode & 0o022):
                self.report.problems.append(
                    f'{self.folder}/{WATCH_KEPT} is not owned by the user watch runs as, or is '
                    f'writable by others: chown it to that user; chmod 700 {self.folder}/{WATCH_KEPT}'
                )
                return False
            try:
                self.incoming_fd = _open_in(dir_fd, WATCH_INCOMING, _OPEN_DIR)
                self.receiver_uid = os.fstat(self.incoming_fd).st_uid
            except FileNotFoundError:
                pass  # nothing arrived yet: the freshness check says so
            except OSError as error:
                self.report.problems.append(
                    f'{self.folder}/{WATCH_INCOMING}: not a folder, or a symlink '
                    f'({error.strerror}); not followed'
                )
        finally:
            os.close(dir_fd)
        return True

    def close(self) -> None:
        for fd in (self.kept_fd, self.incoming_fd):
            if fd >= 0:
                os.close(fd)

    def kept_slot(self, key: RunKey, create: bool) -> OpenFolder:
        """Given a run, open kept/TREE/SLOT (each made 0700 if ``create``) for a ``with`` block;
        raise OSError if it will not open."""
        if self.kept_fd < 0:
            raise FileNotFoundError(errno.ENOENT, 'no kept folder yet')
        with OpenFolder(self.kept_fd, key.tree, create) as tree_fd:
            return OpenFolder(tree_fd, key.slot, create)

    def received_slot(self, key: RunKey) -> OpenFolder | None:
        """Given a run, open incoming/TREE/SLOT for a ``with`` block; None if it will not open."""
        if self.incoming_fd < 0:
            return None
        try:
            with OpenFolder(self.incoming_fd, key.tree) as tree_fd:
                return OpenFolder(tree_fd, key.slot)
        except OSError:
            return None

    # -- state -------------------------------------------------------------------------------------

    def load_state(self) -> None:
        if self.kept_fd < 0:
            return
        try:
            fd = _open_in(self.kept_fd, WATCH_STATE)
        except FileNotFoundError:
            return
        try:
            with os.fdopen(fd, 'rb') as handle:
                self.state_as_read = handle.read()
            self.runs = runs_from_state(json.loads(self.state_as_read))
        except (OSError, ValueError) as error:
            raise BackupError(
                f'{self.folder}/{WATCH_KEPT}/{WATCH_STATE} is unreadable ({error}); restore it or '
                'move it aside (watch then sees every run in kept/ as new)',
                step='watch',
            ) from error
        for run in self.runs.values():
            for name in run.names:
                with contextlib.suppress(OSError):
                    info = os.stat(run.key.rel(name), dir_fd=self.kept_fd, follow_symlinks=False)
                    self.kept_inodes.add((info.st_dev, info.st_ino))

    def save_state(self) -> None:
        if self.dry_run or self.kept_fd < 0:
            return
        data = state_bytes(self.runs.values())
        if data != self.state_as_read:
            write_atomically(self.kept_fd, WATCH_STATE, data)
            self.state_as_read = data
        self.export_first_seen()

    def export_first_seen(self) -> None:
        """Write kept/TREE/first-seen.json for each tree in kept/: every run kept there, with when
        watch first saw it and its manifest's SHA-256. The key holder fetches it with the runs:
        restore and drill order runs by these times, not by the sender's word, and
        ``--arrived-before DATE`` picks the last run that arrived before a break-in. Its format is
        read on the key holder's side: keep it as it is."""
        per_tree: dict[str, dict[str, KeptRun]] = {}
        for key, run in self.runs.items():
            per_tree.setdefault(key.tree, {})[f'{key.slot}/{key.manifest}'] = run
        for tree in os.listdir(self.kept_fd):
            if not tree.startswith('.') and not plain_name_problem(tree):
                per_tree.setdefault(tree, {})
        for tree, runs in sorted(per_tree.items()):
            try:
                inside = OpenFolder(self.kept_fd, tree)
            except OSError:
                continue  # not a folder: not a tree of watch's
            with inside as tree_fd:
                self._export_tree(tree_fd, runs)

    @staticmethod
    def _export_tree(tree_fd: int, runs: Mapping[str, KeptRun]) -> None:
        listed = {
            rel: {'first_seen': run.first_seen, 'sha256': run.manifest_sha256}
            for rel, run in sorted(runs.items())
        }
        document = {
            'format': WATCH_FIRST_SEEN_FORMAT,
            'version': 1,
            'host': os.uname().nodename,
            'runs': listed,
        }
        data = (json.dumps(document, indent=1) + '\n').encode()
        mode = 0o600  # the kept runs' files' mode: that of the newest kept manifest here
        if runs:
            newest = max(runs, key=lambda rel: runs[rel].first_seen)
            with contextlib.suppress(OSError):
                info = os.stat(newest, dir_fd=tree_fd, follow_symlinks=False)
                mode = stat.S_IMODE(info.st_mode) & ~0o7022
        with contextlib.suppress(OSError):
            fd = _open_in(tree_fd, WATCH_FIRST_SEEN)
            with os.fdopen(fd, 'rb') as handle:
                if stat.S_IMODE(os.fstat(fd).st_mode) == mode and handle.read() == data:
                    return
        write_atomically(tree_fd, WATCH_FIRST_SEEN, data, mode=mode)

    # -- hashing -----------------------------------------------------------------------------------

    @staticmethod
    def _hash_key(info: os.stat_result) -> tuple[int, int, int, int]:
        return (info.st_dev, info.st_ino, info.st_size, info.st_ctime_ns)

    def _hash(self, fd: int) -> str:
        """Given an open file, return its SHA-256, read at most once per watch run per inode."""
        before = self._hash_key(os.fstat(fd))
        if before in self.digest_of:
            return self.digest_of[before]
        digest = sha256_of(fd)
        if self._hash_key(os.fstat(fd)) == before:  # not written to while it was read
            self.digest_of[before] = digest
        return digest

    # -- scan: what is in incoming/, and the checks of a new run -----------------------------------

    def scan_incoming(self) -> None:
        """Look at every run in incoming/: keep the new ones that pass, check the kept ones."""
        if self.incoming_fd < 0:
            return
        for tree in sorted(os.listdir(self.incoming_fd)):
            if tree.startswith('.'):
                continue
            where = f'{WATCH_INCOMING}/{shown(tree)}'
            try:
                info = os.stat(tree, dir_fd=self.incoming_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone while we looked
            if stat.S_ISLNK(info.st_mode):
                self.report.problems.append(f'{where} is a symlink; not followed')
                continue
            if not stat.S_ISDIR(info.st_mode) or plain_name_problem(tree):
                continue
            with OpenFolder(self.incoming_fd, tree) as tree_fd:
                for slot in sorted(os.listdir(tree_fd)):
                    if not SLOT_RE.fullmatch(slot):
                        continue
                    if stat.S_ISLNK(os.stat(slot, dir_fd=tree_fd, follow_symlinks=False).st_mode):
                        self.report.problems.append(f'{where}/{slot} is a symlink; not followed')
                        continue
                    try:
                        inside = OpenFolder(tree_fd, slot)
                    except OSError:
                        continue  # not a folder: not a slot
                    with inside as slot_fd:
                        for manifest in sorted(os.listdir(slot_fd)):
                            if manifest.endswith(MANIFEST_SUFFIX) and not manifest.startswith('.'):
                                self.look_at_run(tree, slot, manifest, slot_fd)

    def _open_received(self, slot_fd: int, name: str, where: str) -> tuple[int, os.stat_result]:
        """Given a received name, return (fd, stat) of a regular file; raise ValueError why not."""
        try:
            fd = _open_in(slot_fd, name)
        except FileNotFoundError as error:
            raise ValueError(f'{where}: named by the manifest but missing') from error
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise ValueError(f'{where}: a symlink; not followed') from error
            raise ValueError(f'{where}: cannot open: {error.strerror}') from error
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise ValueError(f'{where}: not a regular file')
        return fd, info

    def look_at_run(self, tree: str, slot: str, manifest: str, slot_fd: int) -> None:
        key = RunKey(tree, slot, manifest)
        where = f'{shown(tree)}/{slot}/{shown(manifest)}'
        match = RUN_NAME_RE.fullmatch(manifest)
        self.report.names.add(shown(match.group(1) if match else manifest))
        why = plain_name_problem(manifest)
        if why:
            self.report.problems.append(f'{where}: refused as a manifest name: {why}')
            return
        if key in self.runs:
            self.recheck_kept_run(self.runs[key], where, slot_fd)
            return
        opened: dict[str, OpenedFile] = {}
        problems: list[str] = []
        try:
            try:
                fd, info = self._open_received(slot_fd, manifest, where)
            except ValueError as error:
                self.report.problems.append(str(error))
                return
            opened[manifest] = (fd, info, self._hash(fd))
            os.lseek(fd, 0, os.SEEK_SET)
            listed, problems = _read_manifest_fd(fd, where)
            claims = self._claims(tree, slot, [manifest, *listed])
            if claims:
                self.report.problems += [
                    f'{shown(tree)}/{slot}/{shown(name)}: named by {shown(manifest)}, but kept '
                    f'for the run {shown(owner)}: a name belongs to one run; {shown(manifest)} '
                    'is not kept'
                    for name, owner in claims
                ]
                return
            for name, digest in listed.items():
                file_where = f'{shown(tree)}/{slot}/{name}'
                try:
                    fd, info = self._open_received(slot_fd, name, file_where)
                except ValueError as error:
                    problems.append(str(error))
                    continue
                opened[name] = (fd, info, '')
                if stat.S_IMODE(info.st_mode) & (stat.S_ISUID | stat.S_ISGID):
                    problems.append(f'{file_where}: setuid or setgid; refused')
                    continue
                actual = self._hash(fd)
                opened[name] = (fd, info, actual)
                if actual != digest:
                    problems.append(
                        f'{file_where}: SHA-256 does not match the manifest (altered or truncated)'
                    )
            for name, (_, info, _) in opened.items():
                if info.st_mtime > self.now + WATCH_FUTURE_SLACK:
                    # Reported, and still kept: the bytes are sound, only the date lies.
                    self.report.problems.append(
                        f'{shown(tree)}/{slot}/{shown(name)}: dated '
                        f'{_when(info.st_mtime)}, in the future '
                        "of this host's clock (retention here uses watch's own times)"
                    )
                self._check_links(tree, slot, name, info)
                mine = (info.st_dev, info.st_ino) in self.kept_inodes
                if info.st_uid != self.receiver_uid and not mine:
                    problems.append(
                        f'{shown(tree)}/{slot}/{shown(name)}: owned by uid {info.st_uid}, not by '
                        'the receiving account; not taken'
                    )
            if problems or self.dry_run:
                self.report.problems += problems
                if self.dry_run and not problems:
                    print(f'would keep {self.folder}/{WATCH_KEPT}/{tree}/{slot}/{manifest}')
                    self._record(key, listed, opened)  # in memory only
                return
            self.keep_run(key, listed, opened)
        finally:
            for fd, _, _ in opened.values():
                os.close(fd)

    def _check_links(self, tree: str, slot: str, name: str, info: os.stat_result) -> None:
        """Report a received file with more names in incoming/ than a run needs (H8).

        The sender's model of twins: a file of a day run that also goes into the week slot is one
        inode under the same name in both (``rsync -H``), so it has at most 2 names in incoming/.
        Its names in kept/ are watch's own links of it, under the same name in the tree's kept
        slots; the link count less those is its names in incoming/. More than 2 are hard links
        the sender made: reported once per inode per watch run (and still kept, if the bytes
        match: only the names are too many; the inode is read once however many it has)."""
        if info.st_nlink <= WATCH_MAX_LINKS:
            return
        kept_names = 0
        with contextlib.suppress(OSError), OpenFolder(self.kept_fd, tree) as tree_fd:
            for kept_slot in os.listdir(tree_fd):
                with contextlib.suppress(OSError):
                    there = os.stat(f'{kept_slot}/{name}', dir_fd=tree_fd, follow_symlinks=False)
                    kept_names += (there.st_dev, there.st_ino) == (info.st_dev, info.st_ino)
        received = info.st_nlink - kept_names
        if received > WATCH_MAX_LINKS and (info.st_dev, info.st_ino) not in self.links_reported:
            self.links_reported.add((info.st_dev, info.st_ino))
            self.report.problems.append(
                f'{shown(tree)}/{slot}/{shown(name)}: one file under {received} names in '
                f'{WATCH_INCOMING}/ (a day run and its week twin need {WATCH_MAX_LINKS}): hard '
                'links the sender made; read once, and kept if it matches'
            )

    def _owners(self, tree: str, slot: str) -> dict[str, str]:
        """Given a slot, return {name kept there: the manifest of the run it belongs to}."""
        owners: dict[str, str] = {}
        for key, run in self.runs.items():
            if (key.tree, key.slot) == (tree, slot):
                for name in run.names:
                    owners.setdefault(name, key.manifest)
        return owners

    def _claims(self, tree: str, slot: str, names: Sequence[str]) -> list[tuple[str, str]]:
        """Given a new run's manifest and file names, return [(name, the manifest of the other
        run that already has it)]: a kept name belongs to exactly one run (H7). Without this, a
        manifest of the sender's naming a kept run's files would be kept along with them, and its
        expiry would take them away."""
        owners = self._owners(tree, slot)
        return [(name, owners[name]) for name in names if name in owners]

    # -- keep: a checked run goes out of the sender's reach ----------------------------------------

    def keep_run(self, key: RunKey, listed: Mapping[str, str], opened: Opened) -> None:
        """Make a checked run unchangeable from the receiving account and link it into kept/.

        The order, and why a crash at any instant (kill -9, ENOSPC) leaves a safe state:
        1. ``look_at_run`` opened each of the run's names once, O_NOFOLLOW relative to the received
           slot's fd, and checked it through that fd: the manifest's SHA-256, each file's against
           it, its owner, no claim on a kept name (H7). From then on only these fds are used: a
           name the sender swaps after the check changes nothing that is kept.
        2. kept/TREE/SLOT is opened (made if new). A name there that is another inode is a clash:
           the version that arrived first stays, and nothing of this run is written (H2).
        3. each file, the manifest first, is made watch's (fchown; group and others lose write)
           and linked into the kept slot from its fd, or, without CAP_CHOWN, copied to a
           temporary name, hashed again, linked, and the temporary removed. A name linked already
           (the week twin) is left as it is: a link never replaces a name.
        4. fsync of the kept slot: every link is durable.
        5. the run is recorded in memory; ``save_state`` writes the state file (temporary name,
           fsync, rename) at the end of the watch run, after the scan and the scrub.
        A run is kept once the state file lists it. A crash before that leaves names in kept/ that
        no state lists: nothing is lost and nothing is removed (retention removes only what the
        state lists). The next watch finds the run new again: if the crash came before step 3, it
        keeps it as if it had just arrived; after, its inodes are no longer the receiving
        account's (or its copies are other inodes), so it reports the run (FAILED) instead of
        keeping it with a later first_seen: safe, not silent, until someone looks."""
        tree, slot = key.tree, key.slot
        with self.kept_slot(key, create=True) as kept_slot_fd:
            clashes = []
            for name, (_, info, digest) in opened.items():
                with contextlib.suppress(FileNotFoundError):
                    kept = os.stat(name, dir_fd=kept_slot_fd, follow_symlinks=False)
                    if (kept.st_dev, kept.st_ino) != (info.st_dev, info.st_ino):
                        clashes.append(name)
            if clashes:
                # Same name, other inode: the version that arrived first stays; this one is news.
                self.report.problems += [
                    f'{shown(tree)}/{slot}/{shown(name)}: arrived again with other content; the '
                    f'first version stays in {self.folder}/{WATCH_KEPT}'
                    for name in clashes
                ]
                return
            for name, (fd, info, digest) in opened.items():
                self._keep_file(fd, info, name, digest, kept_slot_fd, f'{tree}/{slot}')
            os.fsync(kept_slot_fd)
        self._record(key, listed, opened)

    def _record(self, key: RunKey, listed: Mapping[str, str], opened: Opened) -> None:
        self.runs[key] = KeptRun(
            key,
            manifest_sha256=opened[key.manifest][2],
            files=dict(listed),
            first_seen=self.now,
            hashed=self.now,
            size=sum(info.st_size for _, info, _ in opened.values()),
        )
        self.report.kept_now.append(str(key))

    def _keep_file(
        self, fd: int, info: os.stat_result, name: str, digest: str, kept_slot_fd: int, rel: str
    ) -> None:
        with contextlib.suppress(FileExistsError):  # the week slot's twin was linked already
            if not self.copy_instead:
                try:
                    # Owned by watch: the receiving account can no longer write, chmod or
                    # rewrite this inode in place; renaming a new file over its name leaves ours.
                    # The mode stays as sent (an rsync that finds it changed would try to set it
                    # back, and fail), less any write bit for group and others.
                    if info.st_uid != os.geteuid():
                        os.fchown(fd, os.geteuid(), -1)
                    if stat.S_IMODE(info.st_mode) & 0o7022:
                        os.fchmod(fd, stat.S_IMODE(info.st_mode) & ~0o7022)
                except PermissionError:
                    self.copy_instead = True  # a watch user without CAP_CHOWN: one extra copy
            if not self.copy_instead and os.fstat(kept_slot_fd).st_dev == info.st_dev:
                os.link(f'/proc/self/fd/{fd}', name, dst_dir_fd=kept_slot_fd, follow_symlinks=True)
            elif (copied := self.copied_to.get(self._hash_key(info))) is not None:
                # Another name of an inode copied in this run (a week twin, or the sender's
                # hard links): a link of that copy, not one more copy (H8).
                os.link(copied, name, src_dir_fd=self.kept_fd, dst_dir_fd=kept_slot_fd)
            else:
                self._copy_file(fd, name, digest, kept_slot_fd)
                self.copied_to[self._hash_key(info)] = f'{rel}/{name}'
        kept = os.stat(name, dir_fd=kept_slot_fd, follow_symlinks=False)
        self.kept_inodes.add((kept.st_dev, kept.st_ino))
        if kept.st_size == info.st_size:  # the chown, chmod and link above changed its ctime
            self.digest_of[self._hash_key(kept)] = digest

    @staticmethod
    def _copy_file(fd: int, name: str, digest: str, kept_slot_fd: int) -> None:
        tmp = f'{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}'
        out = os.open(
            tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444, dir_fd=kept_slot_fd
        )
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            while block := os.read(fd, BLOCK):
                view = memoryview(block)
                while view:
                    view = view[os.write(out, view) :]
            os.fsync(out)
            if sha256_of(out) != digest:  # the copy, read back: what is kept is what was checked
                raise BackupError(f'{name} changed while it was copied; not kept', step='watch')
            os.link(tmp, name, src_dir_fd=kept_slot_fd, dst_dir_fd=kept_slot_fd)
        finally:
            os.close(out)
            os.unlink(tmp, dir_fd=kept_slot_fd)

    # -- recheck: a kept run still in incoming/ ----------------------------------------------------

    def recheck_kept_run(self, run: KeptRun, where: str, slot_fd: int) -> None:
        """A kept run: its received names must still be the kept inodes (or the same bytes)."""
        expected = run.digests
        try:
            inside = self.kept_slot(run.key, create=False)
        except OSError:
            self.report.problems.append(f'{where}: its kept copy is gone from {WATCH_KEPT}/')
            return
        with inside as kept_slot_fd:
            for name, digest in expected.items():
                file_where = f'{where.rsplit("/", 1)[0]}/{shown(name)}'
                try:
                    kept = os.stat(name, dir_fd=kept_slot_fd, follow_symlinks=False)
                except FileNotFoundError:
                    self.report.problems.append(f'{file_where}: its kept copy is missing')
                    continue
                try:
                    received = os.stat(name, dir_fd=slot_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # gone from incoming/: the kept copy is what counts
                if (received.st_dev, received.st_ino) == (kept.st_dev, kept.st_ino):
                    continue
                try:
                    fd, _ = self._open_received(slot_fd, name, file_where)
                except ValueError as error:
                    self.report.problems.append(
                        f'{error}, after it arrived; the first version is kept'
                    )
                    continue
                try:
                    same = self._hash(fd) == digest
                finally:
                    os.close(fd)
                if not same:
                    self.report.problems.append(
                        f'{file_where}: changed after it arrived (rewritten by the sender); the '
                        f'version that arrived first is kept in {self.folder}/{WATCH_KEPT}'
                    )

    # -- scrub: kept runs read again ---------------------------------------------------------------

    def scrub_kept(self) -> None:
        """Read every kept run not hashed for WATCH_SCRUB_EVERY again and check its SHA-256: the
        receiving account cannot write a kept file, but a disk can rot (T4). Runs arrive daily, so
        the reading spreads over the week instead of the whole history every hour."""
        for key, run in sorted(self.runs.items(), key=lambda item: str(item[0])):
            if self.now - run.hashed < WATCH_SCRUB_EVERY:
                continue  # a run kept just now was hashed just now
            expected = run.digests
            tree, slot = key.tree, key.slot
            try:
                inside = self.kept_slot(key, create=False)
            except OSError:
                self.report.problems.append(f'{key}: its kept copy is gone from {WATCH_KEPT}/')
                continue
            damaged = []
            with inside as kept_slot_fd:
                for name, digest in expected.items():
                    try:
                        fd = _open_in(kept_slot_fd, name)
                    except OSError as error:
                        damaged.append(f'{name} ({error.strerror})')
                        continue
                    try:
                        if self._hash(fd) != digest:
                            damaged.append(f'{name} (SHA-256 differs from the manifest)')
                    finally:
                        os.close(fd)
            if damaged:  # reported at every run until someone looks; never marked as checked
                self.report.problems += [
                    f'{WATCH_KEPT}/{tree}/{slot}/{what}: the kept copy is damaged (disk?); '
                    'restore it from another copy of the run'
                    for what in damaged
                ]
            elif not self.dry_run:
                run.hashed = self.now

    # -- retention ---------------------------------------------------------------------------------

    def apply_retention(self) -> None:
        """Remove the expired runs from kept/, and their names in incoming/ that are the same
        inodes (nothing else there is touched); a name that a run staying names too stays.

        The order, and why a crash at any instant (kill -9) leaves a safe state:
        1. retention comes first in a watch run, before the scan: a name an expired run frees may
           then arrive again, and is judged as new.
        2. ``expired`` picks the runs from the state alone, by watch's own times (H4), and
           ``names_to_remove`` leaves every name a staying run names too (H7).
        3. for each expired run, name by name, the manifest first: the name in incoming/ goes if
           it is the kept inode, then the kept name. Manifest first: incoming/ never shows the
           run's manifest naming files that are gone, only files no manifest names, which the scan
           passes over. incoming/ before kept/: the kept name is how its twin in incoming/ is
           known, so it goes last. A name already gone is passed over.
        4. the run leaves the state in memory; the state file is written at the end of the run.
        Until the state file is written it still lists the run, and its time is still up: the
        next watch expires it again (before its scan) and removes what is left of it. Nothing a
        staying run needs is removed at any point."""
        expiring = expired(list(self.runs.values()), self.now)
        going = {run.key for run in expiring}
        staying = [run for run in self.runs.values() if run.key not in going]
        for key, names in names_to_remove(expiring, staying).items():
            if self.dry_run:
                print(f'would remove {self.folder}/{WATCH_KEPT}/{key} ({len(names)} file(s))')
                continue
            with self.kept_slot(key, create=False) as kept_slot_fd:
                received = self.received_slot(key)
                with received or contextlib.nullcontext(-1) as received_fd:
                    for name in names:
                        try:
                            kept = os.stat(name, dir_fd=kept_slot_fd, follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if received_fd >= 0:
                            with contextlib.suppress(FileNotFoundError):
                                there = os.stat(name, dir_fd=received_fd, follow_symlinks=False)
                                if (there.st_dev, there.st_ino) == (kept.st_dev, kept.st_ino):
                                    os.unlink(name, dir_fd=received_fd)
                        os.unlink(name, dir_fd=kept_slot_fd)
            del self.runs[key]
            self.report.removed.append(str(key))

    # -- the whole look, and its summary -----------------------------------------------------------

    def watch(self, max_age_hours: float) -> TreeReport:
        """Keep and check what arrived, apply retention, and sum up; return the report."""
        try:
            if not self.open_folders():
                return self.report
            self.load_state()
            # Retention first: a name freed by an expired run may arrive again, rightly.
            self.apply_retention()
            self.scan_incoming()
            self.scrub_kept()
            self.save_state()
            self.sum_up(max_age_hours)
        finally:
            self.close()
        return self.report

    def sum_up(self, max_age_hours: float) -> None:
        report = self.report
        report.runs_kept = len(self.runs)
        report.bytes_kept = sum(run.size for run in self.runs.values())
        if self.runs:
            newest = max(self.runs.values(), key=lambda run: run.first_seen)
            report.newest, report.newest_time = str(newest.key), newest.first_seen
        if report.newest_time is None:
            report.stale.append(f'no backup has arrived in {self.folder}/{WATCH_INCOMING}')
        elif self.now - report.newest_time > max_age_hours * 3600:
            since = dt.datetime.fromtimestamp(report.newest_time)
            hours = (self.now - report.newest_time) / 3600
            report.stale.append(
                f'no backup has arrived since {since:%Y-%m-%d %H:%M} ({hours:.0f} h ago, '
                f'more than --max-age {max_age_hours:g} h)'
            )
        recent = [run for run in self.runs.values() if self.now - run.first_seen < 86400]
        if len(recent) > WATCH_FLOOD_RUNS:
            report.problems.append(
                f'{len(recent)} runs arrived within a day (more than {WATCH_FLOOD_RUNS}): a flood '
                'of junk? Every one is kept for its time; nothing older goes sooner'
            )


def watch_metrics_text(reports: Sequence[TreeReport], now: float) -> str:
    """Given watch's reports, return its metrics in Prometheus text, one sample per folder."""

    def per_tree(value: Callable[[TreeReport], float]) -> list[Sample]:
        return [({'tree': str(report.folder)}, value(report)) for report in reports]

    return prometheus_text(
        [
            (
                'ppbackup_watch_newest_run_age_seconds',
                'Seconds since watch first saw the newest run kept (+Inf: none).',
                per_tree(lambda r: now - r.newest_time if r.newest_time is not None else math.inf),
            ),
            (
                'ppbackup_watch_problems',
                'Problems found by the last watch run.',
                per_tree(lambda r: len(r.problems) + len(r.stale)),
            ),
            (
                'ppbackup_watch_runs_kept',
                "Runs kept out of the sender's reach.",
                per_tree(lambda r: r.runs_kept),
            ),
            (
                'ppbackup_watch_bytes_kept',
                'Bytes in the runs kept.',
                per_tree(lambda r: r.bytes_kept),
            ),
        ]
    )


def command_watch(
    folders: Sequence[Path],
    max_age_hours: float,
    mail: Sequence[str],
    dry_run: bool,
    as_json: bool = False,
    metrics: Path | None = None,
) -> int:
    """Watch every sender's folder: one report, at most one mail; return 1 if anything is wrong."""
    now = time.time()
    reports = []
    for folder in folders:
        tree = WatchTree(folder, now, dry_run)
        try:
            reports.append(tree.watch(max_age_hours))
            for key in tree.report.kept_now:
                log.info('%s: %s %s', folder, 'would keep' if dry_run else 'kept', key)
        except OSError as error:  # unreadable, read-only, full: say where, and go on with the rest
            tree.report.problems.append(
                f'{folder}: {error.filename or ""}: {os_reason(error)}; watch needs read access'
                ' to incoming/ and its own kept/ (see README, "watch")'
            )
            reports.append(tree.report)
    code = EXIT_OK
    if metrics is not None and not dry_run:
        try:
            write_metrics(metrics, watch_metrics_text(reports, now))
        except BackupError as error:
            print(f'ppbackup watch: {error}', file=sys.stderr)
            code = EXIT_FAILED
    if as_json:
        rows = [
            {
                'tree': str(r.folder),
                'names': sorted(r.names),
                'newest_run': r.newest or None,
                'newest_run_first_seen': r.newest_time,
                'newest_run_age_hours': (now - r.newest_time) / 3600 if r.newest_time else None,
                'runs_kept': r.runs_kept,
                'bytes_kept': r.bytes_kept,
                'problems': [*r.problems, *r.stale],
            }
            for r in reports
        ]
        print(json.dumps(rows, indent=2))
    troubled = [r for r in reports if r.problems or r.stale]
    if not troubled:
        return code
    kind = 'FAILED' if any(r.problems for r in troubled) else 'ALERT'
    text = ''
    for r in troubled:
        found = [*r.problems, *r.stale]
        text += f'{r.label()}: {len(found)} problem(s)\n' + ''.join(f'- {p}\n' for p in found)
    print(f'ppbackup watch: {kind}\n{text}', file=sys.stderr, end='')
    if mail:
        body = f'ppbackup watch on {os.uname().nodename}: {kind}\n\n'
        for r in troubled:
            found = [*r.problems, *r.stale]
            body += f'{r.label()}: {len(found)} problem(s)\n' + ''.join(
                f'- {_cut(p, WATCH_MAIL_LINE_WIDTH)}\n' for p in found[:WATCH_MAIL_PROBLEMS]
            )
            if len(found) > WATCH_MAIL_PROBLEMS:
                body += (
                    f'- and {len(found) - WATCH_MAIL_PROBLEMS} more: '
                    f'ppbackup watch --dry-run {r.folder} lists them all\n'
                )
        body += '\nWhat passed the check before stays in each kept/ folder; see README, "watch".\n'
        subject = f'[ppbackup] watch on {os.uname().nodename}: {kind}: ' + _a_few(
            [r.label() for r in troubled], WATCH_MAIL_TREES, 1000
        )
        try:
            send_mail(mail, subject, body)
        except BackupError as error:
            print(f'ppbackup: the alert mail could not be sent: {error}', file=sys.stderr)
    return EXIT_FAILED


# ---------------------------------------------------------------------------------------------------
# The key holder: `decrypt` one file, `restore` a run onto a database server, `drill` that a
# restore brings it all back. A run is data, never instructions: whatever arrived may be hostile.
# ---------------------------------------------------------------------------------------------------


# -- decrypt: one file, to a file or stdout ---------------------------------------------------------


def decompressor_for(name: str) -> tuple[str, ...]:
    """Given a backup file name, return the argv that decompresses it (empty for none)."""
    base = name[:-4] if name.endswith('.gpg') else name
    for _, (_, decompress, ext) in COMPRESSORS.items():
        if ext and base.endswith(ext):
            return decompress
    return ()


def check_encrypted_input(source: Path, fd: int) -> None:
    """Given the open input, raise ConfigError unless it starts as a message encrypted to a public
    key: a backup always does, and gpg would otherwise "decrypt" a merely stored (gpg --store) or
    signed file without a word. Armored input is left to gpg's status check after decryption."""
    head = os.pread(fd, 64, 0)
    if head.lstrip().startswith(b'-----BEGIN PGP MESSAGE'):
        return
    if not head or not head[0] & 0x80:
        raise ConfigError(f'{source}: not OpenPGP data; nothing was written', step='decrypt')
    # The packet tag: new format keeps it in the low 6 bits, the old one in bits 2..5.
    tag = head[0] & 0x3F if head[0] & 0x40 else (head[0] >> 2) & 0x0F
    if tag != 1:  # 1: a public-key encrypted session key, the start of every backup
        raise ConfigError(
            f'{source}: not encrypted to a public key (OpenPGP packet type {tag}), so not a '
            'ppbackup backup; refusing it, nothing was written',
            step='decrypt',
        )


def decrypt_target(output: str | None, source_info: os.stat_result) -> Path | None:
    """Given -o (None or "-" for stdout) and the input's stat, return the file to write, or None.

    Plaintext may go only to a new file or over a regular file that is not the input itself: never
    onto a device, a folder, a FIFO or through a symlink. Raise ConfigError otherwise.
    """
    if not output or output == '-':
        return None
    target = Path(output)
    try:
        info = target.lstat()
    except FileNotFoundError:
        if not target.parent.is_dir():
            raise ConfigError(
                f'-o {target}: the folder {target.parent} does not exist', step='decrypt'
            ) from None
        return target
    except OSError as error:
        raise ConfigError(f'-o {target}: {error.strerror}', step='decrypt') from error
    if stat.S_ISLNK(info.st_mode):
        what = 'a symlink; plaintext is never written through one'
    elif stat.S_ISDIR(info.st_mode):
        what = 'a folder; name the file to write'
    elif not stat.S_ISREG(info.st_mode):
        what = 'not a regular file (a device, FIFO or socket)'
    elif (info.st_dev, info.st_ino) == (source_info.st_dev, source_info.st_ino):
        what = 'the encrypted input itself; it would be lost'
    else:
        return target
    raise ConfigError(f'-o {target} is {what}: refusing it, nothing was written', step='decrypt')


def terminal_env() -> dict[str, str]:
    """Return the environment for gpg: GPG_TTY set from our terminal when unset, so that a
    passphrase prompt (pinentry) can reach the key holder (gpg's stdin is the file, not a tty)."""
    env = dict(os.environ)
    if env.get('GPG_TTY'):
        return env
    for fd in (0, 2, 1):
        with contextlib.suppress(OSError):
            if os.isatty(fd):
                env['GPG_TTY'] = os.ttyname(fd)
                return env
    return env


def secret_keyids(gnupghome: str | None) -> set[str]:
    """Given a GnuPG home (None: gpg's default), return the long key ids of its secret (sub)keys."""
    home = ['--homedir', gnupghome] if gnupghome else []
    with contextlib.suppress(BackupError):
        _, out = run_command(
            ['gpg', *home, '--batch', '--no-tty', '--with-colons', '--list-secret-keys'],
            what='gpg --list-secret-keys',
            step='decrypt',
            timeout=60,
        )
        return {
            line.split(':')[4].upper()
            for line in out.splitlines()
            if line.startswith(('sec:', 'ssb:')) and len(line.split(':')) > 4
        }
    return set()


def decrypt_failure(
    source: Path, error: BackupError, status: str, gnupghome: str | None, env: Mapping[str, str]
) -> BackupError:
    """Given gpg's failure and its status lines, return the error that says which case it is:
    no matching private key, a wrong passphrase, a passphrase nobody could be asked for, or a
    damaged file. gpg says "No secret key" for all of them."""
    home = gnupghome or os.environ.get('GNUPGHOME') or '~/.gnupg'
    addressed = sorted(set(re.findall(r'^\[GNUPG:\] ENC_TO ([0-9A-Fa-f]{16})', status, re.M)))
    held = sorted(set(keyid.upper() for keyid in addressed) & secret_keyids(gnupghome))
    if not held:
        return BackupError(
            f'{source.name}: cannot decrypt: no matching private key in {home} (the file is for '
            f"key id(s) {', '.join(addressed) or 'unknown'}). Run this where a recipient's "
            'private key is, or name its GnuPG home with --gnupghome.',
            step='decrypt',
            detail=error.detail,
        )
    # gpg's error code (the low 16 bits) says what the "No secret key" hides: 11 a bad passphrase.
    codes = [int(code) & 0xFFFF for code in re.findall(r'ERROR pkdecrypt_failed (\d+)', status)]
    if 11 in codes:
        return BackupError(
            f'{source.name}: the passphrase for your private key {held[0]} was wrong; run again '
            'and type it carefully.',
            step='decrypt',
            detail=error.detail,
        )
    if 'PINENTRY_LAUNCHED' in status or re.search(
        r'(?i)ioctl|pinentry|cancel|no passphrase|timeout', error.detail
    ):
        tty = env.get('GPG_TTY')
        where = f'GPG_TTY is {tty}' if tty else 'there is no terminal and GPG_TTY is unset'
        return BackupError(
            f'{source.name}: your private key {held[0]} is in {home}, but gpg could not ask for '
            f'its passphrase ({where}). Run ppbackup decrypt in a terminal, or run '
            '`export GPG_TTY=$(tty)` first; without a terminal, set a pinentry-program in '
            'gpg-agent.conf that can reach you, or unlock the key in gpg-agent beforehand '
            '(gpg-agent keeps it for its cache time).',
            step='decrypt',
            detail=error.detail,
        )
    return BackupError(
        f'{source.name}: gpg could not decrypt it although your private key {held[0]} is in '
        f'{home}: the file may be damaged; check it against its manifest (sha256sum -c).',
        step='decrypt',
        detail=error.detail,
    )


def command_decrypt(source: Path, output: str | None, gnupghome: str | None) -> int:
    """Given a backup file, decrypt and decompress it to OUT or stdout; needs the private key.

    OUT is written under a temporary name beside it and renamed into place only when gpg said the
    file decrypted whole. Raise ConfigError for unusable input or output, BackupError if gpg fails.
    """
    try:
        # O_NONBLOCK: a FIFO given as the input must be refused below, not wait for a writer.
        source_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as error:
        raise ConfigError(f'{source}: cannot open it: {error.strerror}', step='decrypt') from error
    tmp: Path | None = None
    out_fd = -1
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(os.close, source_fd)
        source_info = os.fstat(source_fd)
        if not stat.S_ISREG(source_info.st_mode):
            raise ConfigError(f'{source}: not a regular file', step='decrypt')
        check_encrypted_input(source, source_fd)
        target = decrypt_target(output, source_info)
        if target:
            tmp = temp_name(target)
            out_fd = create_private_file(tmp)
            cleanup.callback(os.close, out_fd)
        sink = out_fd if target else sys.stdout.fileno()
        try:
            with Pipeline(f'decrypt {source.name}', 'decrypt') as pipe:
                plain = Plaintext(pipe, source, gnupghome)
                cleanup.callback(plain.close)
                # gpg reads the file we opened and checked: no swap between check and use.
                plain.start(stdin=source_fd, stdout=sink)
                decrypted = plain.check()  # gpg's failure said plainly; else the decompressor's
            if not decrypted:
                raise BackupError(
                    f'{source.name}: gpg did not report a whole, decrypted message: '
                    + ('the output was discarded' if target else 'do not use what was written'),
                    step='decrypt',
                )
            if tmp and target:
                os.fsync(out_fd)
                os.replace(tmp, target)  # a new inode: whatever held the old name is untouched
                tmp = None
        except OSError as error:
            raise BackupError(
                f'{source.name}: cannot write {target or "stdout"}: {error.strerror}',
                step='decrypt',
            ) from error
        finally:
            if tmp:
                remove_path(tmp)
    return EXIT_OK


# -- Choosing a run: by its name, and by when the backup host first saw it --------------------------


INDEX_MAX_BYTES = 64 << 20  # the index is row counts and names: anything bigger is not ours


FIRST_SEEN_FILE = 'first-seen.json'  # watch's record, beside the slots it keeps
FIRST_SEEN_FORMAT = 'ppbackup-first-seen'
FIRST_SEEN_MAX_BYTES = 64 << 20
_OPEN_GIVEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # a folder the key holder named


@dataclasses.dataclass
class RunFiles:
    """One run as a key holder finds it: a slot's manifest, or a plaintext ``latest`` folder."""

    folder: Path
    names: dict[str, str]  # plaintext name -> the file's name in the folder
    digests: dict[str, str]  # file name in the folder -> SHA-256 (empty for plaintext)
    label: str
    seen: str = ''  # how it was chosen: the backup host's first-seen record, or the sender's word


@dataclasses.dataclass
class FirstSeen:
    """The backup host's own record of when each run it keeps first arrived (``watch`` writes it):
    unlike a run's names, ids and mtimes, this is not the sender's word."""

    host: str
    runs: dict[str, tuple[float, str]]  # 'SLOT/MANIFEST' -> (first seen, SHA-256 of the manifest)


def _utc(stamp: float) -> str:
    return f'{dt.datetime.fromtimestamp(stamp, dt.UTC):%Y-%m-%d %H:%M:%S} UTC'


def parse_arrived_before(text: str) -> dt.datetime:
    """Given --arrived-before's ISO date or date-time, return it; UTC unless it names an offset."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f'{text!r} is not an ISO date or date-time (2026-12-01 or 2026-12-01T14:30)'
        ) from error
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _first_seen_problem(record: object) -> str:
    """Given a parsed first-seen record, return '' if it is one watch writes, else what is wrong."""
    if not isinstance(record, dict):
        return 'not a JSON object'
    version = record.get('version')
    if record.get('format') != FIRST_SEEN_FORMAT or type(version) is not int or version != 1:
        return f'not format "{FIRST_SEEN_FORMAT}", version 1'
    if not isinstance(record.get('host'), str) or not record['host']:
        return '"host" is not a name'
    if not isinstance(record.get('runs'), dict):
        return '"runs" is not an object'
    for key, run in record['runs'].items():
        slot, _, manifest = key.partition('/')
        if not SLOT_RE.fullmatch(slot) or plain_name_problem(manifest):
            return f'{shown(key)} is not SLOT/MANIFEST'
        if not isinstance(run, dict):
            return f'{shown(key)}: not an object'
        seen, digest = run.get('first_seen'), run.get('sha256')
        if isinstance(seen, bool) or not isinstance(seen, (int, float)) or not math.isfinite(seen):
            return f'{shown(key)}: "first_seen" is not a time'
        try:
            _utc(seen)
        except (OverflowError, ValueError, OSError):
            return f'{shown(key)}: "first_seen" is not a time'
        if not isinstance(digest, str) or not SHA256_RE.fullmatch(digest):
            return f'{shown(key)}: "sha256" is not a SHA-256'
    return ''


def read_first_seen(tree: Path) -> FirstSeen | None:
    """Given a folder of slots, return the backup host's first-seen record in it, or None if there
    is none. Raise BackupError if it is there but is not one."""
    where = tree / FIRST_SEEN_FILE
    try:
        tree_fd = os.open(tree, _OPEN_GIVEN_DIR)
    except OSError:
        return None
    try:
        fd = _open_in(tree_fd, FIRST_SEEN_FILE)
    except FileNotFoundError:
        return None
    except OSError as error:
        why = 'a symlink; not followed' if error.errno == errno.ELOOP else error.strerror
        raise BackupError(f'{where}: cannot be read: {why}', step='restore') from error
    finally:
        os.close(tree_fd)
    with os.fdopen(fd, 'rb') as handle:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        data = handle.read(FIRST_SEEN_MAX_BYTES + 1) if regular else b''
    problem = 'not a regular file' if not regular else ''
    if not problem and len(data) > FIRST_SEEN_MAX_BYTES:
        problem = f'larger than {FIRST_SEEN_MAX_BYTES} bytes'
    record: object = None
    if not problem:
        try:
            record = json.loads(data)
        except ValueError as error:
            problem = f'not JSON ({error})'
    problem = problem or _first_seen_problem(record)
    if problem:
        raise BackupError(
            f"{where}: not the backup host's first-seen record: {problem}; fetch it again with "
            "the slots, or move it away to choose by run id (the sender's word)",
            step='restore',
        )
    assert isinstance(record, dict)
    runs = {key: (float(run['first_seen']), run['sha256']) for key, run in record['runs'].items()}
    return FirstSeen(record['host'], runs)


def _run_order(manifest: str) -> tuple[int, str, int] | None:
    """Given a manifest's name, return its run id as a sort key (old HHxx ids first), or None."""
    match = RUN_NAME_RE.fullmatch(manifest)
    if not match:
        return None
    run_id = manifest[len(match.group(1)) + 1 : -len(MANIFEST_SUFFIX)]
    if run_id.endswith('xx'):
        return 0, run_id, 0
    return 1, run_id[:15], int(run_id[16:] or 0)


def _manifest_names(slot: Path) -> list[str]:
    """Given a slot, return the names of the manifests in it (not opened, whatever they are)."""
    try:
        names = os.listdir(slot)
    except OSError:
        return []
    return sorted(n for n in names if n.endswith(MANIFEST_SUFFIX) and not n.startswith('.'))


def _manifest_digest(slot: Path, name: str) -> str:
    """Given a manifest in a slot, return its SHA-256, or '' if it is not a regular file."""
    try:
        slot_fd = os.open(slot, _OPEN_GIVEN_DIR)
    except OSError:
        return ''
    try:
        fd = _open_in(slot_fd, name)
    except OSError:
        return ''
    finally:
        os.close(slot_fd)
    try:
        return sha256_of(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else ''
    finally:
        os.close(fd)


def _open_run(slot: Path, name: str, seen: str, digest: str = '') -> RunFiles:
    """Given a slot and a manifest's name in it (and the SHA-256 it was chosen by), return the run.
    Raise BackupError if the manifest is not a regular file, not that one, or names anything but
    plain files of its slot: nothing it names is opened then, and no file outside the slot ever is
    (every open is relative to it, never via a symlink)."""
    where = str(slot / name)
    try:
        slot_fd = os.open(slot, _OPEN_GIVEN_DIR)
    except OSError as error:
        raise ConfigError(f'{slot}: no such slot: {error.strerror}', step='restore') from error
    try:
        try:
            fd = _open_in(slot_fd, name)
        except FileNotFoundError as error:
            raise ConfigError(f'{where}: no such run', step='restore') from error
        except OSError as error:
            why = 'a symlink; not followed' if error.errno == errno.ELOOP else error.strerror
            raise BackupError(f'{where}: refused as a manifest: {why}', step='restore') from error
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BackupError(f'{where}: not a regular file; not a manifest', step='restore')
            if digest and sha256_of(fd) != digest:
                raise BackupError(f'{where}: changed while it was chosen', step='restore')
            os.lseek(fd, 0, os.SEEK_SET)
            digests, problems = _read_manifest_fd(fd, where)
        finally:
            os.close(fd)
        if problems:
            more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
            raise BackupError(
                f'{problems[0]}{more}: this run is refused, and nothing it names is opened',
                step='restore',
            )
        # A file the manifest names but the slot lacks (or holds as a symlink) is missing from the
        # run: said where it matters.
        names = {}
        for entry in digests:
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.stat(entry, dir_fd=slot_fd, follow_symlinks=False).st_mode):
                    names[entry.removesuffix('.gpg')] = entry
    finally:
        os.close(slot_fd)
    return RunFiles(slot, names, digests, where, seen)


def _seen_explicit(record: FirstSeen | None, slot: Path, name: str) -> str:
    """Given a manifest named on the command line, say what the first-seen record says of it."""
    if record is None:
        return (
            f'no first-seen record ({FIRST_SEEN_FILE}) beside the slot: when this run arrived is '
            "not known, its name and run id are the sender's word"
        )
    listed = record.runs.get(f'{slot.name}/{name}')
    if listed is None:
        return f'the first-seen record of the backup host {record.host} does not list this run'
    if _manifest_digest(slot, name) != listed[1]:
        return (
            f'the first-seen record of the backup host {record.host} lists this run with another '
            'manifest: this one is not what the backup host kept'
        )
    return f'first seen by the backup host {record.host} at {_utc(listed[0])}'


def _best(chosen: Sequence[tuple[Any, Path, str, str]]) -> tuple[Any, Path, str, str]:
    """Given (order, slot, manifest, digest) runs, return the last, as its day slot's copy if there
    is one: a week slot holds the same run without its binaries."""
    best = max(chosen, key=lambda run: (run[0], run[1].name.startswith('day')))
    days = [run for run in chosen if run[2] == best[2] and run[1].name.startswith('day')]
    return days[0] if days else best


def choose_run(
    slots: Sequence[Path], record: FirstSeen | None, arrived_before: dt.datetime | None
) -> tuple[Path, str, str, str]:
    """Given slots, return (slot, manifest name, how it was chosen, its SHA-256 if by the record)
    of the run to use: the last by the backup host's first-seen record if there is one (only the
    runs it lists with that very manifest), else the last by run id (the sender's word); never by
    mtime. Raise BackupError if none qualifies. What was passed over is said on stderr."""
    chosen: list[tuple[Any, Path, str, str]] = []  # (order, slot, manifest, its SHA-256 or '')
    unlisted = mismatched = unnamed = 0
    for slot in slots:
        for name in _manifest_names(slot):
            if record is not None:
                listed = record.runs.get(f'{slot.name}/{name}')
                if listed is None:
                    unlisted += 1
                elif _manifest_digest(slot, name) != listed[1]:
                    mismatched += 1
                elif arrived_before is None or listed[0] < arrived_before.timestamp():
                    chosen.append((listed[0], slot, name, listed[1]))
                continue
            order = _run_order(name)
            if order is None:
                unnamed += 1
                continue
            if arrived_before is not None:
                # A run id is the web host's wall clock: compared with DATE as written, in UTC.
                limit = f'{arrived_before.astimezone(dt.UTC):%Y%m%d-%H%M%S}'
                if order[0] == 0 or order[1] >= limit:
                    continue  # an HHxx id has no date: not known to be before DATE
            chosen.append((order, slot, name, ''))
    where = ', '.join(str(slot) for slot in slots[:3]) + (' ...' if len(slots) > 3 else '')
    if record is not None:
        if unlisted or mismatched:
            print(
                f'ppbackup: skipped {unlisted + mismatched} run(s): {unlisted} not in the '
                f'first-seen record of the backup host {record.host}, {mismatched} whose manifest '
                'does not match it',
                file=sys.stderr,
            )
        before = f' first seen before {_utc(arrived_before.timestamp())}' if arrived_before else ''
        if not chosen:
            raise BackupError(
                f'{where}: no run{before} that the first-seen record of the backup host '
                f'{record.host} lists with this manifest',
                step='restore',
            )
        seen, slot, name, digest = _best(chosen)
        return slot, name, f'first seen by the backup host {record.host} at {_utc(seen)}', digest
    if unnamed:
        print(
            f'ppbackup: skipped {unnamed} manifest(s) whose name holds no run id',
            file=sys.stderr,
        )
    before = f' with a run id before {_utc(arrived_before.timestamp())}' if arrived_before else ''
    if not chosen:
        raise BackupError(f'{where}: no run{before}', step='restore')
    _, slot, name, _ = _best(chosen)
    chosen_as = f'the last run{before}' if arrived_before else 'the newest run by its run id'
    said = f'no first-seen record ({FIRST_SEEN_FILE}) beside the slots: {chosen_as}, which is '
    return slot, name, said + "the sender's word", ''


def find_run(
    source: str, config_arg: str | None, arrived_before: dt.datetime | None = None
) -> RunFiles:
    """Given a run as named on the command line (a manifest, a slot, a folder of slots, a copy of
    ``latest``, or the word ``latest``), return its files; with ``arrived_before``, the last run
    before it (see choose_run). Raise ConfigError if there is none, BackupError if it is refused."""
    if source == 'latest':
        folder = load_config(config_path_from(config_arg)).insecure_dir / 'latest'
    else:
        folder = Path(source)
    if folder.name.endswith(MANIFEST_SUFFIX) and (folder.is_file() or folder.is_symlink()):
        if arrived_before is not None:
            raise ConfigError(
                '--arrived-before chooses among runs: give a slot or a folder of slots, '
                'not a manifest',
                step='restore',
            )
        record = read_first_seen(folder.parent.parent)
        return _open_run(
            folder.parent, folder.name, _seen_explicit(record, folder.parent, folder.name)
        )
    if not folder.is_dir() or folder.is_symlink():
        raise ConfigError(f'{source}: no such run (a manifest, a slot or a folder)', step='restore')
    slots = [folder] if _manifest_names(folder) else all_slots(folder)
    if any(_manifest_names(slot) for slot in slots):
        tree = folder.parent if slots == [folder] else folder
        return _open_run(*choose_run(slots, read_first_seen(tree), arrived_before))
    if arrived_before is not None:
        raise ConfigError(
            f'{source}: --arrived-before chooses among encrypted runs; this is plaintext',
            step='restore',
        )
    # A plaintext run: the latest/ folder or a copy of it.
    names = {
        entry.name: entry.name
        for entry in sorted(folder.iterdir())
        if entry.is_file() and not entry.is_symlink() and not entry.name.startswith('.')
    }
    return RunFiles(folder, names, {}, str(folder))


def run_file(run: RunFiles, plain: str) -> Path:
    """Given a file of the run by its plaintext name (as the index names it), return its path
    once its SHA-256 matches the manifest. Raise BackupError if the run lacks it or it is altered."""
    if plain not in run.names:
        raise BackupError(f'{shown(plain)} is missing from {run.label}', step='restore')
    return verified_path(run, run.names[plain])


def verified_path(run: RunFiles, name: str) -> Path:
    """Given a file of a run, return its path once its SHA-256 matches the manifest. Raise
    BackupError if it is missing, not a plain file of the run's folder, or altered."""
    if plain_name_problem(name):
        raise BackupError(f'{shown(name)} is not a file of {run.folder}', step='restore')
    try:
        folder_fd = os.open(run.folder, _OPEN_GIVEN_DIR)
    except OSError as error:
        raise BackupError(f'{run.folder}: cannot be read: {error.strerror}', step='restore')
    try:
        fd = _open_in(folder_fd, name)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise BackupError(
                f'{name} is a symlink in {run.folder}; not followed', step='restore'
            ) from error
        raise BackupError(f'{name} is missing from {run.folder}', step='restore') from error
    finally:
        os.close(folder_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BackupError(f'{name} is missing from {run.folder}', step='restore')
        if name in run.digests and sha256_of(fd) != run.digests[name]:
            raise BackupError(
                f'{name}: SHA-256 does not match the manifest (altered or truncated); '
                'fetch it again from the remote',
                step='restore',
            )
    finally:
        os.close(fd)
    return run.folder / name


# -- Reading a backup: one way, decrypt, decompress, check the status -------------------------------


def gpg_decrypt_argv(gnupghome: str | None, status_fd: int) -> list[str]:
    """Given a GnuPG home (None: gpg's default) and the fd for gpg's status lines, return the argv
    of ``gpg --decrypt`` as every reader of a backup runs it (the input follows, or is stdin)."""
    home = ['--homedir', gnupghome] if gnupghome else []
    return ['gpg', *home, '--batch', '--no-tty', '--status-fd', str(status_fd), '--decrypt']


class Plaintext:
    """A backup file read in a pipeline: gpg --decrypt (for .gpg) or cat, then its decompressor.
    ``start`` starts them; ``check`` at the end waits for the pipeline and says plainly why gpg
    could not decrypt (no matching key, a wrong passphrase, no way to ask for it)."""

    def __init__(self, pipe: Pipeline, path: Path, gnupghome: str | None) -> None:
        self.pipe = pipe
        self.path = path
        self.gnupghome = gnupghome
        self.status = tempfile.TemporaryFile()  # gpg's status lines
        self.env = terminal_env()  # a passphrase prompt reaches the key holder's terminal

    def start(
        self, stdin: int | None = None, stdout: int = subprocess.PIPE
    ) -> subprocess.Popen[bytes]:
        """Start gpg and the decompressor, writing the plaintext to ``stdout``; return the last
        process. ``stdin``: an fd opened and checked by the caller, which gpg decrypts (no swap
        between check and use); else the file by its name, with cat for a plaintext file."""
        decompress = decompressor_for(self.path.name)
        first_out = subprocess.PIPE if decompress else stdout
        if stdin is not None or self.path.name.endswith('.gpg'):
            named = ['--', str(self.path)] if stdin is None else []
            first = self.pipe.start(
                [*gpg_decrypt_argv(self.gnupghome, self.status.fileno()), *named],
                stdin=subprocess.DEVNULL if stdin is None else stdin,
                stdout=first_out,
                env=self.env,
                pass_fds=(self.status.fileno(),),
            )
        else:  # a plaintext file of latest/: no key needed
            first = self.pipe.start(['cat', '--', str(self.path)], stdout=first_out)
        if not decompress:
            return first
        last = self.pipe.start(decompress, stdin=first.stdout, stdout=stdout)
        assert first.stdout is not None
        first.stdout.close()  # the decompressor holds it now: gpg sees EPIPE if it stops early
        return last

    def check(self, broken: bool = False) -> bool:
        """Wait for the pipeline (``broken``: its reader stopped early); return whether gpg said
        it decrypted the file whole. Raise BackupError, saying plainly why gpg could not decrypt,
        when gpg is what failed; else the pipeline's own failure (the decompressor's, a
        loader's)."""
        try:
            self.pipe.check(downstream_broke=broken)
        except BackupError as error:
            text = self.close()
            if ': gpg ' in str(error) and '[GNUPG:] DECRYPTION_OKAY' not in text:
                failure = decrypt_failure(self.path, error, text, self.gnupghome, self.env)
                failure.step = self.pipe.step
                raise failure from error
            raise
        return '[GNUPG:] DECRYPTION_OKAY' in self.close()

    def close(self) -> str:
        """Close gpg's status lines (a reader that fails before ``check``); return them."""
        if self.status.closed:
            return ''
        self.status.seek(0)
        text = self.status.read().decode('utf-8', 'replace')
        self.status.close()
        return text


def open_plaintext(
    pipe: Pipeline, path: Path, gnupghome: str | None
) -> tuple[IO[bytes], Plaintext]:
    """Given a backup file, start gpg (for .gpg) and the decompressor in ``pipe``; return the
    stream of plaintext and what checks the pipeline at the end (its ``check``)."""
    plain = Plaintext(pipe, path, gnupghome)
    last = plain.start()
    assert last.stdout is not None
    return last.stdout, plain


def feed(
    source: IO[bytes],
    sink: subprocess.Popen[bytes],
    what: str,
    transform: Callable[[bytes], bytes] | None = None,
) -> bool:
    """Given a plaintext stream and a loader process, copy one into the other (line by line
    through ``transform`` if given). Return True if the loader stopped reading early (it failed:
    check() then names it, not the decompressor that got EPIPE)."""
    assert sink.stdin is not None
    progress = Progress(what)
    count = 0
    broken = False
    try:
        if transform is None:
            while block := source.read(BLOCK):
                sink.stdin.write(block)
                count += len(block)
                progress.update(count)
        else:
            for lines, line in enumerate(source):
                count += len(line)
                out = transform(line)
                if out:
                    sink.stdin.write(out)
                if lines % 10000 == 0:
                    progress.update(count)
        sink.stdin.flush()
    except BrokenPipeError:
        broken = True
    finally:
        progress.done(count)
        with contextlib.suppress(OSError):
            sink.stdin.close()
        if broken:
            source.close()  # the decompressor and gpg stop too, instead of blocking on a pipe
    return broken


def load_into(
    what: str,
    path: Path,
    gnupghome: str | None,
    argv: Sequence[str],
    shown: str | None = None,
    transform: Callable[[bytes], bytes] | None = None,
) -> None:
    """Given a backup file and a loader's argv (the mysql client in its sandbox), decrypt the file
    and feed it to the loader (line by line through ``transform`` if given); ``shown``: the
    progress line's name (else ``what``). Raise BackupError naming what failed, and why gpg did."""
    with Pipeline(what, 'restore') as pipe:
        source, plain = open_plaintext(pipe, path, gnupghome)
        loader = pipe.start(argv, stdin=subprocess.PIPE)
        plain.check(feed(source, loader, shown or what, transform))


def read_plaintext(path: Path, gnupghome: str | None, limit: int) -> bytes:
    """Given a backup file, return its plaintext, cut after ``limit`` + 1 bytes (the caller says
    what a larger file is). Raise BackupError if it cannot be read."""
    with Pipeline(f'decrypt {path.name}', 'restore', timeout=600) as pipe:
        stream, plain = open_plaintext(pipe, path, gnupghome)
        data = stream.read(limit + 1)
        stream.close()
        plain.check(broken=len(data) > limit)
    return data


def read_small(path: Path, gnupghome: str | None, what: str, limit: int = INDEX_MAX_BYTES) -> bytes:
    """Given a small backup file (a roles or users file), return its plaintext. Raise BackupError
    if it cannot be read or is larger than ``limit``."""
    data = read_plaintext(path, gnupghome, limit)
    if len(data) > limit:
        raise BackupError(f'{what}: larger than {human_size(limit)}: not ours', step='restore')
    return data


def read_index(run: RunFiles, gnupghome: str | None) -> dict[str, Any]:
    """Given a run, return its index (what each file holds, row counts). Raise BackupError if the
    run has none or it cannot be read."""
    found = [name for name in run.names if f'-{RUN_INDEX}-' in name and '.json' in name]
    if not found:
        raise BackupError(
            f'{run.label}: no row counts file (*-{RUN_INDEX}-*.json) in this run: it was made '
            'by an older ppbackup, or the file was lost; restore its dumps by hand (README)',
            step='restore',
        )
    path = verified_path(run, run.names[found[0]])
    data = read_plaintext(path, gnupghome, INDEX_MAX_BYTES)
    try:
        index = json.loads(data)
    except ValueError as error:
        raise BackupError(f'{path.name}: not a ppbackup index: {error}', step='restore') from error
    if not isinstance(index, dict) or index.get('format') != INDEX_FORMAT:
        raise BackupError(f'{path.name}: not an index this ppbackup knows', step='restore')
    listed = {name.removesuffix('.gpg') for name in run.digests} if run.digests else None
    problem = index_problem(index, listed)
    if problem:
        raise BackupError(
            f'{path.name}: not a sound ppbackup index: {problem}; nothing of this run is restored',
            step='restore',
        )
    if listed is not None:  # a week slot's run: its binaries stay in the day slot
        absent = [name for name in index.get('archives', []) if name not in listed]
        index['archives'] = [name for name in index.get('archives', []) if name in listed]
        index['not_in_slot'] = absent  # said by restore and drill, not a failure
    return index


def index_problem(index: object, listed: set[str] | None) -> str:
    """Given a decrypted index and the plaintext names of the files its manifest lists (None for a
    plaintext ``latest`` run), return '' if it is an index as ppbackup writes it, else what is
    wrong, in words. A run is data: this is the only check between its index and the code that
    reads it, so everything that code relies on is checked here.

    - an object with ``format`` (INDEX_FORMAT), ``name`` (a str) and ``databases``: a list of
      objects, each with ``kind`` (psql or mysql), ``database`` and ``file`` (str), ``rows`` (an
      object of str -> int) and optionally ``owner`` (a str or null) and ``grants`` (an object of
      str -> str: each object's owner and grants; older runs have none);
    - optionally ``pg_roles`` and ``mariadb_users`` (a str or null), ``archives`` and ``lacks``
      (lists of str);
    - every file it names (``file``, ``pg_roles``, ``mariadb_users``, ``archives``) is a plain file
      name, and one its manifest lists; only a binaries archive may be absent (a week slot keeps
      none: the index is the run's, shared by its day and week slots).
    """
    if not isinstance(index, dict):
        return 'not a JSON object'
    for key in ('format', 'name', 'databases'):
        if key not in index:
            return f'it lacks "{key}"'
    if type(index['format']) is not int or index['format'] != INDEX_FORMAT:
        return f'"format" is not {INDEX_FORMAT}'
    if not isinstance(index['name'], str):
        return '"name" is not a string'
    if not isinstance(index['databases'], list):
        return '"databases" is not a list'
    named: list[str] = []
    for number, entry in enumerate(index['databases'], 1):
        where = f'database {number} of "databases"'
        if not isinstance(entry, dict):
            return f'{where} is not an object'
        for key in ('kind', 'database', 'file', 'rows'):
            if key not in entry:
                return f'{where} lacks "{key}"'
        if not isinstance(entry['kind'], str) or entry['kind'] not in ('psql', 'mysql'):
            return f'{where}: "kind" is neither "psql" nor "mysql"'
        for key in ('database', 'file'):
            if not isinstance(entry[key], str):
                return f'{where}: "{key}" is not a string'
        rows = entry['rows']
        if not isinstance(rows, dict) or any(type(count) is not int for count in rows.values()):
            return f'{where}: "rows" is not an object of table -> row count'
        if entry.get('owner') is not None and not isinstance(entry['owner'], str):
            return f'{where}: "owner" is neither a string nor null'
        grants = entry.get('grants', {})
        if not isinstance(grants, dict) or any(not isinstance(v, str) for v in grants.values()):
            return f'{where}: "grants" is not an object of object -> grants'
        named.append(entry['file'])
    for key in ('pg_roles', 'mariadb_users'):
        value = index.get(key)
        if value is not None and not isinstance(value, str):
            return f'"{key}" is neither a string nor null'
        if value:
            named.append(value)
    for key in ('archives', 'lacks'):
        value = index.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            return f'"{key}" is not a list of strings'
    named += index.get('archives', [])
    binaries = re.compile(rf'.+-binaries-(?:{RUN_ID_PATTERN})\.tar(?:\.[a-z0-9]+)?')
    for name in named:
        why = plain_name_problem(name)
        if why:
            return f'it names {shown(name)}: {why}'
        if listed is not None and name not in listed and not binaries.fullmatch(name):
            return f'it names {shown(name)}, a file its manifest does not list'
    return ''


# -- The roles file: parsed and written again by ppbackup, never fed to psql as it comes ------------


PG_TOKEN_RE = re.compile(
    r"""(?P<space>\s+)|(?P<comment>--[^\n]*)|(?P<ident>"(?:[^"]|"")+")|(?P<string>'(?:[^']|'')*')"""
    r'|(?P<number>-?[0-9]+)|(?P<word>[A-Za-z_][A-Za-z0-9_$]*)|(?P<punct>[(),;=.])'
)
PG_ROLE_ATTRIBUTES = {
    f'{no}{name}'
    for name in ('SUPERUSER', 'INHERIT', 'CREATEROLE', 'CREATEDB', 'LOGIN', 'REPLICATION')
    for no in ('', 'NO')
} | {'BYPASSRLS', 'NOBYPASSRLS'}
PG_ROLE_POWERS = {'SUPERUSER', 'REPLICATION', 'BYPASSRLS'}  # what a drill's roles never get
# Role settings that load code when the role logs in: never applied from a backup.
PG_REFUSED_SETTINGS = {'session_preload_libraries', 'local_preload_libraries'}


@dataclasses.dataclass
class RoleStatement:
    """One statement of a roles file, as ppbackup writes it again: every name and value quoted
    by ppbackup itself, the keywords from a fixed set."""

    kind: str  # role, role attributes, role setting, role comment, membership, tablespace...
    name: str  # the role or tablespace it is about
    sql: str
    line: int
    roles: tuple[str, ...] = ()  # a membership: (the role granted, its member)


class _Tokens:
    """The tokens of one statement, read by the shapes pg_dumpall --globals-only writes."""

    def __init__(self, tokens: list[tuple[str, str]], line: int, source: str) -> None:
        self.tokens = tokens
        self.at = 0
        self.line = line
        self.source = source

    def refuse(self) -> NoReturn:
        raise BackupError(
            f'{self.source}, line {self.line}: not a statement pg_dumpall --globals-only writes; '
            'refused (a run is data, never instructions): look at the file before you trust it',
            step='restore',
        )

    def peek(self, *words: str) -> bool:
        if self.at + len(words) > len(self.tokens):
            return False
        ahead = self.tokens[self.at : self.at + len(words)]
        return all(
            kind == 'word' and text.upper() == word for (kind, text), word in zip(ahead, words)
        )

    def take(self, *words: str) -> bool:
        if self.peek(*words):
            self.at += len(words)
            return True
        return False

    def punct(self, char: str) -> bool:
        if self.at < len(self.tokens) and self.tokens[self.at] == ('punct', char):
            self.at += 1
            return True
        return False

    def need(self, *words: str) -> None:
        if not self.take(*words):
            self.refuse()

    def next(self, *kinds: str) -> tuple[str, str]:
        if self.at >= len(self.tokens) or self.tokens[self.at][0] not in kinds:
            self.refuse()
        self.at += 1
        return self.tokens[self.at - 1]

    def name(self) -> str:
        kind, text = self.next('ident', 'word')
        return text[1:-1].replace('""', '"') if kind == 'ident' else text.lower()

    def string(self) -> str:
        return self.next('string')[1][1:-1].replace("''", "'")

    def value(self) -> str:
        """A setting's value: a string, a number or a plain word, re-quoted as a literal."""
        kind, text = self.next('string', 'number', 'word', 'ident')
        if kind == 'string':
            return sql_literal(text[1:-1].replace("''", "'"))
        if kind == 'number':
            return str(int(text))
        return pg_ident(text[1:-1].replace('""', '"')) if kind == 'ident' else text.lower()

    def end(self) -> None:
        if self.at != len(self.tokens):
            self.refuse()


def _role_statement(tokens: _Tokens) -> RoleStatement | None:
    """Given one statement's tokens, return it written again by ppbackup, or None for a SET of
    the file's own session. Raise BackupError for any other shape."""
    line = tokens.line
    if tokens.take('SET'):
        return None  # the dump's session settings: ours are psql's defaults
    if tokens.take('CREATE', 'ROLE'):
        name = tokens.name()
        tokens.end()
        return RoleStatement('role', name, f'CREATE ROLE {pg_ident(name)};', line)
    if tokens.take('ALTER', 'ROLE'):
        name = tokens.name()
        if tokens.take('WITH'):
            parts = []
            while tokens.at < len(tokens.tokens):
                if tokens.take('CONNECTION', 'LIMIT'):
                    parts.append(f'CONNECTION LIMIT {int(tokens.next("number")[1])}')
                elif tokens.take('PASSWORD'):
                    parts.append('PASSWORD NULL' if tokens.take('NULL') else
                                 f'PASSWORD {sql_literal(tokens.string())}')  # fmt: skip
                elif tokens.take('VALID', 'UNTIL'):
                    parts.append(f'VALID UNTIL {sql_literal(tokens.string())}')
                else:
                    word = tokens.next('word')[1].upper()
                    if word not in PG_ROLE_ATTRIBUTES:
                        tokens.refuse()
                    parts.append(word)
            sql = f'ALTER ROLE {pg_ident(name)} WITH {" ".join(parts)};'
            return RoleStatement('role attributes', name, sql, line)
        database = ''
        if tokens.take('IN', 'DATABASE'):
            database = tokens.name()
        tokens.need('SET')
        setting = tokens.name()
        while tokens.punct('.'):  # a setting of an extension's: app.tenant
            setting += '.' + tokens.name()
        if setting in PG_REFUSED_SETTINGS or not re.fullmatch(r'[a-z_][a-z0-9_.]*', setting):
            tokens.refuse()
        if not (tokens.take('TO') or tokens.punct('=')):
            tokens.refuse()
        values = [tokens.value()]
        while tokens.punct(','):
            values.append(tokens.value())
        tokens.end()
        where = f' IN DATABASE {pg_ident(database)}' if database else ''
        sql = f'ALTER ROLE {pg_ident(name)}{where} SET {setting} TO {", ".join(values)};'
        return RoleStatement('role setting', name, sql, line)
    if tokens.take('COMMENT', 'ON'):
        kind = 'role' if tokens.take('ROLE') else 'tablespace' if tokens.take('TABLESPACE') else ''
        if not kind:
            tokens.refuse()
        name = tokens.name()
        tokens.need('IS')
        text = 'NULL' if tokens.take('NULL') else sql_literal(tokens.string())
        tokens.end()
        sql = f'COMMENT ON {kind.upper()} {pg_ident(name)} IS {text};'
        return RoleStatement(f'{kind} comment', name, sql, line)
    if tokens.take('GRANT'):
        role = tokens.name()
        tokens.need('TO')
        member = tokens.name()
        options = []
        if tokens.take('WITH'):
            while True:
                option = tokens.next('word')[1].upper()
                if option not in ('ADMIN', 'INHERIT', 'SET'):
                    tokens.refuse()
                value = tokens.next('word')[1].upper()
                if value not in ('OPTION', 'TRUE', 'FALSE'):
                    tokens.refuse()
                options.append(f'{option} {value}')
                if not tokens.punct(','):
                    break
        grantor = pg_ident(tokens.name()) if tokens.take('GRANTED', 'BY') else ''
        tokens.end()
        sql = f'GRANT {pg_ident(role)} TO {pg_ident(member)}'
        sql += f' WITH {", ".join(options)}' if options else ''
        sql += f' GRANTED BY {grantor};' if grantor else ';'
        return RoleStatement('membership', member, sql, line, (role, member))
    if tokens.take('CREATE', 'TABLESPACE'):
        name = tokens.name()
        tokens.need('OWNER')
        owner = tokens.name()
        tokens.need('LOCATION')
        location = tokens.string()
        tokens.end()
        sql = (
            f'CREATE TABLESPACE {pg_ident(name)} OWNER {pg_ident(owner)} '
            f'LOCATION {sql_literal(location)};'
        )
        return RoleStatement('tablespace', name, sql, line)
    tokens.refuse()


def _backslash_refused(source: str, line: int) -> NoReturn:
    raise BackupError(
        f'{source}, line {line}: a psql backslash command; refused (a run is data, never '
        'instructions)',
        step='restore',
    )


def parse_pg_globals(text: str, source: str) -> list[RoleStatement]:
    """Given the text of a ``pg_dumpall --globals-only`` file, return its statements written again
    by ppbackup (see RoleStatement). Raise BackupError, naming the line, for a backslash command
    other than pg_dump's own ``\\restrict``/``\\unrestrict``, or any statement of another shape."""
    lines = text.splitlines(keepends=True)
    for number, raw in enumerate(lines, 1):
        if raw.startswith(('\\restrict ', '\\unrestrict ')):
            lines[number - 1] = '\n'  # pg_dump's own key, nothing to run
        elif raw.startswith('\\'):
            _backslash_refused(source, number)
    text = ''.join(lines)
    statements: list[RoleStatement] = []
    tokens: list[tuple[str, str]] = []
    start = pos = 0
    while pos < len(text):
        match = PG_TOKEN_RE.match(text, pos)
        if not match:
            number = text.count('\n', 0, pos) + 1
            if text[pos] == '\\':  # mid-line, outside any string
                _backslash_refused(source, number)
            _Tokens([], number, source).refuse()
        kind, pos = match.lastgroup or '', match.end()
        if kind in ('space', 'comment'):
            continue
        if not tokens:
            start = match.start()
        if match.group() == ';':
            statement = _role_statement(_Tokens(tokens, text.count('\n', 0, start) + 1, source))
            if statement:
                statements.append(statement)
            tokens = []
        else:
            tokens.append((kind, match.group()))
    if tokens:  # a statement without its end
        _Tokens(tokens, text.count('\n', 0, start) + 1, source).refuse()
    return statements


# -- Loading a backup: psql restricted, the mysql client sandboxed ----------------------------------


PG_ENTRY_RE = re.compile(rb'^-- (?:Data for )?Name: (.*); Type: (.*); Schema: ')
PG_DATABASE_NAME_RE = re.compile(rb'(?<=DATABASE )' + PG_IDENT)
PG_OWNER_RE = re.compile(rb'^ALTER [A-Z ]+ .+ OWNER TO .+;\n?$')
PG_DOLLAR_RE = re.compile(rb'\$[A-Za-z_]*\$')
MYSQL_CREATE_USER_RE = re.compile(rb'^CREATE USER IF NOT EXISTS (`(?:[^`]|``)*`@`(?:[^`]|``)*`)')


class PgDumpFilter:
    """A plain pg_dump --create, line by line: the database's own statements renamed to the target,
    and with --no-owner / --no-privileges its ownership and grants left out. COPY data and function
    bodies are never touched. The dump's ``\\connect`` is not passed on: ``connect`` turns True and
    pg_load connects to the target itself. A line left out becomes an empty line, so that psql's
    line numbers stay the dump's (an error names the dump's own line).

    ``role_settings``: collect the ``ALTER ROLE ... IN DATABASE`` lines instead of passing them on
    (the drill's loader may not run them; they are parsed and applied apart)."""

    def __init__(
        self, target: str, no_owner: bool, no_privileges: bool, role_settings: bool = False
    ) -> None:
        self.target = target
        self.no_owner = no_owner
        self.no_privileges = no_privileges
        self.in_copy = False
        self.dollar: bytes | None = None  # the $tag$ of the function body we are in
        self.entry_type = b''
        self.entry_name = b''
        self.connect = False
        self.role_settings: list[bytes] | None = [] if role_settings else None

    def __call__(self, line: bytes) -> bytes:
        if self.in_copy:
            self.in_copy = line not in (b'\\.\n', b'\\.')
            return line
        if self.dollar is None:
            if line.startswith(b'COPY ') and line.rstrip().endswith(b'FROM stdin;'):
                self.in_copy = True
                return line
            entry = PG_ENTRY_RE.match(line)
            if entry:
                self.entry_name, self.entry_type = entry.group(1), entry.group(2)
                return line
            if line.startswith(b'\\connect '):
                self.connect = True
                return b''
            if line.startswith((b'\\restrict ', b'\\unrestrict ')):
                return b'\n'  # pg_dump's own key: ours restricts psql instead
        in_body = self.dollar is not None
        for tag in PG_DOLLAR_RE.findall(line):
            if self.dollar is None:
                self.dollar = tag
            elif tag == self.dollar:
                self.dollar = None
        if in_body or line.startswith(b'--'):
            return line
        database_entry = self.entry_type in (b'DATABASE', b'DATABASE PROPERTIES') or (
            self.entry_type in (b'COMMENT', b'ACL', b'SECURITY LABEL')
            and self.entry_name.startswith(b'DATABASE ')
        )
        if database_entry:  # always the target's name: never a database the run names itself
            quoted = pg_ident(self.target).encode()
            line = PG_DATABASE_NAME_RE.sub(lambda _: quoted, line, count=1)
        if self.no_privileges and self.entry_type in (b'ACL', b'DEFAULT ACL'):
            return b'\n'
        if database_entry and line.startswith(b'ALTER ROLE '):
            if self.no_owner:
                return b'\n'
            if self.role_settings is not None:
                self.role_settings.append(line)
                return b'\n'
        if self.no_owner and PG_OWNER_RE.match(line):
            return b'\n'
        return line


# psql's \restrict came with these minor releases (August 2025), and with every release from 18 on.
PSQL_RESTRICT_SINCE = {13: 22, 14: 19, 15: 14, 16: 10, 17: 6}
PSQL_REFUSED_RE = re.compile(r'psql:<stdin>:([0-9]+): error: backslash commands are restricted')
BACKSLASH_COMMAND_RE = re.compile(rb'\\(?:[A-Za-z]+|!|\?)')
# Never a target, whatever a run's index says: the servers' own databases.
SYSTEM_DATABASES = {
    'psql': {'postgres', 'template0', 'template1'},
    'mysql': {'mysql', 'information_schema', 'performance_schema', 'sys'},
}


@functools.lru_cache(maxsize=2)
def loader_problem(kind: str) -> str:
    """Given psql or mysql, return why its client cannot load a backup safely ('' if it can):
    psql needs ``\\restrict``, the mysql client ``--sandbox``; ppbackup never loads without."""
    if kind == 'psql':
        out = run_command(['psql', '--version'], what='psql --version', step='restore')[1]
        found = re.search(r'([0-9]+)\.([0-9]+)', out)
        major, minor = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
        if major >= 18 or minor >= PSQL_RESTRICT_SINCE.get(major, 1 << 30):
            return ''
        return (
            f'psql {major}.{minor} has no \\restrict (it came with 13.22, 14.19, 15.14, 16.10 and '
            '17.6): ppbackup never loads a backup into a psql that would obey its backslash '
            'commands; upgrade postgresql-client'
        )
    out = run_command(['mysql', '--help'], what='mysql --help', step='restore')[1]
    if '--sandbox' in out:
        return ''
    return (
        'this mysql client has no --sandbox (it came with MariaDB 10.5.25, 10.6.18, 10.11.8 and '
        '11.0.6): ppbackup never loads a backup into a client that would obey its commands; '
        'upgrade mariadb-client'
    )


def check_loader(kind: str, step: str = 'restore') -> None:
    """Given psql or mysql, raise BackupError if its client cannot load a backup safely."""
    problem = loader_problem(kind)
    if problem:
        raise BackupError(problem, step=step)


def restricted_psql(db: str) -> tuple[list[str], bytes]:
    """Given a database, return psql's argv for loading a backup's text and the line to feed it
    first: ``\\restrict`` under a fresh random key, which the backup cannot know, so that psql
    obeys none of its backslash commands (``\\!``, ``\\o``, ``\\copy ... program``, ``\\connect``)."""
    argv = ['psql', '--no-password', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '--echo-errors',
            f'--dbname={db}', '-f', '-']  # fmt: skip
    return argv, f'\\restrict {secrets.token_hex(24)}\n'.encode()


def pg_load(
    path: Path,
    gnupghome: str | None,
    what: str,
    dump_filter: PgDumpFilter,
    env: Mapping[str, str] | None = None,
) -> None:
    """Given a plain pg_dump --create file, decrypt it and load it with restricted psql, stopping
    at the first error (ON_ERROR_STOP) and naming the statement. What comes before the dump's
    ``\\connect`` runs in the maintenance database; at each ``\\connect`` ppbackup starts a new
    psql on the target itself. ``env``: the loader's libpq settings (the drill's own role). Raise
    BackupError if anything fails, naming the dump's line for a refused backslash command."""
    check_loader('psql')
    loaders: list[tuple[int, int]] = []  # (process index, the dump's line its line 2 is)
    recent: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=16384)
    with Pipeline(what, 'restore') as pipe:
        source, plain = open_plaintext(pipe, path, gnupghome)

        def start_loader(db: str, first_line: int) -> subprocess.Popen[bytes]:
            argv, head = restricted_psql(db)
            proc = pipe.start(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
            loaders.append((len(pipe.procs) - 1, first_line))
            assert proc.stdin is not None
            proc.stdin.write(head)
            return proc

        loader = start_loader(PG_MAINTENANCE_DB, 1)
        progress, count, broken = Progress(what), 0, False
        try:
            for number, line in enumerate(source, 1):
                count += len(line)
                out = dump_filter(line)
                if dump_filter.connect:  # the dump's own \connect: ours, to the target
                    dump_filter.connect = False
                    assert loader.stdin is not None
                    loader.stdin.close()
                    if loader.wait():
                        broken = True
                        break
                    loader = start_loader(dump_filter.target, number + 1)
                    continue
                if b'\\' in line:
                    recent.append((number, line[:4096]))
                assert loader.stdin is not None
                loader.stdin.write(out)
                if number % 10000 == 0:
                    progress.update(count)
        except BrokenPipeError:
            broken = True
        finally:
            progress.done(count)
            with contextlib.suppress(OSError):
                assert loader.stdin is not None
                loader.stdin.close()
            if broken:
                source.close()  # the decompressor and gpg stop too
        try:
            plain.check(broken)
        except BackupError as error:
            refused = _refused_line(pipe, loaders, recent)
            if refused:
                raise BackupError(
                    f'{what}: line {refused[0]} of {path.name} holds a psql backslash command '
                    f'({refused[1]}); refused: a run is data, never instructions',
                    step='restore',
                    detail=error.detail,
                ) from error
            raise


def _refused_line(
    pipe: Pipeline, loaders: Sequence[tuple[int, int]], recent: Iterable[tuple[int, bytes]]
) -> tuple[int, str] | None:
    """Given a failed load, return (the dump's line, the command) if psql refused a backslash
    command of the backup's, else None."""
    for index, first_line in loaders:
        found = PSQL_REFUSED_RE.search(pipe.stderr_tail(index))
        if found:
            number = first_line + int(found.group(1)) - 2  # psql's line 1 is our \restrict
            text = dict(recent).get(number, b'')
            command = BACKSLASH_COMMAND_RE.search(text)
            return number, command.group().decode() if command else 'a backslash command'
    return None


# -- restore: onto a server, never over what is there -----------------------------------------------


PG_MAINTENANCE_DB = 'postgres'
PG_TABLES_SQL = (
    'SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace '
    "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
    "AND n.nspname NOT LIKE 'pg\\_%'"
)
PG_RIGHTS_SQL = (
    'SELECT rolsuper, rolcreaterole, rolcreatedb, '
    "current_setting('server_version_num'), current_user FROM pg_roles WHERE rolname = current_user"
)
# What the restoring account holds on MariaDB, for one database name: its global privileges and
# those of database-level grants whose pattern (`site\_before\_restore\_%`) matches that name.
MYSQL_MY_PRIVILEGES_SQL = """
SELECT DISTINCT PRIVILEGE_TYPE FROM (
  SELECT GRANTEE, PRIVILEGE_TYPE FROM information_schema.USER_PRIVILEGES
  UNION ALL SELECT GRANTEE, PRIVILEGE_TYPE FROM information_schema.SCHEMA_PRIVILEGES
    WHERE {name} LIKE TABLE_SCHEMA
) AS p WHERE GRANTEE IN (
  CONCAT("'", SUBSTRING_INDEX(CURRENT_USER(), '@', 1), "'@'",
         SUBSTRING_INDEX(CURRENT_USER(), '@', -1), "'"),
  CONCAT("'", CURRENT_ROLE(), "'"))
"""
MYSQL_DEFINERS_SQL = """
SELECT CONCAT(kind, ' ', name, ' (definer ', DEFINER, ')') FROM (
  SELECT 'view' AS kind, TABLE_NAME AS name, DEFINER FROM information_schema.VIEWS
    WHERE TABLE_SCHEMA = DATABASE()
  UNION ALL SELECT LOWER(ROUTINE_TYPE), ROUTINE_NAME, DEFINER FROM information_schema.ROUTINES
    WHERE ROUTINE_SCHEMA = DATABASE()
  UNION ALL SELECT 'trigger', TRIGGER_NAME, DEFINER FROM information_schema.TRIGGERS
    WHERE TRIGGER_SCHEMA = DATABASE()
  UNION ALL SELECT 'event', EVENT_NAME, DEFINER FROM information_schema.EVENTS
    WHERE EVENT_SCHEMA = DATABASE()
) AS objects
WHERE DEFINER NOT IN (SELECT CONCAT(User, '@', Host) FROM mysql.user) ORDER BY 1
"""
TARGET_NAME_RE = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$')


@dataclasses.dataclass
class Target:
    """Where a restore goes, and what it made (as the server says: rows of pg_roles and mysql.user
    before and after, never names from the backup's text)."""

    as_name: str = ''
    replace: bool = False
    no_owner: bool = False
    no_privileges: bool = False
    mysql_defaults: str | None = None
    databases: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (kind, name)
    roles: list[str] = dataclasses.field(default_factory=list)
    users: list[str] = dataclasses.field(default_factory=list)
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)  # original db -> target db
    drill: bool = False  # onto the drill's own servers
    pg_loader: str = ''  # the role that loads dumps there: no superuser
    pg_me: PgRights | None = None  # the restoring role's rights there, asked before any change
    asides: dict[str, str] = dataclasses.field(default_factory=dict)  # target db -> aside name
    self_granted: list[str] = dataclasses.field(default_factory=list)  # roles granted to pg_me

    def name_for(self, db: str) -> str:
        return self.as_name or db


@dataclasses.dataclass(frozen=True)
class PgRights:
    """What the role a restore connects as may do on the target server, as the server says."""

    user: str
    superuser: bool
    createrole: bool
    createdb: bool
    version: int  # server_version_num: 150000 for 15.0


def aside_name(db: str) -> str:
    """Given a database --replace replaces, return the name its old contents are kept under."""
    return f'{db[:40]}_before_restore_{dt.datetime.now():%Y%m%d%H%M%S}'


def pg_query(sql: str, db: str = PG_MAINTENANCE_DB, step: str = 'restore') -> str:
    """Given SQL of ppbackup's own, run it with psql against the target server; return its
    unaligned output."""
    return run_command([*pg_client(db), '-c', sql], what=f'psql {db}', step=step, timeout=600)[1]


def mysql_query(sql: str, target: Target, db: str = '', step: str = 'restore') -> str:
    """Given SQL of ppbackup's own, run it with mysql against the target server; return its batch
    output."""
    argv = [*mysql_client(target.mysql_defaults), '--skip-column-names', '-e', sql]
    return run_command(
        [*argv, *(['--', db] if db else [])], what=f'mysql {db}', step=step, timeout=600
    )[1]


def pg_roles_now() -> set[str]:
    """Return the roles the target server has now: what a restore made is asked of the server."""
    return set(pg_query('SELECT rolname FROM pg_roles').splitlines())


def mysql_users_now(target: Target) -> set[str]:
    """Return the target server's accounts now, as `user`@`host` (its own spelling of them)."""
    sql = "SELECT CONCAT('`', User, '`@`', Host, '`') FROM mysql.user"
    return set(mysql_query(sql, target).splitlines())


def pg_memberships_now() -> set[tuple[str, str]]:
    """Return the target server's role memberships now, as (the role granted, its member)."""
    rows = pg_query(
        'SELECT r.rolname, m.rolname FROM pg_auth_members a JOIN pg_roles r ON r.oid = a.roleid '
        'JOIN pg_roles m ON m.oid = a.member'
    )
    return {
        (role, member) for role, _, member in (row.partition('\t') for row in rows.splitlines())
    }


def pg_globals(run: RunFiles, name: str, gnupghome: str | None) -> list[RoleStatement]:
    """Given the run's roles artifact, return its statements, parsed and written again."""
    path = run_file(run, name)
    data = read_small(path, gnupghome, name)
    return parse_pg_globals(data.decode('utf-8', 'replace'), path.name)


def pg_missing_roles(statements: Sequence[RoleStatement]) -> list[str]:
    """Given the roles file's statements, return the roles it creates that the target lacks."""
    roles = pg_roles_now()
    return [s.name for s in statements if s.kind == 'role' and s.name not in roles]


def restore_pg_roles(statements: Sequence[RoleStatement], target: Target) -> None:
    """Given the roles file's statements, create the roles and tablespaces the target lacks, with
    their attributes, memberships and settings; roles that exist are left as they are. On the
    drill's own server no role gets SUPERUSER, REPLICATION or BYPASSRLS. Record what was made, as
    the server says. Raise BackupError if that fails."""
    before = pg_roles_now()
    me = target.pg_me
    tablespaces = set(pg_query('SELECT spcname FROM pg_tablespace').splitlines())
    new_roles = {s.name for s in statements if s.kind == 'role' and s.name not in before}
    memberships = pg_memberships_now()
    script = []
    for statement in statements:
        existing = tablespaces if statement.kind.startswith('tablespace') else before
        if statement.kind != 'membership' and statement.name in existing:
            continue
        if statement.kind == 'membership' and statement.roles in memberships:
            continue  # there already: granting it again would need ADMIN OPTION on 16 and later
        if (
            target.drill
            and statement.kind == 'membership'
            and not set(statement.roles) <= new_roles
        ):
            # Never a way up on the drill's server: no membership in its superuser, its loader,
            # or a predefined role (pg_execute_server_program); only among the site's own roles.
            log.warning('drill: not applied: %s', statement.sql)
            continue
        sql = statement.sql
        if target.drill and statement.kind == 'role attributes':
            for power in PG_ROLE_POWERS:
                sql = re.sub(rf'(?<= ){power}\b', f'NO{power}', sql)
        if me is not None and not me.superuser:
            # Only a superuser may name SUPERUSER, REPLICATION or BYPASSRLS at all, even as NO...:
            # a new role has none of them, and check_pg_rights refused a role that needs one.
            if statement.kind == 'role attributes':
                sql = re.sub(r' NO(?:SUPERUSER|REPLICATION|BYPASSRLS)\b', '', sql)
                if sql.endswith(' WITH;'):
                    continue
            # Granted by you: a grant recorded as another role's needs that role's rights.
            if statement.kind == 'membership':
                sql = re.sub(r' GRANTED BY ("(?:[^"]|"")*"|\S+);$', ';', sql)
        script.append(sql)
    log.info('restore roles: %d statements', len(script))
    argv, head = restricted_psql(PG_MAINTENANCE_DB)
    try:
        run_command(
            argv,
            what='psql roles',
            step='restore',
            timeout=600,
            input_bytes=head + '\n'.join(script).encode() + b'\n',
        )
    except BackupError:
        # Nothing is loaded yet, so nothing belongs to the roles made a moment ago: remove them.
        made = sorted(pg_roles_now() - before)
        for role in made:
            with contextlib.suppress(BackupError):
                pg_query(f'DROP ROLE {pg_ident(role)}')
        target.roles += sorted(pg_roles_now() - before)
        if made:
            print(f'removed the PostgreSQL roles this restore had made: {", ".join(made)}')
        raise
    target.roles += sorted(pg_roles_now() - before)
    if me is not None and not me.superuser:
        grant_self(target.roles, me, target)


def grant_self(roles: Sequence[str], me: PgRights, target: Target) -> None:
    """Given the roles a restore made as a CREATEROLE role, grant them to that role, so that it
    may make them owners (ALTER ... OWNER TO needs SET ROLE on the new owner, and membership on
    15) and act as their owner afterwards. On 16 and later CREATEROLE gives ADMIN OPTION on the
    roles it creates, but SET and INHERIT only as createrole_self_grant says."""
    options = ' WITH SET TRUE, INHERIT TRUE' if me.version >= 160000 else ''
    for role in roles:
        pg_query(f'GRANT {pg_ident(role)} TO {pg_ident(me.user)}{options}')
        target.self_granted.append(role)
    if roles:
        print(
            f'granted the new roles to {me.user}, to set owners: {", ".join(roles)} '
            f'(REVOKE them when done)'
        )


def make_room_pg(db: str, target: Target) -> None:
    """Given a target database name, make sure it does not exist: an empty one is dropped, one that
    holds tables is renamed aside with --replace and refused without."""
    if not pg_query(f'SELECT 1 FROM pg_database WHERE datname = {sql_literal(db)}').strip():
        return
    tables = int(pg_query(PG_TABLES_SQL, db).strip() or 0)
    if not tables:
        pg_query(f'DROP DATABASE {pg_ident(db)}')
        return
    if not target.replace:
        raise BackupError(
            f'PostgreSQL database {db} already holds {tables} table(s); refusing to load over '
            'it. Use --as NAME for another name, or --replace --database to rename it aside first',
            step='restore',
        )
    aside = target.asides.get(db) or aside_name(db)
    pg_query(f'ALTER DATABASE {pg_ident(db)} RENAME TO {pg_ident(aside)}')
    log.warning('PostgreSQL database %s renamed aside to %s', db, aside)
    print(f'kept the old {db} aside as {aside}')


def make_room_mysql(db: str, target: Target) -> None:
    """Given a target database name, make sure it exists and holds no table: one that holds tables
    is copied aside and emptied with --replace, and refused without."""
    exists = mysql_query(
        f'SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = {sql_literal(db)}',
        target,
    )
    tables = int(
        mysql_query(
            'SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = '
            + sql_literal(db),
            target,
        ).strip()
        or 0
    )
    if tables and not target.replace:
        raise BackupError(
            f'MariaDB database {db} already holds {tables} table(s); refusing to load over it. '
            'Use --as NAME for another name, or --replace --database to keep it aside first',
            step='restore',
        )
    if tables:
        # MariaDB cannot rename a database: copy it aside with its routines, then start afresh.
        aside = target.asides.get(db) or aside_name(db)
        mysql_query(f'CREATE DATABASE {backtick(aside)}', target)
        defaults = mysql_defaults_args(target.mysql_defaults)
        dump = [
            'mysqldump',
            *defaults,
            '--single-transaction',
            '--routines',
            '--events',
            '--triggers',
            '--hex-blob',
            '--',
            db,
        ]
        try:
            with Pipeline(f'copy {db} aside', 'restore') as pipe:
                dumper = pipe.start(dump, stdout=subprocess.PIPE)
                client = mysql_client(target.mysql_defaults, reads_backup=True)
                pipe.start([*client, '--', aside], stdin=dumper.stdout)
                assert dumper.stdout is not None
                dumper.stdout.close()
                pipe.check()
        except BackupError:
            print(
                f'left behind: MariaDB database {aside}, a partial copy of {db} ({db} itself is '
                'unchanged)',
                file=sys.stderr,
            )
            raise
        mysql_query(f'DROP DATABASE {backtick(db)}', target)
        print(f'kept the old {db} aside as {aside}')
    if not tables and exists.strip() != '0':
        return
    mysql_query(f'CREATE DATABASE {backtick(db)}', target)


def restore_database(
    run: RunFiles, entry: Mapping[str, Any], gnupghome: str | None, target: Target
) -> str:
    """Given a database of the run's index, load it into the target server under its target
    name; return that name. Raise BackupError if it cannot be loaded."""
    kind, db = entry['kind'], entry['database']
    name = target.name_for(db)
    if entry['file'] not in run.names:
        raise BackupError(f'the dump of {kind} {db} ({entry["file"]}) is missing', step='restore')
    path = verified_path(run, run.names[entry['file']])
    log.info('restore %s %s as %s from %s', kind, db, name, path.name)
    if kind == 'psql':
        make_room_pg(name, target)
        target.databases.append((kind, name))
        dump_filter = PgDumpFilter(
            name, target.no_owner, target.no_privileges, role_settings=target.drill
        )
        loader_env = {**os.environ, 'PGUSER': target.pg_loader} if target.pg_loader else None
        pg_load(path, gnupghome, f'psql {db} -> {name}', dump_filter, loader_env)
        if dump_filter.role_settings:  # the drill: its loader may not; ppbackup's own statements
            text = b''.join(dump_filter.role_settings).decode('utf-8', 'replace')
            settings = parse_pg_globals(text, path.name)
            script = [  # for the roles this restore made: never the drill's own
                re.sub(r' IN DATABASE ("(?:[^"]|"")*")', f' IN DATABASE {pg_ident(name)}', s.sql)
                for s in settings
                if s.kind == 'role setting' and s.name in target.roles
            ]
            argv, head = restricted_psql(PG_MAINTENANCE_DB)
            data = head + '\n'.join(script).encode() + b'\n'
            run_command(argv, what='psql role settings', step='restore', input_bytes=data)
    else:
        check_loader('mysql')
        make_room_mysql(name, target)
        target.databases.append((kind, name))
        client = mysql_client(target.mysql_defaults, reads_backup=True)
        load_into(f'mysql {db} -> {name}', path, gnupghome, [*client, '--', name], f'mysql {name}')
    target.renamed[db] = name
    return name


class MysqlUsersFilter:
    """The MariaDB users script, line by line: grants on a database restored under another name
    follow it."""

    def __init__(self, renamed: Mapping[str, str]) -> None:
        self.renamed = {
            backtick(old).encode(): backtick(new).encode()
            for old, new in renamed.items()
            if old != new
        }

    def __call__(self, line: bytes) -> bytes:
        if line.startswith(b'GRANT ') and b' ON ' in line:
            head, _, rest = line.partition(b' ON ')
            for old, new in self.renamed.items():
                for kind in (b'', b'PROCEDURE ', b'FUNCTION ', b'PACKAGE ', b'PACKAGE BODY '):
                    if rest.startswith(kind + old + b'.'):
                        rest = kind + new + rest[len(kind + old) :]
            line = head + b' ON ' + rest
        return line


def mysql_accounts_named(run: RunFiles, name: str, gnupghome: str | None) -> list[str]:
    """Given the run's MariaDB users artifact, return the accounts it creates, as it spells them
    (for the plan a restore prints; what it made is asked of the server afterwards)."""
    path = run_file(run, name)
    return [
        match.group(1).decode('utf-8', 'replace')
        for line in read_small(path, gnupghome, name).splitlines()
        if (match := MYSQL_CREATE_USER_RE.match(line))
    ]


def restore_mysql_users(run: RunFiles, name: str, gnupghome: str | None, target: Target) -> None:
    """Given the run's MariaDB users artifact, create the users the target lacks and apply their
    grants (after the tables: table and column grants need them), in the client's sandbox. What
    was created is recorded as the server says (mysql.user before and after), never from the
    file's text: its names may be spelt to collide with accounts that were there before."""
    check_loader('mysql')
    path = run_file(run, name)
    before = mysql_users_now(target)
    log.info('restore MariaDB users from %s', path.name)
    try:
        client = mysql_client(target.mysql_defaults, reads_backup=True)
        users_filter = MysqlUsersFilter(target.renamed)
        load_into('mariadb users', path, gnupghome, client, transform=users_filter)
    finally:
        target.users += sorted(mysql_users_now(target) - before)


# -- The files: every archive member extracted as data ----------------------------------------------


class ArchiveUnreadable(BackupError):
    """The plaintext is no tar archive, or it ends early: gpg or the decompressor may be why."""


@dataclasses.dataclass
class Extracted:
    """What one restore's archives made so far: each name (relative to DIR) as 'folder', 'file' or
    'symlink', and each folder's mode and mtime, applied once everything is in."""

    kinds: dict[str, str] = dataclasses.field(default_factory=dict)
    folders: dict[str, tuple[int, float | None]] = dataclasses.field(default_factory=dict)
    walked: set[str] = dataclasses.field(
        default_factory=set
    )  # every name a symlink's target passes
    wanted: tuple[str, ...] = ()  # --path: only these members (a folder with all under it)
    matched: set[str] = dataclasses.field(default_factory=set)  # the wanted that were found
    notes: list[str] = dataclasses.field(default_factory=list)  # what was left out, and why

    def selects(self, name: str) -> bool:
        """Given a member's name (normalised), return whether this restore extracts it, and
        record which --path it matched."""
        if not self.wanted:
            return True
        found = [path for path in self.wanted if name == path or name.startswith(path + '/')]
        self.matched.update(found)
        return bool(found)


def symlink_walk(folder: str, target: str) -> list[str] | None:
    """Given a symlink's folder (relative to DIR) and its target, return every name (relative to
    DIR) its target passes through, read lexically; None if it climbs out of DIR."""
    place = [part for part in folder.split('/') if part]
    walked = []
    for part in target.split('/'):
        if part in ('', '.'):
            continue
        if part == '..':
            if not place:
                return None
            place.pop()
        else:
            place.append(part)
        walked.append('/'.join(place))
    return walked


def tar_member_parts(name: str) -> list[str] | None:
    """Given a member name (or a hard link's target), return its components without "" and ".";
    None if it is absolute or has a ".." component."""
    if name.startswith('/'):
        return None
    parts = [part for part in name.split('/') if part not in ('', '.')]
    return None if '..' in parts else parts


def tar_member_problem(info: tarfile.TarInfo, folder: str) -> str:
    """Given a member and the name of its folder, return why it is refused, or '' if it is data:
    a folder, a regular file, a symlink that stays inside DIR, or a hard link (checked later)."""
    if info.ischr() or info.isblk():
        return 'it is a device node'
    if info.isfifo():
        return 'it is a FIFO'
    if info.mode & 0o7000:
        return f'it has a setuid, setgid or sticky bit (mode {info.mode & 0o7777:04o})'
    if info.type == tarfile.CONTTYPE:
        return 'it is a contiguous file'
    if not (info.isreg() or info.isdir() or info.issym() or info.islnk()):
        return f'its type {shown(info.type.decode("latin-1"))} is not a folder, a file or a link'
    if tar_member_parts(info.name) is None:
        return 'its name is absolute or climbs out with ".."'
    if not (isinstance(info.mtime, (int, float)) and math.isfinite(info.mtime)):
        return 'its mtime is not a time'
    if abs(info.mtime) >= 1 << 40:
        return 'its mtime is out of range'
    if info.issym():
        target = posixpath.normpath(posixpath.join(folder, info.linkname))
        if not info.linkname or info.linkname.startswith('/'):
            return f'it is a symlink to {shown(info.linkname)}: empty or absolute'
        if target == '..' or target.startswith('../'):
            return f'it is a symlink to {shown(info.linkname)}, outside the restore folder'
    return ''


def tar_members(archive: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Given a tar archive opened as a stream ("r|"), yield its members one by one, forgetting
    each as the next comes: memory stays flat however many members the archive holds (tarfile
    would keep every header)."""
    while (info := archive.next()) is not None:
        vars(archive)['members'].clear()  # tarfile keeps every header it read
        yield info


def _open_folder(root: int, parts: Sequence[str]) -> int:
    """Given the restore folder's fd and a folder's components, return that folder's fd, each
    component opened relative to its parent, never through a symlink."""
    fd = os.dup(root)
    for part in parts:
        try:
            child = os.open(part, _OPEN_DIR, dir_fd=fd)
        finally:
            os.close(fd)
        fd = child
    return fd


def read_archive(
    stream: IO[bytes], label: str, root: int | None, made: Extracted, step: str = 'restore'
) -> int:
    """Given the plaintext of a tar archive, check every member and, given the fd of the restore
    folder, write it there as data; given None, write nothing (the drill) but read every byte.
    ``made`` is what earlier archives of the same restore made. Return the bytes read.

    Nothing is ever written through a symlink: each parent is a folder this restore made, opened
    O_NOFOLLOW relative to its own parent, and files are created O_EXCL. Owners are never applied.
    Raise BackupError naming the first member refused (tar_member_problem; a hard link to anything
    but a regular file from earlier in this archive; a name through or over something else), or
    ArchiveUnreadable if the stream is not a whole tar archive."""
    progress = Progress(label)
    count = 0
    here: set[str] = set()  # the regular files of this archive: what its hard links may name
    passed: set[str] = set()  # its regular files that --path left out
    cached: tuple[str, int] | None = None  # the last parent folder's name and fd

    def refuse(name: str, why: str) -> BackupError:
        return BackupError(
            f'{label}: member {shown(name)} refused: {why}; the whole archive is refused (a run '
            'is data, never instructions)',
            step=step,
        )

    def parent_of(info: tarfile.TarInfo, parts: list[str]) -> int:
        # Every parent must be a folder this restore made; a missing one is made (0700) now.
        nonlocal cached
        key = '/'.join(parts[:-1])
        if cached and cached[0] == key:
            return cached[1]
        for depth in range(1, len(parts)):
            prefix = '/'.join(parts[:depth])
            kind = made.kinds.get(prefix)
            if kind is None:
                if root is not None:
                    fd = _open_folder(root, parts[: depth - 1])
                    try:
                        os.mkdir(parts[depth - 1], 0o700, dir_fd=fd)
                    finally:
                        os.close(fd)
                made.kinds[prefix] = 'folder'
                made.folders[prefix] = (0o700, None)
            elif kind != 'folder':
                raise refuse(info.name, f'its folder {shown(prefix)} is a {kind} of this restore')
        if root is None:
            return -1
        if cached:
            os.close(cached[1])
            cached = None
        fd = _open_folder(root, parts[:-1])
        cached = (key, fd)
        return fd

    try:
        with tarfile.open(fileobj=stream, mode='r|', bufsize=BLOCK) as archive:
            for info in tar_members(archive):
                count += tarfile.BLOCKSIZE
                parts = tar_member_parts(info.name) or []
                name, folder = '/'.join(parts), '/'.join(parts[:-1])
                why = tar_member_problem(info, folder)
                if why:  # refused wherever it stands, asked for or not
                    raise refuse(info.name, why)
                if not parts:
                    if info.isdir():  # "./": the restore folder stays as ppbackup made it
                        continue
                    raise refuse(info.name, 'it names the restore folder itself')
                if not made.selects(name):
                    if info.isreg():
                        passed.add(name)
                    continue  # tarfile skips its data
                existing = made.kinds.get(name)
                if existing == 'folder' and not info.isdir():
                    raise refuse(info.name, 'a folder of that name was extracted before it')
                if existing not in (None, 'folder') and info.isdir():
                    raise refuse(info.name, f'a {existing} of that name was extracted before it')
                link_parts: list[str] = []
                if info.islnk():
                    link_parts = tar_member_parts(info.linkname) or []
                    if '/'.join(link_parts) in passed:
                        made.notes.append(
                            f'{label}: {shown(name)} not extracted: a hard link to '
                            f'{shown(info.linkname)}, which the --path given leave out; ask for '
                            'that too'
                        )
                        continue
                    if '/'.join(link_parts) not in here or link_parts == parts:
                        raise refuse(
                            info.name,
                            f'it is a hard link to {shown(info.linkname)}, which is no regular '
                            'file extracted before it from this archive',
                        )
                try:
                    parent = parent_of(info, parts)
                    last = parts[-1]
                    if root is not None and existing in ('file', 'symlink'):
                        os.unlink(last, dir_fd=parent)  # a later member replaces it, as in tar
                    here.discard(name)
                    if info.isdir():
                        if root is not None and existing is None:
                            os.mkdir(last, 0o700, dir_fd=parent)
                        made.kinds[name] = 'folder'
                        made.folders[name] = (info.mode & 0o777, info.mtime)
                    elif info.issym():
                        # A target read through another symlink of this restore could lead out
                        # of DIR however each one reads alone: no symlink stands on another's way.
                        walked = symlink_walk(folder, info.linkname) or []
                        through = [n for n in walked[:-1] if made.kinds.get(n) == 'symlink']
                        if through or name in made.walked:
                            raise refuse(
                                info.name,
                                'a symlink on the way of another symlink of this restore',
                            )
                        made.walked.update(walked)
                        if root is not None:
                            os.symlink(info.linkname, last, dir_fd=parent)
                            os.utime(
                                last,
                                (info.mtime, info.mtime),
                                dir_fd=parent,
                                follow_symlinks=False,
                            )
                        made.kinds[name] = 'symlink'
                    elif info.islnk():
                        if root is not None:
                            source = _open_folder(root, link_parts[:-1])
                            try:
                                os.link(
                                    link_parts[-1],
                                    last,
                                    src_dir_fd=source,
                                    dst_dir_fd=parent,
                                    follow_symlinks=False,
                                )
                            finally:
                                os.close(source)
                        made.kinds[name] = 'file'
                        here.add(name)
                    else:
                        count += _extract_file(
                            archive, info, last, parent if root is not None else None
                        )
                        progress.update(count)
                        made.kinds[name] = 'file'
                        here.add(name)
                except OSError as error:
                    raise BackupError(
                        f'{label}: member {shown(info.name)}: cannot extract it: '
                        f'{os_reason(error)}',
                        step=step,
                    ) from error
        while block := stream.read(BLOCK):  # what follows the end of the archive is read too
            count += len(block)
    except tarfile.TarError as error:
        while stream.read(BLOCK):  # to its end: gpg's and the decompressor's verdicts come first
            pass
        raise ArchiveUnreadable(
            f'{label}: not a tar archive, or a truncated one: {error}', step=step
        ) from error
    finally:
        if cached:
            os.close(cached[1])
        progress.done(count)
    return count


def _extract_file(
    archive: tarfile.TarFile, info: tarfile.TarInfo, name: str, parent: int | None
) -> int:
    """Given a regular file's member, create it new as ``name`` in ``parent`` (or, given None, only
    read it), a MiB at a time; set its mode (0o777 bits) and mtime. Return the bytes read."""
    source = archive.extractfile(info)
    assert source is not None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    fd = os.open(name, flags, 0o600, dir_fd=parent) if parent is not None else -1
    count = 0
    try:
        while block := source.read(BLOCK):
            count += len(block)
            view = memoryview(block)
            while fd >= 0 and view:
                view = view[os.write(fd, view) :]
        if fd >= 0:
            os.fchmod(fd, info.mode & 0o777)
            os.utime(fd, (info.mtime, info.mtime))
    finally:
        if fd >= 0:
            os.close(fd)
    return count


def read_tar_file(
    path: Path, gnupghome: str | None, read: Callable[[IO[bytes]], object], verb: str, step: str
) -> None:
    """Given a run's archive, decrypt it in a pipeline of its own (named ``verb`` and the file)
    and give its plaintext stream to ``read`` (read_archive, list_members); raise BackupError if
    gpg, the decompressor or ``read`` fails, gpg's own failure first."""
    with Pipeline(f'{verb} {path.name}', step) as pipe:
        stream, plain = open_plaintext(pipe, path, gnupghome)
        try:
            read(stream)
        except ArchiveUnreadable:
            plain.check()  # gpg's failure, if it is why
            raise
        except BaseException:
            plain.close()
            raise
        plain.check()


def open_restore_folder(folder: Path) -> tuple[int, bool]:
    """Given --files DIR, make it (0700), or take it if it is an empty folder of ours; return its fd
    and whether ppbackup made it. Raise ConfigError for ``/``, a symlink, or a folder with content:
    a restore never extracts into a tree that has content."""
    if folder.resolve() == Path('/'):
        raise ConfigError('--files /: refusing to extract over the root folder', step='restore')
    made_it = True
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(folder, 0o700)
    except FileExistsError:
        made_it = False
    except OSError as error:
        raise BackupError(f'cannot create {folder}: {error.strerror}', step='restore') from error
    try:
        fd = os.open(folder, _OPEN_DIR)
    except OSError as error:
        raise ConfigError(
            f'--files {folder}: a symlink or not a folder ({error.strerror}); name a new folder',
            step='restore',
        ) from error
    info = os.fstat(fd)
    problem = ''
    if not made_it and os.listdir(fd):
        problem = 'holds files already; name a new or empty folder (files never land in a tree'
        problem += ' that has content)'
    elif info.st_uid != os.getuid():
        problem = f'is owned by uid {info.st_uid}, not by this user'
    if problem:
        os.close(fd)
        raise ConfigError(f'--files {folder}: this folder {problem}', step='restore')
    os.fchmod(fd, 0o700)
    return fd, made_it


def finish_folders(root: int, made: Extracted) -> None:
    """Given the restore folder and what was extracted, give each folder its mode (0o777 bits) and
    mtime, deepest first, once its content is in."""
    for name, (mode, mtime) in sorted(made.folders.items(), key=lambda item: -item[0].count('/')):
        fd = _open_folder(root, name.split('/'))
        try:
            if mtime is not None:
                os.utime(fd, (mtime, mtime))
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def remove_extracted(folder: Path, root: int, made_it: bool) -> None:
    """Remove what a failed restore extracted: the restore folder's content (never following a
    symlink), and the folder itself if ppbackup made it."""
    for entry in os.listdir(root):
        info = os.stat(entry, dir_fd=root, follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(entry, dir_fd=root)
        else:
            os.unlink(entry, dir_fd=root)
    if made_it:
        os.rmdir(folder)


def extract_archives(
    run: RunFiles,
    index: Mapping[str, Any],
    gnupghome: str | None,
    folder: Path,
    paths: Sequence[str] = (),
) -> None:
    """Given a folder that does not exist or is empty, extract the run's file archives into it as
    data (read_archive): every member, or given ``paths`` (as archived, see wanted_paths) only
    those, a folder with everything under it. Raise ConfigError for ``/`` or a folder with
    content, BackupError for an archive refused or unreadable, or a path no archive holds: what
    this restore extracted is removed then."""
    archives = index.get('archives', [])
    if not archives:
        raise BackupError(
            f'{run.label} holds no file archive (its BACKUP_FILES and BACKUP_BINARIES were empty)',
            step='restore',
        )
    root, made_it = open_restore_folder(folder)
    made = Extracted(wanted=tuple(paths))
    try:
        for name in archives:
            path = run_file(run, name)
            log.info('extract %s into %s', path.name, folder)
            read_tar_file(
                path,
                gnupghome,
                lambda stream: read_archive(stream, path.name, root, made),
                'extract',
                'restore',
            )
            print(f'files: {name} extracted into {folder}')
        missing = [path for path in made.wanted if path not in made.matched]
        if missing:
            raise BackupError(
                f'--path {", ".join(shown(path) for path in missing)}: no such file or folder in '
                f'{run.label} (a path is given as archived, relative to the home folder; '
                '"ppbackup list RUN --files" shows them)',
                step='restore',
            )
        finish_folders(root, made)
        for note in made.notes:
            print(f'note: {note}')
    except BaseException as error:
        try:
            remove_extracted(folder, root, made_it)
        except OSError as failure:
            log.error('could not remove what was extracted into %s: %s', folder, failure)
        else:
            if isinstance(error, BackupError):
                error.args = (f'{error}; what this restore extracted was removed',)
        raise
    finally:
        os.close(root)


# -- What a restore needs, and what it will do ------------------------------------------------------


def wanted_paths(paths: Sequence[str]) -> list[str]:
    """Given --path values, return them as members are named (``myapp/uploads``: relative, no
    "." or trailing "/"). Raise ConfigError for one that is absolute or climbs out with "..":
    no member is named so (a run that holds one is refused whole)."""
    wanted = []
    for path in paths:
        parts = tar_member_parts(path)
        if not parts:
            raise ConfigError(
                f'--path {shown(path)}: give a path as it was archived, relative to the home '
                'folder (like myapp/uploads/photo.jpg), never absolute or with ".."',
                step='restore',
            )
        wanted.append('/'.join(parts))
    return wanted


def run_lacks(
    run: RunFiles, index: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Given a run, its index and the databases to restore, return what a restore of them will lack:
    what the backup user could not read at dump time, and the roles or users file if it is gone."""
    return backup_user_lacks(index, entries) + missing_files(run, index, entries)


def backup_user_lacks(index: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """Given a run's index and the databases to restore, return what the backup user could not
    read at dump time (so the backup never held it): for the drill, warnings, not failures."""
    lacks = list(index.get('lacks', []))
    has_mysql = any(entry['kind'] == 'mysql' for entry in entries)
    said = any('MariaDB' in lack for lack in lacks)  # the run's own words for it
    if has_mysql and not index.get('mariadb_users') and not said:
        lacks.append('this run has no MariaDB users: the backup user could not read them')
    return lacks


def missing_files(
    run: RunFiles, index: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Given a run, its index and the databases to restore, return the roles or users file the
    run made that is gone from it: what the backup held and a restore will lack."""
    missing = []
    pg_roles, users = index.get('pg_roles'), index.get('mariadb_users')
    if any(entry['kind'] == 'psql' for entry in entries) and pg_roles and pg_roles not in run.names:
        missing.append(f'the PostgreSQL roles file {pg_roles} is missing from this run')
    if any(entry['kind'] == 'mysql' for entry in entries) and users and users not in run.names:
        missing.append(f'the MariaDB users file {users} is missing from this run')
    return missing


def restore_entries(
    index: Mapping[str, Any], only: Sequence[str], target: Target
) -> list[Mapping[str, Any]]:
    """Given the run's index and the databases asked for, return the index's entries to restore.
    Raise ConfigError for a database the run lacks, a target name that is a server's own database
    or not a plain name, and --replace or --as without the databases named."""
    databases = index.get('databases', [])
    unknown = [db for db in only if db not in {entry['database'] for entry in databases}]
    if unknown:
        raise ConfigError(f'no database {", ".join(unknown)} in this run', step='restore')
    if target.replace and not only:
        raise ConfigError(
            '--replace acts only on the databases you name: add --database DB for each one it '
            'may keep aside and replace',
            step='restore',
        )
    entries = [entry for entry in databases if not only or entry['database'] in only]
    if target.as_name and len(entries) != 1:
        raise ConfigError(
            '--as needs exactly one database: name it with --database', step='restore'
        )
    for entry in entries:
        name = target.name_for(entry['database'])
        if name.lower() in SYSTEM_DATABASES[entry['kind']] or not TARGET_NAME_RE.match(name):
            raise ConfigError(
                f"{name!r}: not a database ppbackup restores to (a server's own database, or "
                'not a plain name); the run names it, which only a forged run does: see README '
                '"When the web host was broken into"',
                step='restore',
            )
    return entries


def restore_plan(
    run: RunFiles,
    index: Mapping[str, Any],
    entries: Sequence[Mapping[str, Any]],
    gnupghome: str | None,
    target: Target,
) -> list[RoleStatement]:
    """Given what a restore will load, print what it will create, replace and add, before anything
    is touched; return the roles file's statements (parsed, for restore_run)."""
    statements: list[RoleStatement] = []
    pg_roles, users = index.get('pg_roles'), index.get('mariadb_users')
    has_pg = any(entry['kind'] == 'psql' for entry in entries)
    has_mysql = any(entry['kind'] == 'mysql' for entry in entries)
    for entry in entries:
        server = 'PostgreSQL' if entry['kind'] == 'psql' else 'MariaDB'
        how = 'create or replace (the old one kept aside)' if target.replace else 'create'
        print(f'will {how} {server} database {target.name_for(entry["database"])}')
    if has_pg and pg_roles in run.names and not target.no_owner:
        statements = pg_globals(run, pg_roles, gnupghome)
        missing = pg_missing_roles(statements)
        powers = {
            s.name: [power for power in sorted(PG_ROLE_POWERS) if f' {power}' in s.sql]
            for s in statements
            if s.kind == 'role attributes' and s.name in missing
        }
        for role in missing:
            extra = f' ({", ".join(powers[role])})' if powers.get(role) and not target.drill else ''
            print(f'will add PostgreSQL role {role}{extra}')
        for s in statements:  # a way up into a role that was there: said, and kept from a drill
            if s.kind == 'membership' and s.roles[0] not in missing and not target.drill:
                print(f'will grant the existing PostgreSQL role {s.roles[0]} to {s.roles[1]}')
    if has_mysql and users in run.names:
        try:
            existing = {account.lower() for account in mysql_users_now(target)}
        except BackupError as error:
            me = mysql_query('SELECT CURRENT_USER()', target).strip()
            raise BackupError(
                f'the run holds MariaDB users, and restoring them needs reading mysql.user, '
                f'CREATE USER and GRANT OPTION, which {me} lacks: restore as root (sudo mariadb), '
                f'or name only PostgreSQL databases with --database; {NOTHING_CHANGED}',
                step='restore',
                detail=error.detail,
            ) from error
        for account in mysql_accounts_named(run, users, gnupghome):
            if account.lower() not in existing:
                print(f'will add MariaDB user {account}')
    sys.stdout.flush()
    return statements


NOTHING_CHANGED = 'nothing was changed'


def check_restore_rights(
    entries: Sequence[Mapping[str, Any]],
    statements: Sequence[RoleStatement],
    target: Target,
    users_held: bool = False,
) -> None:
    """Given what a restore will load and the roles file's statements, ask each server what the
    restoring account may do there and raise BackupError, naming the right that is missing, before
    anything is changed (see README "Restore, as a key holder")."""
    if any(entry['kind'] == 'psql' for entry in entries):
        check_pg_rights(entries, statements, target)
    for entry in entries:
        if entry['kind'] == 'mysql':
            check_mysql_rights(target.name_for(entry['database']), target)
    if users_held and any(entry['kind'] == 'mysql' for entry in entries):
        me = mysql_query('SELECT CURRENT_USER()', target).strip()
        if 'CREATE USER' not in mysql_privileges_on('', target):
            raise BackupError(
                f'the run holds MariaDB users, and restoring them needs CREATE USER (and GRANT '
                f'OPTION), which {me} lacks: restore as root (sudo mariadb); {NOTHING_CHANGED}',
                step='restore',
            )


def _pg_roles_that(roles: Iterable[str], condition: str) -> list[str]:
    """Given role names and an SQL condition on pg_roles (``oid`` is the role), return those of the
    roles that exist and meet it."""
    names = sorted(set(roles))
    if not names:
        return []
    listed = ', '.join(sql_literal(name) for name in names)
    sql = f'SELECT rolname FROM pg_roles WHERE rolname IN ({listed}) AND ({condition}) ORDER BY 1'
    return pg_query(sql).split()


def check_pg_rights(
    entries: Sequence[Mapping[str, Any]], statements: Sequence[RoleStatement], target: Target
) -> None:
    """See check_restore_rights: PostgreSQL. A superuser may do everything a restore does; any other
    role needs CREATEDB (each dump creates its database), CREATEROLE for roles the server lacks,
    and never gets a role SUPERUSER, REPLICATION or BYPASSRLS or a tablespace; --replace renames
    the old database aside, which needs its owner and CREATEDB."""
    fields = pg_query(PG_RIGHTS_SQL).strip().split('\t')
    if len(fields) != 5 or not fields[3].isdigit():
        raise BackupError(
            f"PostgreSQL: cannot read your own role's rights ({fields})", step='restore'
        )
    me = target.pg_me = PgRights(
        fields[4], fields[0] == 't', fields[1] == 't', fields[2] == 't', int(fields[3])
    )
    if me.superuser or target.drill:
        return
    who = f'the PostgreSQL role {me.user}'
    names = [target.name_for(e['database']) for e in entries if e['kind'] == 'psql']
    if not me.createdb:
        raise BackupError(
            f'{who} lacks CREATEDB, which restoring {", ".join(names)} needs (a dump creates its '
            f"database; --replace renames the old one aside): ask the server's admin for "
            f'ALTER ROLE {pg_ident(me.user)} CREATEDB, or restore as a superuser; {NOTHING_CHANGED}',
            step='restore',
        )
    for name in names:
        row = pg_query(
            "SELECT pg_get_userbyid(datdba), pg_has_role(datdba, 'USAGE') FROM pg_database "
            f'WHERE datname = {sql_literal(name)}'
        ).strip()
        if target.replace and row and row.split('\t')[1] != 't':
            raise BackupError(
                f'--replace renames the PostgreSQL database {name} aside, which needs its owner '
                f'and CREATEDB: it belongs to {row.split(chr(9))[0]}, not to {me.user}: ask its '
                f'owner or a superuser to run the restore; {NOTHING_CHANGED}',
                step='restore',
            )
        if target.replace:
            target.asides[name] = aside_name(name)
    if not statements:
        return
    missing = pg_missing_roles(statements)
    if missing and not me.createrole:
        raise BackupError(
            f'the roles {", ".join(missing[:10])} are missing on this server and {who} cannot '
            'create roles (CREATEROLE): run the restore as a superuser (or a role with CREATEROLE '
            'and CREATEDB), or use --no-owner --no-privileges (everything then belongs to you); '
            + NOTHING_CHANGED,
            step='restore',
        )
    powers: dict[str, list[str]] = {}
    for s in statements:
        if s.kind == 'role attributes' and s.name in missing:
            found = [power for power in sorted(PG_ROLE_POWERS) if f' {power}' in s.sql]
            if found:
                powers[s.name] = found
    if powers:
        named = '; '.join(f'{role} needs {", ".join(found)}' for role, found in powers.items())
        raise BackupError(
            f'roles this restore would create need what only a superuser can give ({named}); '
            f'{who} is not a superuser, and CREATEROLE never gives SUPERUSER, REPLICATION or '
            'BYPASSRLS: restore as a superuser, have a superuser create those roles first, or '
            f'use --no-owner --no-privileges; {NOTHING_CHANGED}',
            step='restore',
        )
    spaces = set(pg_query('SELECT spcname FROM pg_tablespace').split())
    new_spaces = [s.name for s in statements if s.kind == 'tablespace' and s.name not in spaces]
    if new_spaces:
        raise BackupError(
            f'the tablespaces {", ".join(new_spaces)} are missing on this server, and only a '
            f'superuser may create one ({who} is not): have a superuser create them (or run the '
            f'restore); {NOTHING_CHANGED}',
            step='restore',
        )
    # Memberships in a role that is there already: 16 and later need ADMIN OPTION on it, 15
    # needs it not to be a superuser role.
    there = pg_memberships_now()
    existing = {
        s.roles[0]
        for s in statements
        if s.kind == 'membership' and s.roles not in there and me.createrole
    } - set(missing)
    if me.version >= 160000:
        refused = _pg_roles_that(existing, "NOT pg_has_role(oid, 'USAGE WITH ADMIN OPTION')")
        need = 'ADMIN OPTION on it'
    else:
        refused = _pg_roles_that(existing, 'rolsuper')
        need = 'a superuser (it is one)'
    if refused:
        raise BackupError(
            f'the roles file grants the existing role(s) {", ".join(refused)} to others, which '
            f'needs {need}; {who} lacks that: restore as a superuser, or use --no-owner '
            f'--no-privileges; {NOTHING_CHANGED}',
            step='restore',
        )
    # A database's owner that exists already: setting it needs SET ROLE to it (membership on 15).
    owners = {
        str(e['owner'])
        for e in entries
        if e['kind'] == 'psql' and e.get('owner') and not target.no_owner
    } - set(missing)
    how = "'SET'" if me.version >= 160000 else "'MEMBER'"
    for owner in _pg_roles_that(owners, f'NOT pg_has_role(oid, {how})'):
        raise BackupError(
            f'the database is owned by {owner}, a role this server has, and {who} may not act '
            f'as it (SET ROLE {owner}), which setting that owner needs: ask a superuser for '
            f'GRANT {pg_ident(owner)} TO {pg_ident(me.user)}, restore as a superuser, or use '
            f'--no-owner --no-privileges; {NOTHING_CHANGED}',
            step='restore',
        )


def mysql_privileges_on(name: str, target: Target) -> set[str]:
    """Given a database name, return the privileges the restoring MariaDB account holds on it
    (global grants and database-level grants whose pattern matches it)."""
    sql = MYSQL_MY_PRIVILEGES_SQL.replace('{name}', sql_literal(name))
    return {line.strip().upper() for line in mysql_query(sql, target).splitlines()}


def check_mysql_rights(name: str, target: Target) -> None:
    """See check_restore_rights: MariaDB. A new database needs CREATE on its name; --replace copies
    the old one aside to a new name (CREATE there) and drops it (DROP on it)."""
    exists = mysql_query(
        f'SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = {sql_literal(name)}',
        target,
    ).strip() not in ('', '0')
    tables = exists and mysql_query(
        f'SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = {sql_literal(name)}',
        target,
    ).strip() not in ('', '0')
    if tables and not target.replace:
        return  # make_room_mysql refuses it, saying why
    me = mysql_query('SELECT CURRENT_USER()', target).strip()
    needs: list[str] = []
    if tables:
        aside = target.asides[name] = aside_name(name)
        if 'CREATE' not in mysql_privileges_on(aside, target):
            needs.append(f'CREATE on the new database {aside}')
        if 'DROP' not in mysql_privileges_on(name, target):
            needs.append(f'DROP on {name}')
    if (not exists or tables) and 'CREATE' not in mysql_privileges_on(name, target):
        needs.append(f'CREATE on {name}')
    if not needs:
        return
    if tables:
        pattern = name.replace('_', '\\_').replace('%', '\\%') + '\\_before\\_restore\\_%'
        how = (
            f'--replace keeps the old {name} aside as a copy and then drops it, which needs '
            f"{' and '.join(needs)}; {me} lacks that: ask the server's admin for GRANT ALL ON "
            f'`{pattern}`.* TO {me} (and CREATE, DROP on {name})'
        )
    else:
        how = f'restoring MariaDB database {name} needs {needs[0]}, which {me} lacks'
    raise BackupError(f'{how}; {NOTHING_CHANGED}', step='restore')


def restore_run(
    run: RunFiles,
    index: Mapping[str, Any],
    gnupghome: str | None,
    target: Target,
    only: Sequence[str] = (),
    timings: dict[str, float] | None = None,
) -> list[str]:
    """Given a run and its index, restore its databases into the target servers: PostgreSQL roles
    first where missing, MariaDB users after the tables, having printed what it will do. Return
    what the run lacks (warnings). Raise BackupError at the first failure; what was made is
    recorded in ``target``."""
    entries = restore_entries(index, only, target)
    lacks = run_lacks(run, index, entries)
    statements = restore_plan(run, index, entries, gnupghome, target)
    users = index.get('mariadb_users')
    # Before anything changes.
    check_restore_rights(entries, statements, target, users in run.names)
    if statements:
        me = target.pg_me
        if me is None or me.superuser or me.createrole:
            restore_pg_roles(statements, target)
        if target.pg_loader:  # the drill's own loader owns nothing: it acts as the site's roles
            for role in target.roles:
                pg_query(f'GRANT {pg_ident(role)} TO {pg_ident(target.pg_loader)}')
    for entry in entries:
        started = time.monotonic()
        try:
            restore_database(run, entry, gnupghome, target)
        finally:  # a failed one too: the time until it failed
            if timings is not None:
                timings[f'{entry["kind"]} {entry["database"]}'] = time.monotonic() - started
    if any(entry['kind'] == 'mysql' for entry in entries) and users in run.names:
        restore_mysql_users(run, users, gnupghome, target)
    return lacks


def say_left_behind(target: Target) -> None:
    """Given a failed restore's target, print on stderr what it made and left (as the servers say
    now): the database whose load failed stays for inspection."""
    for kind, name in target.databases:
        try:
            if kind == 'psql':
                there = pg_query(f'SELECT 1 FROM pg_database WHERE datname = {sql_literal(name)}')
            else:
                there = mysql_query(
                    'SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = '
                    + sql_literal(name),
                    target,
                )
        except BackupError:
            there = '?'
        if there.strip():
            server = 'PostgreSQL' if kind == 'psql' else 'MariaDB'
            print(
                f'left behind: {server} database {name}, as far as it loaded, for inspection '
                '(drop it before you try again)',
                file=sys.stderr,
            )
    for role in target.roles:
        print(f'left behind: PostgreSQL role {role}, made by this restore', file=sys.stderr)
    for role in target.self_granted:
        print(f'left behind: the grant of {role} to {target.pg_me.user if target.pg_me else "you"}',
              file=sys.stderr)  # fmt: skip
    for user in target.users:
        print(f'left behind: MariaDB user {user}, made by this restore', file=sys.stderr)


def command_restore(
    source: str,
    config_arg: str | None,
    gnupghome: str | None,
    target: Target,
    only: Sequence[str],
    files: Path | None,
    arrived_before: dt.datetime | None = None,
    paths: Sequence[str] = (),
) -> int:
    """Restore what is asked for from a run (a manifest, a slot or ``latest``): with --files DIR
    alone its files (no database server is touched), with --database DB those databases onto the
    servers the client settings name (PG* variables, ~/.my.cnf or --mysql-defaults), both with
    both, every database with neither. --path (with --files) takes only those members."""
    if paths and files is None:
        raise ConfigError('--path needs --files DIR: the folder to extract into', step='restore')
    wanted = wanted_paths(paths)
    run = find_run(source, config_arg, arrived_before)
    print(f'restoring {run.label}')
    if run.seen:
        print(run.seen)
    index = read_index(run, gnupghome)
    if files is not None and os.path.lexists(files):  # refused before any database is touched
        os.close(open_restore_folder(files)[0])  # it exists: this checks it, and makes nothing
    lacks: list[str] = []
    if only or files is None:
        try:
            lacks = restore_run(run, index, gnupghome, target, only)
        except BackupError:
            say_left_behind(target)
            raise
    for kind, name in target.databases:
        print(f'restored {"PostgreSQL" if kind == "psql" else "MariaDB"} database {name}')
    for role in target.roles:
        print(f'created PostgreSQL role {role}')
    for user in target.users:
        print(f'created MariaDB user {user}')
    if files is not None:
        extract_archives(run, index, gnupghome, files, wanted)
    for name in index.get('not_in_slot', []):
        print(f'note: {name} is not in this slot: a week slot keeps no binaries (see the day slot)')
    for lack in lacks:
        print(f'WARNING: this backup lacks something: {lack}')
    return EXIT_OK


# -- list: what a run holds, from its index and, with --files, its archives' member lists -------


def member_entry(info: tarfile.TarInfo) -> dict[str, Any]:
    """Given an archive member, return what ``list`` says of it: its name as archived, type, size,
    mtime (UTC, ISO 8601; None if it is no time), a link's target, and why a restore would refuse
    it (the whole archive then). Names are the sender's: data, shown escaped in text."""
    parts = tar_member_parts(info.name)
    why = tar_member_problem(info, '/'.join((parts or [])[:-1]))
    kind = (
        'folder' if info.isdir() else 'file' if info.isreg() else 'symlink' if info.issym()
        else 'hardlink' if info.islnk() else 'other'
    )  # fmt: skip
    mtime = None
    if (
        isinstance(info.mtime, (int, float))
        and math.isfinite(info.mtime)
        and abs(info.mtime) < 1 << 40
    ):
        mtime = dt.datetime.fromtimestamp(info.mtime, dt.timezone.utc).strftime(
            '%Y-%m-%dT%H:%M:%SZ'
        )
    return {
        'name': info.name,
        'type': kind,
        'size': info.size if info.isreg() else 0,
        'mtime': mtime,
        **({'link': info.linkname} if info.issym() or info.islnk() else {}),
        **({'refused': why} if why else {}),
    }


def list_members(stream: IO[bytes], label: str, emit: Callable[[dict[str, Any]], None]) -> None:
    """Given an archive's plaintext, give ``emit`` each member's entry (member_entry) as it comes:
    streamed, one header in memory at a time, every file's data skipped, never extracted. Raise
    ArchiveUnreadable if the stream is not a whole tar archive."""
    progress = Progress(label)
    count = 0
    try:
        with tarfile.open(fileobj=stream, mode='r|', bufsize=BLOCK) as archive:
            for info in tar_members(archive):
                emit(member_entry(info))
                count = info.offset_data + info.size
                progress.update(count)
        while stream.read(BLOCK):  # to its end: what follows the archive, and gpg's verdict
            pass
    except tarfile.TarError as error:
        while stream.read(BLOCK):
            pass
        raise ArchiveUnreadable(
            f'{label}: not a tar archive, or a truncated one: {error}', step='list'
        ) from error
    finally:
        progress.done(count)


def run_summary(run: RunFiles, index: Mapping[str, Any]) -> dict[str, Any]:
    """Given a run and its index, return what ``list`` says of it without reading an archive."""
    databases = [
        {
            'kind': entry['kind'],
            'database': entry['database'],
            'file': entry['file'],
            'tables': len(entry.get('rows', {})),
            'rows': sum(entry.get('rows', {}).values()),
        }
        for entry in index.get('databases', [])
    ]
    return {
        'format': 'ppbackup-list',
        'version': 1,
        'run': run.label,
        'seen': run.seen or None,
        'databases': databases,
        'pg_roles': index.get('pg_roles'),
        'mariadb_users': index.get('mariadb_users'),
        'lacks': list(index.get('lacks', [])),
        'not_in_slot': list(index.get('not_in_slot', [])),
    }


def command_list(
    source: str,
    config_arg: str | None,
    gnupghome: str | None,
    files: bool,
    as_json: bool,
    arrived_before: dt.datetime | None = None,
) -> int:
    """Print what a run holds: its databases (tables and rows, from the index) and its archives,
    with --files every member (name, size, mtime), streamed; with --json one JSON document,
    written as it is read. Needs the private key: the index and the archives are encrypted."""
    run = find_run(source, config_arg, arrived_before)
    index = read_index(run, gnupghome)
    summary = run_summary(run, index)
    out = sys.stdout
    if as_json:
        out.write(json.dumps(summary, sort_keys=True)[:-1] + ', "archives": [')
    else:
        out.write(f'run {run.label}\n' + (f'{run.seen}\n' if run.seen else ''))
        for db in summary['databases']:
            kind = 'PostgreSQL' if db['kind'] == 'psql' else 'MariaDB'
            out.write(
                f'database {kind} {db["database"]}: {db["tables"]} table(s), {db["rows"]} row(s) '
                f'({db["file"]})\n'
            )
        for key, what in (('pg_roles', 'PostgreSQL roles'), ('mariadb_users', 'MariaDB users')):
            if summary[key]:
                out.write(f'{what}: {summary[key]}\n')
        for lack in summary['lacks']:
            out.write(f'lacks: {lack}\n')
        for name in summary['not_in_slot']:
            out.write(f'not in this slot: {name} (a week slot keeps no binaries)\n')
    for number, name in enumerate(index.get('archives', [])):
        if as_json:
            out.write((', ' if number else '') + '{"file": ' + json.dumps(name))
        else:
            out.write(f'archive {name}\n')
        if files:
            path = run_file(run, name)
            first = [True]

            def emit(entry: dict[str, Any]) -> None:
                if as_json:
                    out.write(('' if first[0] else ', ') + json.dumps(entry, sort_keys=True))
                    first[0] = False
                    return
                line = f'  {entry["type"]:<8} {entry["size"]:>12} {entry["mtime"] or "?":<20} '
                line += shown(entry['name']) + (
                    f' -> {shown(entry["link"])}' if 'link' in entry else ''
                )
                out.write(
                    line + (f'  (refused: {entry["refused"]})' if 'refused' in entry else '') + '\n'
                )

            if as_json:
                out.write(', "members": [')
            read_tar_file(
                path,
                gnupghome,
                lambda stream: list_members(stream, path.name, emit),
                'list',
                'list',
            )
            if as_json:
                out.write(']')
        if as_json:
            out.write('}')
    if as_json:
        out.write(']}\n')
    out.flush()
    return EXIT_OK


# -- drill: throwaway servers of its own, and the row counts, owners and grants compared ------------


def pg_row_counts(db: str) -> dict[str, int]:
    """Given a restored PostgreSQL database, return {schema.table: exact row count} (partitioned
    parents and populated materialized views included), for the drill; a run counts in its dump's
    snapshot (DumpSnapshot). Raise BackupError if psql fails."""
    _, out = run_command(
        [*pg_client(db), '-c', PG_COUNT_SQL], what=f'row counts of {db}', step='drill', timeout=3600
    )
    return parse_counts(out.splitlines())


def mysql_row_counts(db: str, defaults: str | None = None) -> dict[str, int]:
    """Given a restored MariaDB database, return {table: exact row count}, for the drill. Raise
    BackupError on failure."""
    client = [*mysql_client(defaults), '--skip-column-names']
    _, out = run_command(
        [*client, '-e', MYSQL_TABLES_SQL, '--', db], what=f'tables of {db}', step='drill'
    )
    tables = [line for line in out.splitlines() if line]
    if not tables:
        return {}
    query = mysql_count_query(tables)
    _, out = run_command(
        [*client, '-e', query, '--', db], what=f'row counts of {db}', step='drill', timeout=3600
    )
    return parse_counts(out.splitlines())


def drill_checks(
    entry: Mapping[str, Any], name: str, target: Target, users_held: bool = True
) -> tuple[list[str], list[str]]:
    """Given a database of the index and its restored name, return (what did not come back, what
    the backup never held): tables and row counts, the database's owner, each object's owner and
    grants (an index of an older run has none: not compared), definers that do not exist, views
    that fail when used. Without MariaDB users in the run (``users_held`` False: the backup user
    could not read them, a warning of its own) a missing definer is a warning: the backup never
    held it."""
    kind, db = entry['kind'], entry['database']
    problems: list[str] = []
    warnings: list[str] = []
    if kind == 'psql':
        counts = pg_row_counts(name)
        owner = pg_query(
            f'SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = {sql_literal(name)}'
        ).strip()
        if not target.no_owner and entry.get('owner') and owner != entry['owner']:
            problems.append(f'psql {db}: owned by {owner}, not by {entry["owner"]}')
    else:
        counts = mysql_row_counts(name, target.mysql_defaults)
        missing = warnings if not users_held else problems
        definers = mysql_query(MYSQL_DEFINERS_SQL, target, name).splitlines()
        for line in definers:
            missing.append(f'mysql {db}: {line} does not exist: it fails when used')
        views = mysql_query(
            'SELECT TABLE_NAME FROM information_schema.VIEWS WHERE TABLE_SCHEMA = DATABASE()',
            target,
            name,
        )
        for view in views.splitlines():
            if not users_held and any(
                line.startswith(f'view {view} (definer ') for line in definers
            ):
                continue  # said above, as a warning
            try:
                mysql_query(f'SELECT COUNT(*) FROM {backtick(view)}', target, name)
            except BackupError as error:
                problems.append(f'mysql {db}: view {view} fails when used: {error.detail[-200:]}')
    recorded = entry.get('grants')
    if recorded is not None and not (target.no_owner or target.no_privileges):
        if kind == 'psql':
            restored = pg_grants(name)
        else:
            restored = mysql_grants(
                lambda sql: mysql_query(sql, target, name, step='drill').splitlines()
            )
        problems += grant_differences(f'{kind} {db}', recorded, restored)
    for table, rows in sorted(entry.get('rows', {}).items()):
        if table not in counts:
            problems.append(f'{kind} {db}: table {table} did not come back')
        elif counts[table] != rows:
            problems.append(
                f'{kind} {db}: table {table} has {counts[table]} rows, {rows} at dump time'
            )
    return problems, warnings


def grant_differences(
    where: str, recorded: Mapping[str, str], restored: Mapping[str, str]
) -> list[str]:
    """Given the owners and grants of a database's objects at dump time and after a restore, return
    each object whose grants differ, in words."""
    problems = []
    for what in sorted(set(recorded) | set(restored)):
        before, after = recorded.get(what), restored.get(what)
        if before == after:
            continue
        if after is None:
            problems.append(
                f'{where}: grants on {what} did not come back (at dump time "{before}")'
            )
        elif before is None:
            problems.append(
                f'{where}: grants on {what} are new (restored "{after}", none at dump time)'
            )
        else:
            problems.append(
                f'{where}: grants on {what} differ: at dump time "{before}", restored "{after}"'
            )
    return problems


DRILL_OS_USER = 'ppbackup-drill'  # as root, the drill's servers run as this system user
DRILL_PG_LOADER = 'ppdrill'  # the drill loads as this role: no superuser, so SQL stays SQL
DRILL_START_TIMEOUT = 120.0
DRILL_LOG = '.ppbackup-drill.log'  # in the key holder's home, 0600: the last failed drill's details


def _server_program(name: str, folders: Sequence[str] = ('/usr/sbin', '/usr/bin')) -> str:
    """Given a server program, return its path (PATH first, then where Debian puts it), or ''."""
    found = shutil.which(name)
    if found:
        return found
    return next((f'{d}/{name}' for d in folders if os.access(f'{d}/{name}', os.X_OK)), '')


def pg_server_bindir() -> Path | None:
    """Return the newest installed PostgreSQL server's bin folder (Debian's layout first)."""
    versions = [path.parent for path in Path('/usr/lib/postgresql').glob('*/bin/initdb')]
    if versions:
        return max(versions, key=lambda bin_dir: int(re.sub(r'\D', '', bin_dir.parent.name) or 0))
    initdb = shutil.which('initdb')
    return Path(initdb).parent if initdb else None


def drill_server_problems(kinds: set[str]) -> list[str]:
    """Given the kinds of database a run holds, return what the drill's own servers need and this
    machine lacks, each as a sentence naming the package."""
    problems = []
    if 'psql' in kinds and not pg_server_bindir():
        problems.append(
            'the drill starts a PostgreSQL server of its own: install postgresql (initdb, postgres)'
        )
    if 'mysql' in kinds and not (
        _server_program('mariadb-install-db') and _server_program('mariadbd')
    ):
        problems.append(
            'the drill starts a MariaDB server of its own: install mariadb-server '
            '(mariadb-install-db, mariadbd)'
        )
    if os.geteuid() == 0 and not shutil.which('setpriv'):
        problems.append('as root, the drill runs its servers through setpriv: install util-linux')
    return problems


class DrillServers:
    """Throwaway PostgreSQL and MariaDB servers for one drill: in a private temporary folder, on
    sockets only (no TCP), as the system user ppbackup-drill when ppbackup runs as root. Nothing a
    hostile dump does reaches a real server or the key holder's files: PostgreSQL loads as a role
    that is no superuser (no COPY ... PROGRAM, no server files), MariaDB's file access is confined
    to an empty folder (secure_file_priv), and the clients run restricted and sandboxed. Leaving
    the context stops both servers and removes the folder.

    While it runs, libpq's variables name its PostgreSQL server (the drill is one command: the
    process's environment is the drill's); ``mysql_defaults`` names its MariaDB server."""

    def __init__(self, kinds: set[str]) -> None:
        self.kinds = kinds
        self.folder = Path()
        self.mysql_defaults: str | None = None
        self.stack = contextlib.ExitStack()
        self.saved_env: dict[str, str] | None = None  # libpq's variables before the drill's
        self.as_user: list[str] = []

    def __enter__(self) -> DrillServers:
        try:
            self.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def start(self) -> None:
        problems = drill_server_problems(self.kinds)
        if problems:
            raise BackupError('; '.join(problems), step='drill')
        self.folder = Path(tempfile.mkdtemp(prefix='ppbackup-drill-'))
        self.stack.callback(shutil.rmtree, self.folder, True)
        if os.geteuid() == 0:
            account = drill_os_user()
            os.chown(self.folder, account.pw_uid, account.pw_gid)
            self.as_user = ['setpriv', f'--reuid={account.pw_uid}', f'--regid={account.pw_gid}',
                            '--clear-groups', '--', 'setpriv', '--pdeathsig', 'KILL', '--']  # fmt: skip
        if 'psql' in self.kinds:
            self.start_postgres()
        if 'mysql' in self.kinds:
            self.start_mariadb()

    def server(self, what: str, argv: Sequence[str]) -> None:
        """Start a server in a pipeline of its own, stopped (SIGTERM, then SIGKILL) on leaving."""
        pipe = self.stack.enter_context(Pipeline(what, 'drill'))
        pipe.start([*self.as_user, *argv], stdout=subprocess.DEVNULL, env=self.server_env())

    def server_env(self) -> dict[str, str]:
        # The servers' own temporary files stay in the drill's folder, whoever's TMPDIR this is.
        return {**os.environ, 'TMPDIR': str(self.folder)}

    def wait_ready(self, what: str, probe: Sequence[str]) -> None:
        deadline = time.monotonic() + DRILL_START_TIMEOUT
        while True:
            try:
                run_command(probe, what=what, step='drill', timeout=30)
                return
            except BackupError as error:
                if time.monotonic() > deadline:
                    raise BackupError(
                        f"the drill's {what} did not start within {DRILL_START_TIMEOUT:.0f} s",
                        step='drill',
                        detail=error.detail,
                    ) from error
            nap(0.1)

    def start_postgres(self) -> None:
        bin_dir = pg_server_bindir()
        assert bin_dir is not None
        data = self.folder / 'pg'
        run_command(
            [*self.as_user, str(bin_dir / 'initdb'), '--no-sync', '-D', str(data), '-U', 'postgres',
             '--auth=trust', '-E', 'UTF8', '--locale=C.UTF-8'],
            what='initdb for the drill', step='drill', timeout=DRILL_START_TIMEOUT,
            env=self.server_env(),
        )  # fmt: skip
        self.server(
            'the drill\'s PostgreSQL server',
            [str(bin_dir / 'postgres'), '-D', str(data), '-k', str(self.folder), '-p', '5432',
             '-c', "listen_addresses=", '-c', 'fsync=off'],
        )  # fmt: skip
        self.saved_env = {key: value for key, value in os.environ.items() if key.startswith('PG')}
        for key in self.saved_env:
            del os.environ[key]
        os.environ.update(PGHOST=str(self.folder), PGPORT='5432', PGUSER='postgres')
        probe = ['psql', '-X', '-q', '--no-password', '-d', PG_MAINTENANCE_DB, '-c', 'SELECT 1']
        self.wait_ready('PostgreSQL server', probe)
        pg_query(f'CREATE ROLE {pg_ident(DRILL_PG_LOADER)} LOGIN CREATEDB', step='drill')

    def start_mariadb(self) -> None:
        data, files = self.folder / 'my', self.folder / 'my-files'
        socket_path = self.folder / 'my.sock'
        run_command(
            [*self.as_user, _server_program('mariadb-install-db'), '--no-defaults',
             f'--datadir={data}', '--auth-root-authentication-method=normal', '--skip-test-db'],
            what='mariadb-install-db for the drill', step='drill', timeout=DRILL_START_TIMEOUT,
            env=self.server_env(),
        )  # fmt: skip
        run_command([*self.as_user, 'mkdir', '-m', '700', '--', str(files)], what='mkdir',
                    step='drill')  # fmt: skip
        self.server(
            'the drill\'s MariaDB server',
            [_server_program('mariadbd'), '--no-defaults', f'--datadir={data}',
             f'--socket={socket_path}', '--skip-networking', f'--secure-file-priv={files}',
             f'--pid-file={self.folder / "my.pid"}', f'--log-error={self.folder / "my.log"}',
             '--skip-log-bin', '--event-scheduler=OFF'],
        )  # fmt: skip
        defaults = self.folder / DRILL_MYSQL_DEFAULTS
        defaults.write_text(f'[client]\nsocket={socket_path}\nuser=root\n')
        self.mysql_defaults = str(defaults)
        probe = ['mysqladmin', *mysql_defaults_args(str(defaults)), 'ping']
        self.wait_ready('MariaDB server', probe)

    def __exit__(self, *exc: object) -> None:
        try:
            self.stack.close()
        finally:
            if self.saved_env is not None:
                for key in [key for key in os.environ if key.startswith('PG')]:
                    del os.environ[key]
                os.environ.update(self.saved_env)


def drill_os_user() -> pwd.struct_passwd:
    """As root: return the system user the drill's servers run as, made if it is missing."""
    try:
        return pwd.getpwnam(DRILL_OS_USER)
    except KeyError:
        pass
    run_command(
        ['useradd', '--system', '--no-create-home', '--home-dir', '/nonexistent', '--shell',
         '/usr/sbin/nologin', DRILL_OS_USER],
        what='useradd', step='drill',
    )  # fmt: skip
    log.warning("made the system user %s for the drill's servers", DRILL_OS_USER)
    return pwd.getpwnam(DRILL_OS_USER)


def command_drill(
    source: str,
    config_arg: str | None,
    gnupghome: str | None,
    target: Target,
    mail: Sequence[str],
    arrived_before: dt.datetime | None = None,
) -> int:
    """Restore the newest run onto throwaway servers of the drill's own, check that everything
    came back, remove the servers, and report by mail: exit 0 when it passed, 1 when it did not.
    What the backup user could not read (the backup never held it) is a WARNING line, not a
    failure: the README's own setup passes, with its warnings named."""
    started = time.monotonic()
    problems: list[str] = []
    warnings: list[str] = []  # what the backup never held: named, not a failure
    details: list[str] = []  # the servers' words on a failure: for the key holder's eyes only
    timings: dict[str, float] = {}
    target.drill = True
    run = find_run(source, config_arg, arrived_before)
    label = run.label
    index_seen: Mapping[str, Any] = {}
    try:
        index = index_seen = read_index(run, gnupghome)
        label = f'{index.get("name", "?")} ({run.label})'
        for name in run.digests:
            try:
                verified_path(run, name)
            except BackupError as error:
                problems.append(str(error))
        kinds = {entry['kind'] for entry in index.get('databases', [])}
        try:
            # What the backup user could not read, the backup never held: a warning, as in the
            # run's mail. A file of the run that is gone fails; said first, since a restore that
            # then fails (no roles file) is explained by it.
            databases = index.get('databases', [])
            warnings += backup_user_lacks(index, databases)
            problems += [
                f'the run lacks something: {lack}' for lack in missing_files(run, index, databases)
            ]
            with DrillServers(kinds) as servers:
                target.mysql_defaults = servers.mysql_defaults
                target.pg_loader = DRILL_PG_LOADER if 'psql' in kinds else ''
                restore_run(run, index, gnupghome, target, timings=timings)
                for entry in databases:
                    failed, lacking = drill_checks(
                        entry,
                        target.name_for(entry['database']),
                        target,
                        users_held=bool(index.get('mariadb_users')),
                    )
                    problems += failed
                    warnings += lacking
            checked = Extracted()  # every member as a restore would take it, nothing written
            for name in index.get('archives', []):
                path = run_file(run, name)
                read_tar_file(
                    path,
                    gnupghome,
                    lambda stream: read_archive(stream, path.name, None, checked, 'drill'),
                    'tar',
                    'drill',
                )
        except BackupError as error:
            problems.append(str(error))
            details.append(f'{error}\n{mask_secrets(error.detail)}')
    except BackupError as error:
        problems.append(str(error))
    if details:  # the servers' own words quote the backup's rows: never in a mail (P1)
        log_path = Path.home() / DRILL_LOG
        try:
            write_atomically(log_path.parent, log_path.name, '\n\n'.join(details).encode() + b'\n')
            problems.append(
                f'what the servers said is in {log_path} (not mailed: it may quote data)'
            )
        except OSError as error:
            problems.append(f'what the servers said could not be kept: {os_reason(error)}')
    outcome = 'FAILED' if problems else 'passed'
    if warnings:
        outcome += f' with {len(warnings)} WARNING(s)'
    lines = [
        f'drill: {outcome}',
        f'run:   {label}',
        *([f'seen:  {run.seen}'] if run.seen else []),
        f'host:  {os.uname().nodename}',
        f'time:  {time.monotonic() - started:.1f} s in all',
        '',
        'time to restore each database (your recovery time):',
        *(f'  {what}: {seconds:.1f} s' for what, seconds in timings.items()),
    ]
    if index_seen and index_seen.get('not_in_slot'):
        lines += ['', *(f'note: {name} is not in this slot (a week slot keeps no binaries)'
                        for name in index_seen['not_in_slot'])]  # fmt: skip
    if warnings:
        lines += ['', *(f'WARNING: the backup lacks something: {warning}' for warning in warnings)]
    if problems:
        lines += ['', 'what did not come back:', *(f'  - {problem}' for problem in problems)]
    body = '\n'.join(lines) + '\n'
    print(body, end='')
    try:
        send_mail(mail, f'[ppbackup] drill: {outcome}: {label}', body)
    except BackupError as error:
        print(f'ppbackup: the drill mail could not be sent: {error}', file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if problems else EXIT_OK


# ---------------------------------------------------------------------------------------------------
# demo: the whole cycle in a throwaway folder, with a fresh key, leaving $HOME as it was.
# ---------------------------------------------------------------------------------------------------


def _demo_databases() -> tuple[list[str], list[str], Callable[[], None]]:
    """Create a small demo database where a server is reachable; return (psql, mysql, cleanup)."""
    name = f'ppbackup_demo_{os.getpid()}'
    psql: list[str] = []
    mysql: list[str] = []
    cleanups: list[list[str]] = []
    sql = (
        'CREATE TABLE members (id integer PRIMARY KEY, name varchar(80));'
        "INSERT INTO members VALUES (1, 'Ada'), (2, 'Grace'), (3, 'Émilie');"
    )
    with contextlib.suppress(BackupError):
        run_command(
            ['createdb', '--no-password', '--', name], what='createdb', step='demo', timeout=30
        )
        cleanups.append(['dropdb', '--no-password', '--if-exists', '--', name])
        run_command(
            [*pg_client(name), '-v', 'ON_ERROR_STOP=1', '-c', sql],
            what='psql',
            step='demo',
            timeout=30,
        )
        psql.append(name)
    with contextlib.suppress(BackupError):
        run_command(
            ['mysql', '--batch', '-e', f'CREATE DATABASE `{name}`'],
            what='mysql',
            step='demo',
            timeout=30,
        )
        cleanups.append(['mysql', '--batch', '-e', f'DROP DATABASE IF EXISTS `{name}`'])
        run_command(
            ['mysql', '--batch', '-e', sql, '--', name], what='mysql', step='demo', timeout=30
        )
        mysql.append(name)

    def cleanup() -> None:
        for argv in cleanups:
            with contextlib.suppress(BackupError):
                run_command(argv, what=argv[0], step='demo', timeout=30)

    return psql, mysql, cleanup


def command_demo() -> int:
    """Run the embedded demo: key, data, backup, status, verify, decrypt; then remove it all."""
    work = Path(tempfile.mkdtemp(prefix='ppbackup-demo-'))
    host_home = work / 'host-gnupg'  # public key only, as on a real host
    holder_home = work / 'keyholder-gnupg'  # the private key, as with a key holder elsewhere
    cleanup_dbs: Callable[[], None] = lambda: None
    try:
        for home in (host_home, holder_home):
            home.mkdir(mode=0o700)
        print(f'demo folder: {work}')
        holder = GnuPG(gnupghome=str(holder_home))
        key = holder.gen_key(
            holder.gen_key_input(
                key_type='EDDSA',
                key_curve='ed25519',
                subkey_type='ECDH',
                subkey_curve='cv25519',
                name_real='ppbackup demo',
                name_email='demo@ppbackup.invalid',
                no_protection=True,
                expire_date='2d',
            )
        )
        if not key.fingerprint:
            raise BackupError(f'could not make a demo key: {key.stderr[-300:]}', step='demo')
        GnuPG(gnupghome=str(host_home)).import_keys(holder.export_keys(key.fingerprint))
        print(
            f'demo key: {key.fingerprint} (public key on the "host", private key with the '
            '"key holder")'
        )
        data = work / 'home' / 'site'
        (data / 'uploads').mkdir(parents=True)
        (data / 'index.html').write_text('<h1>Demo association</h1>\n')
        (data / 'members.csv').write_text('id,name\n1,Ada\n2,Grace\n3,Émilie\n')
        (data / 'uploads' / 'photo.bin').write_bytes(os.urandom(256 * 1024))
        psql, mysql, cleanup_dbs = _demo_databases()
        print(
            'databases: '
            + (
                ', '.join([*(f'psql {db}' for db in psql), *(f'mysql {db}' for db in mysql)])
                or 'none reachable; files only'
            )
        )
        config_path = work / 'ppbackup.cfg'
        config_path.write_text(
            f'BACKUP_NAME=demo\nBACKUP_REMOTE={shlex.quote(str(work / "remote"))}\n'
            f'BACKUP_GPG_RECIPIENT={key.fingerprint}\nBACKUP_FILES=site\n'
            f'BACKUP_PSQL_DB="{" ".join(psql)}"\nBACKUP_MYSQL_DB="{" ".join(mysql)}"\n'
            f'BACKUP_GNUPGHOME={shlex.quote(str(host_home))}\n'
            f'BACKUP_DIR={shlex.quote(str(work / "home" / "backups"))}\n'
            f'BACKUP_INSECURE_DIR={shlex.quote(str(work / "home" / "backups.insecure"))}\n'
        )
        config_path.chmod(0o600)
        (work / 'remote').mkdir()
        config = load_config(config_path, {**os.environ, 'HOME': str(work / 'home')})
        print('\n== ppbackup run')
        code = command_run(config, dry_run=False)
        if code:
            raise BackupError('the demo run failed; see above', step='demo')
        print('run: succeeded')
        print('\n== ppbackup status')
        command_status(config, as_json=False)
        print('\n== ppbackup verify --remote')
        if command_verify(config, remote=True):
            raise BackupError('the demo verify failed; see above', step='demo')
        print('\n== ppbackup decrypt (as the key holder, from the remote copy)')
        remote_slot = next((work / 'remote' / 'backups').glob('day*'))
        restored_files = work / 'restored.tar'
        encrypted = next(remote_slot.glob('demo-files-*.gpg'))
        command_decrypt(encrypted, str(restored_files), str(holder_home))
        code, listing = run_command(
            ['tar', '-t', '-f', str(restored_files)], what='tar -t', step='demo'
        )
        if 'site/members.csv' not in listing:
            raise BackupError('the decrypted archive lacks site/members.csv', step='demo')
        print(
            f'{encrypted.name} -> tar archive with {len(listing.split())} entries, '
            'site/members.csv included'
        )
        for dump in [*remote_slot.glob('demo-psql*.gpg'), *remote_slot.glob('demo-mysql*.gpg')]:
            restored = work / 'restored.sql'
            command_decrypt(dump, str(restored), str(holder_home))
            text = restored.read_text(encoding='utf-8', errors='replace')
            if 'Grace' not in text:
                raise BackupError(f'{dump.name}: decrypted dump lacks the sample rows', step='demo')
            print(f'{dump.name} -> {len(text.splitlines())} lines of SQL with the sample rows')
        print('\ndemo: the round trip works. Everything it made is now removed.')
        return EXIT_OK
    finally:
        cleanup_dbs()
        for home in (host_home, holder_home):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    ['gpgconf', '--homedir', str(home), '--kill', 'all'],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=10,
                )
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='ppbackup',
        description='Privacy-preserving backups: dump, encrypt to public keys, '
        'rotate, rsync, mail. With no command, "run".',
    )
    parser.add_argument('--version', action='version', version=f'ppbackup {__version__}')
    parser.add_argument(
        '--config', help=f'config file (default: $PPBACKUP_CONFIG or {DEFAULT_CONFIG})'
    )
    parser.add_argument(
        '-v', '--verbose', action='store_true', help='show each step even under cron'
    )
    commands = parser.add_subparsers(dest='command', metavar='COMMAND')
    run = commands.add_parser('run', help='run one backup cycle (the default)')
    run.add_argument('--dry-run', action='store_true', help='print the plan; write nothing')
    commands.add_parser('check', help='pre-flight: programs, databases, keys, folders, remote')
    status = commands.add_parser('status', help='what exists: slots, plaintext, last run')
    status.add_argument('--json', action='store_true', help='print JSON for monitoring')
    verify = commands.add_parser('verify', help='check every slot without a private key')
    verify.add_argument('--remote', action='store_true', help='also check the remote copies')
    decrypt = commands.add_parser('decrypt', help='decrypt and decompress a backup file')
    decrypt.add_argument('file', type=Path)
    decrypt.add_argument('-o', '--output', help='output file (default: stdout)')
    decrypt.add_argument('--gnupghome', help='GnuPG home with the private key')
    commands.add_parser('demo', help='run the whole cycle on sample data in a throwaway folder')
    watch = commands.add_parser(
        'watch', help="on the backup host: keep what arrived out of the sender's reach, check it"
    )
    watch.add_argument('dir', type=Path, nargs='+', help="a sender's folder: incoming/ and kept/")
    watch.add_argument('--max-age', type=float, default=26, help='hours (default 26)')
    watch.add_argument('--mail', default='', help='comma-separated addresses to alert')
    watch.add_argument(
        '--dry-run',
        action='store_true',
        help='print what would be kept and removed; change nothing',
    )
    watch.add_argument('--json', action='store_true', help='print JSON per folder for monitoring')
    watch.add_argument('--metrics', type=Path, help='write Prometheus metrics to this file')
    restore = commands.add_parser(
        'restore', help='as a key holder: load a run into database servers (roles first)'
    )
    listing = commands.add_parser(
        'list', help='as a key holder: what a run holds (its databases; with --files, every file)'
    )
    drill = commands.add_parser(
        'drill', help='as a key holder: restore the newest run onto servers of its own, check it'
    )
    for sub in (restore, listing, drill):  # the key holder's: a run, the private key, a date
        sub.add_argument(
            'run', help='a manifest, a slot (its newest run), a folder of slots, or "latest"'
        )
        sub.add_argument('--gnupghome', help='GnuPG home with the private key')
        sub.add_argument(
            '--arrived-before',
            type=parse_arrived_before,
            metavar='DATE',
            help='the last run first seen before DATE (ISO date or date-time, UTC unless it names '
            "an offset; without a first-seen record, by run id: the sender's word)",
        )
    restore.add_argument(
        '--database', action='append', default=[], help='only this database (repeatable)'
    )
    restore.add_argument('--as', dest='as_name', default='', help='restore the database as NAME')
    restore.add_argument(
        '--replace', action='store_true', help='keep an existing database aside, then restore'
    )
    restore.add_argument(
        '--files', type=Path, help='extract the file archives into this folder (alone: only them)'
    )
    restore.add_argument(
        '--path',
        action='append',
        default=[],
        help='with --files: only this file or folder, as archived (repeatable)',
    )
    restore.add_argument(
        '--no-owner', action='store_true', help='no ownership: everything belongs to you'
    )
    restore.add_argument('--no-privileges', action='store_true', help='no grants')
    restore.add_argument(
        '--mysql-defaults', help='MariaDB option file naming the target server and user'
    )
    listing.add_argument(
        '--files', action='store_true', help="list every archive's members: name, size, mtime"
    )
    listing.add_argument('--json', action='store_true', help='print one JSON document, for scripts')
    drill.add_argument('--mail', default='', help='comma-separated addresses for the report')
    for sub in (run, status, verify, decrypt, watch, restore, listing, drill):
        sub.add_argument('--config', default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def setup_logging(verbose: bool, syslog: bool = False) -> None:
    """Log steps to stderr on a terminal (or with -v); under cron only the final report speaks."""
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('ppbackup: %(message)s'))
    handler.setLevel(logging.INFO if verbose or sys.stderr.isatty() else logging.CRITICAL)
    log.addHandler(handler)
    if syslog and os.path.exists('/dev/log'):
        with contextlib.suppress(OSError):
            sys_handler = logging.handlers.SysLogHandler(address='/dev/log')
            sys_handler.setFormatter(logging.Formatter('ppbackup[%(process)d]: %(message)s'))
            log.addHandler(sys_handler)


def parse_mail_list(text: str, step: str) -> tuple[str, ...]:
    """Given --mail's comma-separated addresses, return them. Raise ConfigError for a bad one."""
    mail = tuple(part.strip() for part in text.split(',') if part.strip())
    bad = [addr for addr in mail if not EMAIL_RE.match(addr)]
    if bad:
        raise ConfigError(f'--mail: not an email address: {", ".join(bad)}', step=step)
    return mail


def _raise_interrupted(signum: int, _frame: object) -> NoReturn:
    raise Interrupted(signum)


def dispatch(args: argparse.Namespace) -> int:
    """Given the parsed command line, run its command and return the exit code."""
    command = args.command or 'run'
    if command == 'decrypt':
        return command_decrypt(args.file, args.output, args.gnupghome)
    if command == 'demo':
        return command_demo()
    if command == 'list':
        return command_list(
            args.run, args.config, args.gnupghome, args.files, args.json, args.arrived_before
        )
    if command in ('restore', 'drill'):
        target = Target(
            as_name=getattr(args, 'as_name', ''),
            replace=getattr(args, 'replace', False),
            no_owner=getattr(args, 'no_owner', False),
            no_privileges=getattr(args, 'no_privileges', False),
            mysql_defaults=getattr(args, 'mysql_defaults', None),
        )
        if command == 'restore':
            return command_restore(
                args.run,
                args.config,
                args.gnupghome,
                target,
                args.database,
                args.files,
                args.arrived_before,
                args.path,
            )
        mail = parse_mail_list(args.mail, 'drill')
        return command_drill(
            args.run, args.config, args.gnupghome, target, mail, args.arrived_before
        )
    if command == 'watch':
        mail = parse_mail_list(args.mail, 'watch')
        return command_watch(args.dir, args.max_age, mail, args.dry_run, args.json, args.metrics)
    try:
        config = load_config(config_path_from(args.config))
    except ConfigError:
        # Even a broken config must not keep old plaintext alive: sweep the default place.
        try:
            expire_plaintext(Path(os.path.expanduser('~/backups.insecure')))
        except BackupError as error:
            print(f'ppbackup: {error}', file=sys.stderr)
        raise
    setup_logging(args.verbose, config.syslog)
    remember_secrets(config.home)
    if command in ('status', 'verify'):  # check and --dry-run write nothing; run does it itself
        expire_plaintext(config.insecure_dir)
    if command == 'check':
        return command_check(config)
    if command == 'status':
        return command_status(config, getattr(args, 'json', False))
    if command == 'verify':
        return command_verify(config, args.remote)
    return command_run(config, getattr(args, 'dry_run', False))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the command, return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return EXIT_USAGE if exit_.code not in (0, None) else EXIT_OK
    setup_logging(args.verbose)
    too_old = python_gnupg_problem(getattr(gnupg, '__version__', ''))
    if too_old:
        print(f'ppbackup: {too_old}', file=sys.stderr)
        return EXIT_USAGE
    caller_umask = os.umask(0o077)  # plaintext is private whatever the caller's umask
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    if threading.current_thread() is threading.main_thread():
        for sig in previous:
            signal.signal(sig, _raise_interrupted)
    code = EXIT_OK
    try:
        code = dispatch(args)
        sys.stdout.flush()  # a closed pipe (status | head -1) shows here, not at exit
        return code
    except BrokenPipeError:
        # The reader stopped reading: it had what it wanted. Nothing more goes to it, not even
        # Python's own flush at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return code
    except BackupError as error:
        # A program's words are masked; the config's own sentences never repeat a value, and
        # masking them would hide their point ("PGPASSWORD: a password never goes...").
        shown = (lambda text: text) if isinstance(error, ConfigError) else mask_secrets
        print(f'ppbackup: {shown(str(error))}', file=sys.stderr)
        if error.detail:
            print(shown(error.detail), file=sys.stderr)
        return error.exit_code
    except Interrupted as interrupt:
        kill_all_children()
        print(f'ppbackup: interrupted by {interrupt}', file=sys.stderr)
        return 128 + interrupt.signum
    except Exception:  # a bug: say so plainly, with the traceback, and a distinct code
        kill_all_children()
        traceback.print_exc()
        print('ppbackup: this is a bug; please report it with the traceback above', file=sys.stderr)
        return EXIT_BUG
    finally:
        os.umask(caller_umask)  # main() may be called in-process, as the tests do
        if threading.current_thread() is threading.main_thread():
            for sig, handler in previous.items():
                signal.signal(sig, handler)


if __name__ == '__main__':
    raise SystemExit(main())
