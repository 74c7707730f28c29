"""Transfer faults from FAULTS.md (T2, T3, T4) against a local remote; T1 and T5 run over a
loopback sshd in test_remote.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import Site, sh

import ppbackup


def test_T2_a_transfer_killed_mid_file_fails_and_the_next_run_completes_it(site: Site) -> None:
    (site.home / 'site' / 'uploads' / 'big.bin').write_bytes(os.urandom(6 * 1024 * 1024))
    # Only the pace is faked: the real rsync, slowed down so that it can be caught mid-file.
    site.shim('rsync', '#!/bin/sh\nexec /usr/bin/rsync --bwlimit=1500 "$@"\n')
    run = site.start()
    rsync_pid = None
    for _ in range(600):
        found = subprocess.run(
            ['pgrep', '-f', f'^/usr/bin/rsync --bwlimit=1500 .* {site.remote}$'],
            capture_output=True,
            text=True,
        ).stdout.split()
        partial = [path for path in site.remote.rglob('*') if path.is_file()]
        if found and partial:
            rsync_pid = int(found[0])
            break
        time.sleep(0.05)
    assert rsync_pid, 'rsync never started sending'
    os.killpg(os.getpgid(rsync_pid), signal.SIGKILL)  # rsync and everything in its group
    out, err = run.communicate(timeout=60)
    assert run.returncode == 1
    assert 'FAILED at sync' in err and 'killed by SIGKILL' in err
    assert 'FAILED at sync' in site.subjects()[-1]
    (site.shims / 'rsync').unlink()
    result = site.run()
    assert result.returncode == 0, result.stderr
    for path in site.backups.rglob('*'):
        if path.is_file():
            assert (site.remote / path.relative_to(site.home)).read_bytes() == path.read_bytes()
    assert site.run('verify', '--remote').returncode == 0


def test_T3_a_full_remote_disk_fails_the_run_and_keeps_the_local_slots(
    site: Site, mounts: list[Path]
) -> None:
    sh('mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(site.remote))
    mounts.append(site.remote)
    (site.home / 'site' / 'uploads' / 'big.bin').write_bytes(os.urandom(200 * 1024))
    result = site.run()
    assert result.returncode == 1
    assert 'FAILED at sync' in site.subjects()[0]
    body = site.mails()[0]['body']
    assert 'rsync exited 11' in body or 'rsync exited 12' in body or 'rsync exited 23' in body
    assert 'No space left' in body
    assert ppbackup.tree_problems(site.backups, None, None) == []
    # psql, mysql, files, binaries, and the PostgreSQL roles, MariaDB users and row counts
    assert len(list(site.backups.glob('day*/*.gpg'))) == 7


FLIP = """#!/bin/sh
# The real rsync; afterwards one byte of one received file silently flips (size and mtime kept),
# as a failing disk or a bad cable would do. With FLIP_ONCE set, only the first transfer is hit.
/usr/bin/rsync "$@"; code=$?
case "$*" in *--dry-run*) exit $code;; esac
if [ -z "$FLIP_ONCE" ] || [ ! -e "$FLIP_MARK" ]; then
  touch "$FLIP_MARK"
  PYTHON - "$REMOTE" <<'EOF'
import os, pathlib, sys
paths = pathlib.Path(sys.argv[1]).glob('backups/day*/*psql*.gpg')
path = max(paths, key=lambda p: p.stat().st_mtime_ns)  # the newest run's, even in one second
info = path.stat()
data = bytearray(path.read_bytes())
data[len(data) // 2] ^= 0x40
path.write_bytes(bytes(data))
os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
EOF
fi
exit $code
"""


def test_T4_a_silent_corruption_in_the_copy_is_found_by_checksum(site: Site) -> None:
    site.shim('rsync', FLIP.replace('PYTHON', sys.executable))
    env = {'REMOTE': str(site.remote), 'FLIP_MARK': str(site.root / 'flipped')}
    # Once: found by the checksum check, sent again, and the run says so.
    result = site.run(extra_env={**env, 'FLIP_ONCE': '1'})
    assert result.returncode == 0, result.stderr
    assert 'WARNING' in site.subjects()[0]
    assert (
        'differed from the manifest after the transfer and were sent again'
        in site.mails()[0]['body']
    )
    for path in site.backups.rglob('*.gpg'):
        assert (site.remote / path.relative_to(site.home)).read_bytes() == path.read_bytes()
    # Every time: the run fails, naming the file.
    result = site.run(extra_env=env)
    assert result.returncode == 1
    assert 'FAILED at verify remote' in site.subjects()[1]
    assert (
        'psql' in site.mails()[1]['body'] and 'differs from the manifest' in site.mails()[1]['body']
    )
    # And `verify --remote` finds it too, without a private key.
    (site.shims / 'rsync').unlink()
    verify = site.run('verify', '--remote')
    assert (
        verify.returncode == 1 and 'psql' in verify.stdout and 'missing or differs' in verify.stdout
    )
