"""decrypt, as a key holder runs it: passphrase-protected keys, and where plaintext may land (S5).

The key holder's key here has a passphrase, as every real one does. gpg-agent asks for it through
a pinentry: the real pinentry-curses on a pseudo-terminal, or a scripted pinentry that answers
like a person typing (the only fake: a person cannot be caused for real).
"""

from __future__ import annotations

import dataclasses
import os
import pty
import select
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from conftest import REPO, scripted_pinentry, sh

PASSPHRASE = 'correct horse battery staple'
PLAINTEXT = b'-- PostgreSQL database dump\nCOPY members FROM stdin;\n1\tAda\n\\.\n'


@dataclasses.dataclass
class Holder:
    root: Path
    gnupghome: Path
    backup: Path  # a backup file encrypted to the holder's key, as a run makes it

    def pinentry(self, program: str) -> None:
        """Make gpg-agent ask for passphrases through ``program`` (restarting the agent)."""
        (self.gnupghome / 'gpg-agent.conf').write_text(
            f'pinentry-program {program}\ndefault-cache-ttl 0\nmax-cache-ttl 0\n'
        )
        sh('gpgconf', '--homedir', str(self.gnupghome), '--kill', 'gpg-agent', check=False)

    def scripted_pinentry(self, passphrase: str) -> None:
        script = self.root / 'pinentry-scripted'
        script.write_text(scripted_pinentry(passphrase))
        script.chmod(0o755)
        self.pinentry(str(script))

    def decrypt(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        environ = {key: value for key, value in os.environ.items() if key != 'GPG_TTY'}
        return subprocess.run(
            [sys.executable, str(REPO / 'ppbackup.py'), 'decrypt', *args],
            capture_output=True,
            text=True,
            env={**environ, 'GNUPGHOME': str(self.gnupghome), **(env or {})},
            stdin=subprocess.DEVNULL,
            timeout=120,
            start_new_session=True,  # no controlling terminal: /dev/tty is not the tester's
            cwd=self.root,
        )

    def leftovers(self) -> list[Path]:
        return list(self.root.rglob('.ppbackup-tmp-*'))


@pytest.fixture(scope='module')
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """Make the key holder's passphrase-protected key and one backup for it, once per module;
    return (GnuPG home, backup). Each test works on a copy."""
    root = tmp_path_factory.mktemp('holder-template')
    gnupghome = root / 'gnupg'
    gnupghome.mkdir(mode=0o700)
    base = ['gpg', '--homedir', str(gnupghome), '--batch', '--no-tty']
    sh(
        *base,
        '--pinentry-mode',
        'loopback',
        '--passphrase',
        PASSPHRASE,
        '--quick-gen-key',
        'Treasurer <treasurer@example.org>',
        'future-default',
        'default',
        '2y',
    )
    # A backup as a run makes it: zstd, then gpg to the public key, no compression by gpg.
    backup = root / 'assoc-psql-20270104-031700.sql.zst.gpg'
    sh(
        'sh',
        '-c',
        f'zstd -q -c | {" ".join(base)} --trust-model always --compress-algo none '
        f'-r treasurer@example.org --encrypt -o {backup}',
        input=PLAINTEXT.decode(),
    )
    sh('gpgconf', '--homedir', str(gnupghome), '--kill', 'all', check=False)
    yield gnupghome, backup


@pytest.fixture
def holder(tmp_path: Path, template: tuple[Path, Path]) -> Iterator[Holder]:
    gnupghome = tmp_path / 'gnupg'
    # Only the keys: no agent socket of the template's (killed) agent.
    shutil.copytree(template[0], gnupghome, ignore=shutil.ignore_patterns('S.*'))
    backup = tmp_path / template[1].name
    shutil.copy(template[1], backup)
    the_holder = Holder(tmp_path, gnupghome, backup)
    yield the_holder
    sh('gpgconf', '--homedir', str(gnupghome), '--kill', 'all', check=False)


def run_in_terminal(argv: list[str], env: dict[str, str], answer: bytes) -> tuple[int, bytes]:
    """Run ``argv`` on a new pseudo-terminal; when a passphrase dialog is drawn, type ``answer``.

    Return (exit code, what the terminal showed)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once, nothing else
        os.execvpe(argv[0], argv, env)
    screen = b''
    typed = False
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1)
            if not ready:
                continue
            try:
                data = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            screen += data
            if not typed and b'<Cancel>' in screen:  # the dialog is drawn and waits for keys
                os.write(fd, answer + b'\r')
                typed = True
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), screen


def test_decrypt_asks_for_the_passphrase_in_a_terminal_without_gpg_tty(holder: Holder) -> None:
    holder.pinentry('/usr/bin/pinentry-curses')
    out = holder.root / 'members.sql'
    env = {key: value for key, value in os.environ.items() if key != 'GPG_TTY'}
    env.update(GNUPGHOME=str(holder.gnupghome), TERM='xterm')
    code, screen = run_in_terminal(
        [sys.executable, str(REPO / 'ppbackup.py'), 'decrypt', str(holder.backup), '-o', str(out)],
        env,
        PASSPHRASE.encode(),
    )
    assert b'Passphrase' in screen  # pinentry-curses drew its dialog on our terminal
    assert code == 0, screen[-2000:]
    assert out.read_bytes() == PLAINTEXT
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_decrypt_with_a_scripted_pinentry_and_no_terminal(holder: Holder) -> None:
    holder.scripted_pinentry(PASSPHRASE)
    out = holder.root / 'members.sql'
    result = holder.decrypt(str(holder.backup), '-o', str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == PLAINTEXT
    to_stdout = subprocess.run(
        [sys.executable, str(REPO / 'ppbackup.py'), 'decrypt', str(holder.backup)],
        capture_output=True,
        env={**os.environ, 'GNUPGHOME': str(holder.gnupghome)},
        stdin=subprocess.DEVNULL,
        timeout=120,
        start_new_session=True,
    )
    assert to_stdout.returncode == 0 and to_stdout.stdout == PLAINTEXT


def test_decrypt_without_a_terminal_says_what_to_do_not_no_secret_key(holder: Holder) -> None:
    holder.pinentry('/usr/bin/pinentry-curses')  # needs a terminal, and there is none
    out = holder.root / 'members.sql'
    result = holder.decrypt(str(holder.backup), '-o', str(out))
    assert result.returncode == 1
    assert 'no matching private key' not in result.stderr
    assert f'is in {holder.gnupghome}' in result.stderr
    assert 'GPG_TTY' in result.stderr and 'pinentry' in result.stderr
    assert 'Traceback' not in result.stderr
    assert not out.exists() and holder.leftovers() == []


def test_decrypt_with_a_wrong_passphrase_says_so(holder: Holder) -> None:
    holder.scripted_pinentry('not the passphrase')
    result = holder.decrypt(str(holder.backup), '-o', str(holder.root / 'members.sql'))
    assert result.returncode == 1
    assert 'passphrase' in result.stderr and 'was wrong' in result.stderr
    assert not (holder.root / 'members.sql').exists() and holder.leftovers() == []


def test_decrypt_without_the_key_names_the_key_ids_it_needs(holder: Holder, tmp_path: Path) -> None:
    other = tmp_path / 'other-gnupg'
    other.mkdir(mode=0o700)
    result = holder.decrypt(str(holder.backup), '--gnupghome', str(other))
    keyid = (
        sh('gpg', '--homedir', str(holder.gnupghome), '--with-colons', '--list-keys')
        .stdout.split('sub:', 1)[1]
        .split(':')[3]
    )
    assert result.returncode == 1
    assert 'cannot decrypt: no matching private key' in result.stderr
    assert keyid in result.stderr
    sh('gpgconf', '--homedir', str(other), '--kill', 'all', check=False)


# S5: plaintext lands only in a new file or over a regular file that is not the input.


def test_decrypt_refuses_a_device(holder: Holder) -> None:
    # A device node of our own (the null device's numbers): what -o /dev/null would be.
    device = holder.root / 'null'
    os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    holder.scripted_pinentry(PASSPHRASE)
    result = holder.decrypt(str(holder.backup), '-o', str(device))
    assert result.returncode == 2
    assert 'not a regular file' in result.stderr and 'Traceback' not in result.stderr
    assert stat.S_ISCHR(device.lstat().st_mode)
    assert holder.leftovers() == []


def test_decrypt_refuses_a_symlink_and_writes_nothing_beside_its_target(holder: Holder) -> None:
    elsewhere = holder.root / 'elsewhere'
    elsewhere.mkdir()
    target = elsewhere / 'target.sql'
    target.write_text('keep me\n')
    link = holder.root / 'link.sql'
    link.symlink_to(target)
    holder.scripted_pinentry(PASSPHRASE)
    result = holder.decrypt(str(holder.backup), '-o', str(link))
    assert result.returncode == 2
    assert 'a symlink' in result.stderr and 'Traceback' not in result.stderr
    assert target.read_text() == 'keep me\n' and link.is_symlink()
    assert sorted(p.name for p in elsewhere.iterdir()) == ['target.sql']
    assert holder.leftovers() == []


def test_decrypt_refuses_a_folder_without_a_traceback(holder: Holder) -> None:
    folder = holder.root / 'out'
    folder.mkdir()
    holder.scripted_pinentry(PASSPHRASE)
    result = holder.decrypt(str(holder.backup), '-o', str(folder))
    assert result.returncode == 2
    assert 'a folder' in result.stderr and 'Traceback' not in result.stderr
    assert list(folder.iterdir()) == [] and holder.leftovers() == []


def test_decrypt_never_writes_over_its_own_input(holder: Holder) -> None:
    holder.scripted_pinentry(PASSPHRASE)
    before = holder.backup.read_bytes()
    twin = holder.root / 'twin.gpg'
    os.link(holder.backup, twin)  # the same file under another name
    for output in (str(holder.backup), str(twin), f'{holder.root}/./{holder.backup.name}'):
        result = holder.decrypt(str(holder.backup), '-o', output)
        assert result.returncode == 2, output
        assert 'the encrypted input itself' in result.stderr
        assert holder.backup.read_bytes() == before
    assert holder.leftovers() == []


def test_decrypt_replaces_a_regular_file(holder: Holder) -> None:
    holder.scripted_pinentry(PASSPHRASE)
    out = holder.root / 'members.sql'
    out.write_text('an older restore\n')
    result = holder.decrypt(str(holder.backup), '-o', str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == PLAINTEXT and holder.leftovers() == []


def test_decrypt_refuses_unencrypted_openpgp_input(holder: Holder) -> None:
    holder.scripted_pinentry(PASSPHRASE)
    gpg = ['gpg', '--homedir', str(holder.gnupghome), '--batch', '--no-tty']
    secret = holder.root / 'plain.sql'
    secret.write_bytes(PLAINTEXT)
    stored = holder.root / 'assoc-psql-20270104-031700.sql.gpg'
    armored = holder.root / 'assoc-files-20270104-031700.tar.asc'
    sh(*gpg, '--store', '-o', str(stored), str(secret))
    sh(*gpg, '--store', '--armor', '-o', str(armored), str(secret))
    for source in (stored, armored):
        out = holder.root / 'out.sql'
        result = holder.decrypt(str(source), '-o', str(out))
        assert result.returncode in (1, 2), result.stderr
        assert 'Traceback' not in result.stderr
        assert 'not encrypted to a public key' in result.stderr or 'not report' in result.stderr
        assert not out.exists() and holder.leftovers() == []


def test_decrypt_refuses_a_fifo_as_input_without_waiting(holder: Holder) -> None:
    fifo = holder.root / 'assoc-psql-20270104-031700.sql.zst.gpg.fifo'
    os.mkfifo(fifo)
    result = holder.decrypt(str(fifo), '-o', str(holder.root / 'out.sql'))
    assert result.returncode == 2
    assert 'not a regular file' in result.stderr and 'Traceback' not in result.stderr


def test_decrypt_names_the_decompressor_when_only_it_fails(holder: Holder) -> None:
    holder.scripted_pinentry(PASSPHRASE)
    not_zstd = holder.root / 'assoc-psql-20270104-031700.sql.zst.gpg'
    not_zstd.unlink()
    sh(
        'gpg',
        '--homedir',
        str(holder.gnupghome),
        '--batch',
        '--trust-model',
        'always',
        '-r',
        'treasurer@example.org',
        '--encrypt',
        '-o',
        str(not_zstd),
        input='plain text where zstd data should be\n',
    )
    out = holder.root / 'out.sql'
    result = holder.decrypt(str(not_zstd), '-o', str(out))
    assert result.returncode == 1
    assert 'zstd exited' in result.stderr
    assert 'passphrase' not in result.stderr and 'private key' not in result.stderr
    assert not out.exists() and holder.leftovers() == []
