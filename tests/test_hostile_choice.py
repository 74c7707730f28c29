"""A hostile run, seen from the key holder (FAULTS.md A7, A8).

After a break-in of the web host every run it sends is the attacker's: names, manifests, indexes
and mtimes. These tests forge runs from the public key alone (tests/forge.py) beside genuine ones
and prove that a run is data, never instructions:

- A7: ``restore`` and ``drill`` choose a run by the backup host's own first-seen record
  (``first-seen.json`` beside the slots) when it is there, else by run id, never by mtime; a run
  whose manifest does not match the record is skipped; ``--arrived-before`` picks the last run
  before a break-in; a malformed record is a sentence, not a silent fallback.
- A8: a manifest naming anything but a plain file of its slot (``../x``, ``/x``, ``slot/x``) is
  refused before anything it names is opened; a malformed index is a sentence and exit 1, never a
  traceback, and nothing of the run is restored.

Each run's only content is a files archive whose one file says which run it is, so that
``restore RUN --files DIR`` shows which run was chosen, without a database server.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import forge
import pytest
from conftest import Site

FUTURE = 1893456000.0  # 2030-01-01: the mtime an attacker gives a forged run
T_OLD = 1793505600.0  # 2026-11-01 04:00 UTC: watch first saw the older genuine run
T_NEW = 1793592000.0  # 2026-11-02 04:00 UTC: and the newer one
OLD_ID, NEW_ID = '20261101-030000', '20261102-030000'


class Runs:
    """A folder of slots fetched from the backup host (``kept/backups``), and runs forged in it."""

    def __init__(self, tmp_path: Path, site: Site) -> None:
        self.site = site
        self.tree = tmp_path / 'kept' / 'backups'
        self.out = tmp_path / 'out'
        self.home = forge.public_keyring(tmp_path, site.keys.public[site.keys.alice])

    def write(self, slot: str, run_id: str, says: str, **options: Any) -> Path:
        """Write a run into ``slot`` whose files archive holds www/which.txt saying ``says``."""
        tar = forge.tar_bytes([(forge.member('www/which.txt'), says.encode())])
        return forge.write_run(
            self.tree / slot,
            self.home,
            self.site.keys.alice,
            {'files': tar},
            run_id=run_id,
            **options,
        )

    def forge_future(self, slot: str, run_id: str) -> Path:
        """Write a forged run and date its manifest and files in 2030, as ``touch -d`` would."""
        manifest = self.write(slot, run_id, 'forged')
        for path in manifest.parent.iterdir():
            if run_id in path.name:
                os.utime(path, (FUTURE, FUTURE))
        return manifest

    def record(self, runs: dict[Path, float], digests: dict[Path, str] | None = None) -> None:
        """Write watch's first-seen record listing ``runs`` (manifest -> first seen)."""
        listed = {}
        for manifest, seen in runs.items():
            digest = (digests or {}).get(manifest)
            digest = digest or hashlib.sha256(manifest.read_bytes()).hexdigest()
            key = f'{manifest.parent.name}/{manifest.name}'
            listed[key] = {'first_seen': seen, 'sha256': digest}
        record = {'format': 'ppbackup-first-seen', 'version': 1, 'host': 'backuphost'}
        (self.tree / 'first-seen.json').write_text(json.dumps({**record, 'runs': listed}))

    def restore(self, run: Path | str, *options: str) -> subprocess.CompletedProcess[str]:
        shutil.rmtree(self.out, ignore_errors=True)
        gnupghome = str(self.site.keys.holder)
        files = str(self.out)
        return self.site.run(
            'restore', str(run), '--files', files, '--gnupghome', gnupghome, *options
        )

    def restored(self) -> str:
        return (self.out / 'www' / 'which.txt').read_text()


@pytest.fixture
def runs(tmp_path: Path, site: Site) -> Runs:
    return Runs(tmp_path, site)


