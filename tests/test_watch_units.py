"""Watch's pure parts on their own: retention by watch's own times (H4, H7) and its state file.

No sshd, no subprocess, no files: hand-built runs and a clock given as an argument. The times are
local, as watch's ISO weeks are.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest

from ppbackup import (
    WATCH_DAY_KEEP,
    WATCH_WEEK_KEEP,
    KeptRun,
    RunKey,
    expired,
    names_to_remove,
    runs_from_state,
    state_bytes,
)

DAY = 86400


def at(text: str) -> float:
    """Given a local time 'YYYY-MM-DD HH:MM', return it as seconds since 1970."""
    return dt.datetime.strptime(text, '%Y-%m-%d %H:%M').timestamp()


def kept(
    slot: str,
    first_seen: float,
    name: str = 'site',
    tree: str = 'backups',
    files: tuple[str, ...] = (),
    manifest: str = '',
) -> KeptRun:
    """Return a kept run of BACKUP_NAME ``name`` in ``tree``/``slot``, first seen then."""
    stamp = f'{dt.datetime.fromtimestamp(first_seen):%Y%m%d-%H%M%S}'
    key = RunKey(tree, slot, manifest or f'{name}-{stamp}.sha256')
    listed = {each: f'{len(each):064x}' for each in files or (f'{name}-{stamp}-files.tar.gpg',)}
    return KeptRun(key, '0' * 64, listed, first_seen, first_seen, 1000)


def gone(runs: list[KeptRun], now: float) -> list[KeptRun]:
    return expired(runs, now)


# ---------------------------------------------------------------------------------------------------
# expired: a day run 7 days, the newest week-slot run of an ISO week 53 weeks, the newest always.
# ---------------------------------------------------------------------------------------------------


def test_a_day_run_stays_7_days_to_the_second() -> None:
    day = kept('day1', at('2027-03-01 04:00'))
    newer = kept('day2', at('2027-03-20 04:00'))
    assert gone([day, newer], day.first_seen + WATCH_DAY_KEEP) == []
    assert gone([day, newer], day.first_seen + WATCH_DAY_KEEP + 1) == [day]


def test_the_newest_run_stays_however_old() -> None:
    only = kept('day3', at('2020-01-01 04:00'))
    assert gone([only], at('2027-01-01 04:00')) == []
    older = kept('day2', at('2019-12-31 04:00'))
    assert gone([older, only], at('2027-01-01 04:00')) == [older]
    assert gone([], at('2027-01-01 04:00')) == []


def test_the_newest_week_slot_run_of_an_iso_week_stays_53_weeks() -> None:
    monday = kept('wk10', at('2027-03-08 04:00'))
    sunday = kept('wk10', at('2027-03-14 04:00'))
    later = kept('day1', at('2028-06-01 04:00'))
    runs = [monday, sunday, later]
    # Monday's run is a week run too, but not the newest of its week: a day run's 7 days.
    assert gone(runs, monday.first_seen + WATCH_DAY_KEEP) == []
    assert gone(runs, monday.first_seen + WATCH_DAY_KEEP + 1) == [monday]
    assert gone(runs, sunday.first_seen + WATCH_WEEK_KEEP) == [monday]
    assert gone(runs, sunday.first_seen + WATCH_WEEK_KEEP + 1) == [monday, sunday]


def test_a_week_ends_on_sunday_night() -> None:
    sunday = kept('wk10', at('2027-03-14 23:59'))
    monday = kept('wk11', at('2027-03-15 00:00'))
    later = kept('day1', at('2027-09-01 04:00'))
    assert gone([sunday, monday, later], at('2027-09-01 05:00')) == []


def test_an_iso_week_spans_the_new_year() -> None:
    # 2026-12-31 (Thursday) and 2027-01-03 (Sunday) are both in the ISO week 2026-W53.
    thursday = kept('wk53', at('2026-12-31 04:00'))
    sunday = kept('wk53', at('2027-01-03 04:00'))
    monday = kept('wk1', at('2027-01-04 04:00'))  # 2027-W01
    later = kept('day1', at('2027-06-01 04:00'))
    assert gone([thursday, sunday, monday, later], at('2027-06-01 05:00')) == [thursday]


def test_each_backup_name_and_each_tree_has_its_own_newest_of_a_week() -> None:
    when = at('2027-03-10 04:00')
    site = kept('wk10', when, name='site')
    shop = kept('wk10', when + 60, name='shop')
    other = kept('wk10', when + 120, name='site', tree='other')
    odd = kept('wk10', when + 180, manifest='hand-written.sha256')  # no BACKUP_NAME in it
    later = kept('day1', at('2027-09-01 04:00'))
    assert gone([site, shop, other, odd, later], at('2027-09-01 05:00')) == []


def test_a_day_slot_run_is_never_a_week_run() -> None:
    day = kept('day3', at('2027-03-10 04:00'))
    later = kept('day4', at('2027-03-20 04:00'))
    assert gone([day, later], at('2027-03-20 05:00')) == [day]


def test_a_first_seen_in_the_future_pushes_no_run_out_before_its_time() -> None:
    now = at('2027-03-20 04:00')
    future = kept('day1', now + 365 * DAY)  # a clock that was once set ahead
    week = kept('wk10', now - 300 * DAY)
    day = kept('day2', now - 6 * DAY)
    old = kept('day3', now - 8 * DAY)
    assert gone([future, week, day, old], now) == [old]
    assert gone([future], now + 400 * DAY) == []  # the newest, still


def test_expired_runs_come_in_the_order_of_their_keys_text() -> None:
    when = at('2027-03-01 04:00')
    first = kept('day1', when, tree='backups-2')  # '-' sorts before '/'
    second = kept('day1', when, tree='backups')
    newest = kept('day2', when + 30 * DAY)
    assert gone([second, newest, first], when + 20 * DAY) == [first, second]


# ---------------------------------------------------------------------------------------------------
# names_to_remove: a name goes only when no run that stays names it (H7).
# ---------------------------------------------------------------------------------------------------


def test_a_name_a_staying_run_names_stays() -> None:
    when = at('2027-03-01 04:00')
    going = kept('day1', when, files=('a.gpg', 'shared.gpg'))
    staying = kept('day1', when + DAY, files=('shared.gpg',))
    assert names_to_remove([going], [staying]) == {going.key: [going.key.manifest, 'a.gpg']}


def test_the_same_name_in_another_slot_is_another_file() -> None:
    when = at('2027-03-01 04:00')
    going = kept('day1', when, files=('a.gpg',))
    elsewhere = kept('wk9', when, files=('a.gpg',), manifest=going.key.manifest)
    other_tree = kept('day1', when, tree='other', files=('a.gpg',))
    assert names_to_remove([going], [elsewhere, other_tree]) == {
        going.key: [going.key.manifest, 'a.gpg']
    }


def test_two_expiring_runs_sharing_a_name_both_list_it() -> None:
    when = at('2027-03-01 04:00')
    first = kept('day1', when, files=('shared.gpg',))
    second = kept('day1', when + 60, files=('shared.gpg', 'b.gpg'))
    assert names_to_remove([first, second], []) == {
        first.key: [first.key.manifest, 'shared.gpg'],
        second.key: [second.key.manifest, 'shared.gpg', 'b.gpg'],
    }


def test_a_claimed_manifest_name_stays_with_its_staying_run() -> None:
    when = at('2027-03-01 04:00')
    staying = kept('day1', when, files=('a.gpg',))
    claim = kept('day1', when + 60, files=(staying.key.manifest, 'a.gpg', 'junk.gpg'))
    assert names_to_remove([claim], [staying]) == {claim.key: [claim.key.manifest, 'junk.gpg']}


# ---------------------------------------------------------------------------------------------------
# The state file: today's format, read and written back byte for byte.
# ---------------------------------------------------------------------------------------------------

STATE = b"""{
 "runs": {
  "backups/day4/site-20270304-040000.sha256": {
   "bytes": 2345,
   "files": {
    "site-20270304-040000-db.sql.zst.gpg": "%(a)s",
    "site-20270304-040000-files.tar.zst.gpg": "%(b)s"
   },
   "first_seen": 1804125601.25,
   "hashed": 1804730401.5,
   "manifest_name": "site-20270304-040000.sha256",
   "manifest_sha256": "%(c)s"
  }
 },
 "version": 1
}""" % {b'a': b'a' * 64, b'b': b'b' * 64, b'c': b'c' * 64}


def test_the_state_file_reads_and_writes_back_byte_for_byte() -> None:
    runs = runs_from_state(json.loads(STATE))
    key = RunKey('backups', 'day4', 'site-20270304-040000.sha256')
    assert list(runs) == [key]
    run = runs[key]
    assert (run.first_seen, run.hashed, run.size) == (1804125601.25, 1804730401.5, 2345)
    assert run.manifest_sha256 == 'c' * 64 and run.backup_name == 'site'
    assert run.names == [key.manifest, *sorted(run.files)]
    assert state_bytes(runs.values()) == STATE
    assert str(key) == 'backups/day4/site-20270304-040000.sha256'
    assert RunKey.parse(str(key)) == key


def test_an_old_state_file_without_the_scrub_time_loads() -> None:
    document = json.loads(STATE)
    entry = next(iter(document['runs'].values()))
    del entry['hashed']
    (run,) = runs_from_state(document).values()
    assert run.hashed == run.first_seen  # last hashed when it was kept
    assert run.to_json() == {**entry, 'hashed': entry['first_seen']}


def test_a_state_without_runs_holds_none() -> None:
    assert runs_from_state([]) == {}
    assert runs_from_state({'version': 1}) == {}
    assert runs_from_state({'version': 1, 'runs': []}) == {}
    assert state_bytes([]) == b'{\n "runs": {},\n "version": 1\n}'


@pytest.mark.parametrize(
    'change',
    [
        {'first_seen': 'yesterday'},
        {'first_seen': None},
        {'hashed': True},
        {'files': ['a.gpg']},
        {'files': {'a.gpg': 1}},
        {'manifest_name': 'other.sha256'},
        {'manifest_sha256': None},
        {'bytes': 1.5},
    ],
)
def test_a_malformed_run_in_the_state_file_is_an_error(change: dict[str, object]) -> None:
    document = json.loads(STATE)
    for entry in document['runs'].values():
        entry.update(change)
    with pytest.raises(ValueError, match='the run backups/day4/'):
        runs_from_state(document)


@pytest.mark.parametrize('key', ['backups/day4', 'a/b/c/d.sha256', ''])
def test_a_key_that_is_not_tree_slot_manifest_is_an_error(key: str) -> None:
    document = json.loads(STATE)
    document['runs'] = {key: next(iter(document['runs'].values()))}
    with pytest.raises(ValueError, match='not a "TREE/SLOT/MANIFEST" key'):
        runs_from_state(document)
    with pytest.raises(ValueError):
        runs_from_state({'runs': {'backups/day1/x.sha256': 'not an object'}})
