"""The sending host, reviewed (FAULTS.md S2-S4, S6, S8-S12; issue 14).

Each test causes its finding for real with the real command: a symlinked folder, a GnuPG home others
can write, a .my.cnf typo that mysqldump echoes back, a closed pipe, a tmpfs without inodes. Where a
finding needs a second local user, the test makes one with a unique name and removes it, even on
failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MAILX_SHIM, REPO, Site, leave_this_second, make_key, sh, wait_no_processes

import ppbackup

# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def other_user() -> Iterator[pwd.struct_passwd]:
    """Make a local user with a unique name (as root); remove it afterwards, even on failure."""
    name = f'ppbt{secrets.token_hex(4)}'
    sh('useradd', '--no-create-home', '--shell', '/usr/sbin/nologin', name)
    try:
        yield pwd.getpwnam(name)
    finally:
        sh('userdel', name, check=False)


def only_files(site: Site, files: str = 'site') -> None:
    """A config with folders only: the database dumps are not what these tests are about."""
    site.write_config(BACKUP_FILES=files, BACKUP_BINARIES=None, BACKUP_PSQL_DB=None)
    site.write_config(BACKUP_MYSQL_DB=None)


def archive_listing(site: Site, tmp_path: Path) -> list[str]:
    """Decrypt the newest files archive as the key holder would; return its member names."""
    newest = max(site.backups.glob('day*/assoc-files-*.gpg'), key=lambda path: path.stat().st_mtime)
    out = tmp_path / f'files-{secrets.token_hex(4)}.tar'
    site.decrypt(newest, out)
    return sh('tar', '-t', '-f', str(out)).stdout.splitlines()


def everything_said(site: Site, *results: subprocess.CompletedProcess[str]) -> str:
    """Every word the tool said: stdout, stderr, every mail (argv and body) and its state file."""
    said = [result.stdout + result.stderr for result in results]
    said += [' '.join(mail['argv']) + mail['body'] for mail in site.mails()]
    state = site.home / 'backups.insecure' / f'assoc{ppbackup.STATE_SUFFIX}'
    said += [state.read_text()] if state.exists() else []
    return '\n'.join(said)


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert 'Traceback' not in result.stderr and 'this is a bug' not in result.stderr, result.stderr
    assert result.returncode != ppbackup.EXIT_BUG


# ---------------------------------------------------------------------------------------------------
# S2: a BACKUP_FILES entry that is a symlink
# ---------------------------------------------------------------------------------------------------


def test_S2_a_symlinked_entry_is_archived_followed_at_the_top_only(
    site: Site, tmp_path: Path
) -> None:
    www = tmp_path / 'srv' / 'www' / 'site'
    (www / 'css').mkdir(parents=True)
    (www / 'index.html').write_text('<h1>the real site</h1>\n')
    (www / 'css' / 'main.css').write_text('body {}\n')
    outside = tmp_path / 'outside'
    outside.mkdir()
    (outside / 'not-configured.txt').write_text('never archived\n')
    (www / 'shared').symlink_to(outside)  # a link inside: archived as a link, never followed
    (site.home / 'public_html').symlink_to(www)
    only_files(site, '"site \'public_html\'"')

    check = site.run('check')
    assert f'public_html: a symlink to {www}' in check.stdout, check.stdout
    result = site.run()
    assert result.returncode == 0, result.stderr
    members = archive_listing(site, tmp_path)
    assert 'public_html/index.html' in members, members
    assert 'public_html/css/main.css' in members
    assert 'public_html/shared' in members  # the inner link itself...
    assert not [name for name in members if 'not-configured' in name]  # ...never its target
    assert 'site/index.php' in members  # an ordinary entry is as before


def test_S2_a_dangling_symlinked_entry_is_a_missing_path(site: Site, tmp_path: Path) -> None:
    (site.home / 'public_html').symlink_to(tmp_path / 'gone')
    only_files(site, 'public_html')
    check = site.run('check')
    assert check.returncode == 1 and 'public_html' in check.stdout, check.stdout
    result = site.run()
    assert result.returncode == 1 and 'public_html' in result.stderr, result.stderr
    assert len(site.mails()) == 1 and 'FAILED' in site.subjects()[0]


# ---------------------------------------------------------------------------------------------------
# S3: the plaintext folder inside what is synced, through a symlinked parent
# ---------------------------------------------------------------------------------------------------


def test_S3_plaintext_folder_inside_the_backups_through_a_symlink_is_refused(site: Site) -> None:
    synced = site.home / 'synced'
    synced.mkdir()
    (site.home / 'private').symlink_to(synced)
    site.write_config(BACKUP_DIR='~/synced', BACKUP_INSECURE_DIR='~/private/plain')
    result = site.run()
    assert result.returncode == 2, result.stderr
    assert 'must be separate folders' in result.stderr
    assert list(synced.iterdir()) == [] and site.mails() == []


# ---------------------------------------------------------------------------------------------------
# S4: a GnuPG home or keyring that others can write
# ---------------------------------------------------------------------------------------------------


def gnupghome(site: Site) -> Path:
    return Path(site.env['GNUPGHOME'])


@pytest.fixture
def open_tree() -> Iterator[Path]:
    """A folder under /tmp that every user can reach (the site fixture's own tree is 0700, where
    nobody else could change anything): for faults that need others to reach what they write."""
    root = Path(tempfile.mkdtemp(prefix='ppbt-open-'))
    root.chmod(0o755)
    yield root
    subprocess.run(['chmod', '-R', 'u+rwX', str(root)], check=False)
    shutil.rmtree(root, ignore_errors=True)


def as_user(user: pwd.struct_passwd, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run a command as ``user``, with the user's own groups."""
    return sh('runuser', '-u', user.pw_name, '--', *argv, check=False)


