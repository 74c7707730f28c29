"""A real OpenSSH server on 127.0.0.1, for tests that sync over ssh.

``start_sshd(folder)`` makes a host key, a client key, a known_hosts file that trusts the host key,
an ``sshd_config`` listening on a free loopback port, starts ``/usr/sbin/sshd -D -e`` and waits until
the port accepts connections. Who may log in, and how, is chosen per test by rewriting
``authorized_keys``: sshd reads it again on every connection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shlex
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

SSHD = '/usr/sbin/sshd'


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def write_only_options(folder: Path) -> str:
    """Return the README's authorized_keys options (its forced command) for ``folder``."""
    text = (Path(__file__).resolve().parent.parent / 'README.md').read_text()
    match = re.search(r'^(command="/usr/bin/rrsync [^"]*",restrict) ssh-ed25519 ', text, re.M)
    assert match, 'the README shows no forced command'
    return match.group(1).replace('/srv/ppbackup/site/incoming', str(folder))


def keygen(path: Path, comment: str) -> str:
    """Make an ed25519 key pair at ``path`` (no passphrase); return the public key line."""
    subprocess.run(
        ['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-C', comment, '-f', str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return path.with_name(path.name + '.pub').read_text().strip()


@dataclasses.dataclass
class Sshd:
    folder: Path
    port: int
    host_key_line: str  # "ssh-ed25519 AAAA..." of the server
    client_key: Path  # private key the client logs in with
    client_pub: str
    known_hosts: Path  # trusts exactly this server's host key at [127.0.0.1]:port
    authorized_keys: Path
    log: Path  # sshd's own stderr (-e)
    proc: subprocess.Popen[bytes]

    def rsh(
        self, *, port: int | None = None, known_hosts: Path | None = None, strict: bool = True
    ) -> str:
        """Return an RSYNC_RSH command line for this server (or another port / known_hosts).

        ``-F /dev/null`` keeps the machine's and root's ssh_config out of the test.
        """
        argv = [
            'ssh',
            '-F',
            '/dev/null',
            '-p',
            str(port or self.port),
            '-i',
            str(self.client_key),
            '-o',
            f'UserKnownHostsFile={known_hosts or self.known_hosts}',
            '-o',
            'GlobalKnownHostsFile=/dev/null',
            '-o',
            'IdentitiesOnly=yes',
        ]
        if strict:
            argv += ['-o', 'StrictHostKeyChecking=yes']
        for word in argv:
            assert word == shlex.quote(word), f'rsync splits -e on spaces: {word!r}'
        return ' '.join(argv)

    def env(self, **kwargs: object) -> dict[str, str]:
        """Return the extra environment for ``site.run``: RSYNC_RSH for this server."""
        return {'RSYNC_RSH': self.rsh(**kwargs)}  # type: ignore[arg-type]

    def allow_plain(self) -> None:
        """Let the client key in with a normal shell: rsync --server runs as asked."""
        self.authorized_keys.write_text(self.client_pub + '\n')

    def allow_write_only(self, folder: Path) -> None:
        """Let the client key in only through the README's forced command, ``rrsync -wo -no-del
        -no-overwrite -munge folder``: it adds below it; it cannot read, delete or rewrite."""
        self.authorized_keys.write_text(f'{write_only_options(folder)} {self.client_pub}\n')

    def allow_in(self, home: Path, options: str) -> None:
        """Let the client key in as the user whose home is ``home``, with ``options`` (a forced
        command, as in the README), through a root-owned ``home/.ssh/authorized_keys``."""
        (home / '.ssh').mkdir(mode=0o755, exist_ok=True)
        (home / '.ssh' / 'authorized_keys').write_text(f'{options} {self.client_pub}\n')
        (home / '.ssh' / 'authorized_keys').chmod(0o644)

    def deny_all(self) -> None:
        self.authorized_keys.write_text('')

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _write_config(folder: Path, port: int, host_key: Path, authorized_keys: Path) -> Path:
    config = folder / 'sshd_config'
    config.write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {folder / 'sshd.pid'}
AuthorizedKeysFile {authorized_keys} %h/.ssh/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
UsePAM no
UseDNS no
PrintMotd no
X11Forwarding no
AllowTcpForwarding no
Subsystem sftp internal-sftp
LogLevel VERBOSE
# Other users (a receiving account made by a test) use their own ~/.ssh/authorized_keys, as on a
# real backup host; root only the test's file.
Match User root
  AuthorizedKeysFile {authorized_keys}
""")
    return config


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with (
            contextlib.suppress(OSError),
            socket.create_connection(('127.0.0.1', port), timeout=1) as sock,
        ):
            sock.settimeout(2)
            if sock.recv(4).startswith(b'SSH-'):  # sshd itself answers, not someone else
                return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def start_sshd(folder: Path) -> Iterator[Sshd]:
    """Start a loopback sshd with its own keys in ``folder``; stop it when the block ends."""
    folder.mkdir(parents=True, exist_ok=True)
    Path('/run/sshd').mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    host_key = folder / 'host_ed25519_key'
    host_key_line = ' '.join(keygen(host_key, 'ppbackup-test-host').split()[:2])
    client_key = folder / 'client_ed25519_key'
    client_pub = keygen(client_key, 'ppbackup-test-client')
    authorized_keys = folder / 'authorized_keys'
    authorized_keys.write_text('')
    log = folder / 'sshd.log'
    last_error = ''
    for _attempt in range(5):  # another process may take the free port before sshd binds it
        port = free_port()
        config = _write_config(folder, port, host_key, authorized_keys)
        check = subprocess.run(
            [SSHD, '-t', '-f', str(config)], capture_output=True, text=True, timeout=30, check=False
        )
        assert check.returncode == 0, f'sshd -t rejects the config: {check.stderr}'
        with open(log, 'ab') as log_handle:
            proc = subprocess.Popen(
                [SSHD, '-D', '-e', '-f', str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
            )
        if _wait_for_port(port, proc, time.monotonic() + 15):
            break
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        last_error = log.read_text(errors='replace')[-2000:]
    else:
        raise RuntimeError(f'sshd did not start:\n{last_error}')
    known_hosts = folder / 'known_hosts'
    known_hosts.write_text(f'[127.0.0.1]:{port} {host_key_line}\n')
    server = Sshd(
        folder, port, host_key_line, client_key, client_pub, known_hosts, authorized_keys, log, proc
    )
    try:
        yield server
    finally:
        server.stop()
