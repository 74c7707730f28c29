"""The web host admin's smaller needs (issue 15): check before the first run, status naming the
configured keys, and libpq/MySQL client settings that reach the dumps under cron."""

from __future__ import annotations

from conftest import Site, psql


def test_check_before_the_first_run_has_nothing_to_warn_about(site: Site) -> None:
    result = site.run('check')
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith(('WARN', 'FAIL'))] == []
    assert f'ok    {site.home / "backups"}: not there yet; the first run creates it (0700)' in lines
    assert lines[-1] == 'all is well'


def test_check_says_what_it_checked_of_the_mail(site: Site) -> None:
    result = site.run('check')
    line = next(line for line in result.stdout.splitlines() if 'mail to admin@example.org' in line)
    assert 'mailx found' in line and 'no mail was sent' in line
    assert site.mails() == []  # and indeed none was


def test_status_names_the_configured_fingerprints(site: Site) -> None:
    assert site.run().returncode == 0
    result = site.run('status')
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith('day'))
    assert site.keys.alice in row and site.keys.bob in row
    site.write_config(BACKUP_GPG_RECIPIENT=site.keys.alice)  # bob no longer configured
    row = next(line for line in site.run('status').stdout.splitlines() if line.startswith('day'))
    assert site.keys.alice in row and 'unknown key' in row


def test_libpq_settings_in_the_config_reach_pg_dump_under_cron(site: Site) -> None:
    # A role that may connect but not read: if PGUSER reaches pg_dump, the dump must fail.
    role = f'{site.pg_db}_reader'
    psql('postgres', f'CREATE ROLE "{role}" LOGIN')
    try:
        site.write_config(
            **{'export PGUSER': role, 'PGHOST': '127.0.0.1', 'PGCONNECT_TIMEOUT': '10'}
        )
        check = site.run('check')
        assert f'ok    PostgreSQL database {site.pg_db}: reachable' in check.stdout
        assert f'PGUSER={role}' in check.stdout and 'PGHOST=127.0.0.1' in check.stdout
        denied = site.run()
        assert denied.returncode == 1
        assert f'FAILED at dump psql {site.pg_db}' in denied.stderr
        assert 'permission denied' in denied.stderr
        psql(site.pg_db, f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"')
        granted = site.run()
        assert granted.returncode == 0, granted.stderr
    finally:
        psql(site.pg_db, f'DROP OWNED BY "{role}"')
        psql('postgres', f'DROP ROLE IF EXISTS "{role}"')


def test_passwords_and_misspelt_client_settings_are_refused(site: Site) -> None:
    site.write_config(PGPASSWORD='hunter2', PGUSR='site')
    result = site.run('check')
    assert result.returncode == 2
    assert 'PGPASSWORD: a password never goes in the config' in result.stderr
    assert '~/.pgpass' in result.stderr
    assert 'unknown key PGUSR; did you mean PGUSER?' in result.stderr
    assert 'hunter2' not in result.stderr + result.stdout