@pytest.mark.parametrize('how', ['home 777', 'keyring of another user', 'parent 777'])
def test_S4_a_gnupg_home_others_can_change_is_refused(
    site: Site, open_tree: Path, how: str
) -> None:
    only_files(site)
    parent = open_tree / 'home'
    parent.mkdir(mode=0o755)
    home = parent / '.gnupg'
    home.mkdir(mode=0o700)
    for fpr in (site.keys.alice, site.keys.bob):
        sh('gpg', '--homedir', str(home), '--batch', '--import', input=site.keys.public[fpr])
    site.write_config(BACKUP_GNUPGHOME=str(home))
    try:
        with other_user() as intruder:
            if how == 'home 777':
                home.chmod(0o777)
            elif how == 'keyring of another user':
                os.chown(home / 'pubring.kbx', intruder.pw_uid, intruder.pw_gid)
            else:
                parent.chmod(0o777)  # whoever writes here can put another .gnupg in its place
            if how != 'keyring of another user':  # the intruder really can change it
                target = home if how == 'home 777' else parent
                assert as_user(intruder, 'test', '-w', str(target)).returncode == 0
            check = site.run('check')
            result = site.run()
    finally:
        sh('gpgconf', '--homedir', str(home), '--kill', 'all', check=False)
    assert check.returncode == 1
    assert 'FAIL  recipients:' in check.stdout and 'could be changed by others' in check.stdout
    assert result.returncode == 1, result.stderr
    assert 'could be changed by others' in result.stderr
    assert len(site.mails()) == 1 and 'FAILED at keys' in site.subjects()[0]
    assert not list(site.backups.glob('day*/*.gpg'))  # nothing was encrypted to anyone


def test_S4_the_example_config_pins_recipients_by_fingerprint() -> None:
    example = (REPO / 'ppbackup.cfg.example').read_text()
    line = next(line for line in example.splitlines() if line.startswith('BACKUP_GPG_RECIPIENT='))
    words = line.split('=', 1)[1].strip('"').split()
    assert words and all(ppbackup.FINGERPRINT_RE.match(word) for word in words), line


