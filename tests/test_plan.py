"""run --dry-run prints the gpg and rsync commands the run then executes, argument for argument."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

from conftest import Site

# A shim that records its argv (one JSON list a line) and then runs the real program.
RECORD = """#!PYTHON
import json, os, sys
with open(LOG, 'a') as log:
    log.write(json.dumps(['NAME', *sys.argv[1:]]) + '\\n')
os.execv('/usr/bin/NAME', ['NAME', *sys.argv[1:]])
"""

# What differs from one run to the next: run ids, the run folder's and the temporaries' pid and
# random part.
RUN_SPECIFIC = (
    (re.compile(r'\d{8}-\d{6}(-\d+)?'), 'RUNID'),
    (re.compile(r'\.ppbackup-run-\w+'), '.ppbackup-run-PID'),
    (re.compile(r'\.ppbackup-tmp-[^-/]+-[^-/]+-'), '.ppbackup-tmp-PID-RANDOM-'),
)


def masked(argv: list[str]) -> list[str]:
    words = []
    for word in argv:
        for pattern, mask in RUN_SPECIFIC:
            word = pattern.sub(mask, word)
        words.append(word)
    return words


def record(site: Site, name: str, log: Path) -> None:
    script = RECORD.replace('PYTHON', sys.executable).replace('NAME', name)
    site.shim(name, script.replace('LOG', repr(str(log))))


def recorded(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_dry_run_prints_the_gpg_and_rsync_argv_the_run_executes(site: Site) -> None:
    when = '@2027-01-11 04:00:00'
    plan = site.run('run', '--dry-run', faketime=when)
    assert plan.returncode == 0, plan.stderr
    planned = [
        shlex.split(line)
        for line in plan.stdout.splitlines()
        if line.startswith(('  gpg ', '  rsync '))
    ]
    planned_gpg = [argv for argv in planned if argv[0] == 'gpg']
    planned_rsync = [argv for argv in planned if argv[0] == 'rsync']
    assert planned_gpg and len(planned_rsync) == 2, plan.stdout
    for argv in planned_gpg:
        assert '--no-encrypt-to' in argv and argv[argv.index('--recipient') + 1] == site.keys.alice
    assert all('--files-from=-' in argv for argv in planned_rsync)

    log = site.root / 'argv.log'
    record(site, 'gpg', log)
    record(site, 'rsync', log)
    result = site.run(faketime=when)
    assert result.returncode == 0, result.stderr
    executed = recorded(log)
    # Only encryption: the run also asks gpg for its version, the keys and each file's packets.
    executed_gpg = [argv for argv in executed if argv[0] == 'gpg' and '--encrypt' in argv]
    executed_rsync = [argv for argv in executed if argv[0] == 'rsync']
    assert sorted(map(masked, executed_gpg)) == sorted(map(masked, planned_gpg))
    assert list(map(masked, executed_rsync)) == list(map(masked, planned_rsync))
