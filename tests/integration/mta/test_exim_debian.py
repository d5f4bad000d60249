"""contrib/exim/ plugged into Debian's own Exim configuration, as contrib/exim/README.md
tells a Debian admin to do it, checked with ``exim -bh`` against the real policyd.

* split configuration: a copy of Debian's /etc/exim4 (from the exim4-config package),
  the README's files added to conf.d/, and Debian's real ``update-exim4.conf -d DIR -o
  FILE`` generating the configuration;
* monolithic configuration (dc_use_split_config='false'): exim4.conf.localmacros and the
  template, also through update-exim4.conf.

Both need a router that accepts the list domains (Mailman's, in a real setup); the test
adds a minimal one.  The client is 192.0.2.10: not in relay_from_hosts, so Debian's RCPT
ACL reaches the CHECK_RCPT_LOCAL_ACL_FILE include.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess

import pytest

from .conftest import ANNOUNCE, MEMBER, MTA_DIR, NONMEMBER, NOTICE, OTHER
from .harness import LIST_DOMAIN, Message, parse_bh

pytestmark = [pytest.mark.integration, pytest.mark.mta]

DEBIAN = MTA_DIR / "exim4-config"

UPDATE_EXIM4_CONF_CONF = """\
dc_eximconfig_configtype='local'
dc_other_hostnames='lists.test.example'
dc_local_interfaces='127.0.0.1'
dc_readhost=''
dc_relay_domains=''
dc_minimaldns='false'
dc_relay_nets=''
dc_smarthost=''
CFILEMODE='644'
dc_use_split_config='{split}'
dc_hide_mailname=''
dc_mailname_in_oh='true'
dc_localdelivery='mail_spool'
"""

# The README's local macros, with this run's socket and spool.
LOCALMACROS = """\
POLICYD_SOCKET = {socket}
POLICYD_LIST_DOMAINS = {domain}
CHECK_RCPT_LOCAL_ACL_FILE = {contrib}/policyd-rcpt.acl
CHECK_DATA_LOCAL_ACL_FILE = {contrib}/policyd-data.acl
SPOOLDIR = {spool}
ETC_MAILNAME = mx.test.example
"""

# What Mailman's router would be; only routing matters here (no delivery under -bh).
ROUTER = """
lists_for_the_test:
  driver = accept
  domains = +policyd_list_domains
  transport = mail_spool
"""


def _localmacros(layout, spool) -> str:
    # The run folder's copy of contrib/exim/: Exim opens included files as Debian-exim.
    return LOCALMACROS.format(socket=layout.exim_socket, domain=LIST_DOMAIN,
                              contrib=layout.contrib / "exim", spool=spool)


@pytest.fixture(scope="module", params=["split", "monolithic"])
def debian_conf(request, mtas, layout, policyd):
    assert (DEBIAN / "etc" / "exim4" / "exim4.conf.template").exists(), \
        f"{DEBIAN}: install-mtas.sh unpacks Debian's exim4-config there"
    base = layout.run / f"debian-{request.param}"
    confdir = base / "exim4"
    shutil.copytree(DEBIAN / "etc" / "exim4", confdir)
    spool = base / "spool"
    spool.mkdir()
    exim_user = pwd.getpwnam("Debian-exim")
    os.chown(spool, exim_user.pw_uid, exim_user.pw_gid)
    output = base / "exim4.conf"
    split = request.param == "split"
    (confdir / "update-exim4.conf.conf").write_text(
        UPDATE_EXIM4_CONF_CONF.format(split="true" if split else "false"), encoding="utf-8")
    localmacros = _localmacros(layout, spool)
    if split:
        # The README: local macros in conf.d/main/000_localmacros, policyd-main.conf as
        # conf.d/main/05_policyd (update-exim4.conf skips file names with a dot).
        (confdir / "conf.d" / "main" / "000_localmacros").write_text(
            localmacros, encoding="utf-8")
        shutil.copy(layout.contrib / "exim" / "policyd-main.conf",
                    confdir / "conf.d" / "main" / "05_policyd")
        (confdir / "conf.d" / "router" / "450_lists_for_the_test").write_text(
            ROUTER, encoding="utf-8")
    else:
        # The README: exim4.conf.localmacros holds the macros and an .include of
        # policyd-main.conf; the router goes into exim4.conf.template.
        localmacros += f".include {layout.contrib / 'exim' / 'policyd-main.conf'}\n"
        (confdir / "exim4.conf.localmacros").write_text(localmacros, encoding="utf-8")
        template = confdir / "exim4.conf.template"
        text = template.read_text(encoding="utf-8")
        assert text.count("\nbegin routers\n") == 1
        template.write_text(text.replace("\nbegin routers\n", "\nbegin routers\n" + ROUTER, 1),
                            encoding="utf-8")
    done = subprocess.run(
        ["sh", str(DEBIAN / "usr" / "sbin" / "update-exim4.conf"),
         "-d", str(confdir), "-o", str(output)],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    if not split and "POLICYD_SOCKET" not in output.read_text(encoding="utf-8"):
        # update-exim4.conf reads DIR/exim4.conf.localmacros only when
        # /etc/exim4/exim4.conf.localmacros exists; then it writes it first: do that here.
        output.write_text(localmacros + output.read_text(encoding="utf-8"), encoding="utf-8")
    output.chmod(0o644)
    os.chown(output, 0, 0)
    return layout.exim_bin, output


def bh(debian_conf, message: Message):
    exim_bin, conf = debian_conf
    session = "EHLO client.test.example\r\n" + f"MAIL FROM:<{message.sender}>\r\n"
    session += "".join(f"RCPT TO:<{r}>\r\n" for r in message.recipients)
    session += "DATA\r\n" + message.data() + "\r\n.\r\nQUIT\r\n"
    done = subprocess.run([str(exim_bin), "-C", str(conf), "-bh", "192.0.2.10"],
                          input=session.encode(), capture_output=True, timeout=60)
    return parse_bh(done.stdout.decode(errors="replace"), message,
                    done.stderr.decode(errors="replace"), done.returncode)


def test_member_accepted(debian_conf):
    result = bh(debian_conf, Message(MEMBER, [ANNOUNCE], [f"From: <{MEMBER}>"]))
    assert result.rcpt == [(250, "Accepted")], result
    assert result.accepted, result


def test_nonmember_rejected_with_the_lists_notice(debian_conf):
    result = bh(debian_conf, Message(NONMEMBER, [ANNOUNCE], [f"From: <{NONMEMBER}>"]))
    assert result.data == (550, f"5.7.1 {NOTICE}"), result


def test_unknown_list_second_list_and_null_sender_at_rcpt(debian_conf):
    result = bh(debian_conf, Message(MEMBER, [f"nolist@{LIST_DOMAIN}", ANNOUNCE, OTHER],
                                     [f"From: <{MEMBER}>"]))
    assert result.rcpt == [
        (550, f"5.1.1 No such list: nolist@{LIST_DOMAIN}"),
        (250, "Accepted"),
        (452, f"4.5.3 One list per message: please send to {OTHER} separately"),
    ], result
    assert result.accepted, result
    result = bh(debian_conf, Message("", [ANNOUNCE], []))
    assert result.rcpt[0][0] == 550 and "null sender" in result.rcpt[0][1], result