# ---------------------------------------------------------------------------------------------------
# S12: umask 0002 (Debian 13's new users): a group-writable keyring inside a 0700 ~/.gnupg
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class UnixSite:
    """A real site user (umask 0002, its own group) and a real member of that group."""

    user: pwd.struct_passwd
    member: pwd.struct_passwd
    home: Path
    mails: Path
    env: list[str]

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run a command as the site user under umask 0002, as its login shell would."""
        wrapped = ['/bin/sh', '-c', 'umask 0002 && exec "$@"', 'sh', *argv]
        return sh(
            'runuser', '-u', self.user.pw_name, '--', 'env', '-i', *self.env, *wrapped, check=False
        )

    def ppbackup(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run('/usr/bin/python3', str(REPO / 'ppbackup.py'), *args)

    def gpg_import(self, armored: str) -> subprocess.CompletedProcess[str]:
        wrapped = ['/bin/sh', '-c', 'umask 0002 && exec gpg --batch --import']
        return sh(
            'runuser',
            '-u',
            self.user.pw_name,
            '--',
            'env',
            '-i',
            *self.env,
            *wrapped,
            input=armored,
            check=False,
        )

    def member_opens_for_writing(self, path: Path) -> str:
        """As the group member, open ``path`` for writing (nothing is written); return the
        errno's name, or 'opened'."""
        probe = (
            'import errno, os, sys\n'
            'try:\n'
            '    os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND))\n'
            '    print("opened")\n'
            'except OSError as error:\n'
            '    print(errno.errorcode[error.errno])\n'
        )
        ran = as_user(self.member, '/usr/bin/python3', '-c', probe, str(path))
        assert ran.returncode == 0, ran.stderr
        return ran.stdout.strip()


@pytest.fixture
def unix_site(site: Site, open_tree: Path) -> Iterator[UnixSite]:
    """The site fixture's config and files, for a real user with a home in /tmp (0751, as on a
    web host), its own group (useradd's USERGROUPS_ENAB) and a second user in that group."""
    only_files(site)  # no databases: the site user is not a database user here
    name, member_name = f'ppbs{secrets.token_hex(3)}', f'ppbm{secrets.token_hex(3)}'
    (open_tree / 'home').mkdir(mode=0o755)
    home = open_tree / 'home' / name
    sh(
        'useradd',
        '--create-home',
        '--home-dir',
        str(home),
        '--user-group',
        '--shell',
        '/bin/sh',
        name,
    )
    try:
        user = pwd.getpwnam(name)
        sh(
            'useradd',
            '--no-create-home',
            '--shell',
            '/usr/sbin/nologin',
            '--groups',
            name,
            member_name,
        )
        member = pwd.getpwnam(member_name)
        home.chmod(0o751)
        shims, mails = open_tree / 'shims', open_tree / 'mails'
        shims.mkdir(mode=0o755)
        mails.mkdir(mode=0o700)
        os.chown(mails, user.pw_uid, user.pw_gid)
        (shims / 'mailx').write_text(MAILX_SHIM.replace('PYTHON', '/usr/bin/python3'))
        (shims / 'mailx').chmod(0o755)
        shutil.copytree(site.home / 'site', home / 'site')
        config = site.cfg.read_text().replace(str(site.remote), str(home / 'remote'))
        (home / 'ppbackup.cfg').write_text(config)
        (home / 'ppbackup.cfg').chmod(0o600)  # as the README says
        sh('chown', '-R', f'{name}:{name}', str(home))
        env = [
            f'HOME={home}',
            f'USER={name}',
            f'LOGNAME={name}',
            f'MAILX_DIR={mails}',
            f'PATH={shims}:/usr/bin:/bin',
            'LANG=C.UTF-8',
        ]
        yield UnixSite(user, member, home, mails, env)
    finally:
        sh('runuser', '-u', name, '--', 'gpgconf', '--kill', 'all', check=False)
        for _ in range(3):  # what the user left running, by process id
            pids = sh('pgrep', '-u', name, check=False).stdout.split()
            if pids:
                sh('kill', '-KILL', *pids, check=False)
                wait_no_processes(name)  # userdel refuses a user who still runs something
            if sh('userdel', member_name, check=False).returncode in (0, 6) and sh(
                'userdel', name, check=False
            ).returncode in (0, 6):
                break


def extended(key_home: Path, fingerprint: str) -> str:
    """A routine key refresh: the key holder extends the key (and its subkey); return it."""
    sh('gpg', '--homedir', str(key_home), '--batch', '--quick-set-expire', fingerprint, '2y')
    sh('gpg', '--homedir', str(key_home), '--batch', '--quick-set-expire', fingerprint, '2y', '*')
    return sh('gpg', '--homedir', str(key_home), '--armor', '--export', fingerprint).stdout


