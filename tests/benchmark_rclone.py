"""Peak memory of a run to an S3 endpoint through rclone: 100 MiB against 1 GiB.

The ppbackup Python process must stay flat whatever the file size (it only streams and hashes a
MiB at a time), and rclone's own peak must stay bounded too (one PUT streamed from the file, up to
5 GiB; S3 multipart above that buffers chunk size x concurrency). This script starts moto's S3
emulator on 127.0.0.1 (tests/s3server.py), makes a key, then for each size writes incompressible
data, runs ``ppbackup run`` under a wrapper that records the exact VmHWM of the ppbackup process
and the largest peak RSS of its children (gpg, rclone), and prints one line per size:

    python3 tests/benchmark_rclone.py --sizes 100,1024

Not part of the test suite: it takes minutes and a few GiB of disk.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3

TESTS = Path(__file__).resolve().parent
PPBACKUP = TESTS.parent / 'ppbackup.py'
sys.path.insert(0, str(TESTS))
from sshd import free_port  # noqa: E402

WRAPPER = r"""
import atexit, os, resource, sys
def _write_hwm():
    with open('/proc/self/status') as status:
        hwm = next(line.split()[1] for line in status if line.startswith('VmHWM:'))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with open(os.environ['PPBENCH_HWM_FILE'], 'w') as out:
        out.write(f'{hwm} {children}')
atexit.register(_write_hwm)
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import ppbackup
sys.exit(ppbackup.main(sys.argv[2:]))
"""


def run(*argv: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(
        list(argv), capture_output=True, text=True, check=True, env=env, timeout=3600
    ).stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--sizes', default='100,1024', help='MiB per run, comma-separated')
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix='ppbench-rclone-'))
    env = {k: v for k, v in os.environ.items() if k != 'AWS_CA_BUNDLE'}
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(TESTS / 's3server.py'), str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                socket.create_connection(('127.0.0.1', port), timeout=1).close()
                break
            time.sleep(0.1)
        url = f'http://127.0.0.1:{port}'
        creds = {'aws_access_key_id': 'bench', 'aws_secret_access_key': 'bench'}
        boto3.client('s3', endpoint_url=url, region_name='us-east-1', **creds).create_bucket(
            Bucket='ppbt-bench'
        )
        conf = work / 'rclone.conf'
        conf.write_text(
            f'[bench]\ntype = s3\nprovider = Other\nendpoint = {url}\nregion = us-east-1\n'
            'access_key_id = bench\nsecret_access_key = bench\n'
        )
        holder, host = work / 'holder', work / 'host'
        for home in (holder, host):
            home.mkdir(mode=0o700)
        gpg = ['gpg', '--batch', '--no-tty', '--passphrase', '']
        run(*gpg, '--homedir', str(holder), '--quick-gen-key', 'bench@x.invalid', 'ed25519')
        fpr = next(
            line.split(':')[9]
            for line in run(*gpg, '--homedir', str(holder), '--with-colons', '-k').splitlines()
            if line.startswith('fpr:')
        )
        run(*gpg, '--homedir', str(holder), '--quick-add-key', fpr, 'cv25519', 'encr')
        public = work / 'public.asc'
        public.write_text(run(*gpg, '--homedir', str(holder), '--armor', '--export', fpr))
        run(*gpg, '--homedir', str(host), '--import', str(public))
        print(
            f'{"raw data":>9} {"run s":>7} {"ppbackup VmHWM":>15} {"largest child (rclone/gpg)":>27}'
        )
        for size in (int(part) for part in args.sizes.split(',')):
            home = work / f'home-{size}'
            (home / 'data').mkdir(parents=True)
            with open(home / 'data' / 'blob.bin', 'wb') as out:
                for _ in range(size):
                    out.write(os.urandom(1 << 20))
            cfg = home / 'ppbackup.cfg'
            cfg.write_text(
                f'BACKUP_NAME=bench\nBACKUP_REMOTE=rclone:bench:ppbt-bench/{size}\n'
                f'BACKUP_GPG_RECIPIENT={fpr}\nBACKUP_FILES=data\nBACKUP_COMPRESSION=none\n'
                f'BACKUP_GNUPGHOME={host}\nBACKUP_MAIL_ON_SUCCESS=0\n'
            )
            cfg.chmod(0o600)
            hwm_file = work / f'hwm-{size}'
            started = time.monotonic()
            subprocess.run(
                [sys.executable, '-c', WRAPPER, str(PPBACKUP), '--config', str(cfg), 'run'],
                env={
                    **env,
                    'HOME': str(home),
                    'RCLONE_CONFIG': str(conf),
                    'PPBENCH_HWM_FILE': str(hwm_file),
                },
                check=True,
                timeout=3600,
                stdin=subprocess.DEVNULL,
            )
            elapsed = time.monotonic() - started
            hwm_kb, child_kb = (int(word) for word in hwm_file.read_text().split())
            print(
                f'{size:>5} MiB {elapsed:>7.1f} {hwm_kb / 1024:>11.1f} MiB '
                f'{child_kb / 1024:>23.1f} MiB',
                flush=True,
            )
            shutil.rmtree(home)
    finally:
        server.terminate()
        server.wait(timeout=30)
        subprocess.run(['gpgconf', '--homedir', str(work / 'holder'), '--kill', 'all'], check=False)
        subprocess.run(['gpgconf', '--homedir', str(work / 'host'), '--kill', 'all'], check=False)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
