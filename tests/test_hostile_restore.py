"""A hostile run, seen from the key holder: what a run holds can fail a restore, never act.

After a break-in every run is the attacker's. Each run here is built as the attacker would build it,
from the key holder's public key alone (tests/forge.py: zstd, ``gpg -e -r``, sha256sum, a
hand-written index), and restored or drilled with the key holder's private key: onto the fresh
servers of test_restore, or by the drill onto servers of its own. Every attack aims at a canary
file in a folder that any user can write (the servers' own OS users included); none may appear,
and the real servers keep what they had.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import forge
import pytest
from conftest import Site, drill_env, drill_leftovers, mysql, psql, sh
from test_restore import fresh_mariadb, fresh_pg, my_on, on  # noqa: F401 (fixtures)


@pytest.fixture
def canary_dir() -> Iterator[Path]:
    """A folder any user can write: where every attack tries to leave a file."""
    folder = Path(tempfile.mkdtemp(prefix='ppbt-canary-', dir='/tmp'))
    folder.chmod(0o1777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def attacker(site: Site, tmp_path: Path) -> Path:
    """The attacker's GnuPG home: the key holder's public key and nothing else."""
    return forge.public_keyring(tmp_path, site.keys.public[site.keys.alice])


def forged(site: Site, tmp_path: Path, files: dict[str, bytes], **index: Any) -> Path:
    """Return the manifest of a forged run holding ``files``, its index changed by ``index``."""
    home = attacker(site, tmp_path)
    written = {kind: f'{forge.NAME}-{kind}-20260101-010101.sql.zst' for kind in files}
    full = {**forge.default_index({k: v + '.gpg' for k, v in written.items()}), **index}
    for entry in full['databases']:
        entry['file'] = written[entry['kind']]
    slot = tmp_path / f'run-{secrets.token_hex(3)}' / 'day1'
    return forge.write_run(slot, home, site.keys.alice, files, index=full)


def holder(site: Site, *args: str, env: dict[str, str] | None = None) -> Any:
    return site.run(*args, '--gnupghome', str(site.keys.holder), extra_env=env)


def drill(site: Site, manifest: Path) -> subprocess.CompletedProcess[str]:
    return holder(site, 'drill', str(manifest), '--mail', 'keeper@example.org', env=drill_env())


PG_ATTACKS = {
    'line start': '\\! touch {canary}\n',
    'mid-line': 'SELECT 1; \\! touch {canary}\n',
    'output': '\\o {canary}\nSELECT 1;\n',
    'copy program': "\\copy (SELECT 1) TO PROGRAM 'touch {canary}'\n",
    'include': '\\i {canary}\n',
}


def pg_db_entry(db: str) -> dict[str, Any]:
    return {'kind': 'psql', 'database': db, 'file': '', 'rows': {}}


# ---------------------------------------------------------------------------------------------------
# A1: psql backslash commands in a dump or in the roles file.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('attack', sorted(PG_ATTACKS))
def test_A1_a_dump_with_psql_backslash_commands_runs_none_on_restore_or_drill(
    site: Site, tmp_path: Path, canary_dir: Path, fresh_pg: dict[str, str], attack: str
) -> None:
    canary = canary_dir / 'pwned'
    db = f'ppbt_evil_{secrets.token_hex(3)}'
    body = 'CREATE TABLE t (n int);\n' + PG_ATTACKS[attack].format(canary=canary)
    manifest = forged(
        site, tmp_path, {'psql': forge.pg_dump_text(db, body)}, databases=[pg_db_entry(db)]
    )
    restored = holder(site, 'restore', str(manifest), env=fresh_pg)
    assert restored.returncode == 1, restored.stdout + restored.stderr
    assert 'holds a psql backslash command' in restored.stderr, restored.stderr
    assert 'refused' in restored.stderr and 'line ' in restored.stderr
    drilled = drill(site, manifest)
    assert drilled.returncode == 1, drilled.stdout + drilled.stderr
    assert 'drill: FAILED' in drilled.stdout and 'backslash command' in drilled.stdout
    assert not canary.exists()


def test_A1_the_refused_line_is_the_dumps_own(
    site: Site, tmp_path: Path, canary_dir: Path, fresh_pg: dict[str, str]
) -> None:
    canary = canary_dir / 'pwned'
    db = f'ppbt_evil_{secrets.token_hex(3)}'
    dump = forge.pg_dump_text(db, f'SELECT 1;\nSELECT 2; \\! touch {canary}\n')
    number = dump.decode().splitlines().index(f'SELECT 2; \\! touch {canary}') + 1
    manifest = forged(site, tmp_path, {'psql': dump}, databases=[pg_db_entry(db)])
    restored = holder(site, 'restore', str(manifest), env=fresh_pg)
    assert restored.returncode == 1
    assert f'line {number} of ' in restored.stderr and '(\\!)' in restored.stderr, restored.stderr
    assert not canary.exists()


@pytest.mark.parametrize(
    'roles',
    [
        'CREATE ROLE ppbt_r1;\n\\! touch {canary}\n',
        'CREATE ROLE ppbt_r2; \\! touch {canary}\n',
        "\\copy (SELECT 1) TO PROGRAM 'touch {canary}'\n",
        'CREATE ROLE ppbt_r3;\nDROP DATABASE postgres;\n',
        "ALTER ROLE ppbt_r4 SET session_preload_libraries TO '{canary}';\n",
    ],
)
def test_A1_the_roles_file_is_parsed_never_fed_to_psql(
    site: Site, tmp_path: Path, canary_dir: Path, fresh_pg: dict[str, str], roles: str
) -> None:
    canary = canary_dir / 'pwned'
    db = f'ppbt_evil_{secrets.token_hex(3)}'
    files = {
        'psql': forge.pg_dump_text(db, 'CREATE TABLE t (n int);'),
        'pg-roles': roles.format(canary=canary).encode(),
    }
    manifest = forged(site, tmp_path, files, databases=[pg_db_entry(db)])
    before = on(fresh_pg, 'postgres', 'SELECT rolname FROM pg_roles ORDER BY 1')
    restored = holder(site, 'restore', str(manifest), env=fresh_pg)
    assert restored.returncode == 1, restored.stdout + restored.stderr
    assert 'line ' in restored.stderr and 'refused' in restored.stderr, restored.stderr
    drilled = drill(site, manifest)
    assert drilled.returncode == 1 and 'refused' in drilled.stdout, drilled.stdout
    assert not canary.exists()
    # Refused before anything was made: the server has the roles it had, and no new database.
    assert on(fresh_pg, 'postgres', 'SELECT rolname FROM pg_roles ORDER BY 1') == before
    assert on(fresh_pg, 'postgres', f"SELECT 1 FROM pg_database WHERE datname = '{db}'") == ''


# ---------------------------------------------------------------------------------------------------
# A2: the mysql client's own commands in a dump or in the users file.
# ---------------------------------------------------------------------------------------------------

MY_ATTACKS = {
    'shell': '\\! touch {canary}\n',
    'system': 'system touch {canary}\n',
    'tee': 'tee {canary}\nSELECT 1;\n',
    'local infile': "CREATE TABLE t (s TEXT);\nLOAD DATA LOCAL INFILE '{secret}' INTO TABLE t;\n",
}


@pytest.mark.parametrize('where', ['mysql', 'mariadb-users'])
@pytest.mark.parametrize('attack', sorted(MY_ATTACKS))
def test_A2_mariadb_client_commands_run_none(
    site: Site,
    tmp_path: Path,
    canary_dir: Path,
    fresh_mariadb: Path,
    attack: str,
    where: str,
) -> None:
    canary = canary_dir / 'pwned'
    secret = tmp_path / 'private-key'
    secret.write_text('the key holder secret')
    db = f'ppbt_evil_{secrets.token_hex(3)}'
    text = MY_ATTACKS[attack].format(canary=canary, secret=secret)
    dump = 'CREATE TABLE ok (n INT);\n' + (text if where == 'mysql' else '') + '-- Dump completed\n'
    users = '-- users\n' + (text if where == 'mariadb-users' else '') + '-- Dump completed\n'
    files = {'mysql': dump.encode(), 'mariadb-users': users.encode()}
    entry = {'kind': 'mysql', 'database': db, 'file': '', 'rows': {}}
    manifest = forged(site, tmp_path, files, databases=[entry])
    restored = site.run(
        'restore', str(manifest), '--gnupghome', str(site.keys.holder),
        '--mysql-defaults', str(fresh_mariadb),
    )  # fmt: skip
    assert restored.returncode == 1, restored.stdout + restored.stderr
    drilled = drill(site, manifest)
    assert drilled.returncode == 1, drilled.stdout
    assert not canary.exists()
    leaked = my_on(
        fresh_mariadb,
        f"SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{db}' AND TABLE_NAME = 't'",
    )
    if leaked.strip() == '1':
        assert my_on(fresh_mariadb, 'SELECT COUNT(*) FROM t', db).strip() == '0'
    my_on(fresh_mariadb, f'DROP DATABASE IF EXISTS `{db}`')


# ---------------------------------------------------------------------------------------------------
# A4: SQL that acts beyond its target reaches nothing real in a drill.
# ---------------------------------------------------------------------------------------------------


def test_A4_a_drill_of_sql_that_drops_a_real_database_or_runs_a_program_reaches_nothing(
    site: Site, tmp_path: Path, canary_dir: Path
) -> None:
    canary = canary_dir / 'pwned'
    live_pg, live_my = f'ppbt_live_{secrets.token_hex(3)}', f'ppbt_live_{secrets.token_hex(3)}'
    sh('createdb', live_pg)
    mysql('', f'CREATE DATABASE `{live_my}`')
    try:
        pg_body = (
            f'DROP DATABASE IF EXISTS {live_pg};\n'
            f"COPY (SELECT 1) TO PROGRAM 'touch {canary}';\n"
            'ALTER ROLE ppdrill SUPERUSER;\n'
        )
        my_body = (
            f'DROP DATABASE IF EXISTS `{live_my}`;\n'
            f"SELECT 'x' INTO OUTFILE '{canary_dir / 'outfile'}';\n"
            '-- Dump completed\n'
        )
        pg_db, my_db = f'ppbt_evil_{secrets.token_hex(3)}', f'ppbt_evil_{secrets.token_hex(3)}'
        entries = [pg_db_entry(pg_db), {'kind': 'mysql', 'database': my_db, 'file': '', 'rows': {}}]
        files = {'psql': forge.pg_dump_text(pg_db, pg_body), 'mysql': my_body.encode()}
        drilled = drill(site, forged(site, tmp_path, files, databases=entries))
        assert drilled.returncode == 1 and 'drill: FAILED' in drilled.stdout, drilled.stdout
        assert psql('postgres', f"SELECT 1 FROM pg_database WHERE datname = '{live_pg}'") == '1\n'
        assert mysql('', f"SHOW DATABASES LIKE '{live_my}'").strip() == live_my
        assert not canary.exists() and not (canary_dir / 'outfile').exists()
        assert drill_leftovers() == []  # servers gone
    finally:
        sh('dropdb', '--if-exists', '--force', live_pg, check=False)
        mysql('', f'DROP DATABASE IF EXISTS `{live_my}`')


# ---------------------------------------------------------------------------------------------------
# A5: a server's own databases are never a target; --replace acts only on the databases named.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'kind, db', [('psql', 'postgres'), ('psql', 'template1'), ('mysql', 'mysql'), ('mysql', 'sys')]
)
def test_A5_an_index_naming_a_system_database_is_refused_with_replace(
    site: Site,
    tmp_path: Path,
    fresh_pg: dict[str, str],
    fresh_mariadb: Path,
    kind: str,
    db: str,
) -> None:
    dump = (
        forge.pg_dump_text(db, 'CREATE TABLE hijacked (n int);')
        if kind == 'psql'
        else b'CREATE TABLE hijacked (n INT);\n-- Dump completed\n'
    )
    entry = {'kind': kind, 'database': db, 'file': '', 'rows': {}}
    manifest = forged(site, tmp_path, {kind: dump}, databases=[entry])
    pg_before = on(fresh_pg, 'postgres', 'SELECT datname FROM pg_database ORDER BY 1')
    my_before = my_on(fresh_mariadb, 'SELECT COUNT(*) FROM mysql.user')
    restored = site.run(
        'restore', str(manifest), '--replace', '--database', db,
        '--gnupghome', str(site.keys.holder), '--mysql-defaults', str(fresh_mariadb),
        extra_env=fresh_pg,
    )  # fmt: skip
    assert restored.returncode == 2, restored.stdout + restored.stderr
    assert 'not a database ppbackup restores to' in restored.stderr
    assert on(fresh_pg, 'postgres', 'SELECT datname FROM pg_database ORDER BY 1') == pg_before
    assert my_on(fresh_mariadb, 'SELECT COUNT(*) FROM mysql.user') == my_before
    assert 'hijacked' not in on(fresh_pg, 'postgres', 'SELECT relname FROM pg_class')
    assert my_on(fresh_mariadb, "SHOW TABLES FROM mysql LIKE 'hijacked'") == ''


def test_A5_replace_without_the_databases_named_is_refused(
    site: Site, tmp_path: Path, fresh_pg: dict[str, str]
) -> None:
    db = f'ppbt_evil_{secrets.token_hex(3)}'
    files = {'psql': forge.pg_dump_text(db, 'CREATE TABLE t (n int);')}
    manifest = forged(site, tmp_path, files, databases=[pg_db_entry(db)])
    restored = holder(site, 'restore', str(manifest), '--replace', env=fresh_pg)
    assert restored.returncode == 2
    assert '--replace acts only on the databases you name' in restored.stderr
    assert on(fresh_pg, 'postgres', f"SELECT 1 FROM pg_database WHERE datname = '{db}'") == ''


def test_A5_a_restore_says_what_it_will_create_and_add_before_it_starts(
    site: Site, tmp_path: Path, fresh_pg: dict[str, str]
) -> None:
    db, role = f'ppbt_plan_{secrets.token_hex(3)}', f'ppbt_planrole_{secrets.token_hex(3)}'
    roles = f'CREATE ROLE {role};\nALTER ROLE {role} WITH SUPERUSER LOGIN;\n'
    files = {'psql': forge.pg_dump_text(db, 'CREATE TABLE t (n int);'), 'pg-roles': roles.encode()}
    manifest = forged(site, tmp_path, files, databases=[pg_db_entry(db)])
    restored = holder(site, 'restore', str(manifest), env=fresh_pg)
    try:
        assert restored.returncode == 0, restored.stderr
        lines = restored.stdout.splitlines()
        plan = [
            f'will create PostgreSQL database {db}',
            f'will add PostgreSQL role {role} (SUPERUSER)',
        ]
        start = next(n for n, line in enumerate(lines) if line.startswith('will '))
        assert lines[start : start + 2] == plan, restored.stdout
        assert lines.index(plan[1]) < lines.index(f'restored PostgreSQL database {db}')
    finally:
        on(fresh_pg, 'postgres', f'DROP DATABASE IF EXISTS {db}')
        on(fresh_pg, 'postgres', f'DROP ROLE IF EXISTS {role}')


# ---------------------------------------------------------------------------------------------------
# A6: what a restore made is what the server says, never names spelt to collide.
# ---------------------------------------------------------------------------------------------------


def test_A6_an_account_spelt_to_collide_is_never_counted_as_made(
    site: Site, tmp_path: Path, fresh_mariadb: Path
) -> None:
    db = f'ppbt_evil_{secrets.token_hex(3)}'
    users = (
        '-- users\nCREATE USER IF NOT EXISTS `root`@`LOCALHOST`;\n'
        'CREATE USER IF NOT EXISTS `mariadb.sys`@`LocalHost`;\n-- Dump completed\n'
    )
    files = {
        'mysql': b'CREATE TABLE t (n INT);\n-- Dump completed\n',
        'mariadb-users': users.encode(),
    }
    entry = {'kind': 'mysql', 'database': db, 'file': '', 'rows': {}}
    manifest = forged(site, tmp_path, files, databases=[entry])
    before = my_on(fresh_mariadb, 'SELECT User, Host FROM mysql.user ORDER BY 1, 2')
    restored = site.run(
        'restore', str(manifest), '--gnupghome', str(site.keys.holder),
        '--mysql-defaults', str(fresh_mariadb),
    )  # fmt: skip
    try:
        assert restored.returncode == 0, restored.stderr
        assert 'created MariaDB user' not in restored.stdout, restored.stdout
        assert my_on(fresh_mariadb, 'SELECT User, Host FROM mysql.user ORDER BY 1, 2') == before
        # The drill never touches a real server: this machine's root@localhost stays too.
        assert drill(site, manifest).returncode == 0
        assert (
            mysql(
                '', "SELECT COUNT(*) FROM mysql.user WHERE User = 'root' AND Host = 'localhost'"
            ).strip()
            == '1'
        )
    finally:
        my_on(fresh_mariadb, f'DROP DATABASE IF EXISTS `{db}`')


def test_A4_a_roles_file_granting_a_way_up_gives_the_drill_none(
    site: Site, tmp_path: Path, canary_dir: Path
) -> None:
    """The drill's loader is no superuser; a roles file that grants it (or a role of the run) the
    server's superuser or pg_execute_server_program is not applied there, so SET ROLE and COPY ...
    TO PROGRAM stay refused."""
    canary = canary_dir / 'pwned'
    db, role = f'ppbt_evil_{secrets.token_hex(3)}', f'ppbt_up_{secrets.token_hex(3)}'
    roles = (
        f'CREATE ROLE {role};\nGRANT postgres TO ppdrill;\nGRANT postgres TO {role};\n'
        f'GRANT pg_execute_server_program TO {role};\nGRANT {role} TO ppdrill;\n'
    )
    body = (
        f"SET ROLE {role};\nCOPY (SELECT 1) TO PROGRAM 'touch {canary}';\n"
        f"RESET ROLE;\nSET ROLE postgres;\nCOPY (SELECT 1) TO PROGRAM 'touch {canary}';\n"
    )
    files = {'psql': forge.pg_dump_text(db, body), 'pg-roles': roles.encode()}
    drilled = drill(site, forged(site, tmp_path, files, databases=[pg_db_entry(db)]))
    assert drilled.returncode == 1 and 'drill: FAILED' in drilled.stdout, drilled.stdout
    said = (site.home / '.ppbackup-drill.log').read_text()
    assert 'permission denied' in said or 'must be superuser' in said, said
    assert not canary.exists()