def test_S12_a_keyring_imported_under_umask_0002_passes_check_and_runs(
    site: Site, unix_site: UnixSite, tmp_path: Path
) -> None:
    key_home = tmp_path / 'holder-s12'
    key_home.mkdir(mode=0o700)
    fingerprint = make_key(key_home, 'S12 <s12@example.org>', expire='1y')
    armored = sh('gpg', '--homedir', str(key_home), '--armor', '--export', fingerprint).stdout
    config = unix_site.home / 'ppbackup.cfg'
    text = site.cfg.read_text().replace(str(site.remote), str(unix_site.home / 'remote'))
    config.write_text(text.replace(f'"{site.keys.alice} {site.keys.bob}"', fingerprint))
    os.chown(config, unix_site.user.pw_uid, unix_site.user.pw_gid)
    imported = unix_site.gpg_import(armored)
    assert imported.returncode == 0, imported.stderr
    gnupg, keyring = unix_site.home / '.gnupg', unix_site.home / '.gnupg' / 'pubring.kbx'
    assert stat.S_IMODE(gnupg.stat().st_mode) == 0o700
    assert stat.S_IMODE(keyring.stat().st_mode) == 0o664  # the fault, for real
    # The member of the site's group cannot change it: ~/.gnupg lets no group in.
    assert unix_site.member_opens_for_writing(keyring) == 'EACCES'
    check = unix_site.ppbackup('check')
    assert check.returncode == 0, check.stdout + check.stderr
    first = unix_site.ppbackup()
    assert first.returncode == 0, first.stderr
    refreshed = unix_site.gpg_import(extended(key_home, fingerprint))
    assert refreshed.returncode == 0 and 'new signatures: 2' in refreshed.stderr, refreshed.stderr
    assert stat.S_IMODE(keyring.stat().st_mode) == 0o664
    assert unix_site.member_opens_for_writing(keyring) == 'EACCES'
    leave_this_second()  # the next run in another second (rsync compares whole seconds)
    again = unix_site.ppbackup()
    assert again.returncode == 0, again.stderr
    mails = sorted(unix_site.mails.glob('mail-*.json'))
    assert len(mails) == 2 and all('succeeded' in path.read_text() for path in mails)
    (archive,) = unix_site.home.glob('backups/day*/assoc-files-*.gpg')  # one a day
    decrypted = subprocess.run(
        ['gpg', '--homedir', str(key_home), '--batch', '--decrypt', str(archive)],
        capture_output=True,
        check=False,
    )
    assert decrypted.returncode == 0 and decrypted.stdout, decrypted.stderr  # to the refreshed key
    sh('gpgconf', '--homedir', str(key_home), '--kill', 'all', check=False)


@pytest.mark.parametrize('mode', [0o750, 0o770], ids=['gnupg 750', 'gnupg 770'])
def test_S12_a_keyring_a_group_member_can_reach_is_refused_naming_the_group(
    site: Site, unix_site: UnixSite, mode: int
) -> None:
    for fingerprint in (site.keys.alice, site.keys.bob):
        imported = unix_site.gpg_import(site.keys.public[fingerprint])
        assert imported.returncode == 0, imported.stderr
    gnupg, keyring = unix_site.home / '.gnupg', unix_site.home / '.gnupg' / 'pubring.kbx'
    assert unix_site.ppbackup('check').returncode == 0  # safe while ~/.gnupg is 0700
    gnupg.chmod(mode)
    assert stat.S_IMODE(keyring.stat().st_mode) == 0o664
    assert unix_site.member_opens_for_writing(keyring) == 'opened'  # the member really can
    group = unix_site.user.pw_name
    check = unix_site.ppbackup('check')
    assert check.returncode == 1, check.stdout
    said = (
        f'{keyring} is writable by group {group} (mode 664) and members of group {group} can '
        f'reach it through {gnupg} (mode {mode:o}): chmod g-w {keyring}'
    )
    assert 'FAIL  recipients:' in check.stdout and said in check.stdout, check.stdout
    if mode == 0o770:  # the folder itself: a member could put another keyring in its place
        assert f'{gnupg} is writable by group {group} (mode 770)' in check.stdout
    result = unix_site.ppbackup()
    assert result.returncode == 1 and said in result.stderr, result.stderr
    mails = [json.loads(path.read_text()) for path in unix_site.mails.glob('mail-*.json')]
    assert len(mails) == 1 and 'FAILED at keys' in ' '.join(mails[0]['argv'])
    assert not list(unix_site.home.glob('backups/day*/*.gpg'))  # nothing was encrypted


