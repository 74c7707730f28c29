"""The README's "Set up for real", walked as written, in order, as the users it names.

Every code block marked ``<!-- walk: USER -->`` in README.md is run, in the README's order, by a
real Unix user made for this test: root, the site user, the key holder. Between the blocks the test
does only what the README leaves to people or to other sections: it carries the public key and the
ssh key between machines, plays the backup host (a loopback sshd with the receiving account's
forced command: the README's own line, read from it), runs the backup host's ``ppbackup watch`` as
root, seeds the site's data, reads the fingerprints out, and copies what watch kept to the key
holder. cron's run is the crontab's own line, run as cron runs it (``env -i``, cron's PATH).

Only these words of the README's commands are changed, all of them names and places:
- ``apt-get install -y PKGS`` becomes ``dpkg-query -W PKGS``: the packages must be installed (CI
  installs them); the test neither reaches the network nor takes the shared apt lock;
- ``/usr/local/bin/`` is a folder of the test's own (the machine is shared);
- the user names ``site``, ``treasurer`` and ``recv-site``, the database names, the backup host's
  name and port, the placeholder fingerprint and the admin's address become unique or real values.

Each user's commands, and cron's run, get the umask a login gives that user here (``su -``'s PAM
session: 0002 on Debian 13, 0022 on Debian 12): under 0002 the site's ``gpg --import`` leaves its
keyring 0664 inside a 0700 ~/.gnupg, and the README's commands must work as written all the same.

The key holder's key has a passphrase; gpg-agent asks for it through a scripted pinentry (the one
fake: a person typing it).
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from conftest import REPO, psql, scripted_pinentry, sh, wait_no_processes
from sshd import start_sshd, write_only_options

PASSPHRASE = 'Tr3asurer pass phrase'
CRON_PATH = '/usr/bin:/bin'  # what cron gives a job
WALK_RE = re.compile(r'<!-- walk: ([a-z-]+) -->\n```sh\n(.*?)```\n', re.S)
README_FINGERPRINT = '0123456789ABCDEF0123456789ABCDEF01234567'


def readme_steps() -> list[tuple[str, str]]:
    """Return the README's walked blocks as (user, script), in the README's order."""
    return WALK_RE.findall((REPO / 'README.md').read_text(encoding='utf-8'))


@dataclasses.dataclass
class World:
    root: Path  # everything the test makes on disk, traversable by its users
    prefix: Path  # stands in for /usr/local/bin
    site: str
    holder: str
    recv: str
    pg_db: str
    restored_db: str
    homes: dict[str, Path]
    words: dict[str, str] = dataclasses.field(default_factory=dict)
    umasks: dict[str, int] = dataclasses.field(default_factory=dict)  # each user's login umask

    def adapt(self, script: str) -> str:
        """Given a README block, return it with the names and places of this machine."""
        script = re.sub(r'apt-get install -y ', 'dpkg-query -W ', script)
        script = script.replace('/usr/local/bin/', f'{self.prefix}/')
        for word, value in self.words.items():
            script = re.sub(rf'(?<![\w-]){re.escape(word)}(?![\w])', value, script)
        return script

    def run_as(self, user: str, script: str, cwd: Path | None = None) -> str:
        """Run a script with bash -e as ``user`` (root: this process) in a login-like, minimal
        environment; return its output. Fail the test with the output if it fails."""
        home = self.homes.get(user, Path('/root'))
        path = f'{self.prefix}:/usr/bin:/bin' + (':/usr/sbin:/sbin' if user == 'root' else '')
        env = [
            'env',
            '-i',
            f'HOME={home}',
            f'USER={user}',
            f'LOGNAME={user}',
            'SHELL=/bin/bash',
            f'PATH={path}',
            'LANG=C.UTF-8',
        ]
        argv = [*env, 'bash', '-euo', 'pipefail', '-c', script]
        if user != 'root':
            argv = ['runuser', '-u', user, '--', *argv]
        result = subprocess.run(
            argv,
            cwd=cwd or home,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            start_new_session=True,  # no controlling terminal, as under cron or a remote shell
            umask=self.umasks.get(user, -1),  # what a login gives the user (root: ours)
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, (
            f'as {user}:\n{script}\n--- exit {result.returncode}:\n{output}'
        )
        return output


def make_user(name: str, home: Path) -> None:
    # '*' rather than useradd's '!': sshd without PAM refuses a locked account even for a key.
    sh('useradd', '--create-home', '--home-dir', str(home), '--shell', '/bin/bash', '-p', '*', name)


def login_umask(name: str) -> int:
    """Return the umask a login session gives ``name`` here: ``su -`` runs PAM's session stack, as
    a terminal, ssh or cron does. Debian 13 has pam_umask there and USERGROUPS_ENAB, so a user
    with its own group gets 0002; Debian 12 has no pam_umask (0022). ``runuser`` has neither."""
    return int(sh('su', '-', name, '-c', 'umask').stdout.split()[-1], 8)


def remove_user(name: str) -> None:
    """Stop what the user left running (by process id), then remove the user and its crontab."""
    sh('runuser', '-u', name, '--', 'gpgconf', '--kill', 'all', check=False)
    sh('crontab', '-r', '-u', name, check=False)
    for _ in range(3):
        pids = sh('pgrep', '-u', name, check=False).stdout.split()
        if pids:
            sh('kill', '-KILL', *pids, check=False)
            wait_no_processes(name)  # userdel refuses a user who still runs something
        if sh('userdel', name, check=False).returncode in (0, 6):  # 6: no such user
            break
    Path('/var/mail', name).unlink(missing_ok=True)


@pytest.fixture
def world() -> Iterator[World]:
    suffix = secrets.token_hex(3)
    root = Path(tempfile.mkdtemp(prefix='ppbt-walk-'))
    root.chmod(0o755)  # the test's users must reach their homes and the install below
    prefix = root / 'usr-local-bin'
    prefix.mkdir(mode=0o755)
    site, holder, recv = f'ppbts{suffix}', f'ppbtk{suffix}', f'ppbtr{suffix}'
    homes = {user: root / 'home' / user for user in (site, holder, recv)}
    (root / 'home').mkdir(mode=0o755)
    the_world = World(
        root, prefix, site, holder, recv, f'ppbt_pg_{suffix}', f'ppbt_pg_{suffix}_r', homes
    )
    made: list[str] = []
    try:
        for user in (site, holder, recv):
            make_user(user, homes[user])
            made.append(user)
            the_world.umasks[user] = login_umask(user)
        yield the_world
    finally:
        for db in (the_world.restored_db, the_world.pg_db):
            sh('dropdb', '--if-exists', '--force', '--', db, check=False)
        for role in (site, holder):
            psql('postgres', f'DROP ROLE IF EXISTS "{role}"')
        for user in made:
            remove_user(user)
        shutil.rmtree(root, ignore_errors=True)


def test_the_readme_setup_walked_as_written_from_install_to_a_restore(world: World) -> None:
    steps = readme_steps()
    users = [user for user, _ in steps]
    assert users[:2] == ['root', 'root'] and 'site' in users and 'treasurer' in users
    site_home, holder_home = world.homes[world.site], world.homes[world.holder]

    # The key holder's gpg-agent asks for the passphrase through the scripted pinentry.
    pinentry = world.root / 'pinentry-scripted'
    pinentry.write_text(scripted_pinentry(PASSPHRASE))
    pinentry.chmod(0o755)
    world.run_as(
        world.holder,
        f'mkdir -m 700 ~/.gnupg && echo "pinentry-program {pinentry}" > ~/.gnupg/gpg-agent.conf',
    )

    with start_sshd(world.root / 'backuphost') as backup_host:
        # The sender's folder on the backup host, as README "A write-only remote" makes it:
        # root's, with the receiving account's incoming/ (0700) inside.
        srv = world.root / 'srv' / 'ppbackup' / 'site'
        (srv / 'incoming').mkdir(parents=True)
        for folder in (srv.parent, srv):
            folder.chmod(0o755)
        sh('chown', f'{world.recv}:', str(srv / 'incoming'))
        (srv / 'incoming').chmod(0o700)
        for path in (backup_host.folder, backup_host.authorized_keys):
            path.chmod(0o755 if path.is_dir() else 0o644)
        world.words = {
            'recv-site': world.recv,
            'members_restored': world.restored_db,
            'members': world.pg_db,
            'site': world.site,
            'treasurer': world.holder,
            'backup.example.org': '127.0.0.1',
            'admin@example.org': f'{world.site}@localhost',
        }
        host_fingerprint = sh('ssh-keygen', '-lf', f'{backup_host.folder}/host_ed25519_key.pub')
        fingerprint = ''
        ran_cron = False
        for user, block in steps:
            script = world.adapt(block)
            script = re.sub(r'(-p |Port )22\b', rf'\g<1>{backup_host.port}', script)
            script = script.replace(README_FINGERPRINT, fingerprint or README_FINGERPRINT)
            if user == 'treasurer' and 'ppbackup decrypt' in script:
                # The key holder fetches a copy (README "Restore, as a key holder").
                before_decrypt(world, srv, ran_cron)
            who = {'root': 'root', 'site': world.site, 'treasurer': world.holder}[user]
            output = world.run_as(who, script, cwd=REPO if user == 'root' else None)

            if 'createdb -O' in script:  # the site's application fills its database
                seed_site(world)
            if user == 'treasurer' and '--quick-generate-key' in script:
                # The key really has a passphrase: without it, gpg cannot export the secret key.
                unlocked = world.run_as(
                    world.holder,
                    "{ gpg --batch --pinentry-mode loopback --passphrase '' --export-secret-keys"
                    ' || true; } | wc -c',
                )
                assert unlocked.split()[0] == '0', unlocked
                # Read out by phone: the fingerprint gpg printed, in groups of four.
                groups = re.search(r'((?:[0-9A-F]{4}\s+){9}[0-9A-F]{4})', output)
                assert groups, output
                fingerprint = re.sub(r'\s+', '', groups.group(1))
                # ... and the public key sent by mail.
                shutil.copy(holder_home / f'{world.holder}.asc', site_home)
                sh('chown', world.site, str(site_home / f'{world.holder}.asc'))
            if user == 'site' and 'ssh-keygen -q' in script:
                # The backup host's admin gives the site's key the forced command (README
                # "A write-only remote").
                site_key = (site_home / '.ssh' / 'id_ed25519.pub').read_text().strip()
                assert site_key in output  # "Send that line to the backup host's admin"
                # "A write-only remote": the README's forced command, word for word.
                options = write_only_options(srv / 'incoming')
                backup_host.authorized_keys.write_text(f'{options} {site_key}\n')
            if user == 'site' and 'ssh-keyscan' in script:
                # Compared with what the backup host's admin read out.
                assert host_fingerprint.stdout.split()[1] in output, output
            if user == 'site' and 'ppbackup check' in script:
                assert '\nall is well\n' in output and 'FAIL' not in output, output
                assert fingerprint in output
            if user == 'site' and 'crontab -' in script:
                run_like_cron(world)
                watch_like_cron(world, srv)
                ran_cron = True
        assert fingerprint and ran_cron

    # The non-superuser's restore holds every row of the original, owned by the key holder.
    for query in ('SELECT * FROM members ORDER BY id', 'SELECT * FROM notes'):
        assert psql(world.restored_db, query) == psql(world.pg_db, query)
    query = 'SELECT * FROM members ORDER BY id'
    assert 'Ada Lovelace' in psql(world.restored_db, query)
    owner = psql(world.restored_db, "SELECT tableowner FROM pg_tables WHERE tablename='members'")
    assert owner.strip() == world.holder
    superuser = psql('postgres', f"SELECT rolsuper FROM pg_roles WHERE rolname='{world.holder}'")
    assert superuser.strip() == 'f'


def seed_site(world: World) -> None:
    """The site's application: a table owned by the site's role, a grant, and a folder of files."""
    sql = (
        'CREATE TABLE members (id integer PRIMARY KEY, name text);'
        "INSERT INTO members VALUES (1, 'Ada Lovelace'), (2, 'Grace Hopper');"
        'GRANT SELECT ON members TO PUBLIC;'
        # A row that starts its line in the dump like a statement the restore leaves out.
        'CREATE TABLE notes (body text);'
        "INSERT INTO notes VALUES ('GRANT ALL ON members TO PUBLIC;');"
    )
    world.run_as(
        world.site,
        f'psql -X -q -v ON_ERROR_STOP=1 -d {world.pg_db} -c "{sql}" && mkdir www && '
        'echo "<h1>our site</h1>" > www/index.html',
    )


def run_like_cron(world: World) -> None:
    """Run the site's crontab job as cron would: its own variables, PATH=/usr/bin:/bin, sh -c."""
    crontab = sh('crontab', '-l', '-u', world.site).stdout
    variables = dict(re.findall(r'^([A-Z]+)=(.*)$', crontab, re.M))
    jobs = [line for line in crontab.splitlines() if re.match(r'^[0-9*]', line)]
    assert len(jobs) == 1, crontab
    command = jobs[0].split(None, 5)[5]
    assert command.startswith(str(world.prefix) + '/'), 'cron needs the full path'
    home = world.homes[world.site]
    env = [f'HOME={home}', f'LOGNAME={world.site}', 'SHELL=/bin/sh', f'PATH={CRON_PATH}']
    env += [f'{key}={value}' for key, value in variables.items()]
    quiet_cron_job(
        ['runuser', '-u', world.site, '--', 'env', '-i', *env, '/bin/sh', '-c', command],
        home,
        umask=world.umasks[world.site],  # cron opens a PAM session too: pam_umask where enabled
    )
    # The admins' mail, through the machine's real mailx and MTA, into the local mailbox.
    mailbox = Path('/var/mail') / world.site
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and 'succeeded' not in _read(mailbox):
        time.sleep(0.5)
    assert f'[ppbackup] {world.site}: succeeded' in _read(mailbox)


