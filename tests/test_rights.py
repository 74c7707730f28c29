"""R6: the rights the README states for the backup user, the key holder's restore and the admin's
rollback, on the servers this machine has (PostgreSQL 15 and MariaDB 10.11 on Debian 12; 17 and
11.8 in .ci/trixie's chroot, which runs this file too).

A source PostgreSQL cluster holds the README's setup (`createuser site`, `createdb -O site
members`, a reader role), backed up as `site`; a second, fresh cluster is where the key holder
restores. MariaDB runs on this machine's own server, as a user with exactly the README's grants.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ADMIN_ENV, Site, sh
from test_restore import on, pg_cluster

SITE, READER, DB = 'site', 'ppbt_reader', 'members'
SOURCE_SQL = f"""
CREATE TABLE members (id integer PRIMARY KEY, name text);
INSERT INTO members SELECT n, 'member ' || n FROM generate_series(1, 40) AS n;
GRANT SELECT ON members TO {READER};
REVOKE ALL ON DATABASE members FROM PUBLIC;
GRANT CONNECT ON DATABASE members TO {READER};
"""


@pytest.fixture(scope='module')
def src() -> Iterator[dict[str, str]]:
    """The web host's PostgreSQL, as README step 1 sets it up, with a reader role granted to
    site; yields the superuser's libpq settings."""
    with pg_cluster() as env:
        on(env, 'postgres', f'CREATE ROLE {SITE} LOGIN')  # createuser site
        on(env, 'postgres', f'CREATE ROLE {READER} NOLOGIN')
        on(env, 'postgres', f'GRANT {READER} TO {SITE}')
        on(env, 'postgres', f'CREATE DATABASE {DB} OWNER {SITE}')  # createdb -O site members
        as_site = {**env, 'PGUSER': SITE}
        for statement in SOURCE_SQL.strip().split(';\n'):
            on(as_site, DB, statement)
        yield env


@pytest.fixture(scope='module')
def dst() -> Iterator[dict[str, str]]:
    """The key holder's server: a fresh cluster, without the site's roles."""
    with pg_cluster() as env:
        yield env


def state(pg: dict[str, str]) -> tuple[str, str, str]:
    """The server's roles, databases and memberships: what a refused restore must leave as is."""
    return (
        on(pg, 'postgres', "SELECT string_agg(rolname, ' ' ORDER BY rolname) FROM pg_roles"),
        on(pg, 'postgres', "SELECT string_agg(datname, ' ' ORDER BY datname) FROM pg_database"),
        on(pg, 'postgres', 'SELECT count(*) FROM pg_auth_members'),
    )


def reset(pg: dict[str, str]) -> None:
    """Drop every database and role a test made on the key holder's server."""
    dbs = "SELECT datname FROM pg_database WHERE datname NOT IN ('postgres', 'template0', 'template1')"
    for name in on(pg, 'postgres', dbs).split():
        on(pg, 'postgres', f'DROP DATABASE "{name}" WITH (FORCE)')
    roles = "SELECT rolname FROM pg_roles WHERE rolname <> 'postgres' AND rolname NOT LIKE 'pg\\_%'"
    for role in on(pg, 'postgres', roles).split():
        on(pg, 'postgres', f'DROP OWNED BY "{role}"')
    for role in on(pg, 'postgres', roles).split():
        on(pg, 'postgres', f'DROP ROLE "{role}"')


def backup(site: Site, src: dict[str, str]) -> Path:
    """A run as the site user (README step 6); return its day slot."""
    site.write_config(BACKUP_PSQL_DB=DB, BACKUP_MYSQL_DB=None)
    result = site.run(extra_env={**src, 'PGUSER': SITE})
    assert result.returncode == 0, result.stderr
    return next(site.backups.glob('day*'))