# ---------------------------------------------------------------------------------------------------
# S6: passwords echoed back, and passwords in a database name
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def my_cnf(site: Site) -> Iterator[Path]:
    """The site's ~/.my.cnf, removed before the site drops its databases (with mysql, which would
    read it too)."""
    path = site.home / '.my.cnf'
    yield path
    path.unlink(missing_ok=True)


def test_S6_a_my_cnf_typo_echoed_by_mysqldump_is_masked_everywhere(
    site: Site, my_cnf: Path
) -> None:
    secret = 'Sekret-' + secrets.token_hex(6)
    my_cnf.write_text(f'[client]\npasword={secret}\n')  # sic: the typo mysqldump echoes back
    my_cnf.chmod(0o600)
    site.write_config(BACKUP_PSQL_DB=None, BACKUP_FILES=None, BACKUP_BINARIES=None)
    result = site.run()
    check = site.run('check')
    status = site.run('status')
    assert result.returncode == 1 and check.returncode == 1
    assert 'unknown variable' in result.stderr  # the useful part of the message stays
    assert 'FAILED at dump mysql' in site.subjects()[0]
    assert secret not in everything_said(site, result, check, status)


def test_S6_using_password_yes_is_not_masked_but_the_password_is(site: Site, my_cnf: Path) -> None:
    user, secret = f'ppbt_h14_{secrets.token_hex(4)}', 'Sekret-' + secrets.token_hex(6)
    # A real account, so that the server answers "(using password: YES)" whatever other accounts
    # exist; the password given is the wrong one.
    sh('mysql', '-e', f"CREATE USER '{user}'@'localhost' IDENTIFIED BY 'right-{secret}'")
    try:
        my_cnf.write_text(f'[client]\nuser={user}\npassword={secret}\n')
        my_cnf.chmod(0o600)
        site.write_config(BACKUP_PSQL_DB=None)
        check = site.run('check')
    finally:
        my_cnf.unlink(missing_ok=True)  # or this mysql would log in as that user too
        sh('mysql', '-e', f"DROP USER IF EXISTS '{user}'@'localhost'")
    assert check.returncode == 1
    assert '(using password: YES)' in check.stdout, check.stdout
    assert secret not in check.stdout + check.stderr


@pytest.mark.parametrize('shape', ['keywords', 'uri'])
def test_S6_a_connection_string_as_database_name_is_refused(site: Site, shape: str) -> None:
    secret = 'Sekret' + secrets.token_hex(6)
    name = (
        f"'dbname={site.pg_db} password={secret}'"
        if shape == 'keywords'
        else f'postgresql://postgres:{secret}@localhost/{site.pg_db}'
    )
    site.write_config(BACKUP_PSQL_DB=name)
    result = site.run()
    check = site.run('check')
    for refused in (result, check):
        assert refused.returncode == 2, refused.stderr
        assert 'a connection string is not a database name' in refused.stderr
    assert secret not in everything_said(site, result, check)
    assert not site.backups.exists() and site.mails() == []


# ---------------------------------------------------------------------------------------------------
# S8: check runs the run's own checks
# ---------------------------------------------------------------------------------------------------


def test_S8_a_recipient_named_twice_passes_check_and_the_run(site: Site) -> None:
    only_files(site)
    alice = site.keys.alice
    site.write_config(BACKUP_GPG_RECIPIENT=f'"{alice} 0x{alice.lower()} {site.keys.bob}"')
    check = site.run('check')
    assert check.returncode == 0, check.stdout
    assert 'same key' in check.stdout
    result = site.run()
    assert result.returncode == 0, result.stderr
    assert 'WARNING' in site.subjects()[0] and 'same key' in site.mails()[0]['body']


