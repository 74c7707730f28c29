"""Monitoring: the healthchecks.io-style ping and the Prometheus metrics file, as an ops person sees
them: a real loopback HTTP server records the pings, a real Prometheus parser reads the metrics."""

from __future__ import annotations

import http.server
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from conftest import CANARY, REPO, InProcess, Site
from prometheus_client.parser import text_string_to_metric_families
from sshd import free_port

import ppbackup

TOKEN = 'b1d2c3e4-tok'  # a healthchecks check's path is its secret: never shown in a message


class Monitor(http.server.ThreadingHTTPServer):
    hits: list[tuple[str, str, str]]  # (method, path, body)


class Recorder(http.server.BaseHTTPRequestHandler):
    server: Monitor

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get('Content-Length', 0))).decode()
        self.server.hits.append((self.command, self.path, body))
        self.send_response(200)
        self.send_header('Content-Length', '2')
        self.end_headers()
        self.wfile.write(b'OK')

    do_GET = do_HEAD = do_POST

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def monitor() -> Iterator[Monitor]:
    """A monitoring server on a loopback port that records every request."""
    server = Monitor(('127.0.0.1', 0), Recorder)
    server.hits = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def ping_url(server: Monitor) -> str:
    return f'http://127.0.0.1:{server.server_address[1]}/ping/{TOKEN}'


