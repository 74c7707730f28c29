"""Every cron line the README shows runs under cron's PATH (/usr/bin:/bin) as written.

cron gives a job ``PATH=/usr/bin:/bin``: a bare ``ppbackup`` (installed in /usr/local/bin by the
README's install step) is "not found" there, every night, and only cron's own mail says so. Each
line in a code block that starts with a cron schedule (``17 3 * * *``, ``@daily``; in ```cron
blocks, crontab heredocs, /etc/cron.d lines with their user field) is read here: the program of
each of its commands must resolve under ``env -i PATH=/usr/bin:/bin``, or be the absolute path the
install step creates; and every ``ppbackup`` it names is that path.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import subprocess

from conftest import REPO

CRON_PATH = '/usr/bin:/bin'
FENCE_RE = re.compile(r'^\s*```[^\n]*\n(.*?)^\s*```', re.DOTALL | re.MULTILINE)
SCHEDULE_RE = re.compile(
    r'^\s*(?:(?:[0-9*][0-9*/,-]*\s+){5}|@(?:reboot|yearly|annually|monthly|weekly|daily|hourly)\s+)'
    r'(\S.*)$'
)
OPERATORS = {'&&', '||', ';', '|', '&'}


def readme() -> str:
    return (REPO / 'README.md').read_text(encoding='utf-8')


def install_path() -> str:
    """The path the README's install step puts the command at (every install line agrees)."""
    paths = set(re.findall(r'install -m 0?755 ppbackup\.py (\S+)', readme()))
    assert len(paths) == 1, paths
    (path,) = paths
    assert os.path.isabs(path), path
    return path


def cron_lines() -> list[str]:
    """Every cron job line in the README's code blocks: its command (after the schedule)."""
    return [
        match.group(1)
        for block in FENCE_RE.findall(readme())
        for line in block.splitlines()
        if (match := SCHEDULE_RE.match(line))
    ]


def is_user(word: str) -> bool:
    try:
        pwd.getpwnam(word)
    except KeyError:
        return False
    return True


def programs(command: str) -> list[str]:
    """Given a cron command, return the program word of each of its simple commands."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    if words and is_user(words[0]) and len(words) > 1 and words[1].startswith('/'):
        words = words[1:]  # /etc/cron.d: the user field
    found: list[str] = []
    expecting = True
    for word in words:
        if word in OPERATORS:
            expecting = True
        elif expecting and not re.match(r'^[A-Za-z_][A-Za-z0-9_]*=', word):
            found.append(word)
            expecting = False
    return found


def resolves_under_cron(program: str) -> str:
    """Return where sh finds ``program`` with cron's environment (env -i, cron's PATH), or ''."""
    found = subprocess.run(
        ['env', '-i', f'PATH={CRON_PATH}', '/bin/sh', '-c', 'command -v "$1"', 'sh', program],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return found if os.path.isabs(found) else ''


def test_the_readme_shows_cron_lines() -> None:
    lines = cron_lines()
    assert len(lines) >= 5, lines  # the site's nightly run, watch (3 lines), drill, ...
    assert any('ppbackup drill' in line for line in lines), lines


def test_every_cron_line_resolves_under_crons_path() -> None:
    installed = install_path()
    wrong = []
    for line in cron_lines():
        for program in programs(line):
            if program == installed:
                continue  # what the install step creates
            if '/' in program:
                ok = os.path.isabs(program) and os.access(program, os.X_OK)
            else:
                ok = bool(resolves_under_cron(program))
            if not ok:
                wrong.append(f'{program!r} in: {line}')
        # The command itself, wherever in the line (after setpriv, after &&): the install path.
        for word in shlex.split(line):
            if (word == 'ppbackup' or word.endswith('/ppbackup')) and word != installed:
                wrong.append(f'{word!r} is not {installed} in: {line}')
    assert not wrong, '\n'.join(wrong)


def test_a_bare_ppbackup_would_be_caught() -> None:
    """The check above can fail: a bare name is not found under cron's PATH."""
    assert programs('ppbackup watch x && true') == ['ppbackup', 'true']
    assert programs('root  /usr/bin/setpriv --reuid=x /usr/local/bin/ppbackup') == [
        '/usr/bin/setpriv'
    ]
    assert resolves_under_cron('ppbackup-not-installed-anywhere') == ''
    assert resolves_under_cron('sh') == '/usr/bin/sh' or resolves_under_cron('sh') == '/bin/sh'