def test_S8_check_fails_where_the_run_fails_on_a_pgpass_others_can_read(site: Site) -> None:
    pgpass = site.home / '.pgpass'
    pgpass.write_text('*:*:*:*:not-used\n')
    pgpass.chmod(0o644)
    check = site.run('check')
    assert check.returncode == 1, check.stdout
    assert f'FAIL  credentials: {pgpass} is readable by group or others' in check.stdout
    result = site.run()
    assert result.returncode == 1 and '.pgpass' in result.stderr


def test_S8_check_and_the_run_refuse_a_pgpass_another_user_owns(site: Site) -> None:
    pgpass = site.home / '.pgpass'
    pgpass.write_text('*:*:*:*:not-used\n')
    pgpass.chmod(0o600)
    with other_user() as owner:
        os.chown(pgpass, owner.pw_uid, owner.pw_gid)
        check = site.run('check')
        result = site.run()
        os.chown(pgpass, 0, 0)
    said = f'{pgpass} is owned by uid {owner.pw_uid}, not by this user'
    assert check.returncode == 1 and f'FAIL  credentials: {said}' in check.stdout, check.stdout
    assert result.returncode == 1 and said in result.stderr, result.stderr


def test_S8_a_folder_others_can_write_above_the_backups_is_refused(
    site: Site, open_tree: Path
) -> None:
    only_files(site)
    shared = open_tree / 'shared'
    shared.mkdir()
    shared.chmod(0o777)  # reachable from /: whoever writes here can swap backups/ for their own
    (shared / 'backups').mkdir(mode=0o700)
    site.write_config(BACKUP_DIR=str(shared / 'backups'))
    check = site.run('check')
    result = site.run()
    said = f'{shared} is writable by group or others (group root, mode 777) and'
    assert check.returncode == 1 and 'FAIL  folders: ' + said in check.stdout, check.stdout
    assert result.returncode == 1 and said in result.stderr, result.stderr
    assert 'FAILED at prepare' in site.subjects()[0]
    shared.chmod(0o1777)  # sticky, as /tmp: others cannot rename or remove what is ours
    assert site.run('check').returncode == 0


# ---------------------------------------------------------------------------------------------------
# S9: every failure after the config is read is mailed
# ---------------------------------------------------------------------------------------------------


def test_S9_an_insecure_folder_that_is_a_symlink_fails_with_a_mail(
    site: Site, tmp_path: Path
) -> None:
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    (site.home / 'backups.insecure').symlink_to(elsewhere)
    result = site.run()
    assert_no_traceback(result)
    assert result.returncode == 1 and 'symlink' in result.stderr
    assert len(site.mails()) == 1 and 'FAILED at prepare' in site.subjects()[0]
    assert list(elsewhere.iterdir()) == []  # no lock, no state, no plaintext went there
    check = site.run('check')
    assert check.returncode == 1 and 'FAIL  folders:' in check.stdout


def test_S9_an_insecure_folder_owned_by_another_user_fails_with_a_mail(site: Site) -> None:
    folder = site.home / 'backups.insecure'
    folder.mkdir(mode=0o700)
    with other_user() as owner:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        result = site.run()
        check = site.run('check')
        os.chown(folder, 0, 0)
    assert_no_traceback(result)
    assert result.returncode == 1 and f'owned by uid {owner.pw_uid}' in result.stderr
    assert len(site.mails()) == 1 and 'FAILED at prepare' in site.subjects()[0]
    assert check.returncode == 1 and 'FAIL  folders:' in check.stdout


def test_S9_no_inode_left_for_the_lock_fails_with_a_mail(site: Site, mounts: list[Path]) -> None:
    folder = site.home / 'backups.insecure'
    folder.mkdir(mode=0o700)
    sh('mount', '-t', 'tmpfs', '-o', 'size=1m,nr_inodes=8,mode=0700', 'tmpfs', str(folder))
    mounts.append(folder)
    with pytest.raises(OSError) as full:  # use up every inode
        for number in range(100):
            (folder / f'filler-{number}').touch()
    assert full.value.errno == errno.ENOSPC
    result = site.run()
    assert_no_traceback(result)
    assert result.returncode == 1 and 'lock' in result.stderr, result.stderr
    assert len(site.mails()) == 1 and 'FAILED at lock' in site.subjects()[0]
    assert not site.backups.exists()


