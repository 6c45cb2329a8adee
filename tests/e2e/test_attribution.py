"""Which script sent it, in-process: the header, the program and its working directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.shim import SENDMAIL, Shim
from tests.support.upstream import SmtpUpstream

CONTACT_FORM = "<?php var_dump(mail('ola@x.example', 'Hei', 'Fra skjemaet', 'From: post@kunde.example'));\n"


def test_php_mail_records_its_script_program_and_directory(shim: Shim, upstream: SmtpUpstream,
                                                           tmp_path: Path) -> None:
    php = shutil.which("php")
    assert php, "php-cli is required (apt-get install php-cli)"
    site = tmp_path / "site-a"
    site.mkdir()
    (site / "kontakt.php").write_text(CONTACT_FORM)
    proc = subprocess.run([php, "-n", "-d", "mail.add_x_header=On", "-d", f"sendmail_path={SENDMAIL} -t -i",
                           "kontakt.php"], capture_output=True, text=True, env=shim.env, cwd=site, timeout=60)
    assert proc.stdout.strip() == "bool(true)", proc.stderr

    (got,) = upstream.received
    assert f"X-PHP-Originating-Script: {os.getuid()}:kontakt.php".encode() in got.data  # forwarded unchanged
    (line,) = [entry for entry in shim.log_lines() if "verdict=sent" in entry]
    assert f"script={os.getuid()}:kontakt.php" in line
    # PHP's command line, past the shell that popen() ran: it names the script
    assert f'exe="{php} -n -d mail.add_x_header=On -d sendmail_path={SENDMAIL} -t -i kontakt.php" ' in line
    assert f"cwd={site} " in line

    result = shim.admin("report", "--since", "1h", "--by", "script", "--json")
    assert result.code == 0, result.line
    (group,) = json.loads(result.stdout)["groups"]
    assert (group["key"], group["sent"], group["recipients"]) == (f"{os.getuid()}:kontakt.php", 1, 1)


def test_a_shell_script_without_the_header_is_named_by_its_command_line(shim: Shim, upstream: SmtpUpstream,
                                                                          tmp_path: Path) -> None:
    site = tmp_path / "site-b"
    site.mkdir()
    script = site / "backup.sh"
    script.write_text(f"#!/bin/sh\nprintf 'From: post@kunde.example\\nTo: ola@x.example\\n\\nnightly\\n' "
                      f"| {SENDMAIL} -t -i\n")
    script.chmod(0o755)
    # cron (here: a Python program) runs the script; the script, not its parent, sent the mail.
    proc = subprocess.run([sys.executable, "-c", f"import subprocess; subprocess.run([{str(script)!r}], check=True)"],
                          capture_output=True, text=True, env=shim.env, cwd=site, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert len(upstream.received) == 1
    (line,) = [entry for entry in shim.log_lines() if "verdict=sent" in entry]
    assert "script=" not in line
    assert f'exe="/bin/sh {script}" ' in line and f"cwd={site} " in line


def test_a_recipient_the_queue_gives_up_on_is_bounced_in_the_report_of_its_script(
        shim: Shim, upstream: SmtpUpstream, tmp_path: Path) -> None:
    php = shutil.which("php")
    assert php, "php-cli is required (apt-get install php-cli)"
    site = tmp_path / "site-c"
    site.mkdir()
    (site / "nyhetsbrev.php").write_text(
        "<?php var_dump(mail('a@x.example, c@x.example', 'Nytt', 'Hei', 'From: post@kunde.example'));\n")
    upstream.script.replies["RCPT:c@x.example"] = "452 4.2.2 mailbox full"
    proc = subprocess.run([php, "-n", "-d", "mail.add_x_header=On", "-d", f"sendmail_path={SENDMAIL} -t -i",
                           "nyhetsbrev.php"], capture_output=True, text=True, env=shim.env, cwd=site, timeout=60)
    assert proc.stdout.strip() == "bool(true)", proc.stderr  # a has it; c waits in the queue
    upstream.script.replies["RCPT:c@x.example"] = "550 5.1.1 no such user"
    ran = shim.admin("queue", "run", "--now", "--json")
    assert ran.code == 0 and json.loads(ran.stdout)["failed"] == 1, ran.stdout

    script = f"{os.getuid()}:nyhetsbrev.php"
    for by, key in (("account", "post@kunde.example"), ("script", script)):
        result = shim.admin("report", "--since", "1h", "--by", by, "--json")
        assert result.code == 0, result.line
        (group,) = json.loads(result.stdout)["groups"]
        assert (group["key"], group["queued"], group["sent"], group["bounced"]) == (key, 1, 0, 1), group