def metrics(path: Path) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Parse the metrics file with Prometheus's own parser: {name: [(labels, value)]}."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(path.read_text()):
        assert family.type == 'gauge', family
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def value(found: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    [(labels, number)] = found[name]
    assert labels == {'backup': 'assoc'}
    return number


def failing_pg_dump(site: Site) -> None:
    # What a dump prints may quote data or a password: none of it may reach the ping.
    site.shim(
        'pg_dump',
        f"""#!/bin/sh
        echo "row: {CANARY} password=hunter2" >&2
        exit 1
        """,
    )


def test_ping_start_then_success_for_a_good_run(site: Site, monitor: Monitor) -> None:
    site.write_config(BACKUP_PING_URL=ping_url(monitor))
    result = site.run()
    assert result.returncode == 0, result.stderr
    assert [(method, path) for method, path, _ in monitor.hits] == [
        ('POST', f'/ping/{TOKEN}/start'),
        ('POST', f'/ping/{TOKEN}'),
    ]
    assert monitor.hits[1][2].startswith('assoc: succeeded in ')
    # psql, mysql, files, binaries, and the PostgreSQL roles, MariaDB users and row counts
    assert '7 file(s), 0 warning(s)' in monitor.hits[1][2]
    assert site.subjects() == ['[ppbackup] assoc: succeeded']


def test_ping_start_then_fail_for_a_failed_run(site: Site, monitor: Monitor) -> None:
    site.write_config(BACKUP_PING_URL=ping_url(monitor))
    failing_pg_dump(site)
    result = site.run()
    assert result.returncode == 1
    assert [path for _, path, _ in monitor.hits] == [f'/ping/{TOKEN}/start', f'/ping/{TOKEN}/fail']
    body = monitor.hits[1][2]
    assert body.startswith(f'assoc: FAILED at dump psql {site.pg_db}: ')
    assert 'pg_dump exited 1' in body
    assert CANARY not in body and 'hunter2' not in body  # the step and the error, never output
    assert len(body) <= 1000
    assert 'FAILED' in site.subjects()[0]


def test_a_refused_ping_is_a_warning_only(site: Site) -> None:
    url = f'http://127.0.0.1:{free_port()}/ping/{TOKEN}'  # nothing listens there
    site.write_config(BACKUP_PING_URL=url)
    result = site.run()
    assert result.returncode == 0, result.stderr
    assert site.subjects() == ['[ppbackup] assoc: succeeded with 2 WARNING(s)']
    body = site.mails()[0]['body']
    host = url.split('/ping/')[0]
    assert f'monitoring ping {host}/.../start failed: ' in body
    assert f'monitoring ping {host}/... failed: ' in body
    assert 'Connection refused' in body and 'the backup itself is not affected' in body
    assert TOKEN not in body
    assert len(list(site.backups.glob('day*/*.sha256'))) == 1  # the backup was made and kept


def test_a_ping_server_that_never_answers_costs_at_most_the_timeout(
    site: Site, in_process: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It accepts connections (the kernel completes them) and never says a word. The run is
    # in-process, with the bound lowered, so that its two real waits (start and end) are short.
    monkeypatch.setattr(ppbackup, 'PING_TIMEOUT', 1.0)
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(('127.0.0.1', 0))
    silent.listen(8)
    try:
        url = f'http://127.0.0.1:{silent.getsockname()[1]}/ping/{TOKEN}'
        site.write_config(BACKUP_PING_URL=url)
        result = in_process()
    finally:
        silent.close()
    assert result.returncode == 0, result.stderr
    assert site.subjects() == ['[ppbackup] assoc: succeeded with 2 WARNING(s)']
    body = site.mails()[0]['body']
    assert body.count('no answer within 1 s') == 2


def test_send_ping_gives_up_after_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same bound in-process, lowered so that it shows quickly.
    monkeypatch.setattr(ppbackup, 'PING_TIMEOUT', 0.5)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(('127.0.0.1', 0))
        silent.listen(1)
        url = f'http://127.0.0.1:{silent.getsockname()[1]}/x'
        problem = ppbackup.send_ping(url, 'start', '')
    assert problem.endswith('failed: no answer within 0.5 s')


def test_ping_target_keeps_a_query_string() -> None:
    assert ppbackup.ping_target('https://hc.example/abc/', 'fail') == 'https://hc.example/abc/fail'
    assert ppbackup.ping_target('https://hc.example/abc', '') == 'https://hc.example/abc'
    assert (
        ppbackup.ping_target('https://kuma.example/api/push/T?status=up', 'start')
        == 'https://kuma.example/api/push/T/start?status=up'
    )
    assert ppbackup.ping_shown('https://u:pw@hc.example/abc', 'log') == 'https://hc.example/.../log'


def test_metrics_after_a_good_and_a_failed_run(site: Site) -> None:
    textfile = site.root / 'node-exporter'
    textfile.mkdir()
    prom = textfile / 'ppbackup.prom'
    site.write_config(BACKUP_METRICS_FILE=str(prom))
    before = time.time()
    result = site.run()
    after = time.time()
    assert result.returncode == 0, result.stderr

    good = metrics(prom)
    assert value(good, 'ppbackup_last_run_exit_code') == 0
    started = value(good, 'ppbackup_last_run_start_timestamp_seconds')
    assert before <= started <= after
    assert 0 < value(good, 'ppbackup_last_run_duration_seconds') <= after - before
    success = value(good, 'ppbackup_last_success_timestamp_seconds')
    assert started < success <= after
    assert value(good, 'ppbackup_last_run_warnings') == 0
    assert 0 <= value(good, 'ppbackup_newest_run_age_seconds') <= after - before
    # Bytes per artifact, raw, compressed and encrypted, each labelled with the artifact.
    artifacts = {labels['artifact']: labels for labels, _ in good['ppbackup_artifact_raw_bytes']}
    assert sorted(artifacts) == sorted(
        [
            'binaries',
            'files',
            f'mysql {site.my_db}',
            f'psql {site.pg_db}',
            'pg roles',
            'mariadb users',
            'row counts',
        ]
    )
    assert artifacts[f'psql {site.pg_db}'] == {
        'backup': 'assoc',
        'artifact': f'psql {site.pg_db}',
        'kind': 'psql',
    }
    psql_labels = artifacts[f'psql {site.pg_db}']
    plain = next(site.latest.glob('assoc-psql-*'))
    raw = subprocess.run(['zstd', '-dc', str(plain)], capture_output=True, check=True).stdout
    assert (psql_labels, len(raw)) in good['ppbackup_artifact_raw_bytes']
    assert (psql_labels, plain.stat().st_size) in good['ppbackup_artifact_compressed_bytes']
    encrypted = next(site.backups.glob('day*/assoc-psql-*.gpg'))
    assert (psql_labels, encrypted.stat().st_size) in good['ppbackup_artifact_encrypted_bytes']
    # node_exporter runs as another user: readable by all, written by us only; no temporaries.
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644
    assert [path.name for path in textfile.iterdir()] == ['ppbackup.prom']
    inode = prom.stat().st_ino

    failing_pg_dump(site)
    result = site.run()
    done = time.time()
    assert result.returncode == 1
    bad = metrics(prom)
    assert value(bad, 'ppbackup_last_run_exit_code') == 1
    assert after <= value(bad, 'ppbackup_last_run_start_timestamp_seconds') <= done
    assert value(bad, 'ppbackup_last_success_timestamp_seconds') == success  # carried over
    # The newest run in the slots is still the good one.
    assert after - started <= value(bad, 'ppbackup_newest_run_age_seconds') <= done - started
    assert bad['ppbackup_artifact_raw_bytes'] == [] or all(
        labels['artifact'] != f'psql {site.pg_db}'
        for labels, _ in bad['ppbackup_artifact_raw_bytes']
    )
    assert prom.stat().st_ino != inode  # replaced by rename, never rewritten in place
    assert [path.name for path in textfile.iterdir()] == ['ppbackup.prom']


def test_a_metrics_file_that_cannot_be_written_is_a_warning(site: Site) -> None:
    prom = site.root / 'no-such-folder' / 'ppbackup.prom'
    site.write_config(BACKUP_METRICS_FILE=str(prom))
    result = site.run()
    assert result.returncode == 0, result.stderr
    assert site.subjects() == ['[ppbackup] assoc: succeeded with 1 WARNING(s)']
    assert f'cannot write the metrics file {prom}' in site.mails()[0]['body']


def test_a_reader_never_sees_half_a_metrics_file(tmp_path: Path) -> None:
    prom = tmp_path / 'ppbackup.prom'
    versions = [
        ppbackup.prometheus_text(
            [('ppbackup_test', 'A test.', [({'backup': f'b{n}'}, n) for n in range(count)])]
        )
        for count in (1, 20000)  # a few bytes, and about a MiB
    ]
    seen: list[str] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(prom.read_text())
            except FileNotFoundError:
                pass

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for round_ in range(60):
            ppbackup.write_metrics(prom, versions[round_ % 2])
    finally:
        stop.set()
        reader.join()
    assert seen, 'the reader never ran'
    assert all(text in versions for text in seen)
    assert sorted(path.name for path in tmp_path.iterdir()) == ['ppbackup.prom']
    assert len(list(text_string_to_metric_families(prom.read_text()))) == 1


def test_label_values_are_escaped_for_the_parser() -> None:
    text = ppbackup.prometheus_text(
        [('ppbackup_x', 'X.', [({'artifact': 'psql "odd\\name"\nx'}, float('inf'))])]
    )
    [family] = text_string_to_metric_families(text)
    assert family.samples[0].labels == {'artifact': 'psql "odd\\name"\nx'}
    assert family.samples[0].value == float('inf')


def test_check_pings_the_log_endpoint_and_tries_the_metrics_folder(
    site: Site, monitor: Monitor
) -> None:
    textfile = site.root / 'node-exporter'
    textfile.mkdir()
    site.write_config(
        BACKUP_PING_URL=ping_url(monitor), BACKUP_METRICS_FILE=str(textfile / 'ppbackup.prom')
    )
    result = site.run('check')
    assert result.returncode == 0, result.stdout
    host = ping_url(monitor).split('/ping/')[0]
    assert f'ok    monitoring ping {host}/.../log: answers' in result.stdout
    assert f'ok    metrics file {textfile / "ppbackup.prom"}: its folder is writable' in (
        result.stdout
    )
    # URL/log records no run: check never starts or ends one on the monitoring server.
    assert [path for _, path, _ in monitor.hits] == [f'/ping/{TOKEN}/log']
    assert list(textfile.iterdir()) == []

    site.write_config(
        BACKUP_PING_URL=f'http://127.0.0.1:{free_port()}/{TOKEN}',
        BACKUP_METRICS_FILE=str(site.root / 'missing' / 'ppbackup.prom'),
    )
    result = site.run('check')
    assert result.returncode == 1
    fails = [line for line in result.stdout.splitlines() if line.startswith('FAIL')]
    assert any('monitoring ping' in line and 'Connection refused' in line for line in fails)
    assert any('metrics file' in line and 'cannot write in' in line for line in fails)


def test_dry_run_names_the_ping_and_the_metrics_and_sends_nothing(
    site: Site, monitor: Monitor
) -> None:
    prom = site.root / 'ppbackup.prom'
    site.write_config(BACKUP_PING_URL=ping_url(monitor), BACKUP_METRICS_FILE=str(prom))
    result = site.run('run', '--dry-run')
    assert result.returncode == 0, result.stderr
    host = ping_url(monitor).split('/ping/')[0]
    assert f'ping: {host}/.../start, then /... or /.../fail' in result.stdout
    assert f'metrics: {prom}' in result.stdout
    assert monitor.hits == [] and not prom.exists()


def test_only_web_ping_urls_are_accepted(site: Site) -> None:
    site.write_config(BACKUP_PING_URL='file:///etc/passwd')
    result = site.run()
    assert result.returncode == 2
    assert 'BACKUP_PING_URL: give an http:// or https:// URL' in result.stderr


def test_a_too_old_python_gnupg_is_named_at_start(site: Site, tmp_path: Path) -> None:
    # Installing an old release here would need the network: a stand-in module that claims to be
    # 0.4.6 (Debian 11's) is enough for the version check, which runs before gpg is used.
    old = tmp_path / 'old-gnupg'
    old.mkdir()
    (old / 'gnupg.py').write_text("__version__ = '0.4.6'\n\n\nclass GPG:\n    pass\n")
    result = subprocess.run(
        [sys.executable, str(REPO / 'ppbackup.py'), 'check'],
        env={**site.env, 'PYTHONPATH': str(old)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert 'python-gnupg 0.4.6 is too old: ppbackup needs 0.4.9 or later' in result.stderr
    assert 'apt-get install python3-gnupg' in result.stderr
    assert ppbackup.python_gnupg_problem('0.4.9') == ''
    assert ppbackup.python_gnupg_problem('0.5.7') == ''
    assert ppbackup.python_gnupg_problem(ppbackup.gnupg.__version__) == ''
    assert 'python-gnupg>=0.4.9' in (REPO / 'setup.cfg').read_text()  # the same floor

    (old / 'gnupg.py').write_text("raise ImportError('no module named gnupg')\n")
    result = subprocess.run(
        [sys.executable, str(REPO / 'ppbackup.py'), 'check'],
        env={**site.env, 'PYTHONPATH': str(old)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith('ppbackup: python-gnupg is missing: apt-get install')