def test_S9_expired_plaintext_that_cannot_be_removed_fails_with_a_mail(
    site: Site, mounts: list[Path]
) -> None:
    first = site.run()
    assert first.returncode == 0, first.stderr
    before = site.snapshot(site.backups, site.remote)
    two_days_ago = time.time() - 48 * 3600
    for path in site.latest.iterdir():
        os.utime(path, (two_days_ago, two_days_ago))
    # The disk under latest/ went read-only: the 24-hour bound cannot be kept, and must be told.
    sh('mount', '--bind', str(site.latest), str(site.latest))
    mounts.append(site.latest)
    sh('mount', '-o', 'remount,bind,ro', str(site.latest))
    mails = len(site.mails())
    result = site.run()
    assert_no_traceback(result)
    assert result.returncode == 1, result.stderr
    assert 'cannot remove plaintext older than 24 hours' in result.stderr
    assert 'Read-only file system' in result.stderr
    assert len(site.mails()) == mails + 1
    assert 'FAILED at expire plaintext' in site.subjects()[-1]
    assert site.snapshot(site.backups, site.remote) == before  # nothing else was touched
    for command in ('status', 'verify'):  # the same sentence, exit 1, no traceback
        other = site.run(command)
        assert_no_traceback(other)
        assert other.returncode == 1 and 'cannot remove plaintext' in other.stderr, other.stderr


# ---------------------------------------------------------------------------------------------------
# S10: BACKUP_FILES=. never archives the tool's own folders
# ---------------------------------------------------------------------------------------------------


def test_S10_backing_up_home_leaves_out_the_backups_themselves(site: Site, tmp_path: Path) -> None:
    mirror = site.home / 'mirror'  # a local remote inside $HOME is also the tool's own
    only_files(site, '.')
    site.write_config(BACKUP_REMOTE=str(mirror))
    for _ in range(2):  # the second run finds slots, plaintext and a mirror to leave out
        result = site.run()
        assert result.returncode == 0, result.stderr
    members = archive_listing(site, tmp_path)
    assert './site/index.php' in members, members
    own = [
        name
        for name in members
        if name.startswith(('./backups/', './backups.insecure/', './mirror/'))
    ]
    assert own == []


# ---------------------------------------------------------------------------------------------------
# S11: broken pipes, NUL bytes, bad shells, huge numbers, a BOM, a huge manifest
# ---------------------------------------------------------------------------------------------------