def assert_refused(result: subprocess.CompletedProcess[str], words: str) -> None:
    """A refusal: exit 1, one ppbackup sentence holding ``words``, no traceback."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'Traceback' not in result.stderr, result.stderr
    assert result.stderr.startswith('ppbackup: '), result.stderr
    assert words in result.stderr, result.stderr


def test_A7_a_future_mtime_does_not_win_without_a_record_the_run_id_does(runs: Runs) -> None:
    runs.write('day1', OLD_ID, 'genuine-old')
    runs.write('day2', NEW_ID, 'genuine-new')
    runs.write('day4', '23xx', 'hour-only')  # an id of before run ids: sorts first
    runs.forge_future('day3', '20261020-030000')
    result = runs.restore(runs.tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert runs.restored() == 'genuine-new'
    assert f'day2/assoc-{NEW_ID}.sha256' in result.stdout
    assert "the newest run by its run id, which is the sender's word" in result.stdout


def test_A7_with_the_first_seen_record_only_the_runs_it_lists_count(runs: Runs) -> None:
    old = runs.write('day1', OLD_ID, 'genuine-old')
    new = runs.write('day2', NEW_ID, 'genuine-new')
    runs.forge_future('day3', '20261231-235959')  # a later id and a future mtime: not listed
    runs.record({old: T_OLD, new: T_NEW})
    result = runs.restore(runs.tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert runs.restored() == 'genuine-new'
    assert 'first seen by the backup host backuphost at 2026-11-02 04:00:00 UTC' in result.stdout
    assert 'skipped 1 run(s): 1 not in the first-seen record' in result.stderr
    # The record's order wins over the run ids'.
    runs.record({old: T_NEW + 60, new: T_NEW})
    result = runs.restore(runs.tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert runs.restored() == 'genuine-old'
    # A slot finds the record in its parent.
    result = runs.restore(runs.tree / 'day2')
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'first seen by the backup host backuphost at 2026-11-02 04:00:00 UTC' in result.stdout


def test_A7_arrived_before_picks_the_last_run_before_the_break_in(runs: Runs) -> None:
    old = runs.write('day1', OLD_ID, 'genuine-old')
    new = runs.write('day2', NEW_ID, 'genuine-new')
    result = runs.restore(runs.tree, '--arrived-before', '2026-11-02')  # by run id
    assert result.returncode == 0, result.stdout + result.stderr
    assert runs.restored() == 'genuine-old'
    assert "which is the sender's word" in result.stdout
    runs.record({old: T_OLD, new: T_NEW})
    result = runs.restore(runs.tree, '--arrived-before', '2026-11-02T03:59:59+00:00')
    assert result.returncode == 0, result.stdout + result.stderr
    assert runs.restored() == 'genuine-old'
    assert 'first seen by the backup host backuphost at 2026-11-01 04:00:00 UTC' in result.stdout
    result = runs.restore(runs.tree, '--arrived-before', '2026-11-01')
    assert_refused(result, 'no run first seen before 2026-11-01 00:00:00 UTC')


def test_A7_a_run_whose_manifest_does_not_match_the_record_is_skipped(runs: Runs) -> None:
    old = runs.write('day1', OLD_ID, 'genuine-old')
    new = runs.write('day2', NEW_ID, 'genuine-new')
    runs.record({old: T_OLD, new: T_NEW}, digests={new: '0' * 64})
    result = runs.restore(runs.tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert runs.restored() == 'genuine-old'
    assert '1 whose manifest does not match it' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_A7_a_manifest_named_explicitly_is_used_and_said_whether_listed(runs: Runs) -> None:
    old = runs.write('day1', OLD_ID, 'genuine-old')
    forged = runs.forge_future('day3', '20261231-235959')
    runs.record({old: T_OLD})
    result = runs.restore(forged)
    assert result.returncode == 0, result.stdout + result.stderr
    assert runs.restored() == 'forged'
    assert 'the first-seen record of the backup host backuphost does not list this run' in (
        result.stdout
    )
    result = runs.restore(old)
    assert 'first seen by the backup host backuphost at 2026-11-01 04:00:00 UTC' in result.stdout


def test_A7_drill_chooses_as_restore_does(runs: Runs) -> None:
    runs.write('day2', NEW_ID, 'genuine-new')
    runs.forge_future('day3', '20261020-030000')
    gnupghome = str(runs.site.keys.holder)
    result = runs.site.run('drill', str(runs.tree), '--gnupghome', gnupghome)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'run:   assoc (' in result.stdout
    assert f'day2/assoc-{NEW_ID}.sha256' in result.stdout
    assert 'seen:  no first-seen record' in result.stdout


@pytest.mark.parametrize(
    'record',
    [
        b'{"format": "ppbackup-first-seen", "version": 1, "host": "backuphost", "runs": ',
        b'{"format": "ppbackup-first-seen", "version": 2, "host": "backuphost", "runs": {}}',
        b'{"format": "ppbackup-first-seen", "version": 1, "host": "b", "runs": {"day1/x": 5}}',
        b'{"format": "ppbackup-first-seen", "version": 1, "host": "b", "runs": {"../x": {}}}',
    ],
    ids=['not-json', 'version', 'run-not-object', 'bad-key'],
)
def test_A7_a_malformed_record_is_a_sentence(runs: Runs, record: bytes) -> None:
    runs.write('day1', OLD_ID, 'genuine-old')
    (runs.tree / 'first-seen.json').write_bytes(record)
    result = runs.restore(runs.tree)
    assert_refused(result, "not the backup host's first-seen record")
    assert not runs.out.exists()


@pytest.mark.parametrize('where', ['parent', 'absolute', 'other-slot'])
def test_A8_manifest_names_outside_the_run_are_refused(
    runs: Runs, tmp_path: Path, where: str
) -> None:
    index = f'assoc-rowcounts-{OLD_ID}.json.zst.gpg'
    outside = {
        'parent': runs.tree / index,
        'absolute': tmp_path / index,
        'other-slot': runs.tree / 'day9' / index,
    }[where]
    listed = {'parent': f'../{index}', 'absolute': str(outside), 'other-slot': f'day9/{index}'}
    manifest = runs.write('day1', OLD_ID, 'genuine-old', manifest_names={index: listed[where]})
    # The file outside is a sound copy of the index: on today's code it is opened and used.
    outside.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(manifest.parent / index, outside)
    before = outside.read_bytes(), outside.stat().st_mtime_ns
    result = runs.restore(manifest)
    assert_refused(result, 'this run is refused, and nothing it names is opened')
    assert 'a path, not a file name' in result.stderr
    assert not runs.out.exists()
    assert (outside.read_bytes(), outside.stat().st_mtime_ns) == before


def test_A8_a_manifest_that_is_a_symlink_is_not_followed(runs: Runs, tmp_path: Path) -> None:
    manifest = runs.write('day1', OLD_ID, 'genuine-old')
    elsewhere = tmp_path / 'elsewhere.sha256'
    manifest.rename(elsewhere)
    manifest.symlink_to(elsewhere)
    assert_refused(runs.restore(manifest), 'a symlink; not followed')


def _files_index(runs: Runs, change: dict[str, Any], run_id: str = OLD_ID) -> dict[str, Any]:
    index = forge.default_index({'files': f'assoc-files-{run_id}.tar.zst.gpg'})
    index.update(change)
    return {key: value for key, value in index.items() if value != 'DELETE'}


@pytest.mark.parametrize(
    'index',
    [
        b'{"format": 1, "name": ',
        {'archives': f'assoc-files-{OLD_ID}.tar.zst'},
        {'databases': [{'kind': 'psql', 'file': f'assoc-files-{OLD_ID}.tar.zst', 'rows': {}}]},
        {'databases': [{'kind': 'sqlite', 'database': 'd', 'file': 'f', 'rows': {}}]},
        {'lacks': [1]},
        {'name': 'DELETE'},
        {'archives': [f'assoc-files-{OLD_ID}.tar.zst', 'assoc-files-other.tar.zst']},
        {'pg_roles': f'../assoc-files-{OLD_ID}.tar.zst'},
    ],
    ids=[
        'not-json',
        'archives-a-string',
        'database-lacks-its-name',
        'unknown-kind',
        'lacks-not-strings',
        'missing-name',
        'names-a-file-not-in-the-manifest',
        'names-a-path',
    ],
)
def test_A8_a_malformed_index_is_a_sentence_and_exit_1(
    runs: Runs, index: bytes | dict[str, Any]
) -> None:
    raw = index if isinstance(index, bytes) else _files_index(runs, index)
    manifest = runs.write('day1', OLD_ID, 'genuine-old', index=raw)
    result = runs.restore(manifest)
    assert_refused(result, 'index')
    assert not (runs.out / 'www').exists()


def test_A8_a_week_slot_run_lacks_only_its_binaries(runs: Runs) -> None:
    # The index is the run's, shared by its day and week slots; a week slot keeps no binaries.
    binaries = f'assoc-binaries-{NEW_ID}.tar.zst'
    index = _files_index(runs, {}, NEW_ID)
    index['archives'] = [f'assoc-files-{NEW_ID}.tar.zst', binaries]
    manifest = runs.write('wk44', NEW_ID, 'genuine-new', index=index)
    result = runs.restore(manifest)
    assert result.returncode == 0, result.stdout + result.stderr
    assert runs.restored() == 'genuine-new'
    assert f'note: {binaries} is not in this slot: a week slot keeps no binaries' in result.stdout
    assert 'WARNING' not in result.stdout  # by design, not a loss
