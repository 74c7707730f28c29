"""FAULTS.md is the repository's list of promises: every row names the tests that prove it.

This keeps it true as the code changes: a row that names no test, a test it names that does not
exist (renamed or deleted), or a test named after a row that the document lacks, fails here.
"""

from __future__ import annotations

import re

from conftest import REPO

ROW_RE = re.compile(r'^\| ([A-Z][0-9]+) \| (.+?) \| (.*) \|$', re.M)
CELL_RE = re.compile(r'`(test_[a-z_]+\.py)::(test_\w+)`')
ROW_TEST_RE = re.compile(r'^def (test_((?:[A-Z][0-9]+_)+)\w*)', re.M)


def rows() -> dict[str, list[tuple[str, str]]]:
    """Return {row id: [(file, test)]} as FAULTS.md lists them."""
    text = (REPO / 'FAULTS.md').read_text()
    found: dict[str, list[tuple[str, str]]] = {}
    for row_id, _promise, cells in ROW_RE.findall(text):
        assert row_id not in found, f'{row_id} is listed twice'
        found[row_id] = CELL_RE.findall(cells)
    return found


def defined() -> dict[str, str]:
    """Return {test name: its file} of every test function under tests/."""
    tests = {}
    for path in sorted((REPO / 'tests').glob('test_*.py')):
        for match in re.finditer(r'^def (test_\w+)', path.read_text(), re.M):
            tests[match.group(1)] = path.name
    return tests


def test_every_promise_names_tests_that_exist() -> None:
    listed, tests = rows(), defined()
    assert len(listed) >= 60, sorted(listed)
    for row_id, cells in listed.items():
        assert cells, f'FAULTS.md row {row_id} names no test'
        for file, name in cells:
            assert tests.get(name) == file, f'FAULTS.md row {row_id}: no {file}::{name}'


def test_every_test_named_after_a_row_is_listed_under_it() -> None:
    listed = rows()
    for path in sorted((REPO / 'tests').glob('test_*.py')):
        for name, ids in ROW_TEST_RE.findall(path.read_text()):
            for row_id in ids.rstrip('_').split('_'):
                assert row_id in listed, f'{path.name}::{name} names row {row_id}, not in FAULTS.md'
                assert (path.name, name) in listed[row_id], f'{name} is not listed under {row_id}'