def test_S11_status_into_a_closed_pipe_ends_quietly(site: Site) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `ppbackup status | head -1` once head has gone
    try:
        result = subprocess.run(
            [sys.executable, str(REPO / 'ppbackup.py'), 'status'],
            env=site.env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ''


@pytest.mark.parametrize('key', ['BACKUP_ADMIN_EMAILS', 'BACKUP_REMOTE'])
def test_S11_a_nul_byte_in_a_value_is_refused_naming_the_line(site: Site, key: str) -> None:
    site.write_config()
    lines = site.cfg.read_bytes().splitlines(keepends=True)
    number = next(n for n, line in enumerate(lines, 1) if line.startswith(key.encode()))
    lines[number - 1] = lines[number - 1].rstrip(b'\n') + b'\0x\n'
    site.cfg.write_bytes(b''.join(lines))
    result = site.run()
    assert_no_traceback(result)
    assert result.returncode == 2
    assert f'ppbackup.cfg:{number}: a control character' in result.stderr
    assert not site.backups.exists() and site.mails() == []


def test_S11_an_empty_rsync_rsh_means_ssh(site: Site) -> None:
    site.write_config(BACKUP_REMOTE='backup@127.0.0.1:ppbackup')
    result = site.run('run', '--dry-run', extra_env={'RSYNC_RSH': ''})
    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert "-e 'ssh -o BatchMode=yes" in result.stdout


def test_S11_an_unbalanced_rsync_rsh_fails_before_any_dump_with_a_mail(site: Site) -> None:
    site.write_config(BACKUP_REMOTE='backup@127.0.0.1:ppbackup')
    result = site.run(extra_env={'RSYNC_RSH': "ssh -o 'ProxyCommand=x"})
    assert_no_traceback(result)
    assert result.returncode == 1 and 'RSYNC_RSH' in result.stderr
    assert len(site.mails()) == 1 and 'FAILED at prepare' in site.subjects()[0]
    assert not list(site.backups.glob('day*/*'))


@pytest.mark.parametrize(
    'key, value',
    [
        ('BACKUP_DUMP_TIMEOUT', '99999999999'),
        ('BACKUP_SYNC_TIMEOUT', '9' * 5000),
        ('BACKUP_LIMIT_MB', '99999999999999999999'),
        ('BACKUP_SYNC_BWLIMIT', '99999999999999999999'),
    ],
    ids=['timer overflow', '5000 digits', 'limit', 'bandwidth'],
)
def test_S11_numbers_are_bounded(site: Site, key: str, value: str) -> None:
    site.write_config(**{key: value})
    result = site.run()
    assert_no_traceback(result)
    assert result.returncode == 2
    assert f'{key}: at most' in result.stderr
    assert not site.backups.exists() and site.mails() == []


def test_S11_a_config_with_a_byte_order_mark_is_read(site: Site) -> None:
    site.write_config()
    site.cfg.write_bytes(b'\xef\xbb\xbf' + site.cfg.read_bytes())
    config = ppbackup.load_config(site.cfg)
    assert config.name == 'assoc'


def peak_memory_kib(site: Site, *args: str) -> int:
    """Run the real command; return the peak resident memory of it and its children, in KiB."""
    measure = (
        'import resource, subprocess, sys\n'
        'subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n'
        'print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n'
    )
    argv = [sys.executable, '-c', measure, sys.executable, str(REPO / 'ppbackup.py'), *args]
    return int(subprocess.run(argv, env=site.env, capture_output=True, text=True).stdout)


def test_S11_a_huge_manifest_is_read_in_bounded_memory(site: Site) -> None:
    only_files(site)
    assert site.run().returncode == 0
    slot = next(site.backups.glob('day*'))
    line = b'%s  assoc-files-%%07d.tar.zst.gpg\n' % (b'0' * 64)
    with open(slot / 'assoc-00000000-000000.sha256', 'wb') as handle:  # about 48 MiB
        for start in range(0, 500_000, 10_000):
            handle.write(b''.join(line % number for number in range(start, start + 10_000)))
    for command in ('status', 'verify'):
        peak = peak_memory_kib(site, command)
        assert 0 < peak < 120 * 1024, f'{command} took {peak // 1024} MiB'
    verify = site.run('verify')
    assert verify.returncode == 1
    assert 'not a manifest ppbackup wrote' in verify.stdout


# ---------------------------------------------------------------------------------------------------
# A local-folder remote whose parent is missing: a sentence with the mkdir, not rsync's change_dir#3
# ---------------------------------------------------------------------------------------------------


def test_a_local_remote_without_its_parent_is_named_with_the_mkdir(site: Site) -> None:
    only_files(site)
    parent = site.root / 'mnt' / 'usb'
    site.write_config(BACKUP_REMOTE=str(parent / 'backups'))
    expected = (
        f'BACKUP_REMOTE {parent / "backups"} is a local folder whose parent {parent} does not '
        f'exist: make it with mkdir -p {parent}'
    )
    check = site.run('check')
    assert check.returncode == 1 and f'FAIL  remote: {expected}' in check.stdout, check.stdout
    assert 'change_dir' not in check.stdout
    result = site.run()
    assert_no_traceback(result)
    assert result.returncode == 1 and expected in result.stderr, result.stderr
    assert 'change_dir' not in result.stderr
    assert len(site.mails()) == 1 and 'FAILED at sync' in site.subjects()[0]
    assert expected in site.mails()[0]['body']
    # A remote that is gone tonight still leaves tonight's backup in the local slots (T1).
    assert list(site.backups.glob('day*/*.sha256'))
    parent.mkdir(parents=True)  # as the sentence says: then check and the run pass
    assert site.run('check').returncode == 0
    assert site.run().returncode == 0
    assert list((parent / 'backups').rglob('*.gpg'))
