"""Object storage through rclone (BACKUP_REMOTE=rclone:REMOTE:PATH), with Debian's real rclone.

Three backends that run here: rclone's ``local`` backend, ``sftp`` against the loopback sshd of
tests/sshd.py, and the S3 protocol against moto's S3 emulator on 127.0.0.1 (tests/s3server.py),
which enforces IAM policies, so that a key that may not delete, read or write is a real one. Each
test writes its own rclone.conf and points RCLONE_CONFIG at it, as a user would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from conftest import Site
from sshd import Sshd, free_port, start_sshd

import ppbackup

TESTS = Path(__file__).resolve().parent
# rclone's S3 client refuses a plain-http endpoint while a custom CA bundle is set.
CA_BUNDLE_VARIABLES = ('AWS_CA_BUNDLE',)
ADMIN_ACTIONS = ['*']
KEY_POLICIES = {
    # user name: what its key may do in the test buckets
    'full': ['s3:*'],
    'writelist': ['s3:PutObject', 's3:ListBucket'],  # no read, no delete
    'readonly': ['s3:GetObject', 's3:ListBucket'],
}


@dataclasses.dataclass
class S3Server:
    url: str
    keys: dict[str, dict[str, str]]  # user -> boto3 credentials
    proc: subprocess.Popen[bytes]

    def client(self, user: str = 'full') -> Any:
        return boto3.client('s3', endpoint_url=self.url, region_name='us-east-1', **self.keys[user])

    def rclone_sections(self) -> str:
        return ''.join(
            f'[{user}]\ntype = s3\nprovider = Other\nendpoint = {self.url}\nregion = us-east-1\n'
            f'access_key_id = {key["aws_access_key_id"]}\n'
            f'secret_access_key = {key["aws_secret_access_key"]}\n\n'
            for user, key in self.keys.items()
        )


@pytest.fixture(scope='module')
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 emulator on a free loopback port, with one IAM user per key in KEY_POLICIES."""
    log = tmp_path_factory.mktemp('s3') / 'moto.log'
    env = {k: v for k, v in os.environ.items() if k not in CA_BUNDLE_VARIABLES}
    # The first three requests (making the admin user and its key) need no signature; every
    # request after them is checked against IAM.
    env['INITIAL_NO_AUTH_ACTION_COUNT'] = '3'
    port = free_port()
    with open(log, 'wb') as handle:
        proc = subprocess.Popen(
            [sys.executable, str(TESTS / 's3server.py'), str(port)],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                socket.create_connection(('127.0.0.1', port), timeout=1).close()
                break
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        url = f'http://127.0.0.1:{port}'
        anon = {'aws_access_key_id': 'x', 'aws_secret_access_key': 'x'}
        iam = boto3.client('iam', endpoint_url=url, region_name='us-east-1', **anon)
        keys = {'admin': _make_user(iam, 'admin', ADMIN_ACTIONS, '*')}
        iam = boto3.client('iam', endpoint_url=url, region_name='us-east-1', **keys['admin'])
        for user, actions in KEY_POLICIES.items():
            keys[user] = _make_user(iam, user, actions, 'arn:aws:s3:::ppbt-*')
        yield S3Server(url, keys, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _make_user(iam: Any, user: str, actions: list[str], resource: str) -> dict[str, str]:
    iam.create_user(UserName=user)
    resources = [resource] if resource == '*' else [resource, resource + '/*']
    policy = {
        'Version': '2012-10-17',
        'Statement': [{'Effect': 'Allow', 'Action': actions, 'Resource': resources}],
    }
    iam.put_user_policy(UserName=user, PolicyName='p', PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)['AccessKey']
    return {
        'aws_access_key_id': key['AccessKeyId'],
        'aws_secret_access_key': key['SecretAccessKey'],
    }


@pytest.fixture(scope='module')
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with start_sshd(tmp_path_factory.mktemp('sshd')) as server:
        server.allow_plain()
        yield server


@dataclasses.dataclass
class Backend:
    """One rclone remote for a site: what BACKUP_REMOTE says, and the test's own view of it."""

    kind: str
    remote: str  # BACKUP_REMOTE
    files: Callable[[], dict[str, bytes]]  # {path below the remote backups folder: bytes}
    overwrite: Callable[[str, bytes], None]  # replace one remote file's bytes behind rclone


def use_rclone(site: Site, sections: str) -> None:
    conf = site.root / 'rclone.conf'
    conf.write_text(sections)
    conf.chmod(0o600)
    site.env['RCLONE_CONFIG'] = str(conf)
    for name in CA_BUNDLE_VARIABLES:
        site.env.pop(name, None)


def folder_backend(kind: str, remote: str, root: Path) -> Backend:
    def files() -> dict[str, bytes]:
        base = root / 'backups'
        return {
            str(path.relative_to(base)): path.read_bytes()
            for path in sorted(base.rglob('*'))
            if path.is_file()
        }

    def overwrite(name: str, data: bytes) -> None:
        (root / 'backups' / name).write_bytes(data)

    return Backend(kind, remote, files, overwrite)


def s3_backend(server: S3Server, bucket: str, user: str = 'full') -> Backend:
    client = server.client()

    def files() -> dict[str, bytes]:
        listing = client.list_objects_v2(Bucket=bucket, Prefix='site/backups/')
        return {
            item['Key'].removeprefix('site/backups/'): client.get_object(
                Bucket=bucket, Key=item['Key']
            )['Body'].read()
            for item in listing.get('Contents', [])
        }

    def overwrite(name: str, data: bytes) -> None:
        client.put_object(Bucket=bucket, Key=f'site/backups/{name}', Body=data)

    return Backend('s3', f'rclone:{user}:{bucket}/site', files, overwrite)


def new_bucket(server: S3Server) -> str:
    bucket = f'ppbt-{secrets.token_hex(4)}'
    server.client().create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(params=['local', 'sftp', 's3'])
def backend(request: pytest.FixtureRequest, site: Site) -> Backend:
    """The site, sending to each kind of rclone remote in turn."""
    kind = request.param
    folder = site.root / 'objects'
    if kind == 'local':
        use_rclone(site, '[store]\ntype = local\n')
        chosen = folder_backend(kind, f'rclone:store:{folder}', folder)
    elif kind == 'sftp':
        server: Sshd = request.getfixturevalue('sshd')
        use_rclone(
            site,
            f'[store]\ntype = sftp\nhost = 127.0.0.1\nport = {server.port}\nuser = root\n'
            f'key_file = {server.client_key}\nknown_hosts_file = {server.known_hosts}\n',
        )
        chosen = folder_backend(kind, f'rclone:store:{folder}', folder)
    else:
        s3_server: S3Server = request.getfixturevalue('s3')
        use_rclone(site, s3_server.rclone_sections())
        chosen = s3_backend(s3_server, new_bucket(s3_server))
    site.write_config(BACKUP_REMOTE=chosen.remote)
    return chosen


def named_files(site: Site) -> dict[str, bytes]:
    """Return {slot/name: bytes} of every local file a manifest names, and the manifests."""
    found = {}
    for slot in ppbackup.all_slots(site.backups):
        for run in ppbackup.slot_runs(slot):
            found[f'{slot.name}/{run.manifest.name}'] = run.manifest.read_bytes()
            for name in run.files:
                found[f'{slot.name}/{name}'] = (slot / name).read_bytes()
    return found


def last_body(site: Site) -> str:
    return str(site.mails()[-1]['body'])


def transfer_line(site: Site) -> str:
    return next(line for line in last_body(site).splitlines() if line.startswith('transfer:'))


# ---------------------------------------------------------------------------------------------------
# A run to each backend; the remote copies checked against the manifest; a second run sends only
# itself; a flipped byte on the remote is found; an interrupted upload is completed.
# ---------------------------------------------------------------------------------------------------


def test_runs_to_each_backend_are_checked_against_the_manifest_and_send_only_themselves(
    site: Site, backend: Backend
) -> None:
    result = site.run()
    assert result.returncode == 0, result.stderr
    local = named_files(site)
    # day: 7 files (psql, mysql, files, binaries, the PostgreSQL roles, the MariaDB users, the row
    # counts) and the manifest; week: 6 (no binaries) and its own
    assert len(local) == 15
    assert backend.files() == local  # every file a manifest names, byte for byte, and no other
    line = transfer_line(site)
    expected_hash = {'local': 'SHA256', 'sftp': 'MD5', 's3': 'MD5'}[backend.kind]
    assert f'{len(local)} file(s) sent' in line
    assert (
        f'{len(local)} checked against the manifests, {len(local)} of them by {expected_hash}'
        in (line)
    ), line
    assert 'WARNING' not in site.subjects()[-1]
    verify = site.run('verify', '--remote')
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert 'remote included: all is well' in verify.stdout
    # A second run sends only itself.
    first = backend.files()
    first_day = {name: data for name, data in first.items() if name.startswith('day')}
    assert len(first_day) == 8
    result = site.run(faketime='+1d')  # another day slot: the first run's day files stay there
    assert result.returncode == 0, result.stderr
    after = backend.files()
    for name, data in first_day.items():
        assert after[name] == data  # never deleted nor rewritten remotely
    local = named_files(site)
    assert {name: after.get(name) for name in local} == local
    # Sent: the new day slot (7 files and the manifest) and the week slot (6 and the manifest);
    # nothing of the first run's day slot, which the remote already held.
    assert '15 file(s) sent' in transfer_line(site), transfer_line(site)


@pytest.mark.parametrize('backend', ['local', 's3'], indirect=True)
def test_a_flipped_byte_on_the_remote_is_found(site: Site, backend: Backend) -> None:
    assert site.run().returncode == 0
    name = next(name for name in backend.files() if '-psql-' in name and name.startswith('day'))
    good = backend.files()[name]
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x01  # same size: only a checksum can tell
    backend.overwrite(name, bytes(flipped))
    verify = site.run('verify', '--remote')
    assert verify.returncode == 1
    assert f'BAD  remote copy of {name}: missing or differs' in verify.stdout
    assert sum(line.startswith('BAD') for line in verify.stdout.splitlines()) == 1
    backend.overwrite(name, good)
    assert site.run('verify', '--remote').returncode == 0


@pytest.mark.parametrize('backend', ['local', 's3'], indirect=True)
def test_an_interrupted_upload_is_completed_by_the_next_run(site: Site, backend: Backend) -> None:
    (site.home / 'site' / 'uploads' / 'big.bin').write_bytes(os.urandom(3 * 1024 * 1024))
    # 3 MiB at 64 KiB/s takes ~48 s: the 3-second transfer limit always cuts it off.
    site.write_config(BACKUP_SYNC_BWLIMIT='64', BACKUP_SYNC_TIMEOUT='3')
    result = site.run()
    assert result.returncode == 1
    assert 'FAILED at sync' in result.stderr and 'timeout after 3 s' in result.stderr
    assert 'FAILED at sync' in site.subjects()[-1]
    first_day = {name: data for name, data in named_files(site).items() if name.startswith('day')}
    assert len(first_day) == 8  # the local slots are complete
    assert {name: backend.files().get(name) for name in first_day} != first_day
    site.write_config(BACKUP_SYNC_BWLIMIT=None, BACKUP_SYNC_TIMEOUT=None)
    # The next run, a day later: the first run's day slot stays here, and must now arrive whole.
    result = site.run(faketime='+1d')
    assert result.returncode == 0, result.stderr
    local = named_files(site)
    assert first_day.items() <= local.items()
    remote = backend.files()
    assert {name: remote.get(name) for name in local} == local
    assert site.run('verify', '--remote').returncode == 0


# ---------------------------------------------------------------------------------------------------
# Keys: one that may not delete (nor read) is enough; one that may not write fails the run.
# ---------------------------------------------------------------------------------------------------


def test_a_key_that_cannot_delete_or_read_is_enough(site: Site, s3: S3Server) -> None:
    user = 'writelist'  # PutObject and ListBucket: no GetObject, no DeleteObject
    bucket = new_bucket(s3)
    use_rclone(site, s3.rclone_sections())
    backend = s3_backend(s3, bucket, user)
    site.write_config(BACKUP_REMOTE=backend.remote)
    with pytest.raises(Exception, match='AccessDenied'):  # the key really may not delete
        s3.client(user).delete_object(Bucket=bucket, Key='site/backups/x')
    for faketime in (None, '+1d'):
        result = site.run(faketime=faketime)
        assert result.returncode == 0, result.stderr
        assert 'WARNING' not in site.subjects()[-1], last_body(site)
        assert 'by MD5' in transfer_line(site)
    assert backend.files() == {**backend.files(), **named_files(site)}
    verify = site.run('verify', '--remote')
    assert verify.returncode == 0, verify.stdout + verify.stderr
    check = site.run('check')
    assert f'ok    remote {backend.remote}: reachable through rclone; copies checked by MD5' in (
        check.stdout
    ), check.stdout


def test_a_key_that_cannot_write_fails_the_run_naming_the_remote(site: Site, s3: S3Server) -> None:
    bucket = new_bucket(s3)
    use_rclone(site, s3.rclone_sections())
    backend = s3_backend(s3, bucket, 'readonly')
    site.write_config(BACKUP_REMOTE=backend.remote)
    result = site.run()
    mail = site.assert_failed(result, 'sync', {}, new_files_allowed=True)
    assert f'rclone copy {backend.remote}' in mail['body']
    assert 'AccessDenied' in mail['body']
    assert backend.files() == {}
    assert len(named_files(site)) == 15  # nothing local is lost
    for path in site.backups.rglob('*.gpg'):
        assert path.stat().st_size > 0


# ---------------------------------------------------------------------------------------------------
# check, status, --dry-run and the config know the rclone remote; BACKUP_SYNC_BWLIMIT reaches both.
# ---------------------------------------------------------------------------------------------------


def test_check_status_and_dry_run_know_the_rclone_remote(site: Site) -> None:
    folder = site.root / 'objects'
    use_rclone(site, '[store]\ntype = local\n')
    site.write_config(BACKUP_REMOTE=f'rclone:store:{folder}', BACKUP_SYNC_BWLIMIT='512')
    check = site.run('check')
    assert (
        f'ok    remote rclone:store:{folder}: reachable through rclone; copies checked by SHA256'
        in (check.stdout)
    ), check.stdout
    plan = site.run('run', '--dry-run')
    assert plan.returncode == 0, plan.stderr
    assert 'rclone --ask-password=false' in plan.stdout and '--bwlimit=512K' in plan.stdout
    assert f'store:{folder}/backups' in plan.stdout and 'rsync' not in plan.stdout
    status = json.loads(site.run('status', '--json').stdout)
    assert status['transport'] == 'rclone' and status['remote'] == f'rclone:store:{folder}'
    site.write_config(BACKUP_REMOTE=f'rclone:elsewhere:{folder}')
    check = site.run('check')
    assert check.returncode == 1
    assert "rclone.conf has no remote named 'elsewhere'" in check.stdout


def test_the_rsync_bandwidth_limit(site: Site) -> None:
    site.write_config(BACKUP_SYNC_BWLIMIT='300')
    plan = site.run('run', '--dry-run')
    assert '--bwlimit=300 ' in plan.stdout


@pytest.mark.parametrize(
    'remote',
    [
        'rclone::s3,access_key_id=AKIA,secret_access_key=x:bucket',  # credentials on argv
        'rclone:s3',  # no path separator
        'rclone:-x:bucket',  # an option
    ],
)
def test_an_rclone_remote_that_is_not_a_named_remote_is_refused(site: Site, remote: str) -> None:
    site.write_config(BACKUP_REMOTE=f"'{remote}'")
    result = site.run('check')
    assert result.returncode == 2
    assert 'BACKUP_REMOTE: write rclone:REMOTE:PATH' in result.stderr


def test_a_backend_without_hashes_is_checked_by_size_and_says_so(site: Site, sshd: Sshd) -> None:
    folder = site.root / 'objects'
    # An sftp server without a shell: rclone cannot run md5sum there, so it lists no hash.
    use_rclone(
        site,
        f'[bare]\ntype = sftp\nhost = 127.0.0.1\nport = {sshd.port}\nuser = root\n'
        f'key_file = {sshd.client_key}\nknown_hosts_file = {sshd.known_hosts}\nshell_type = none\n',
    )
    site.write_config(BACKUP_REMOTE=f'rclone:bare:{folder}')
    result = site.run()
    assert result.returncode == 0, result.stderr
    assert 'succeeded with 1 WARNING(s)' in site.subjects()[-1]
    assert 'gives no hash for 15 file(s), so only their size was checked' in last_body(site)
    assert '15 checked against the manifests, by size only' in transfer_line(site)
    assert folder_backend('sftp', '', folder).files() == named_files(site)
    verify = site.run('verify', '--remote')
    assert verify.returncode == 0, verify.stdout
    assert verify.stdout.count('only its size was checked') == 15
    check = site.run('check')
    assert 'WARN  remote rclone:bare:' in check.stdout and 'size only' in check.stdout


# A copy that is damaged on its way cannot be caused for real: a PATH shim runs the real rclone,
# then flips one byte of the psql dump it just copied (every time, or only the first time).
CORRUPTING_RCLONE = """#!/bin/sh
list=$(mktemp)
cat > "$list"
/usr/bin/rclone "$@" < "$list"
code=$?
grep -q -- '-psql-' "$list"; sent=$?
rm -f "$list"
[ $code = 0 ] || exit $code
case "$*" in *' copy '*) ;; *) exit 0 ;; esac
[ $sent = 0 ] || exit 0
[ -e {marker} ] && exit 0
{once}
exec {python} - <<'PY'
from pathlib import Path
for path in Path('{folder}').rglob('*-psql-*.gpg'):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
PY
"""


@pytest.mark.parametrize('always', [False, True])
def test_a_copy_damaged_in_transit_is_sent_again_or_fails_the_run(site: Site, always: bool) -> None:
    folder = site.root / 'objects'
    use_rclone(site, '[store]\ntype = local\n')
    site.write_config(BACKUP_REMOTE=f'rclone:store:{folder}')
    marker = site.root / 'damaged-once'
    site.shim(
        'rclone',
        CORRUPTING_RCLONE.format(
            marker=marker,
            once='' if always else f'touch {marker}',
            python=sys.executable,
            folder=folder,
        ),
    )
    result = site.run()
    if always:
        mail = site.assert_failed(result, 'verify remote', {}, new_files_allowed=True)
        assert f'the copy on rclone:store:{folder} differs from the manifest' in mail['body']
        assert '-psql-' in mail['body']
        return
    assert result.returncode == 0, result.stderr
    assert 'succeeded with 1 WARNING(s)' in site.subjects()[-1]
    body = last_body(site)
    assert 'differed from the manifest after the transfer and were sent again' in body
    assert '-psql-' in body.split('sent again:')[1].splitlines()[0]
    assert folder_backend('local', '', folder).files() == named_files(site)
