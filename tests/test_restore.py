"""Restore onto brand-new servers, as a key holder would after the web host is gone, and the drill.

A fresh PostgreSQL cluster (the newest server here) and a fresh MariaDB server are made per module in a temporary folder
(PostgreSQL as an unprivileged Unix user of its own, since it refuses root), with a schema of the
kind real sites have on this machine's running servers as the source. Everything made is removed
afterwards, even on failure.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import Site, drill_env, drill_leftovers, mysql, psql, sh
from sshd import free_port

import ppbackup

# The newest PostgreSQL server this machine has: 15 on Debian 12, 17 in .ci/trixie's chroot.
PG_BIN = max(
    (path.parent for path in Path('/usr/lib/postgresql').glob('*/bin/initdb')),
    key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
    default=Path('/usr/lib/postgresql/15/bin'),
)
SUFFIX = secrets.token_hex(4)
OWNER, READER, LOGIN = f'ppbt_own_{SUFFIX}', f'ppbt_read_{SUFFIX}', f'ppbt_app_{SUFFIX}'
PG_DB, MY_DB, MY_USER = f'ppbt_pgr_{SUFFIX}', f'ppbt_myr_{SUFFIX}', f'ppbt_myu_{SUFFIX}'
EVERY_BYTE = bytes(range(256)).hex()


@contextlib.contextmanager
def pg_cluster() -> Iterator[dict[str, str]]:
    """A new PostgreSQL cluster (PG_BIN) on a socket in a temporary folder, its superuser
    ``postgres``; yields the libpq settings. Stopped and removed afterwards."""
    user = f'ppbtpg{secrets.token_hex(3)}'
    sh('useradd', '--system', '--no-create-home', '--shell', '/usr/sbin/nologin', user)
    folder = Path(tempfile.mkdtemp(prefix='ppbt_pgsrv_'))
    port = str(free_port())
    try:
        shutil.chown(folder, user)
        as_user = ['runuser', '-u', user, '--']
        sh(*as_user, str(PG_BIN / 'initdb'), '-D', str(folder / 'data'), '-U', 'postgres',
           '--auth=trust', '-E', 'UTF8', '--locale=C.UTF-8')  # fmt: skip
        options = f"-p {port} -k {folder} -c listen_addresses=''"
        sh(*as_user, str(PG_BIN / 'pg_ctl'), '-D', str(folder / 'data'), '-o', options,
           '-l', str(folder / 'log'), '-w', 'start')  # fmt: skip
        yield {'PGHOST': str(folder), 'PGPORT': port, 'PGUSER': 'postgres'}
    finally:
        subprocess.run(
            ['runuser', '-u', user, '--', str(PG_BIN / 'pg_ctl'), '-D', str(folder / 'data'),
             '-m', 'immediate', '-w', 'stop'],
            capture_output=True, check=False, timeout=60,
        )  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run(['userdel', user], capture_output=True, check=False)


@pytest.fixture(scope='module')
def fresh_pg() -> Iterator[dict[str, str]]:
    """A new PostgreSQL cluster on a socket in a temporary folder; yields the libpq settings."""
    with pg_cluster() as env:
        yield env


@pytest.fixture(scope='module')
def fresh_mariadb() -> Iterator[Path]:
    """A new MariaDB server on a socket and a free port in a temporary folder; yields an option
    file that names it."""
    with mariadb_server() as cnf:
        yield cnf


@pytest.fixture
def brand_new_pg() -> Iterator[dict[str, str]]:
    """fresh_pg for one test only: what the module's other tests restored there is not on it."""
    with pg_cluster() as env:
        yield env


@pytest.fixture
def brand_new_mariadb() -> Iterator[Path]:
    """fresh_mariadb for one test only."""
    with mariadb_server() as cnf:
        yield cnf


