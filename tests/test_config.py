"""The config is shell-style, parsed and never executed; every mistake is reported at once (exit 2)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from conftest import InProcess, Site

import ppbackup


def load(site: Site, text: str) -> ppbackup.Config:
    site.cfg.write_text(text)
    site.cfg.chmod(0o600)
    return ppbackup.load_config(site.cfg)


def problems(site: Site, text: str) -> str:
    with pytest.raises(ppbackup.ConfigError) as caught:
        load(site, text)
    return caught.value.detail


BASE = 'BACKUP_NAME=x\nBACKUP_REMOTE=/r\nBACKUP_GPG_RECIPIENT=a@example.org\nBACKUP_FILES=site\n'


def test_shell_syntax_is_understood(site: Site) -> None:
    config = load(
        site,
        """
# a comment line
export BACKUP_NAME='assoc'   # trailing comment
BACKUP_REMOTE="backup@host.example:/srv/$BACKUP_NAME"
BACKUP_GPG_RECIPIENT="alice@example.org 0x0123456789ABCDEF0123456789ABCDEF01234567"
BACKUP_FILES="'my docs' logs ${HOME}/abs\\ path"
BACKUP_PSQL_DB=members
ONLY_ONE_DAY=1
BACKUP_LIMIT_MB=500
BACKUP_ADMIN_EMAILS="a@example.org, b@example.org"
BACKUP_COMPRESSION=xz
BACKUP_DIR=/srv/enc
""",
    )
    assert config.name == 'assoc'
    assert config.remote == 'backup@host.example:/srv/assoc'
    assert config.recipients == ('alice@example.org', '0x0123456789ABCDEF0123456789ABCDEF01234567')
    assert config.files == ('my docs', 'logs', f'{site.home}/abs path')
    assert config.psql_dbs == ('members',) and config.mysql_dbs == ()
    assert config.only_one_day is True and config.limit_mb == 500
    assert config.admin_emails == ('a@example.org', 'b@example.org')
    assert config.compression == 'xz'
    assert config.backup_dir == Path('/srv/enc')
    assert config.insecure_dir == site.home / 'backups.insecure'
    assert config.mail_on_success is True


def test_B1_shell_code_is_never_run(site: Site, tmp_path: Path, in_process: InProcess) -> None:
    pwned = tmp_path / 'pwned'
    site.cfg.write_text(BASE + f'BACKUP_NAME=$(touch {pwned})\nBACKUP_REMOTE=`touch {pwned}`\n')
    site.cfg.chmod(0o600)
    result = in_process()
    assert result.returncode == 2
    assert 'ppbackup.cfg:5' in result.stderr and 'ppbackup.cfg:6' in result.stderr
    assert 'never runs the config' in result.stderr
    assert not pwned.exists()
    assert not (site.home / 'backups').exists() and site.mails() == []


def test_B2_every_mistake_is_reported_at_once_with_a_suggestion(site: Site) -> None:
    detail = problems(
        site,
        'BACKUP_NAME=x\nBACKUP_GPG_RECIPENT=a@example.org\nBACKUP_FILES=site\n'
        'BACKUP_LIMIT_MB=lots\nBACKUP_COMPRESION=zstd\n',
    )
    assert 'unknown key BACKUP_GPG_RECIPENT; did you mean BACKUP_GPG_RECIPIENT?' in detail
    assert 'did you mean BACKUP_COMPRESSION?' in detail
    assert 'BACKUP_REMOTE is required' in detail
    assert 'BACKUP_GPG_RECIPIENT is required' in detail
    assert 'BACKUP_LIMIT_MB: expected a whole number' in detail


def test_B2_exit_code_is_2_and_nothing_is_touched(site: Site, in_process: InProcess) -> None:
    site.cfg.write_text('BACKUP_NAME=x\nBACKUP_REMOTE=/r\nBACKUP_GPG_RECIPENT=x\n')
    result = in_process()
    assert result.returncode == 2
    assert 'did you mean BACKUP_GPG_RECIPIENT' in result.stderr
    assert not (site.home / 'backups').exists() and not (site.home / 'backups.insecure').exists()
    assert site.mails() == []


def test_nothing_to_back_up_is_refused(site: Site) -> None:
    detail = problems(site, 'BACKUP_NAME=x\nBACKUP_REMOTE=/r\nBACKUP_GPG_RECIPIENT=a@b.org\n')
    assert 'nothing to back up' in detail


@pytest.mark.parametrize(
    'line, expected',
    [
        ('BACKUP_FILES=a b', 'a space in an unquoted value'),
        ('BACKUP_FILES="unterminated', 'unterminated'),
        ('BACKUP_FILES=${HOME:-/x}', 'only plain ${NAME}'),
        ('BACKUP_FILES=$NOT_A_KEY', '$NOT_A_KEY is not an earlier key'),
        ('BACKUP_FILES=a;rm', "unquoted ';'"),
        ('echo hello', 'not a KEY=value assignment'),
        ('BACKUP_ADMIN_EMAILS=-oProxyCommand=x', 'not an email address'),
        ('ONLY_ONE_DAY=maybe', 'expected 1 or 0'),
        ('BACKUP_COMPRESSION=lz4', 'expected one of zstd'),
        ('BACKUP_DIR=~/backups.insecure/x', 'must be separate folders'),
    ],
)
def test_bad_lines_are_named(site: Site, line: str, expected: str) -> None:
    assert expected in problems(site, BASE + line + '\n')


def test_B3_option_lookalikes_are_refused_or_kept_as_names(site: Site) -> None:
    detail = problems(site, BASE + 'BACKUP_PSQL_DB=--help\nBACKUP_REMOTE=-e.sh\n')
    assert "BACKUP_PSQL_DB: '--help' must not start" in detail
    assert 'BACKUP_REMOTE: must not start with "-"' in detail


def test_B4_a_config_others_can_write_is_refused(site: Site, in_process: InProcess) -> None:
    # In a folder that others can reach (the fixture's tree is 0700: nobody else could write there).
    with tempfile.TemporaryDirectory(prefix='ppbt-open-') as folder:
        os.chmod(folder, 0o755)
        config = Path(folder) / 'ppbackup.cfg'
        config.write_text(site.cfg.read_text())
        config.chmod(0o666)
        result = in_process('--config', str(config))
    assert result.returncode == 2
    assert 'writable by group or others' in result.stderr
    assert 'can redirect the backups' in result.stderr
    assert not (site.home / 'backups').exists()


def test_B4_a_config_owned_by_someone_else_is_refused(site: Site, in_process: InProcess) -> None:
    os.chown(site.cfg, 65534, 65534)
    result = in_process()
    assert result.returncode == 2
    assert 'owned by uid 65534, not by this user' in result.stderr
    assert not (site.home / 'backups').exists()


def test_config_file_can_be_chosen(site: Site, tmp_path: Path, in_process: InProcess) -> None:
    other = tmp_path / 'other.cfg'
    other.write_text(site.cfg.read_text().replace('BACKUP_NAME=assoc', 'BACKUP_NAME=other'))
    other.chmod(0o600)
    site.cfg.unlink()
    assert in_process('--config', str(other), 'run').returncode == 0
    assert list(site.backups.glob('day*/other-*.sha256'))
    result = in_process(extra_env={'PPBACKUP_CONFIG': str(other)})
    assert result.returncode == 0
    missing = in_process('--config', str(tmp_path / 'nope.cfg'))
    assert missing.returncode == 2 and 'cannot read config' in missing.stderr


def test_usage_errors_exit_2(site: Site) -> None:
    assert ppbackup.main(['no-such-command']) == 2
    assert ppbackup.main(['watch', str(site.root / 'missing')]) == 2


def test_example_config_documents_every_key() -> None:
    example = (Path(__file__).parent.parent / 'ppbackup.cfg.example').read_text()
    readme = (Path(__file__).parent.parent / 'README.md').read_text()
    for key in ppbackup.KEYS:
        assert key.name in example, key.name
        assert key.name in readme, key.name