def quiet_cron_job(argv: list[str], cwd: Path, umask: int = -1) -> None:
    """Run a job as cron does (no terminal, no input, the user's ``umask``) and require it to
    succeed in silence: anything it printed would reach the admin as cron's own mail."""
    result = subprocess.run(
        argv,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        start_new_session=True,
        umask=umask,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, '', ''), result


def _read(path: Path) -> str:
    try:
        return path.read_text(errors='replace')
    except OSError:
        return ''


def watch_like_cron(world: World, srv: Path) -> None:
    """Run the backup host's daily watch line (README "On the backup host") for this one sender's
    folder, as root's cron would: it keeps the night's run in kept/ and, all being well, is quiet."""
    readme = (REPO / 'README.md').read_text(encoding='utf-8')
    line = re.search(r'^30 9 \* \* \*  (/usr/local/bin/ppbackup watch .*)$', readme, re.M)
    assert line, 'the README shows no daily watch line for root'
    words = line.group(1).split()
    assert words[:3] == ['/usr/local/bin/ppbackup', 'watch', '/srv/ppbackup/site']
    # Only this sender's folder (the README names a second one), and mail to a local mailbox.
    argv = [str(world.prefix / 'ppbackup'), 'watch', str(srv), '--mail', 'root@localhost']
    env = ['HOME=/root', 'LOGNAME=root', 'SHELL=/bin/sh', f'PATH={CRON_PATH}']
    quiet_cron_job(['env', '-i', *env, *argv], Path('/'))
    kept = list((srv / 'kept' / 'backups').glob(f'day*/{world.site}-*.sha256'))
    assert kept, 'watch kept nothing'
    assert (srv / 'kept').stat().st_uid == 0


def before_decrypt(world: World, srv: Path, ran_cron: bool) -> None:
    """Give the key holder a copy of the history watch kept on the backup host (README "Restore,
    as a key holder", step 1: fetched with an admin account there)."""
    assert ran_cron
    copy = world.homes[world.holder] / 'backups'
    shutil.copytree(srv / 'kept' / 'backups', copy, symlinks=True)
    sh('chown', '-R', world.holder, str(copy))
    assert list(copy.glob(f'day*/{world.site}-psql-*.sql.zst.gpg'))