@contextlib.contextmanager
def mariadb_server() -> Iterator[Path]:
    """Start a new MariaDB server (see fresh_mariadb); stop and remove it afterwards."""
    folder = Path(tempfile.mkdtemp(prefix='ppbt_mysrv_'))
    data, sock = folder / 'data', folder / 'mysqld.sock'
    cnf = folder / 'client.cnf'
    cnf.write_text(f'[client]\nsocket={sock}\nuser=root\n')
    server = None
    try:
        sh('mariadb-install-db', '--no-defaults', f'--datadir={data}', '--user=root',
           '--auth-root-authentication-method=socket', '--skip-test-db')  # fmt: skip
        server = subprocess.Popen(
            ['mariadbd', '--no-defaults', f'--datadir={data}', f'--socket={sock}',
             f'--port={free_port()}', '--bind-address=127.0.0.1', '--user=root',
             f'--pid-file={folder / "pid"}', f'--log-error={folder / "error.log"}',
             '--event-scheduler=ON', '--skip-log-bin'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        for _ in range(600):
            ping = ['mysqladmin', f'--defaults-extra-file={cnf}', 'ping']
            if subprocess.run(ping, capture_output=True, check=False).returncode == 0:
                break
            assert server.poll() is None, (folder / 'error.log').read_text()
            time.sleep(0.1)
        yield cnf
    finally:
        if server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        shutil.rmtree(folder, ignore_errors=True)


PG_ROLES_SQL = f"""
CREATE ROLE {OWNER} LOGIN PASSWORD 'owner-pw' CREATEDB CONNECTION LIMIT 7;
CREATE ROLE {READER} NOLOGIN;
CREATE ROLE {LOGIN} LOGIN PASSWORD 'app-pw';
GRANT {READER} TO {LOGIN};
ALTER ROLE {LOGIN} SET statement_timeout = '5s';
CREATE DATABASE {PG_DB} OWNER {OWNER};
ALTER DATABASE {PG_DB} SET search_path = app, public;
ALTER ROLE {LOGIN} IN DATABASE {PG_DB} SET work_mem = '6MB';
COMMENT ON DATABASE {PG_DB} IS 'the members of the association';
REVOKE ALL ON DATABASE {PG_DB} FROM PUBLIC;
GRANT CONNECT ON DATABASE {PG_DB} TO {READER};
"""
PG_SCHEMA_SQL = f"""
CREATE EXTENSION pgcrypto;
SET ROLE {OWNER};
CREATE SCHEMA app;
GRANT USAGE ON SCHEMA app TO {READER};
ALTER DEFAULT PRIVILEGES IN SCHEMA app GRANT SELECT ON TABLES TO {READER};
CREATE TYPE app.mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN app.email AS text CHECK (VALUE LIKE '%@%');
CREATE TABLE app.members (
  id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL, email app.email,
  mood app.mood, photo bytea, extra jsonb, secret text);
CREATE TABLE app.audit (member integer, note text);
CREATE FUNCTION app.log_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO app.audit VALUES (NEW.id, 'changed ' || NEW.name);
  RETURN NEW;
END $$;
CREATE TRIGGER members_audit AFTER INSERT OR UPDATE ON app.members
  FOR EACH ROW EXECUTE FUNCTION app.log_change();
CREATE TABLE app.events (id integer, at date NOT NULL, what text) PARTITION BY RANGE (at);
CREATE TABLE app.events_2026 PARTITION OF app.events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE TABLE app.events_2027 PARTITION OF app.events FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');
INSERT INTO app.members (name, email, mood, photo, extra, secret)
  SELECT 'member ' || n, 'm' || n || '@example.org', (ARRAY['sad', 'ok', 'happy'])[1 + n % 3]::app.mood,
    CASE WHEN n = 1 THEN decode('{EVERY_BYTE}', 'hex') ELSE public.gen_random_bytes(16) END,
    jsonb_build_object('n', n, 'emoji', '🎉 ünïcødé'), public.crypt('pw', public.gen_salt('bf', 4))
  FROM generate_series(1, 60) AS n;
INSERT INTO app.events SELECT n, date '2026-11-01' + n * 3, 'event ' || n FROM generate_series(1, 90) n;
CREATE VIEW app.happy AS SELECT id, name FROM app.members WHERE mood = 'happy';
CREATE MATERIALIZED VIEW app.mood_counts AS SELECT mood, count(*) FROM app.members GROUP BY mood;
ALTER TABLE app.members ENABLE ROW LEVEL SECURITY;
CREATE POLICY readers_see_the_happy ON app.members FOR SELECT TO {READER} USING (mood = 'happy');
SELECT lo_from_bytea(0, convert_to('a large object ✓', 'UTF8'));
RESET ROLE;
"""
MY_SCHEMA_SQL = f"""
SET NAMES utf8mb4;
CREATE TABLE authors (id INT PRIMARY KEY AUTO_INCREMENT, name VARCHAR(100) NOT NULL, bio TEXT,
  FULLTEXT KEY ft_bio (bio)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
CREATE TABLE posts (id INT PRIMARY KEY AUTO_INCREMENT, author_id INT NOT NULL,
  title VARCHAR(200), body JSON, cover BLOB, price DECIMAL(8,2),
  price_with_tax DECIMAL(9,2) AS (price * 1.2) STORED,
  FOREIGN KEY (author_id) REFERENCES authors (id)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
CREATE TABLE log (id INT PRIMARY KEY AUTO_INCREMENT, what VARCHAR(100)) ENGINE=InnoDB;
INSERT INTO authors (name, bio) VALUES ('Ada', 'numbers and engines'),
  ('Émilie', 'physics 🎉 ünïcødé');
INSERT INTO posts (author_id, title, body, cover, price) VALUES
  (1, 'first', JSON_OBJECT('tags', JSON_ARRAY('a', 'b')), UNHEX('{EVERY_BYTE}'), 5.50),
  (2, 'second', '{{"emoji": "🎉"}}', NULL, 12.00), (1, 'third', NULL, UNHEX('00FF00'), 3.00);
CREATE DEFINER=`{MY_USER}`@`localhost` SQL SECURITY DEFINER VIEW cheap_posts AS
  SELECT id, title FROM posts WHERE price < 10;
CREATE DEFINER=`{MY_USER}`@`localhost` PROCEDURE add_log(IN w VARCHAR(100))
  INSERT INTO log (what) VALUES (w);
CREATE DEFINER=`{MY_USER}`@`localhost` FUNCTION post_count() RETURNS INT READS SQL DATA
  RETURN (SELECT COUNT(*) FROM posts);
CREATE DEFINER=`{MY_USER}`@`localhost` TRIGGER posts_log AFTER INSERT ON posts FOR EACH ROW
  INSERT INTO log (what) VALUES (CONCAT('post ', NEW.id));
CREATE DEFINER=`{MY_USER}`@`localhost` EVENT tidy ON SCHEDULE EVERY 1 DAY
  STARTS '2030-01-01 03:00:00' DO INSERT INTO log (what) VALUES ('event');
"""


@pytest.fixture(scope='module')
def source() -> Iterator[None]:
    """The schema on this machine's servers, under unique names; dropped afterwards."""
    try:
        # CREATE DATABASE cannot run inside the one transaction of psql -c: feed a script.
        sh(
            'psql',
            '-X',
            '-q',
            '-v',
            'ON_ERROR_STOP=1',
            '-d',
            'postgres',
            '-f',
            '-',
            input=PG_ROLES_SQL,
        )
        psql(PG_DB, PG_SCHEMA_SQL)
        sh('mysql', '-e', f"CREATE USER `{MY_USER}`@`localhost` IDENTIFIED BY 'my-app-pw'")
        sh('mysql', '-e', f'CREATE DATABASE `{MY_DB}`')
        sh('mysql', '-e', f'GRANT SELECT, INSERT, UPDATE, DELETE, EXECUTE, TRIGGER, EVENT, '
           f'SHOW VIEW ON `{MY_DB}`.* TO `{MY_USER}`@`localhost`')  # fmt: skip
        mysql(MY_DB, MY_SCHEMA_SQL)
        sh('mysql', '-e', f'GRANT UPDATE (title) ON `{MY_DB}`.`posts` TO `{MY_USER}`@`localhost`')
        yield
    finally:
        sh('dropdb', '--if-exists', '--force', '--', PG_DB, check=False)
        for role in (LOGIN, READER, OWNER):
            sh('psql', '-X', '-q', '-c', f'DROP ROLE IF EXISTS {role}', check=False)
        sh('mysql', '-e', f'DROP DATABASE IF EXISTS `{MY_DB}`', check=False)
        sh('mysql', '-e', f'DROP USER IF EXISTS `{MY_USER}`@`localhost`', check=False)


def on(env: dict[str, str], db: str, sql: str) -> str:
    """Run SQL on the fresh PostgreSQL server."""
    argv = ['psql', '-X', '-q', '-A', '-t', '-v', 'ON_ERROR_STOP=1', '-d', db, '-c', sql]
    return subprocess.run(
        argv, env={**os.environ, **env}, capture_output=True, text=True, check=True, timeout=60
    ).stdout


def my_on(cnf: Path | None, sql: str, db: str = '') -> str:
    """Run SQL on a MariaDB server: the fresh one (cnf) or this machine's (None)."""
    argv = ['mysql', *([f'--defaults-extra-file={cnf}'] if cnf else []), '--batch', '-N']
    return sh(*argv, '-e', sql, *(['--', db] if db else [])).stdout


def schema_only(env: dict[str, str], db: str) -> str:
    dump = subprocess.run(
        ['pg_dump', '--schema-only', '--create', '-d', db],
        env={**os.environ, **env}, capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    # \restrict carries a random key per dump; everything else must be equal.
    return '\n'.join(line for line in dump.splitlines() if 'restrict ' not in line)


PG_FACTS = {
    'roles': f"""SELECT a.rolname, a.rolsuper, a.rolinherit, a.rolcreaterole, a.rolcreatedb,
        a.rolcanlogin, a.rolconnlimit, a.rolpassword, r.rolconfig
        FROM pg_authid a JOIN pg_roles r ON r.oid = a.oid
        WHERE a.rolname IN ('{OWNER}', '{READER}', '{LOGIN}') ORDER BY 1""",
    'memberships': f"""SELECT r.rolname, m.rolname FROM pg_auth_members a
        JOIN pg_roles r ON r.oid = a.roleid JOIN pg_roles m ON m.oid = a.member
        WHERE m.rolname = '{LOGIN}' ORDER BY 1, 2""",
    'database': """SELECT pg_get_userbyid(datdba), datacl::text, shobj_description(oid,
        'pg_database'), pg_encoding_to_char(encoding), datcollate FROM pg_database
        WHERE datname = current_database()""",
    'settings': """SELECT coalesce(pg_get_userbyid(nullif(setrole, 0)), '-'), setconfig
        FROM pg_db_role_setting WHERE setdatabase = (SELECT oid FROM pg_database
        WHERE datname = current_database()) ORDER BY 1""",
    'owners and grants': """SELECT c.relname, pg_get_userbyid(c.relowner), c.relacl::text,
        c.relrowsecurity FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'app' ORDER BY 1""",
    'large objects': """SELECT md5(lo_get(oid)), pg_get_userbyid(lomowner)
        FROM pg_largeobject_metadata ORDER BY 1""",
    'sequence': 'SELECT last_value, is_called FROM app.members_id_seq',
    'default privileges': 'SELECT defaclobjtype, defaclacl::text FROM pg_default_acl',
    'extensions': 'SELECT extname, extversion FROM pg_extension ORDER BY 1',
}
PG_TABLES = ['app.members', 'app.audit', 'app.events_2026', 'app.events_2027', 'app.mood_counts']
MY_TABLES = ['authors', 'posts', 'log']


def pg_facts(env: dict[str, str], db: str) -> dict[str, str]:
    facts = {what: on(env, db, sql) for what, sql in PG_FACTS.items()}
    for table in PG_TABLES:  # every row, every byte
        facts[table] = on(
            env,
            db,
            f"SELECT count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {table} t",
        )
    return facts


def checksums(cnf: Path | None, db: str) -> list[str]:
    out = my_on(cnf, 'CHECKSUM TABLE ' + ', '.join(MY_TABLES) + ' EXTENDED', db)
    return [line.split('\t')[1] for line in out.splitlines()]


def holder_run(
    site: Site, *args: str, pg: dict[str, str], cnf: Path
) -> subprocess.CompletedProcess[str]:
    """Run ppbackup as the key holder against the fresh servers."""
    return site.run(
        *args, '--gnupghome', str(site.keys.holder), '--mysql-defaults', str(cnf), extra_env=pg
    )


@pytest.fixture
def backed_up(site: Site, source: None) -> Site:
    site.write_config(BACKUP_PSQL_DB=PG_DB, BACKUP_MYSQL_DB=MY_DB)
    result = site.run()
    assert result.returncode == 0, result.stderr
    assert site.subjects() == ['[ppbackup] assoc: succeeded'], site.mails()[-1]['body']
    return site


def test_R1_R2_restore_onto_brand_new_servers_brings_everything_back(
    backed_up: Site, brand_new_pg: dict[str, str], brand_new_mariadb: Path
) -> None:
    # Servers of its own: the module's shared ones hold the roles and users that other tests
    # restored (their backups list this server's roles too), and "created" would be "exists".
    site, fresh_pg, fresh_mariadb = backed_up, brand_new_pg, brand_new_mariadb
    day = next(site.backups.glob('day*'))
    files = site.root / 'restored-files'
    # Both databases and the files: --database for each, and --files (alone, --files is files only).
    both = ['--database', PG_DB, '--database', MY_DB, '--files', str(files)]
    result = holder_run(site, 'restore', str(day), *both, pg=fresh_pg, cnf=fresh_mariadb)
    assert result.returncode == 0, result.stderr
    assert f'created PostgreSQL role {OWNER}' in result.stdout
    assert f'created MariaDB user `{MY_USER}`@`localhost`' in result.stdout

    # PostgreSQL: the same schema, roles, owners, grants, settings and every row.
    original_env: dict[str, str] = {}  # this machine's server
    assert schema_only(fresh_pg, PG_DB) == schema_only(original_env, PG_DB)
    restored, original = pg_facts(fresh_pg, PG_DB), pg_facts(original_env, PG_DB)
    for what in restored:
        assert restored[what] == original[what], what
    assert 'SCRAM-SHA-256$' in restored['roles']  # the password hashes came along
    # The application's login reads what its reader role and the policy let it, and no more.
    as_login = {**fresh_pg, 'PGUSER': LOGIN}
    assert on(as_login, PG_DB, 'SELECT count(*) FROM members') == '20\n'  # search_path: app
    assert on(as_login, PG_DB, 'SHOW work_mem') == '6MB\n'

    # MariaDB: the user with the same grants; what it defines works when used; the same rows.
    grants = f'SHOW GRANTS FOR `{MY_USER}`@`localhost`'
    assert my_on(fresh_mariadb, grants) == my_on(None, grants)
    assert checksums(fresh_mariadb, MY_DB) == checksums(None, MY_DB)
    assert (
        my_on(fresh_mariadb, 'SELECT title FROM cheap_posts ORDER BY id', MY_DB) == 'first\nthird\n'
    )
    assert my_on(fresh_mariadb, 'SELECT post_count()', MY_DB) == '3\n'
    my_on(fresh_mariadb, "CALL add_log('by hand')", MY_DB)
    my_on(
        fresh_mariadb, "INSERT INTO posts (author_id, title, price) VALUES (2, 'fourth', 1)", MY_DB
    )
    assert my_on(fresh_mariadb, 'SELECT what FROM log ORDER BY id', MY_DB) == 'by hand\npost 4\n'
    my_on(
        fresh_mariadb,
        f'ALTER DEFINER=`{MY_USER}`@`localhost` EVENT tidy ON SCHEDULE AT CURRENT_TIMESTAMP',
        MY_DB,
    )
    for _ in range(300):  # the event runs as its definer, who must exist
        if 'event' in my_on(fresh_mariadb, 'SELECT what FROM log', MY_DB):
            break
        time.sleep(0.1)
    assert 'event' in my_on(fresh_mariadb, 'SELECT what FROM log', MY_DB)

    # Files come back where asked, never over /.
    assert (files / 'site' / 'canary.txt').is_file()
    again = holder_run(
        site,
        'restore',
        str(day),
        '--database',
        PG_DB,
        '--files',
        '/',
        pg=fresh_pg,
        cnf=fresh_mariadb,
    )
    assert again.returncode != 0


def test_R4_restore_refuses_a_database_with_tables_unless_replace_keeps_it_aside(
    backed_up: Site, fresh_pg: dict[str, str], fresh_mariadb: Path
) -> None:
    site = backed_up
    day = next(site.backups.glob('day*'))
    name = f'ppbt_twice_{secrets.token_hex(3)}'
    args = ('restore', str(day), '--database', PG_DB, '--as', name)
    assert holder_run(site, *args, pg=fresh_pg, cnf=fresh_mariadb).returncode == 0
    on(fresh_pg, name, "INSERT INTO app.audit VALUES (-1, 'only in the old one')")
    refused = holder_run(site, *args, pg=fresh_pg, cnf=fresh_mariadb)
    assert refused.returncode == 1
    assert 'already holds' in refused.stderr and '--replace' in refused.stderr
    assert on(fresh_pg, name, 'SELECT count(*) FROM app.audit WHERE member = -1') == '1\n'
    replaced = holder_run(site, *args, '--replace', pg=fresh_pg, cnf=fresh_mariadb)
    assert replaced.returncode == 0, replaced.stderr
    assert on(fresh_pg, name, 'SELECT count(*) FROM app.audit WHERE member = -1') == '0\n'
    aside = on(
        fresh_pg,
        'postgres',
        f"SELECT datname FROM pg_database WHERE datname LIKE '{name}_before_restore_%'",
    ).strip()
    assert (
        aside and on(fresh_pg, aside, 'SELECT count(*) FROM app.audit WHERE member = -1') == '1\n'
    )
    # MariaDB too: the old one is kept aside as a copy.
    my_args = ('restore', str(day), '--database', MY_DB, '--as', name)
    assert holder_run(site, *my_args, pg=fresh_pg, cnf=fresh_mariadb).returncode == 0
    assert holder_run(site, *my_args, pg=fresh_pg, cnf=fresh_mariadb).returncode == 1
    assert holder_run(site, *my_args, '--replace', pg=fresh_pg, cnf=fresh_mariadb).returncode == 0
    kept = my_on(fresh_mariadb, f"SHOW DATABASES LIKE '{name}\\_before\\_restore\\_%'")
    assert kept.strip() and checksums(fresh_mariadb, kept.strip()) == checksums(None, MY_DB)


def drill(site: Site, *_servers: object) -> subprocess.CompletedProcess[str]:
    """Run the README's drill as the key holder: it starts servers of its own, so the fresh
    servers of this module are not named to it (and must not be touched by it)."""
    return site.run(
        'drill', str(site.backups), '--gnupghome', str(site.keys.holder),
        '--mail', 'keeper@example.org', extra_env=drill_env(),
    )  # fmt: skip


def scratch_left(pg: dict[str, str], cnf: Path) -> tuple[str, str, str]:
    """Return what a drill left: its temporary folders, and any database on the module's servers
    that is not the module's own (the drill must reach no server but its own)."""
    own = f"NOT IN ('postgres', 'template0', 'template1') AND datname NOT LIKE 'ppbt%'"
    folders = drill_leftovers()
    return (
        on(pg, 'postgres', f'SELECT datname FROM pg_database WHERE datname {own}')
        + ''.join(folders),
        my_on(cnf, "SHOW DATABASES LIKE 'ppdrill%'"),
        my_on(cnf, "SELECT Db FROM mysql.db WHERE Db LIKE 'ppdrill%'"),
    )


def test_R5_drill_passes_on_a_good_backup_and_leaves_nothing(
    backed_up: Site, fresh_pg: dict[str, str], fresh_mariadb: Path
) -> None:
    result = drill(backed_up, fresh_pg, fresh_mariadb)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'drill: passed' in result.stdout
    mail = backed_up.mails()[-1]
    assert 'drill: passed' in mail['argv'][mail['argv'].index('-s') + 1]
    assert f'psql {PG_DB}:' in mail['body'] and f'mysql {MY_DB}:' in mail['body']  # timings
    assert scratch_left(fresh_pg, fresh_mariadb) == ('', '', '')


def test_R5_drill_fails_naming_the_table_when_a_dump_lost_rows(
    site: Site, source: None, fresh_pg: dict[str, str], fresh_mariadb: Path
) -> None:
    site.write_config(BACKUP_PSQL_DB=PG_DB, BACKUP_MYSQL_DB=MY_DB)
    # A dumper that loses a row, silently, as a broken one would.
    site.shim('pg_dump', '#!/bin/sh\n/usr/bin/pg_dump "$@" | sed \'/\\tmember 7\\t/d\'\n')
    assert site.run().returncode == 0
    result = drill(site, fresh_pg, fresh_mariadb)
    assert result.returncode == 1
    mail = site.mails()[-1]
    assert 'FAILED' in mail['argv'][mail['argv'].index('-s') + 1]
    assert 'table app.members has 59 rows, 60 at dump time' in mail['body']
    assert 'app.audit' not in mail['body']
    assert scratch_left(fresh_pg, fresh_mariadb) == ('', '', '')


@contextlib.contextmanager
def dump_held_up(site: Site, kind: str) -> Iterator[Callable[[], subprocess.Popen[str]]]:
    """Another session locks ``ballots``; yield a starter of the run that returns once the dumper,
    its snapshot taken, waits for that table. The lock goes when the block ends."""
    if kind == 'psql':
        locker = ['psql', '-X', '-q', '-d', site.pg_db, '-c',
                  'BEGIN; LOCK TABLE ballots IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(120);']  # fmt: skip
        held = ("SELECT count(*) FROM pg_locks WHERE granted AND mode = 'AccessExclusiveLock' "
                "AND relation = 'ballots'::regclass")  # fmt: skip
        waits = (f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{site.pg_db}' "
                 "AND application_name = 'pg_dump' AND wait_event_type = 'Lock'")  # fmt: skip
        ask = functools.partial(psql, site.pg_db)
        release = ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   "WHERE application_name = 'ppbt-locker'")  # fmt: skip
    else:
        locker = ['mysql', '-e', 'LOCK TABLES ballots WRITE; SELECT SLEEP(120) AS ppbt_locker',
                  '--', site.my_db]  # fmt: skip
        listed = 'FROM information_schema.processlist WHERE '
        held = f"SELECT count(*) {listed} info LIKE 'SELECT SLEEP(120) AS ppbt_locker%'"
        waits = (f"SELECT count(*) {listed} db = '{site.my_db}' AND "
                 "state = 'Waiting for table metadata lock'")  # fmt: skip
        ask = functools.partial(mysql, site.my_db)
        release = ''
    holder = subprocess.Popen(
        locker, env={**os.environ, 'PGAPPNAME': 'ppbt-locker'},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    run: list[subprocess.Popen[str]] = []

    def start() -> subprocess.Popen[str]:
        for _ in range(600):
            if not run and ask(held).strip() == '1':
                run.append(site.start())
            if run and ask(waits).strip() == '1':
                return run[0]
            assert not run or run[0].poll() is None, run[0].communicate()
            time.sleep(0.05)
        pytest.fail(f'the {kind} dump never waited on the lock')

    try:
        yield start
    finally:
        if release:
            psql('postgres', release)
        else:
            for line in mysql(
                '', f'SELECT id {listed} info LIKE "SELECT SLEEP(120) AS ppbt%"'
            ).split():
                mysql('', f'KILL CONNECTION {line}')
        holder.wait(timeout=60)


@pytest.mark.parametrize('kind', ['psql', 'mysql'])
def test_R5_rows_written_while_the_dump_runs_do_not_fail_the_drill(
    site: Site, fresh_pg: dict[str, str], fresh_mariadb: Path, kind: str
) -> None:
    """A busy site: a row is written after the dumper took its snapshot, before the run ends. The
    row counts are of the dump's own snapshot, so the drill compares like with like."""
    site.write_config(**({'BACKUP_MYSQL_DB': None} if kind == 'psql' else {'BACKUP_PSQL_DB': None}))
    late = "INSERT INTO members VALUES (100, 'Late Comer', 'written during the dump')"
    with dump_held_up(site, kind) as start:
        run = start()
        (psql(site.pg_db, late) if kind == 'psql' else mysql(site.my_db, late))
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    # The dump holds the rows of its snapshot: not the late one.
    dump = next(site.latest.glob(f'assoc-{kind}-*'))
    assert 'Late Comer' not in sh('zstd', '-dc', str(dump)).stdout
    result = drill(site, fresh_pg, fresh_mariadb)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'drill: passed' in result.stdout
    assert scratch_left(fresh_pg, fresh_mariadb) == ('', '', '')


def test_R5_drill_fails_when_the_roles_artifact_is_missing(
    backed_up: Site, fresh_pg: dict[str, str], fresh_mariadb: Path
) -> None:
    roles = next(backed_up.backups.glob('day*/assoc-pg-roles-*'))
    roles.unlink()
    result = drill(backed_up, fresh_pg, fresh_mariadb)
    assert result.returncode == 1
    body = backed_up.mails()[-1]['body']
    assert 'FAILED' in body and roles.name in body and 'missing' in body
    assert f'the PostgreSQL roles file {roles.name.removesuffix(".gpg")} is missing' in body, body
    assert f'psql {PG_DB}:' in body  # the databases were still tried, and timed
    assert scratch_left(fresh_pg, fresh_mariadb) == ('', '', '')


def test_R3_a_backup_user_that_is_not_a_superuser_warns_and_restore_says_what_is_missing(
    site: Site, fresh_pg: dict[str, str], fresh_mariadb: Path
) -> None:
    backup_user = f'ppbt_bk_{secrets.token_hex(3)}'
    psql(site.pg_db, f'CREATE ROLE {backup_user} LOGIN; GRANT CONNECT ON DATABASE {site.pg_db} '
         f'TO {backup_user}; GRANT SELECT ON ALL TABLES IN SCHEMA public TO {backup_user}')  # fmt: skip
    try:
        site.write_config(BACKUP_MYSQL_DB=None)
        result = site.run(extra_env={'PGUSER': backup_user})
        assert result.returncode == 0, result.stderr
        assert 'WARNING' in site.subjects()[-1]
        assert 'WITHOUT their passwords' in site.mails()[-1]['body']
        day = next(site.backups.glob('day*'))
        restored = holder_run(
            site, 'restore', str(day), '--as', 'ppbt_ns_copy', pg=fresh_pg, cnf=fresh_mariadb
        )
        assert restored.returncode == 0, restored.stderr
        assert 'lacks something' in restored.stdout and 'WITHOUT their passwords' in restored.stdout
        assert on(fresh_pg, 'ppbt_ns_copy', 'SELECT count(*) FROM members') == '3\n'
    finally:
        sh('psql', '-X', '-q', '-d', site.pg_db, '-c', f'DROP OWNED BY {backup_user}', check=False)
        sh('psql', '-X', '-q', '-c', f'DROP ROLE IF EXISTS {backup_user}', check=False)


def test_the_admin_rolls_back_from_latest_without_a_key(
    site: Site, fresh_pg: dict[str, str], fresh_mariadb: Path
) -> None:
    site.write_config(BACKUP_MYSQL_DB=None)
    assert site.run().returncode == 0
    name = f'ppbt_latest_{secrets.token_hex(3)}'
    # No --gnupghome: the host's own keyring holds no private key, and latest/ needs none.
    result = site.run('restore', 'latest', '--as', name, extra_env=fresh_pg)
    assert result.returncode == 0, result.stderr
    query = 'SELECT * FROM members ORDER BY id'
    assert on(fresh_pg, name, query) == psql(site.pg_db, query)


def test_a_key_holder_who_is_not_a_superuser_restores_with_no_owner(
    site: Site, fresh_pg: dict[str, str], fresh_mariadb: Path
) -> None:
    site.write_config(BACKUP_MYSQL_DB=None)
    assert site.run().returncode == 0
    day = next(site.backups.glob('day*'))
    keeper = f'ppbt_keeper_{secrets.token_hex(3)}'
    on(fresh_pg, 'postgres', f'CREATE ROLE {keeper} LOGIN CREATEDB')
    as_keeper = {**fresh_pg, 'PGUSER': keeper}
    name = f'ppbt_mine_{secrets.token_hex(3)}'
    args = ('restore', str(day), '--as', name)
    plain = holder_run(site, *args, pg=as_keeper, cnf=fresh_mariadb)
    assert plain.returncode == 1  # roles it cannot create, or ownership it cannot give
    assert 'no-owner' in plain.stderr or 'OWNER TO' in plain.stderr, plain.stderr
    on(fresh_pg, 'postgres', f'DROP DATABASE IF EXISTS {name}')
    mine = holder_run(site, *args, '--no-owner', '--no-privileges', pg=as_keeper, cnf=fresh_mariadb)
    assert mine.returncode == 0, mine.stderr
    query = 'SELECT * FROM members ORDER BY id'
    assert on(as_keeper, name, query) == psql(site.pg_db, query)
    owners = "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class WHERE relname IN ('members', 'ballots')"
    assert on(fresh_pg, name, owners) == f'{keeper}\n'
    assert (
        on(
            fresh_pg,
            'postgres',
            f"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{name}'",
        )
        == f'{keeper}\n'
    )


def test_a_failing_statement_stops_the_restore_names_it_and_leaves_the_database(
    site: Site, fresh_pg: dict[str, str], fresh_mariadb: Path
) -> None:
    site.write_config(BACKUP_MYSQL_DB=None)
    dry = site.run('run', '--dry-run')
    assert 'pg_dumpall --no-password --globals-only' in dry.stdout  # the roles are in the plan
    # A dump with a statement that fails on the new server, before its last table.
    site.shim(
        'pg_dump',
        '#!/bin/sh\n/usr/bin/pg_dump "$@" | sed \'s/^CREATE TABLE public.members /'
        "SELECT no_such_function();\\n&/'\n",
    )
    assert site.run().returncode == 0
    name = f'ppbt_broken_{secrets.token_hex(3)}'
    day = next(site.backups.glob('day*'))
    result = holder_run(site, 'restore', str(day), '--as', name, pg=fresh_pg, cnf=fresh_mariadb)
    assert result.returncode == 1
    assert 'psql exited 3' in result.stderr
    assert 'no_such_function' in result.stderr  # the statement is named
    assert f'left behind: PostgreSQL database {name}, as far as it loaded' in result.stderr
    # The new database stays for inspection, with what came before the error and nothing after.
    tables = "SELECT count(*) FROM pg_class WHERE relname = 'members'"
    assert on(fresh_pg, name, tables) == '0\n'


def test_the_admin_rolls_back_a_bad_upgrade_in_place_from_latest(site: Site) -> None:
    site.write_config(BACKUP_MYSQL_DB=None)
    assert site.run().returncode == 0
    psql(site.pg_db, 'DELETE FROM members')  # the upgrade that went wrong
    # This machine's server, no key; --replace acts only on the database named.
    result = site.run('restore', 'latest', '--replace', '--database', site.pg_db)
    aside = f"SELECT datname FROM pg_database WHERE datname LIKE '{site.pg_db}_before_restore_%'"
    try:
        assert result.returncode == 0, result.stderr
        assert psql(site.pg_db, 'SELECT count(*) FROM members') == '3\n'
        kept = psql('postgres', aside).strip()
        assert kept and psql(kept, 'SELECT count(*) FROM members') == '0\n'
    finally:
        for name in psql('postgres', aside).split():
            sh('dropdb', '--if-exists', '--force', '--', name, check=False)
        # Roles dropped on this shared server since the backup came back with it: not ours to keep.
        for line in result.stdout.splitlines():
            if line.startswith('created PostgreSQL role '):
                role = line.rsplit(' ', 1)[1]
                sh('psql', '-X', '-q', '-c', f'DROP ROLE IF EXISTS "{role}"', check=False)


def test_R3_a_mariadb_backup_user_without_the_grant_tables_warns(site: Site) -> None:
    user = f'ppbt_mybk_{secrets.token_hex(3)}'
    my_cnf = site.home / '.my.cnf'
    sh('mysql', '-e', f"CREATE USER `{user}`@`localhost` IDENTIFIED BY 'bk-pw'")
    try:
        grant = 'SELECT, LOCK TABLES, SHOW VIEW, EVENT, TRIGGER'
        sh('mysql', '-e', f'GRANT {grant} ON `{site.my_db}`.* TO `{user}`@`localhost`')
        my_cnf.write_text(f'[client]\nuser={user}\npassword=bk-pw\n')
        my_cnf.chmod(0o600)
        site.write_config(BACKUP_PSQL_DB=None)
        result = site.run()
        assert result.returncode == 0, result.stderr
        assert 'WARNING' in site.subjects()[-1]
        assert 'users and grants are NOT backed up' in site.mails()[-1]['body']
        assert not list(site.backups.glob('day*/assoc-mariadb-users-*'))
    finally:
        my_cnf.unlink(missing_ok=True)  # the clients below, and the fixture's, are root again
        sh('mysql', '-e', f'DROP USER IF EXISTS `{user}`@`localhost`', check=False)


@contextlib.contextmanager
def readme_setup(site: Site) -> Iterator[tuple[str, dict[str, str]]]:
    """The README's own setup: a PostgreSQL role made by ``createuser`` (no superuser) owning the
    site's database, which grants to a reader role, and a MariaDB backup user without the grant
    tables (~/.my.cnf). Yields (the PostgreSQL database, the libpq settings of the backup user)."""
    token = secrets.token_hex(3)
    role, reader, db = f'ppbt_site_{token}', f'ppbt_rd_{token}', f'ppbt_rs_{token}'
    my_user = f'ppbt_mybk_{token}'
    my_cnf = site.home / '.my.cnf'
    as_site = {'PGUSER': role}
    try:
        sh('createuser', role)
        sh('psql', '-X', '-q', '-c', f'CREATE ROLE {reader} NOLOGIN')
        sh('createdb', '-O', role, '--', db)
        grants = (
            'CREATE TABLE members (id integer PRIMARY KEY, name text);'
            "INSERT INTO members SELECT n, 'member ' || n FROM generate_series(1, 40) AS n;"
            'CREATE TABLE notes (id integer, note text);'
            f'GRANT SELECT ON members TO {reader}; GRANT SELECT (note) ON notes TO {reader};'
            f'REVOKE ALL ON DATABASE {db} FROM PUBLIC; GRANT CONNECT ON DATABASE {db} TO {reader};'
        )
        sh('psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', db, '-c', grants,
           env={**os.environ, **as_site})  # fmt: skip
        sh('mysql', '-e', f"CREATE USER `{my_user}`@`localhost` IDENTIFIED BY 'bk-pw'")
        privileges = 'SELECT, LOCK TABLES, SHOW VIEW, EVENT, TRIGGER'
        sh('mysql', '-e', f'GRANT {privileges} ON `{site.my_db}`.* TO `{my_user}`@`localhost`')
        my_cnf.write_text(f'[client]\nuser={my_user}\npassword=bk-pw\n')
        my_cnf.chmod(0o600)
        site.write_config(BACKUP_PSQL_DB=db, BACKUP_MYSQL_DB=site.my_db)
        yield db, as_site
    finally:
        my_cnf.unlink(missing_ok=True)  # the clients below, and the fixture's, are root again
        sh('mysql', '-e', f'DROP USER IF EXISTS `{my_user}`@`localhost`', check=False)
        sh('dropdb', '--if-exists', '--force', '--', db, check=False)
        for name in (reader, role):
            sh('psql', '-X', '-q', '-c', f'DROP ROLE IF EXISTS {name}', check=False)


PG_LACK = (
    'the PostgreSQL backup user is not a superuser: roles are backed up WITHOUT their passwords'
)
MY_LACK = 'the MariaDB backup user cannot read its grant tables: users and grants are NOT backed up'


def test_R3_the_readme_setup_warns_and_its_drill_passes_with_the_warnings_named(
    site: Site, fresh_pg: dict[str, str], fresh_mariadb: Path
) -> None:
    with readme_setup(site) as (_, as_site):
        # check predicts the warnings, before any run.
        check = site.run('check', extra_env=as_site)
        assert f'WARN  a run will warn: {PG_LACK}' in check.stdout, check.stdout
        assert f'WARN  a run will warn: {MY_LACK}' in check.stdout, check.stdout
        assert site.mails() == []
        result = site.run(extra_env=as_site)
        assert result.returncode == 0, result.stderr
        assert site.subjects()[-1] == '[ppbackup] assoc: succeeded with 2 WARNING(s)'
        body = site.mails()[-1]['body']
        assert PG_LACK in body and MY_LACK in body, body
        drilled = drill(site, fresh_pg, fresh_mariadb)
        assert drilled.returncode == 0, drilled.stdout + drilled.stderr
        mail = site.mails()[-1]
        subject = mail['argv'][mail['argv'].index('-s') + 1]
        assert 'drill: passed with' in subject and 'WARNING' in subject, subject
        for lack in (PG_LACK, MY_LACK):
            assert f'WARNING: the backup lacks something: {lack}' in mail['body'], mail['body']
        assert 'FAILED' not in mail['body'] and 'did not come back' not in mail['body']


def test_R5_the_readme_setup_drill_fails_naming_the_table_that_lost_rows(
    site: Site, fresh_pg: dict[str, str], fresh_mariadb: Path
) -> None:
    with readme_setup(site) as (_, as_site):
        site.shim('pg_dump', '#!/bin/sh\n/usr/bin/pg_dump "$@" | sed \'/^7\\tmember 7$/d\'\n')
        assert site.run(extra_env=as_site).returncode == 0
        drilled = drill(site, fresh_pg, fresh_mariadb)
        assert drilled.returncode == 1, drilled.stdout
        body = site.mails()[-1]['body']
        assert 'drill: FAILED' in body
        assert 'table public.members has 39 rows, 40 at dump time' in body, body
        assert f'WARNING: the backup lacks something: {PG_LACK}' in body  # still named


def test_R5_a_dump_stripped_of_its_grants_fails_the_drill_naming_each_object(
    site: Site, fresh_pg: dict[str, str], fresh_mariadb: Path
) -> None:
    with readme_setup(site) as (db, as_site):
        site.shim('pg_dump', '#!/bin/sh\n/usr/bin/pg_dump "$@" | sed \'/^GRANT /d; /^REVOKE /d\'\n')
        assert site.run(extra_env=as_site).returncode == 0
        dump = next(site.latest.glob('assoc-psql-*'))
        assert '\nGRANT ' not in sh('zstd', '-dc', str(dump)).stdout  # the shim did strip them
        drilled = drill(site, fresh_pg, fresh_mariadb)
        assert drilled.returncode == 1, drilled.stdout
        body = site.mails()[-1]['body']
        assert 'drill: FAILED' in body
        assert f'psql {db}: grants on table public.members differ: ' in body, body
        assert f'psql {db}: grants on database differ: ' in body, body
        assert f'psql {db}: grants on column public.notes.note did not come back' in body, body
        assert 'grants on table public.notes' not in body  # its own grants are the default
        assert 'rows' not in body.split('what did not come back:')[1]  # every row came back


def test_R5_mariadb_grants_that_did_not_come_back_fail_the_drill(
    site: Site, source: None, fresh_pg: dict[str, str], fresh_mariadb: Path
) -> None:
    site.write_config(BACKUP_PSQL_DB=None, BACKUP_MYSQL_DB=MY_DB)
    # A client that loses the column grant from SHOW GRANTS, so the users file lacks it.
    site.shim(
        'mysql',
        # sed -u: the counting session reads each answer as it comes.
        '#!/bin/bash\nset -o pipefail\n/usr/bin/mysql "$@" | sed -u \'/^GRANT UPDATE (`title`)/d\'\n',
    )
    assert site.run().returncode == 0
    drilled = drill(site, fresh_pg, fresh_mariadb)
    assert drilled.returncode == 1, drilled.stdout
    body = site.mails()[-1]['body']
    user = f'`{MY_USER}`@`localhost`'
    assert f'mysql {MY_DB}: grants on column posts.title to {user} did not come back' in body, body
    assert f'mysql {MY_DB}: grants on table posts to {user} did not come back' in body, body
    assert f'grants on database to {user}' not in body  # the database's grants came back


def test_R5_an_index_without_grants_is_an_older_runs_and_one_with_bad_grants_is_refused() -> None:
    entry = {'kind': 'psql', 'database': 'members', 'file': 'assoc-psql-x.sql.zst', 'rows': {}}
    index = {'format': ppbackup.INDEX_FORMAT, 'name': 'assoc', 'databases': [entry]}
    assert ppbackup.index_problem(index, None) == ''  # an older run: drilled as before
    entry['grants'] = {'table public.members': 'owner site; grants site=arwdDxt/site'}
    assert ppbackup.index_problem(index, None) == ''
    for bad in (['table public.members'], {'table public.members': 7}):
        entry['grants'] = bad
        assert '"grants" is not an object' in ppbackup.index_problem(index, None)
    recorded = {'table a': 'owner o; grants o=r/o', 'view b': 'owner o; grants x'}
    restored = {'table a': 'owner o; grants o=r/o', 'sequence c': 'owner o; grants y'}
    assert ppbackup.grant_differences('psql db', recorded, restored) == [
        'psql db: grants on sequence c are new (restored "owner o; grants y", none at dump time)',
        'psql db: grants on view b did not come back (at dump time "owner o; grants x")',
    ]


def test_P1_a_drill_mails_no_row_of_the_backup_when_a_statement_fails(site: Site) -> None:
    """psql quotes the failing statement, and a server's error can quote a row: the drill's mail
    (and its stdout, which cron mails) say what failed, and the servers' words go to a 0600 file
    in the key holder's home."""
    site.write_config(BACKUP_MYSQL_DB=None)
    marker = f'ppbt-row-{secrets.token_hex(4)}'
    psql(site.pg_db, f"INSERT INTO members VALUES (77, '{marker}', 'a row')")
    # The dumper's output gains a statement that fails on a restore, quoting a row's value.
    site.shim('pg_dump', '#!/bin/sh\n/usr/bin/pg_dump "$@" | sed "/^COPY public.members/i '
              f"INSERT INTO nosuch VALUES ('{marker}');" + '"\n')  # fmt: skip
    assert site.run().returncode == 0
    result = drill(site)
    assert result.returncode == 1, result.stdout
    mail = site.mails()[-1]
    assert 'FAILED' in mail['body'] and '.ppbackup-drill.log' in mail['body']
    assert marker not in mail['body'] and marker not in result.stdout + result.stderr
    log = site.home / '.ppbackup-drill.log'
    assert marker in log.read_text() and stat.S_IMODE(log.stat().st_mode) == 0o600
