"""A hostile sender, seen from the backup host (FAULTS.md H1-H8).

The web host is taken over: the attacker has root there and its ssh key to the backup host. Each test
builds the README's backup host for real: an unprivileged receiving account made here (a unique
name, removed afterwards), a loopback sshd that lets the web host's key in only through the README's
own forced command, a root-owned sender folder with ``incoming/``, and ``ppbackup watch`` run as root.
Then it attacks as the attacker would, with the real rsync and ssh, and checks the promise: every
file that arrived and passed watch's check stays, byte for byte; a key holder restores the newest run
from ``kept/``; nothing outside the received tree changes (a canary beside it and one above it).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import CANARY, REPO, Site, sh
from sshd import Sshd, start_sshd, write_only_options

README_FOLDER = '/srv/ppbackup/site'


def readme_options() -> str:
    """Return the README's authorized_keys options (the forced command), for /srv/ppbackup/site."""
    return write_only_options(Path(README_FOLDER) / 'incoming')


@dataclasses.dataclass
class Host:
    """One web host's folder on the backup host, and its receiving account."""

    user: str
    folder: Path  # root's: incoming/ (the account's) and kept/ (watch's)
    server: Sshd

    @property
    def incoming(self) -> Path:
        return self.folder / 'incoming'

    @property
    def kept(self) -> Path:
        return self.folder / 'kept'

    @property
    def target(self) -> str:
        return f'{self.user}@127.0.0.1'

    def allow(self, options: str) -> None:
        self.server.allow_in(self.folder, options.replace(README_FOLDER, str(self.folder)))

    def push(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run rsync as the attacker on the web host would: its key, through the forced command."""
        return sh('rsync', '-e', self.server.rsh(), *args, check=False)

    def ssh(self, *args: str) -> subprocess.CompletedProcess[str]:
        return sh(*self.server.rsh().split(), '-o', 'BatchMode=yes', *args, check=False)


@pytest.fixture(scope='module')
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with start_sshd(tmp_path_factory.mktemp('sshd-hostile')) as running:
        yield running


@pytest.fixture
def backup_host(server: Sshd) -> Iterator[tuple[Path, Callable[[str], Host]]]:
    """Yield (the folder above every sender's folder, a maker of Hosts). Users and folders made
    here are removed afterwards, even on failure."""
    base = Path(tempfile.mkdtemp(prefix='ppbt-host-', dir='/tmp'))
    base.chmod(0o755)
    (base / 'canary-above.txt').write_text('above the received trees\n')
    made: list[Host] = []

    def make(label: str) -> Host:
        user = f'ppbr{secrets.token_hex(4)}'
        folder = base / label
        folder.mkdir(mode=0o755)
        folder.chmod(0o755)
        (folder / 'canary-beside.txt').write_text('beside the received tree\n')
        sh(
            'useradd',
            '--system',
            '--no-create-home',
            '--home-dir',
            str(folder),
            '--shell',
            '/bin/sh',
            '--user-group',
            user,
        )
        host = Host(user, folder, server)
        made.append(host)
        sh('usermod', '-p', '*', user)  # no password, but not locked: keys work without PAM
        host.incoming.mkdir(mode=0o700)
        shutil.chown(host.incoming, user, user)
        host.allow(readme_options())
        return host

    try:
        yield base, make
    finally:
        for host in made:
            sh('userdel', host.user, check=False)
            sh('groupdel', host.user, check=False)
        shutil.rmtree(base, ignore_errors=True)


def canaries(base: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Return every file outside the received trees under ``base``: inode, owner, mode, bytes."""
    found = {}
    for path in sorted(base.rglob('*')):
        skip = ('incoming', 'kept', '.ssh')  # .ssh: the tests change the forced command
        if any(part in path.parts for part in skip) or not path.is_file():
            continue
        info = path.lstat()
        found[str(path)] = (info.st_ino, info.st_uid, info.st_mode, path.read_bytes())
    return found


def contents(root: Path) -> dict[str, bytes]:
    """Return every file under ``root`` and its bytes, but watch's first-seen export (it changes
    as runs come and go; test_watch_exports_the_first_seen_record... checks it)."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob('*'))
        if path.is_file() and not path.is_symlink() and path.name != 'first-seen.json'
    }


def send(site: Site, host: Host, faketime: str | None = None) -> None:
    """One normal backup run from the web host to ``host``; it must succeed."""
    site.write_config(BACKUP_REMOTE=f'{host.target}:.', BACKUP_MYSQL_DB=None)
    result = site.run(extra_env=host.server.env(), faketime=faketime)
    assert result.returncode == 0, result.stderr


def watch(
    site: Site,
    *folders: Path,
    faketime: str | None = None,
    code: int = 0,
    args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    result = site.run('watch', *map(str, folders), *args, faketime=faketime)
    assert result.returncode == code, result.stderr
    return result


def watch_json(site: Site, *folders: Path, faketime: str | None = None) -> list[dict[str, object]]:
    result = site.run('watch', '--json', *map(str, folders), faketime=faketime)
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return rows


def restore_newest(site: Site, host: Host, tmp: Path, run: str = '') -> None:
    """As a key holder, from where the README says: the newest run in kept/ (or ``run``), checked
    against its manifest, the database dump and the files archive decrypted."""
    newest = host.kept / (run or str(watch_json(site, host.folder)[0]['newest_run']))
    check = sh('sha256sum', '--strict', '-c', newest.name, cwd=newest.parent)
    manifest = newest.read_text().splitlines()
    assert check.stdout.count(': OK') == len(manifest) >= 2
    names = [line.split('  ', 1)[1] for line in manifest]
    dump = newest.parent / next(name for name in names if '-psql-' in name)
    out = tmp / f'restored-{secrets.token_hex(3)}.sql'
    site.decrypt(dump, out)
    assert b'-- PostgreSQL database dump complete' in out.read_bytes()
    assert CANARY.encode() in out.read_bytes()
    archive = newest.parent / next(name for name in names if '-files-' in name)
    site.decrypt(archive, out.with_suffix('.tar'))
    assert 'site/canary.txt' in sh('tar', '-tf', str(out.with_suffix('.tar'))).stdout


def sender_kept(site: Site, backup_host: tuple[Path, Callable[[str], Host]]) -> tuple[Path, Host]:
    """Return (the backup host's base folder, the web host "site" on it) after one normal run
    arrived and watch kept it."""
    base, make = backup_host
    host = make('site')
    send(site, host)
    watch(site, host.folder)
    return base, host


def attacker_copy(site: Site, tmp: Path) -> Path:
    """The attacker's copy of the web host's backups folder (they have root there)."""
    copy = tmp / f'evil-{secrets.token_hex(3)}'
    shutil.copytree(site.backups, copy / 'backups', symlinks=True)
    return copy


def manifest_line(name: str, data: bytes) -> str:
    return f'{hashlib.sha256(data).hexdigest()}  {name}\n'


def one_run(slot: Path) -> tuple[Path, Path]:
    """Return (the manifest, the psql file) of the single run in a slot."""
    manifests = sorted(slot.glob('*.sha256'))
    assert len(manifests) == 1, manifests
    dump = sorted(slot.glob('*-psql-*.gpg'))
    assert len(dump) == 1, dump
    return manifests[0], dump[0]


# ---------------------------------------------------------------------------------------------------
# H1: --delete through the forced command.
# ---------------------------------------------------------------------------------------------------


def test_H1_delete_through_the_forced_command_is_refused(
    site: Site, backup_host: tuple[Path, Callable[[str], Host]], tmp_path: Path
) -> None:
    base, host = sender_kept(site, backup_host)
    arrived = contents(host.incoming / 'backups')
    kept = contents(host.kept / 'backups')
    assert kept and set(kept) <= set(arrived)
    outside = canaries(base)
    empty = tmp_path / 'empty'
    (empty / 'backups').mkdir(parents=True)
    slot = next(path.name for path in (host.incoming / 'backups').iterdir())
    for argv in (
        ('-r', '--delete', f'{empty}/', f'{host.target}:backups/'),
        ('-r', '--delete-after', '--force', f'{empty}/backups/', f'{host.target}:backups/{slot}/'),
        ('-r', '--delete-excluded', f'{empty}/', f'{host.target}:.'),
        ('-r', '--remove-source-files', f'{empty}/', f'{host.target}:.'),
    ):
        attack = host.push(*argv)
        assert attack.returncode != 0, argv
        assert 'has been disabled' in attack.stderr, attack.stderr
    assert contents(host.incoming / 'backups') == arrived
    assert contents(host.kept / 'backups') == kept
    assert canaries(base) == outside
    watch(site, host.folder)
    restore_newest(site, host, tmp_path)
    # The sender's own check of the remote still works through the forced command.
    verify = site.run('verify', '--remote', extra_env=host.server.env())
    assert verify.returncode == 0 and 'remote included: all is well' in verify.stdout, verify.stdout
    # A day of normal runs after the attack still arrives, is checked and kept.
    runs_before = watch_json(site, host.folder)[0]['runs_kept']
    send(site, host, faketime='+2h')
    watch(site, host.folder, faketime='+2h')
    after = watch_json(site, host.folder, faketime='+2h')[0]
    assert after['runs_kept'] == int(str(runs_before)) + 2  # the day slot's run and its week twin
    assert after['problems'] == []
    assert contents(host.kept / 'backups').items() >= kept.items()


# ---------------------------------------------------------------------------------------------------
# H2: a file overwritten under its own name, with its manifest rewritten to match.
# ---------------------------------------------------------------------------------------------------


def rewrite_run(copy: Path) -> tuple[Path, Path]:
    """In the attacker's copy, overwrite the psql file with garbage and rewrite the manifest to
    match; return (manifest, psql file) in the copy."""
    slot = next(path for path in (copy / 'backups').iterdir() if path.name.startswith('day'))
    manifest, dump = one_run(slot)
    # Dated a minute later, whenever the test runs: the sender's quick check (size and mtime, to
    # the second) then sees the change. A rewrite that keeps both is never sent again by the
    # sender, and watch keeps reporting it (README, "Debian 12").
    later = dump.stat().st_mtime + 60
    garbage = os.urandom(dump.stat().st_size)
    dump.write_bytes(garbage)
    lines = [
        manifest_line(dump.name, garbage) if line.endswith('  ' + dump.name) else line + '\n'
        for line in manifest.read_text().splitlines()
    ]
    manifest.write_text(''.join(lines))
    for path in (dump, manifest):
        os.utime(path, (later, later))
    return manifest, dump


def test_H2_a_rewritten_file_and_manifest_change_nothing_that_was_kept(
    site: Site, backup_host: tuple[Path, Callable[[str], Host]], tmp_path: Path
) -> None:
    base, host = sender_kept(site, backup_host)
    arrived = contents(host.incoming / 'backups')
    kept = contents(host.kept / 'backups')
    outside = canaries(base)
    copy = attacker_copy(site, tmp_path)
    rewrite_run(copy)
    # The README's forced command (-no-overwrite): a rewrite is ignored, --inplace or not.
    for extra in (('--checksum',), ('--inplace', '--checksum'), ('--ignore-times',)):
        attack = host.push('-a', *extra, f'{copy}/backups', f'{host.target}:.')
        assert attack.returncode == 0, attack.stderr
    assert contents(host.incoming / 'backups') == arrived
    assert contents(host.kept / 'backups') == kept
    watch(site, host.folder)

    # Debian 12's rsync 3.2.7 has no -no-overwrite: the same attack with the option left out.
    host.allow(readme_options().replace(' -no-overwrite', ''))
    inplace = host.push('-a', '--inplace', '--checksum', f'{copy}/backups', f'{host.target}:.')
    assert inplace.returncode != 0  # the kept inodes are watch's: the account cannot write them
    assert 'Permission denied' in inplace.stderr, inplace.stderr
    assert contents(host.kept / 'backups') == kept
    renamed = host.push('-a', '--checksum', f'{copy}/backups', f'{host.target}:.')
    assert renamed.returncode == 0, renamed.stderr
    assert (
        contents(host.incoming / 'backups') != arrived
    )  # the names now hold the attacker's bytes...
    assert contents(host.kept / 'backups') == kept  # ...but what arrived first is kept
    mails_before = len(site.mails())
    alarm = watch(site, host.folder, code=1, args=('--mail', 'a@example.org'))
    assert alarm.stderr.count('changed after it arrived') == 2, alarm.stderr  # the dump, manifest
    assert '-psql-' in alarm.stderr and '.sha256' in alarm.stderr
    mails = site.mails()[mails_before:]
    assert len(mails) == 1
    subject = mails[0]['argv'][mails[0]['argv'].index('-s') + 1]
    assert 'FAILED' in subject and str(host.folder) in subject and 'assoc' in subject
    assert contents(host.kept / 'backups') == kept
    assert canaries(base) == outside
    restore_newest(site, host, tmp_path)
    # The sender's next run finds its older files changed there (size or mtime), and sends the
    # originals again over the attacker's names: all is well again, and the new run is kept.
    send(site, host, faketime='+2h')
    watch(site, host.folder, faketime='+2h')
    assert contents(host.kept / 'backups').items() > kept.items()


# ---------------------------------------------------------------------------------------------------
# H3: manifest names that are paths, or worse.
# ---------------------------------------------------------------------------------------------------


def test_H3_manifest_names_are_data_never_paths(
    site: Site, backup_host: tuple[Path, Callable[[str], Host]], tmp_path: Path
) -> None:
    base, host = sender_kept(site, backup_host)
    kept = contents(host.kept / 'backups')
    above = base / 'canary-above.txt'
    beside = host.folder / 'canary-beside.txt'
    day = next(path.name for path in (host.incoming / 'backups').iterdir() if path.name[0] == 'd')
    real = next(name for name in kept if name.startswith('wk') and '-psql-' in name)
    lines = [
        manifest_line('../../../canary-beside.txt', beside.read_bytes()),
        manifest_line('../../../../canary-above.txt', above.read_bytes()),
        manifest_line(str(above), above.read_bytes()),
        manifest_line(real, kept[real]),
        manifest_line('-x', b''),
        manifest_line('a\0b', b''),
        '\\' + manifest_line('a\\nb', b''),
        manifest_line('..', b''),
    ]
    evil = tmp_path / 'evil' / 'backups' / day
    evil.mkdir(parents=True)
    (evil / 'assoc-20270101-000000.sha256').write_text(''.join(lines))
    outside = canaries(base)
    attack = host.push('-a', f'{tmp_path}/evil/backups', f'{host.target}:.')
    assert attack.returncode == 0, attack.stderr
    alarm = watch(site, host.folder, code=1)
    for shown in (
        '../../../canary-beside.txt',
        '../../../../canary-above.txt',
        str(above),
        real,
        "'-x'" if "'-x'" in alarm.stderr else '-x',
        repr('a\0b'),
        'not a "SHA-256  name" line',
        'refuses the name ..:',
    ):
        assert shown in alarm.stderr, (shown, alarm.stderr)
    assert alarm.stderr.count('refuses the name') == 7, alarm.stderr
    assert canaries(base) == outside
    assert contents(host.kept / 'backups') == kept
    # Retention, ten days on, removes only what it kept, never a name from a manifest.
    watch(site, host.folder, faketime='+10d', code=1)
    assert canaries(base) == outside
    restore_newest(site, host, tmp_path)


# ---------------------------------------------------------------------------------------------------
# H4: runs dated in the future, and a flood of junk runs.
# ---------------------------------------------------------------------------------------------------


def test_H4_future_dates_and_a_junk_flood_push_no_real_run_out(
    site: Site, backup_host: tuple[Path, Callable[[str], Host]], tmp_path: Path
) -> None:
    base, host = sender_kept(site, backup_host)
    kept = contents(host.kept / 'backups')
    real_runs = {name for name in kept if name.endswith('.sha256')}
    outside = canaries(base)
    evil = tmp_path / 'evil' / 'backups'
    day = next(path.name for path in (host.incoming / 'backups').iterdir() if path.name[0] == 'd')
    week = next(path.name for path in (host.incoming / 'backups').iterdir() if path.name[0] == 'w')
    # A run of the same backup name, dated 2030, in both slots; and 15 junk runs.
    for slot in (day, week):
        (evil / slot).mkdir(parents=True)
        data = os.urandom(1000)
        (evil / slot / 'assoc-psql-20300101-000000.sql.zst.gpg').write_bytes(data)
        (evil / slot / 'assoc-20300101-000000.sha256').write_text(
            manifest_line('assoc-psql-20300101-000000.sql.zst.gpg', data)
        )
    for number in range(15):
        data = os.urandom(100)
        slot = evil / f'{"day" if number % 2 else "wk"}{60 + number % 3}'
        slot.mkdir(parents=True, exist_ok=True)
        (slot / f'junk{number}-x.bin').write_bytes(data)
        (slot / f'junk{number}-20270101-000000.sha256').write_text(
            manifest_line(f'junk{number}-x.bin', data)
        )
    sh(
        'touch',
        '-d',
        '2030-01-01',
        *map(str, (evil / day).iterdir()),
        *map(str, (evil / week).iterdir()),
    )
    attack = host.push('-a', f'{evil}', f'{host.target}:.')
    assert attack.returncode == 0, attack.stderr
    alarm = watch(site, host.folder, code=1)
    assert alarm.stderr.count('in the future of this host') == 4, alarm.stderr
    assert 'runs arrived within a day' in alarm.stderr
    # Six days on, every real run is still kept, byte for byte (the flood and the dates were
    # reported once, when they arrived).
    watch(site, host.folder, faketime='+6d', args=('--max-age', '999'))
    assert contents(host.kept / 'backups').items() >= kept.items()
    assert real_runs <= set(contents(host.kept / 'backups'))
    assert canaries(base) == outside
    # The newest run is junk now; the key holder takes the newest real one, by its name.
    real_day = next(name for name in real_runs if name.startswith('day'))
    restore_newest(site, host, tmp_path, run=f'backups/{real_day}')


# ---------------------------------------------------------------------------------------------------
# H5: symlinks in the received tree.
# ---------------------------------------------------------------------------------------------------


def test_H5_symlinks_are_never_followed(
    site: Site, backup_host: tuple[Path, Callable[[str], Host]], tmp_path: Path
) -> None:
    base, host = sender_kept(site, backup_host)
    kept = contents(host.kept / 'backups')
    above = base / 'canary-above.txt'
    evil = tmp_path / 'evil' / 'backups'
    # Slots no real run uses (runs use day0-day7, wk1-wk53), whatever the weekday and week.
    (evil / 'day8').mkdir(parents=True)
    os.symlink(base, evil / 'day9')  # a slot that is a symlink
    os.symlink(above, evil / 'day8' / 'assoc-psql-20270101-000000.sql.zst.gpg')
    (evil / 'day8' / 'assoc-20270101-000000.sha256').write_text(
        manifest_line('assoc-psql-20270101-000000.sql.zst.gpg', above.read_bytes())
    )
    outside = canaries(base)
    attack = host.push('-rl', f'{evil}', f'{host.target}:.')
    assert attack.returncode == 0, attack.stderr
    first = watch(site, host.folder, code=1)
    assert 'backups/day9 is a symlink; not followed' in first.stderr, first.stderr
    assert 'assoc-psql-20270101-000000.sql.zst.gpg: a symlink; not followed' in first.stderr
    # Without -munge, a symlink arrives pointing where the sender says: watch still never follows.
    received = host.incoming / 'backups'
    (received / 'day97').mkdir()
    shutil.chown(received / 'day97', host.user, host.user)
    os.symlink(above, received / 'day97' / 'assoc-20270102-000000.sha256')
    os.symlink(host.folder, received / 'wk99')
    for path in (received / 'day8' / 'assoc-psql-20270101-000000.sql.zst.gpg',):
        path.unlink()
        os.symlink(above, path)
    second = watch(site, host.folder, code=1)
    for where in (
        'backups/wk99 is a symlink',
        'assoc-20270102-000000.sha256: a symlink',
        'assoc-psql-20270101-000000.sql.zst.gpg: a symlink',
    ):
        assert where in second.stderr, (where, second.stderr)
    assert canaries(base) == outside
    assert contents(host.kept / 'backups') == kept
    restore_newest(site, host, tmp_path)


# ---------------------------------------------------------------------------------------------------
# H6: a shell, a read, a port forward.
# ---------------------------------------------------------------------------------------------------


def test_H6_no_shell_no_read_no_forward(
    site: Site, backup_host: tuple[Path, Callable[[str], Host]], tmp_path: Path
) -> None:
    base, host = sender_kept(site, backup_host)
    outside = canaries(base)
    arrived = contents(host.incoming / 'backups')
    manifest = next((host.incoming / 'backups').rglob('*.sha256'))
    shell = host.ssh(host.target, f'cat {manifest}; touch {base}/pwned')
    assert shell.returncode != 0
    assert shell.stdout == '' and not (base / 'pwned').exists()
    tty = host.ssh('-tt', host.target)
    assert tty.returncode != 0 and tty.stdout.count('$') == 0
    for source in ('backups/', 'incoming/backups/', f'{manifest.parent.name}/'):
        dest = tmp_path / 'read-back'
        pulled = host.push('-a', f'{host.target}:{source}', str(dest))
        assert pulled.returncode != 0
        assert 'reading from write-only server is not allowed' in pulled.stderr, pulled.stderr
        assert not dest.exists() or not any(dest.rglob('*'))
    forward = host.ssh('-W', f'127.0.0.1:{host.server.port}', host.target)
    assert forward.returncode != 0
    assert 'SSH-' not in forward.stdout
    assert 'prohibited' in forward.stderr or 'open failed' in forward.stderr, forward.stderr
    assert contents(host.incoming / 'backups') == arrived
    assert canaries(base) == outside
    restore_newest(site, host, tmp_path)


# ---------------------------------------------------------------------------------------------------
# T4 at the far end: a kept copy that rots on the backup host's disk.
# ---------------------------------------------------------------------------------------------------


def test_T4_a_kept_copy_damaged_on_the_backup_host_is_found_by_the_weekly_hash(
    site: Site, backup_host: tuple[Path, Callable[[str], Host]]
) -> None:
    _, host = sender_kept(site, backup_host)
    slot = next((host.kept / 'backups').glob('day*'))
    _, dump = one_run(slot)
    original = dump.read_bytes()
    # The disk flips one byte: in place, the same inode (kept/ and incoming/ share it).
    with open(dump, 'r+b') as handle:
        handle.seek(len(original) // 2)
        handle.write(bytes([original[len(original) // 2] ^ 0x01]))
    # The hourly run reads only what is new: a kept run is hashed again once a week.
    watch(site, host.folder, faketime='+1h')
    days = ('--max-age', '9999')
    for _ in range(2):  # reported at every run until repaired, never marked as checked
        alarm = watch(site, host.folder, faketime='+8d', code=1, args=days)
        assert 'FAILED' in alarm.stderr
        # Each name of the damaged inode: the day run and its week twin (a hard link).
        damaged = re.findall(
            r'- kept/(\S+) \(SHA-256 differs from the manifest\): the kept', alarm.stderr
        )
        twins = [p for p in (host.kept / 'backups').rglob(dump.name) if p.samefile(dump)]
        assert sorted(damaged) == sorted(str(p.relative_to(host.kept)) for p in twins), alarm.stderr
        assert len(twins) == 2 and alarm.stderr.count('the kept copy is damaged') == 2
    dump.write_bytes(original)  # repaired from another copy: the next run is quiet
    watch(site, host.folder, faketime='+8d', args=days)
    state = json.loads((host.kept / '.ppbackup-watch.json').read_text())
    assert all(run['hashed'] > run['first_seen'] for run in state['runs'].values())


# ---------------------------------------------------------------------------------------------------
# Normal life: a same-hour rerun, and two senders into one backup host.
# ---------------------------------------------------------------------------------------------------


def test_a_same_hour_rerun_keeps_both_versions(
    site: Site, backup_host: tuple[Path, Callable[[str], Host]], tmp_path: Path
) -> None:
    _, host = sender_kept(site, backup_host)
    first = contents(host.kept / 'backups')
    (site.home / 'site' / 'index.php').write_text('<?php echo "changed"; ?>\n')
    send(site, host)  # the same hour: new run id, new names
    watch(site, host.folder)
    both = contents(host.kept / 'backups')
    assert both.items() >= first.items()  # the first version is kept, unchanged
    assert len([name for name in both if name.endswith('.sha256')]) == 2 * len(
        [name for name in first if name.endswith('.sha256')]
    )
    assert {name: data for name, data in contents(site.backups).items()}.items() <= both.items()
    restore_newest(site, host, tmp_path)


def test_two_senders_one_watch_one_report(
    site: Site, backup_host: tuple[Path, Callable[[str], Host]], tmp_path: Path
) -> None:
    _, make = backup_host
    first, second = make('site'), make('shop')
    send(site, first)
    # The second web host: another config, its own folders and name, another receiving account.
    shop_cfg = site.home / 'shop.cfg'
    shop_cfg.write_text(
        f'BACKUP_NAME=shop\nBACKUP_REMOTE={second.target}:.\n'
        f'BACKUP_GPG_RECIPIENT="{site.keys.alice}"\nBACKUP_FILES=site\n'
        'BACKUP_DIR=~/shop-backups\nBACKUP_INSECURE_DIR=~/shop.insecure\n'
    )
    shop_cfg.chmod(0o600)
    shop = site.run('--config', str(shop_cfg), extra_env=second.server.env())
    assert shop.returncode == 0, shop.stderr
    metrics = tmp_path / 'watch.prom'
    quiet = watch(site, first.folder, second.folder, args=('--metrics', str(metrics)))
    assert quiet.stdout == '' and quiet.stderr == ''
    rows = {row['tree']: row for row in watch_json(site, first.folder, second.folder)}
    assert rows[str(first.folder)]['names'] == ['assoc']
    assert rows[str(second.folder)]['names'] == ['shop']
    for row in rows.values():
        assert row['problems'] == [] and int(str(row['runs_kept'])) == 2
        assert float(str(row['newest_run_age_hours'])) < 1
    text = metrics.read_text()
    for folder in (first.folder, second.folder):
        assert f'ppbackup_watch_problems{{tree="{folder}"}} 0' in text
        assert re.search(rf'ppbackup_watch_bytes_kept{{tree="{folder}"}} [1-9]', text)
    # Junk into the second one only: one report, one mail, naming that folder and its name.
    junk = tmp_path / 'junk' / 'backups' / 'day3'
    junk.mkdir(parents=True)
    (junk / 'shop-x.gpg').write_bytes(b'junk')
    (junk / 'shop-20270101-000000.sha256').write_text(manifest_line('shop-x.gpg', b'other'))
    assert second.push('-a', f'{tmp_path}/junk/backups', f'{second.target}:.').returncode == 0
    mails_before = len(site.mails())
    alarm = watch(
        site,
        first.folder,
        second.folder,
        code=1,
        args=('--mail', 'a@example.org', '--metrics', str(metrics)),
    )
    mails = site.mails()[mails_before:]
    assert len(mails) == 1
    subject = mails[0]['argv'][mails[0]['argv'].index('-s') + 1]
    assert 'FAILED' in subject and f'{second.folder} (shop)' in subject
    assert str(first.folder) not in subject
    assert 'shop-x.gpg: SHA-256 does not match' in alarm.stderr
    text = metrics.read_text()
    assert f'ppbackup_watch_problems{{tree="{first.folder}"}} 0' in text
    assert f'ppbackup_watch_problems{{tree="{second.folder}"}} 1' in text


def readme_setpriv() -> list[str]:
    """Return the README's cron line for watch as a dedicated user, up to the ppbackup command."""
    text = (REPO / 'README.md').read_text()
    match = re.search(r'root  (/usr/bin/setpriv .*?) /usr/local/bin/ppbackup watch', text)
    assert match, 'the README shows no setpriv line for a dedicated watch user'
    return match.group(1).split()


def test_watch_as_a_dedicated_user_that_is_not_the_receiving_account(
    site: Site, backup_host: tuple[Path, Callable[[str], Host]], tmp_path: Path
) -> None:
    _, make = backup_host
    host, plain = make('site'), make('shop')
    watcher = f'ppbw{secrets.token_hex(4)}'
    sh('useradd', '--system', '--no-create-home', '--user-group', watcher)
    try:
        for each in (host, plain):
            if each is plain:  # the attacker's copy of what the first one holds
                copy = attacker_copy(site, tmp_path)
            send(site, each)
            each.kept.mkdir(mode=0o700)
            shutil.chown(each.kept, watcher, watcher)
        sent = contents(host.incoming / 'backups')
        setpriv = [word.replace('ppb-watch', watcher) for word in readme_setpriv()]
        python = [sys.executable, str(REPO / 'ppbackup.py'), 'watch']
        # As the README says: the capabilities to read what arrived and to make it its own.
        ran = sh(*setpriv, *python, str(host.folder), check=False, env=site.env)
        assert ran.returncode == 0, ran.stderr
        for path in (host.kept / 'backups').rglob('*.gpg'):
            twin = host.incoming / 'backups' / path.relative_to(host.kept / 'backups')
            assert path.stat().st_ino == twin.stat().st_ino  # a link, no extra copy
            assert path.stat().st_uid == pwd.getpwnam(watcher).pw_uid
        assert contents(host.kept / 'backups') == sent
        # The receiving account can no longer rewrite them, even without -no-overwrite.
        host.allow(readme_options().replace(' -no-overwrite', ''))
        rewrite_run(copy)
        inplace = host.push('-a', '--inplace', '--checksum', f'{copy}/backups', f'{host.target}:.')
        assert inplace.returncode != 0 and 'Permission denied' in inplace.stderr
        assert contents(host.kept / 'backups') == sent
        # Without CAP_CHOWN it cannot take a file over: it keeps a checked copy instead.
        no_chown = [word.replace(',+chown', '') for word in setpriv]
        ran = sh(*no_chown, *python, str(plain.folder), check=False, env=site.env)
        assert ran.returncode == 0, ran.stderr
        for path in (plain.kept / 'backups').rglob('*.gpg'):
            twin = plain.incoming / 'backups' / path.relative_to(plain.kept / 'backups')
            assert path.stat().st_ino != twin.stat().st_ino
            assert path.stat().st_uid == pwd.getpwnam(watcher).pw_uid
            assert path.read_bytes() == twin.read_bytes()
        # One copy per inode, however many names it has: a week twin links the day's copy.
        slots = sorted((plain.kept / 'backups').iterdir())
        day = next(slot for slot in slots if slot.name.startswith('day'))
        week = next(slot for slot in slots if slot.name.startswith('wk'))
        twins = [
            (path, week / path.name) for path in day.glob('*.gpg') if (week / path.name).exists()
        ]
        assert twins and all(a.stat().st_ino == b.stat().st_ino for a, b in twins)
    finally:
        sh('userdel', watcher, check=False)
        sh('groupdel', watcher, check=False)


# ---------------------------------------------------------------------------------------------------
# H7: a manifest of the attacker's claims a kept run's files (or its manifest), then expires.
# ---------------------------------------------------------------------------------------------------


def test_H7_a_manifest_claiming_a_kept_runs_names_is_refused_and_never_expires_them(
    site: Site, backup_host: tuple[Path, Callable[[str], Host]], tmp_path: Path
) -> None:
    base, host = sender_kept(site, backup_host)
    week = next(path.name for path in (host.incoming / 'backups').iterdir() if path.name[0] == 'w')
    genuine, _ = one_run(host.kept / 'backups' / week)
    kept_week = contents(host.kept / 'backups' / week)
    outside = canaries(base)
    # The digests are in the web host's own ~/backups: the attacker copies the manifest's lines
    # into one of their own, and names the genuine manifest in another. Another backup name
    # ("evil"), so that neither becomes the newest week run of "assoc".
    evil = tmp_path / 'evil' / 'backups' / week
    evil.mkdir(parents=True)
    files_claim = 'evil-20270101-000000.sha256'
    manifest_claim = 'evil-20270101-000000-1.sha256'
    (evil / files_claim).write_text(genuine.read_text())
    (evil / manifest_claim).write_text(manifest_line(genuine.name, genuine.read_bytes()))
    attack = host.push('-a', f'{tmp_path}/evil/backups', f'{host.target}:.')
    assert attack.returncode == 0, attack.stderr
    alarm = watch(site, host.folder, code=1)
    assert 'FAILED' in alarm.stderr
    claimed = {line.split('  ', 1)[1]: files_claim for line in genuine.read_text().splitlines()}
    claimed[genuine.name] = manifest_claim
    for name, claim in claimed.items():
        said = f'{week}/{name}: named by {claim}, but kept for the run {genuine.name}'
        assert said in alarm.stderr, alarm.stderr
    assert not (host.kept / 'backups' / week / files_claim).exists()
    assert not (host.kept / 'backups' / week / manifest_claim).exists()
    # A later junk run of the same name makes any run of "evil" this week expire after 7 days.
    junk = tmp_path / 'junk' / 'backups' / week
    junk.mkdir(parents=True)
    (junk / 'evil-x.bin').write_bytes(b'junk')
    (junk / 'evil-20270102-000000.sha256').write_text(manifest_line('evil-x.bin', b'junk'))
    assert host.push('-a', f'{tmp_path}/junk/backups', f'{host.target}:.').returncode == 0
    days = ('--max-age', '9999')
    watch(site, host.folder, faketime='+60s', code=1, args=days)  # the claims, again
    for faked in ('+8d', '+10d'):
        again = watch(site, host.folder, faketime=faked, code=1, args=days)
        assert f'named by {files_claim}' in again.stderr
        assert contents(host.kept / 'backups' / week).items() >= kept_week.items()
    assert canaries(base) == outside
    restore_newest(site, host, tmp_path, run=f'backups/{week}/{genuine.name}')


# ---------------------------------------------------------------------------------------------------
# The first-seen record, exported for the key holder beside the runs it kept.
# ---------------------------------------------------------------------------------------------------


def first_seen_export(host: Host) -> dict[str, float]:
    """Return {run: its first_seen} from kept/backups/first-seen.json, checked against the runs
    kept (each listed once, with its manifest's SHA-256) and watch's own state."""
    export = host.kept / 'backups' / 'first-seen.json'
    document = json.loads(export.read_text())
    assert set(document) == {'format', 'version', 'host', 'runs'}
    assert document['format'] == 'ppbackup-first-seen' and document['version'] == 1
    assert document['host'] == os.uname().nodename
    state = json.loads((host.kept / '.ppbackup-watch.json').read_text())['runs']
    kept = sorted(host.kept.glob('backups/*/*.sha256'))
    assert sorted(document['runs']) == sorted(
        str(p.relative_to(host.kept / 'backups')) for p in kept
    )
    for manifest in kept:
        rel = str(manifest.relative_to(host.kept / 'backups'))
        entry = document['runs'][rel]
        assert set(entry) == {'first_seen', 'sha256'}
        assert entry['sha256'] == hashlib.sha256(manifest.read_bytes()).hexdigest()
        assert isinstance(entry['first_seen'], float)
        assert entry['first_seen'] == state[f'backups/{rel}']['first_seen']
        assert export.stat().st_mode & 0o7777 == manifest.stat().st_mode & 0o7777
    assert not list(export.parent.glob('.ppbackup-tmp-*'))
    return {rel: entry['first_seen'] for rel, entry in document['runs'].items()}


def test_watch_exports_the_first_seen_record_of_the_runs_it_keeps(
    site: Site, backup_host: tuple[Path, Callable[[str], Host]], tmp_path: Path
) -> None:
    _, host = sender_kept(site, backup_host)
    first = first_seen_export(host)
    assert len(first) == 2  # the day run and its week twin
    # A run that fails its check is not listed; a later good one is, with its own time.
    junk = tmp_path / 'junk' / 'backups' / 'day8'
    junk.mkdir(parents=True)
    (junk / 'assoc-x.gpg').write_bytes(b'junk')
    (junk / 'assoc-20270101-000000.sha256').write_text(manifest_line('assoc-x.gpg', b'other'))
    assert host.push('-a', f'{tmp_path}/junk/backups', f'{host.target}:.').returncode == 0
    watch(site, host.folder, code=1)
    assert first_seen_export(host) == first
    send(site, host, faketime='+2h')
    watch(site, host.folder, faketime='+2h', code=1)  # the junk, again
    later = first_seen_export(host)
    assert len(later) == 4 and not any('day8' in rel for rel in later)
    assert later.items() >= first.items()
    assert min(later[rel] for rel in later if rel not in first) > max(first.values())


# ---------------------------------------------------------------------------------------------------
# H8: thousands of long names, hundreds of hard links to one big file.
# ---------------------------------------------------------------------------------------------------


def test_H8_a_flood_of_long_names_still_sends_a_bounded_alert_mail(
    site: Site, backup_host: tuple[Path, Callable[[str], Host]], tmp_path: Path
) -> None:
    _, host = sender_kept(site, backup_host)
    kept = contents(host.kept / 'backups')
    evil = tmp_path / 'evil' / 'backups' / 'day8'
    evil.mkdir(parents=True)
    for number in range(700):  # 253 bytes, a backup name of 230 each: 161 kB of names
        name = f'{number:03d}{"n" * 227}-20270101-000000.sha256'
        (evil / name).write_text(manifest_line(f'{number:03d}-missing.gpg', b''))
    attack = host.push('-a', f'{tmp_path}/evil/backups', f'{host.target}:.')
    assert attack.returncode == 0, attack.stderr
    mails_before = len(site.mails())
    alarm = watch(site, host.folder, code=1, args=('--mail', 'a@example.org'))
    assert 'the alert mail could not be sent' not in alarm.stderr, alarm.stderr[-2000:]
    assert alarm.stderr.count('named by the manifest but missing') == 700  # stderr has them all
    mails = site.mails()[mails_before:]
    assert len(mails) == 1
    subject = mails[0]['argv'][mails[0]['argv'].index('-s') + 1]
    assert 'FAILED' in subject and str(host.folder) in subject and 'and 698 more' in subject
    assert len(subject) < 400, subject
    body = mails[0]['body']
    assert len(body) < 20000 and max(map(len, body.splitlines())) < 400
    assert (
        ': 700 problem(s)' in body
        and 'and 680 more' in body
        and f'ppbackup watch --dry-run {host.folder}' in body
    )
    assert contents(host.kept / 'backups') == kept


def test_H8_hundreds_of_hard_links_to_one_file_are_read_once_and_reported(
    site: Site, backup_host: tuple[Path, Callable[[str], Host]], tmp_path: Path
) -> None:
    _, host = sender_kept(site, backup_host)
    kept = contents(host.kept / 'backups')
    evil = tmp_path / 'evil' / 'backups' / 'day8'
    evil.mkdir(parents=True)
    big = os.urandom(4 << 20)
    (evil / 'big.gpg').write_bytes(big)
    names = ['big.gpg', *(f'b{number}.gpg' for number in range(1, 500))]
    for name in names[1:]:
        os.link(evil / 'big.gpg', evil / name)
    (evil / 'evil-20270101-000000.sha256').write_text(
        ''.join(manifest_line(name, big) for name in names)
    )
    attack = host.push('-aH', f'{tmp_path}/evil/backups', f'{host.target}:.')
    assert attack.returncode == 0, attack.stderr
    assert (host.incoming / 'backups' / 'day8' / 'b499.gpg').stat().st_nlink == 500
    # Every read(2) of the watch process, with the name of what it read (strace -y).
    trace = tmp_path / 'strace.txt'
    python = [sys.executable, str(REPO / 'ppbackup.py'), 'watch', str(host.folder)]
    ran = sh('strace', '-f', '-y', '-e', 'trace=read', '-o', str(trace), *python, check=False)
    read = re.findall(
        r'read\(\d+<[^>]*/day8/b?[0-9]*(?:big)?\.gpg>, .*\) = (\d+)', trace.read_text()
    )
    assert read and sum(map(int, read)) == len(big)  # the inode is read once, whole
    assert ran.returncode == 1, ran.stderr
    said = re.findall(r'(day8/\S+\.gpg): one file under (\d+) names in incoming/', ran.stderr)
    assert len(said) == 1 and said[0][1] == '500', ran.stderr[-2000:]
    # The bytes match: kept all the same (links, no copies), and not reported again.
    assert (host.kept / 'backups' / 'day8' / 'b17.gpg').read_bytes() == big
    assert contents(host.kept / 'backups').items() >= kept.items()
    again = watch(site, host.folder)
    assert again.stderr == ''


def test_A7_the_key_holder_restores_by_what_watch_recorded_not_by_the_senders_dates(
    site: Site, backup_host: tuple[Path, Callable[[str], Host]], tmp_path: Path
) -> None:
    """After a break-in the attacker sends runs of its own with later run ids; watch keeps them (they
    pass its check) but records when each arrived: --arrived-before gives the key holder the last
    run from before the break-in, and the restore names when the backup host first saw it."""
    _, host = sender_kept(site, backup_host)
    genuine = first_seen_export(host)
    break_in = max(genuine.values()) + 1800
    # The attacker's run: from the web host's own keyring (public keys only), a later run id.
    send(site, host, faketime='+2h')
    watch(site, host.folder, faketime='+2h')
    assert len(first_seen_export(host)) == 4
    out = tmp_path / 'files'
    when = dt.datetime.fromtimestamp(break_in, dt.timezone.utc).isoformat()
    restored = site.run(
        'restore', str(host.kept / 'backups'), '--arrived-before', when, '--files', str(out),
        '--database', site.pg_db, '--as', f'ppbt_before_{secrets.token_hex(3)}',
        '--gnupghome', str(site.keys.holder),
    )  # fmt: skip
    assert restored.returncode == 0, restored.stdout + restored.stderr
    chosen = restored.stdout.splitlines()[0].removeprefix('restoring ')
    assert Path(chosen).relative_to(host.kept / 'backups').as_posix() in genuine, restored.stdout
    assert 'first seen by the backup host' in restored.stdout
    for line in restored.stdout.splitlines():
        if line.startswith('restored PostgreSQL database '):
            sh('dropdb', '--if-exists', '--force', line.rsplit(' ', 1)[1], check=False)
