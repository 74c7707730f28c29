"""The web host admin's smaller needs (issue 15): check before the first run, status naming the
configured keys, and libpq/MySQL client settings that reach the dumps under cron."""

from __future__ import annotations

from conftest import Site


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