def holder(site: Site, day: Path, pg: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = site.run(
        'restore', str(day), '--gnupghome', str(site.keys.holder), *args, extra_env=pg
    )
    return result.returncode, result.stdout, result.stderr


def server_major(pg: dict[str, str]) -> int:
    return int(on(pg, 'postgres', "SELECT current_setting('server_version_num')")) // 10000


def test_R6_a_key_holder_with_createrole_and_createdb_restores_owners_and_grants(
    site: Site, src: dict[str, str], dst: dict[str, str]
) -> None:
    day = backup(site, src)
    # README "Restore, as a key holder": createuser --createdb --createrole treasurer
    on(dst, 'postgres', 'CREATE ROLE treasurer LOGIN CREATEDB CREATEROLE')
    try:
        code, out, err = holder(
            site, day, {**dst, 'PGUSER': 'treasurer'}, '--database', DB, '--as', 'members_copy'
        )
        assert code == 0, out + err
        assert (
            f'created PostgreSQL role {SITE}' in out and f'created PostgreSQL role {READER}' in out
        )
        assert 'granted the new roles to treasurer' in out
        owner = "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'members_copy'"
        assert on(dst, 'postgres', owner) == f'{SITE}\n'
        facts = (
            "SELECT pg_get_userbyid(relowner), relacl::text FROM pg_class WHERE relname = 'members'"
        )
        assert on(dst, 'members_copy', facts) == on(src, DB, facts)
        assert on(dst, 'members_copy', 'SELECT count(*) FROM members') == '40\n'
        member = f"SELECT pg_has_role('{SITE}', '{READER}', 'MEMBER')"
        assert on(dst, 'postgres', member) == 't\n'
        datacl = "SELECT datacl::text FROM pg_database WHERE datname = '{}'"
        assert on(dst, 'postgres', datacl.format('members_copy')) == on(
            src, 'postgres', datacl.format(DB)
        ).replace(f'={DB}', '=members_copy')
    finally:
        reset(dst)


def test_R6_a_key_holder_with_createdb_only_restores_with_no_owner(
    site: Site, src: dict[str, str], dst: dict[str, str]
) -> None:
    day = backup(site, src)
    on(dst, 'postgres', 'CREATE ROLE treasurer LOGIN CREATEDB')  # README step 8
    try:
        args = ('--database', DB, '--as', 'members_copy', '--no-owner', '--no-privileges')
        code, out, err = holder(site, day, {**dst, 'PGUSER': 'treasurer'}, *args)
        assert code == 0, out + err
        owner = "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'members_copy'"
        assert on(dst, 'postgres', owner) == 'treasurer\n'
        assert on(dst, 'members_copy', 'SELECT count(*) FROM members') == '40\n'
    finally:
        reset(dst)


@pytest.mark.parametrize(
    ('attributes', 'options', 'said'),
    [
        ('CREATEDB', (), 'cannot create roles (CREATEROLE)'),
        ('CREATEROLE', (), 'lacks CREATEDB'),
        ('NOCREATEDB', ('--no-owner', '--no-privileges'), 'lacks CREATEDB'),
    ],
)
def test_R6_a_key_holder_lacking_a_right_is_told_which_and_nothing_changes(
    site: Site,
    src: dict[str, str],
    dst: dict[str, str],
    attributes: str,
    options: tuple[str, ...],
    said: str,
) -> None:
    day = backup(site, src)
    on(dst, 'postgres', f'CREATE ROLE treasurer LOGIN {attributes}')
    try:
        before = state(dst)
        code, out, err = holder(
            site, day, {**dst, 'PGUSER': 'treasurer'}, '--database', DB, '--as', 'x', *options
        )
        assert code == 1, out + err
        assert said in err and 'nothing was changed' in err, err
        assert 'left behind' not in err
        assert state(dst) == before
    finally:
        reset(dst)


def test_R6_roles_that_need_superuser_are_refused_before_anything_changes(
    site: Site, src: dict[str, str], dst: dict[str, str]
) -> None:
    on(src, 'postgres', 'CREATE ROLE ppbt_super SUPERUSER; CREATE ROLE ppbt_repl REPLICATION')
    try:
        day = backup(site, src)
    finally:
        on(src, 'postgres', 'DROP ROLE ppbt_super; DROP ROLE ppbt_repl')
    on(dst, 'postgres', 'CREATE ROLE treasurer LOGIN CREATEDB CREATEROLE')
    try:
        before = state(dst)
        code, out, err = holder(
            site, day, {**dst, 'PGUSER': 'treasurer'}, '--database', DB, '--as', 'x'
        )
        assert code == 1, out + err
        assert 'ppbt_super needs SUPERUSER' in err and 'ppbt_repl needs REPLICATION' in err, err
        assert 'nothing was changed' in err
        assert state(dst) == before
    finally:
        reset(dst)


def test_R6_the_site_user_rolls_back_with_replace_given_createdb(
    site: Site, src: dict[str, str]
) -> None:
    backup(site, src)  # latest/ holds its plaintext
    as_site = {**src, 'PGUSER': SITE}
    on(as_site, DB, 'DELETE FROM members WHERE id > 10')  # the upgrade that went wrong
    rollback = ('restore', 'latest', '--replace', '--database', DB)
    asides = f"SELECT datname FROM pg_database WHERE datname LIKE '{DB}\\_before\\_restore\\_%'"
    try:
        before = state(src)
        refused = site.run(*rollback, extra_env=as_site)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert 'lacks CREATEDB' in refused.stderr and 'nothing was changed' in refused.stderr
        assert state(src) == before
        assert on(as_site, DB, 'SELECT count(*) FROM members') == '10\n'
        # README "Restore, as a key holder": root gives site CREATEDB once, for the rollback.
        on(src, 'postgres', f'ALTER ROLE {SITE} CREATEDB')
        done = site.run(*rollback, extra_env=as_site)
        assert done.returncode == 0, done.stdout + done.stderr
        assert on(as_site, DB, 'SELECT count(*) FROM members') == '40\n'
        kept = on(src, 'postgres', asides).split()
        assert len(kept) == 1 and on(as_site, kept[0], 'SELECT count(*) FROM members') == '10\n'
    finally:
        for name in on(src, 'postgres', asides).split():
            on(src, 'postgres', f'DROP DATABASE "{name}" WITH (FORCE)')
        on(src, 'postgres', f'ALTER ROLE {SITE} NOCREATEDB')


# README step 1's MariaDB block for the backup user, and the rollback's grants (unix_socket there;
# a password here, since the tests run as root: the grants are the same).
MY_BACKUP_GRANTS = [
    'GRANT SELECT, SHOW VIEW, TRIGGER, EVENT, LOCK TABLES ON `{db}`.* TO {user}',
    'GRANT SELECT ON mysql.proc TO {user}',
]
MY_ROLLBACK_GRANTS = [
    'GRANT ALL ON `{db}`.* TO {user}',
    'GRANT ALL ON `{pattern}\\_before\\_restore\\_%`.* TO {user}',
]


def mysql(db: str, sql: str) -> str:
    """Run SQL on this machine's MariaDB as the suite's own user, never through the test's
    ~/.my.cnf (HOME is the site's)."""
    argv = ['mysql', '--batch', '--skip-column-names', '-e', sql, '--', db]
    return sh(*argv, env=ADMIN_ENV).stdout


def test_R6_the_mariadb_site_user_backs_up_whole_and_rolls_back_with_the_readme_grants(
    site: Site,
) -> None:
    token = secrets.token_hex(3)
    name, db = f'ppbt_st_{token}', site.my_db
    user = f'`{name}`@`localhost`'
    fill = {'db': db, 'user': user, 'pattern': db.replace('_', '\\_')}
    my_cnf = site.home / '.my.cnf'
    asides = (
        'SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE '
        f"'{fill['pattern']}\\_before\\_restore\\_%'"
    )
    try:
        mysql('mysql', f"CREATE USER {user} IDENTIFIED BY 'st-pw'")
        for grant in MY_BACKUP_GRANTS:
            mysql('mysql', grant.format(**fill))
        # A view, a routine and a trigger whose definer is another account: the dump needs them.
        mysql(db, 'CREATE DEFINER=`root`@`localhost` VIEW few AS SELECT id FROM members '
              'WHERE id < 3')  # fmt: skip
        mysql(
            db, 'CREATE DEFINER=`root`@`localhost` PROCEDURE tally() SELECT COUNT(*) FROM members'
        )
        my_cnf.write_text(f'[client]\nuser={name}\npassword=st-pw\n')
        my_cnf.chmod(0o600)
        site.write_config(BACKUP_PSQL_DB=None, BACKUP_MYSQL_DB=db)
        result = site.run()
        assert result.returncode == 0, result.stderr
        dump = next(site.latest.glob('*-mysql-*.sql.zst'))
        text = sh('zstd', '-dc', str(dump)).stdout
        assert 'PROCEDURE `tally`' in text and 'VIEW `few`' in text
        # The definers are root's: loading them as the site's user would need SET USER. A site's
        # own objects name its own user; here they go before the rollback.
        mysql(db, 'DROP VIEW few; DROP PROCEDURE tally')
        assert site.run().returncode == 0
        mysql(db, 'DELETE FROM members WHERE id > 1')  # the upgrade that went wrong
        rollback = ('restore', 'latest', '--replace', '--database', db)
        refused = site.run(*rollback)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert 'CREATE on the new database' in refused.stderr, refused.stderr
        assert 'nothing was changed' in refused.stderr
        assert mysql('mysql', asides) == ''
        assert mysql(db, 'SELECT COUNT(*) FROM members') == '1\n'
        for grant in MY_ROLLBACK_GRANTS:
            mysql('mysql', grant.format(**fill))
        done = site.run(*rollback)
        assert done.returncode == 0, done.stdout + done.stderr
        assert mysql(db, 'SELECT COUNT(*) FROM members') == '3\n'
        kept = mysql('mysql', asides).split()
        assert len(kept) == 1 and mysql(kept[0], 'SELECT COUNT(*) FROM members') == '1\n'
    finally:
        my_cnf.unlink(missing_ok=True)
        for aside in mysql('mysql', asides).split():
            sh('mysql', '-e', f'DROP DATABASE `{aside}`', env=ADMIN_ENV, check=False)
        sh('mysql', '-e', f'DROP USER IF EXISTS {user}', env=ADMIN_ENV, check=False)


def test_R6_an_owner_the_server_has_that_the_key_holder_cannot_act_as_is_refused(
    site: Site, src: dict[str, str], dst: dict[str, str]
) -> None:
    day = backup(site, src)
    on(dst, 'postgres', f'CREATE ROLE {SITE} LOGIN')  # there already, made by the admin
    on(dst, 'postgres', 'CREATE ROLE treasurer LOGIN CREATEDB CREATEROLE')
    try:
        before = state(dst)
        code, out, err = holder(
            site, day, {**dst, 'PGUSER': 'treasurer'}, '--database', DB, '--as', 'x'
        )
        assert code == 1, out + err
        assert f'owned by {SITE}' in err and f'SET ROLE {SITE}' in err, err
        assert 'nothing was changed' in err
        assert state(dst) == before
    finally:
        reset(dst)


def test_R6_a_mariadb_key_holder_without_create_is_told_before_anything_changes(
    site: Site,
) -> None:
    site.write_config(BACKUP_PSQL_DB=None)
    assert site.run().returncode == 0
    day = next(site.backups.glob('day*'))
    name = f'ppbt_kh_{secrets.token_hex(3)}'
    cnf = site.root / 'holder.cnf'
    cnf.write_text(f'[client]\nuser={name}\npassword=kh-pw\n')
    try:
        mysql('mysql', f"CREATE USER `{name}`@`localhost` IDENTIFIED BY 'kh-pw'")
        mysql('mysql', f'GRANT SELECT ON `{site.my_db}`.* TO `{name}`@`localhost`')
        args = ('--database', site.my_db, '--as', f'{name}_copy', '--mysql-defaults', str(cnf))
        code, out, err = holder(site, day, {}, *args)
        assert code == 1, out + err
        assert 'needs reading mysql.user, CREATE USER' in err and 'nothing was changed' in err, err
        mysql('mysql', f'GRANT SELECT ON mysql.* TO `{name}`@`localhost`')
        code, out, err = holder(site, day, {}, *args)
        assert code == 1, out + err
        assert f'needs CREATE on {name}_copy' in err and 'nothing was changed' in err, err
        mysql('mysql', f'GRANT ALL ON `{name}_copy`.* TO `{name}`@`localhost`')
        code, out, err = holder(site, day, {}, *args)
        assert code == 1, out + err
        assert 'needs CREATE USER' in err and 'nothing was changed' in err, err
        assert mysql('mysql', f"SHOW DATABASES LIKE '{name}%'") == ''
    finally:
        sh('mysql', '-e', f'DROP USER IF EXISTS `{name}`@`localhost`', env=ADMIN_ENV, check=False)


def test_R6_roles_whose_statements_fail_are_removed_and_the_restore_says_so(
    site: Site, src: dict[str, str], dst: dict[str, str]
) -> None:
    # A setting only a superuser may give (log_statement): the roles file fails part-way.
    on(src, 'postgres', f"ALTER ROLE {SITE} SET log_statement = 'all'")
    try:
        day = backup(site, src)
    finally:
        on(src, 'postgres', f'ALTER ROLE {SITE} RESET log_statement')
    on(dst, 'postgres', 'CREATE ROLE treasurer LOGIN CREATEDB CREATEROLE')
    try:
        before = state(dst)
        code, out, err = holder(
            site, day, {**dst, 'PGUSER': 'treasurer'}, '--database', DB, '--as', 'x'
        )
        assert code == 1, out + err
        assert 'log_statement' in err, err
        assert f'removed the PostgreSQL roles this restore had made: {READER}, {SITE}' in out
        assert 'left behind' not in err
        assert state(dst) == before
    finally:
        reset(dst)
