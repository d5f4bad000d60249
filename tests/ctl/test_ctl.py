"""``policyctl`` in-process (``main([...])``) against a temporary SQLite store."""

from __future__ import annotations

import io
import json
import socket

import pytest

from policyd import ctl, demo
from policyd.store import NativeBackend

LIST = "discuss@lists.example.org"


class Ctl:
    """Runs policyctl with a --store URL and returns (exit code, stdout, stderr)."""

    def __init__(self, capsys, tmp_path) -> None:
        self.capsys = capsys
        self.path = tmp_path / "state" / "policyd.sqlite"
        self.url = f"sqlite:///{self.path}"
        self.environ = {"POLICYD_CONFIG": str(tmp_path / "no-such.conf")}

    def __call__(self, *argv: str, stdin: str | None = None, store: bool = True):
        args = (["--store", self.url] if store else []) + list(argv)
        code = ctl.main(args, environ=self.environ,
                        stdin=io.StringIO(stdin) if stdin is not None else None)
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err

    def ok(self, *argv: str, stdin: str | None = None) -> str:
        code, out, err = self(*argv, stdin=stdin)
        assert code == 0, (argv, out, err)
        return out

    def token(self) -> str:
        backend = NativeBackend(self.url)
        try:
            return backend.change_token()
        finally:
            backend.close()

    def members(self, target: str = LIST, *extra: str) -> list[dict]:
        return json.loads(self.ok("member", "ls", target, "--json", *extra))


@pytest.fixture
def run(capsys, tmp_path) -> Ctl:
    return Ctl(capsys, tmp_path)


@pytest.fixture
def initialised(run) -> Ctl:
    run.ok("init")
    run.ok("list", "add", LIST, "--default-nonmember-action", "hold")
    return run


@pytest.fixture
def with_demo(run) -> Ctl:
    run.ok("init", "--demo")
    return run


# --- init, migrate, errors about the store -------------------------------------------------


def test_init_creates_then_reports_up_to_date(run):
    """init creates the store (and its directory); a second init changes nothing."""
    out = run.ok("init")
    assert "created (schema rev" in out
    assert run.path.exists()
    token = run.token()
    assert "up to date" in run.ok("init")
    assert "up to date" in run.ok("migrate")
    assert run.token() == token


def test_migrate_makes_dropped_change_triggers_again(initialised):
    """A change trigger dropped by hand (the daemon then reports it and reads every
    change with a full build): ``policyctl migrate`` at the head revision makes the
    triggers again and says so; a second run has nothing to repair."""
    import sqlite3

    from sqlalchemy import create_engine

    from policyd.store import engine as engine_module

    with sqlite3.connect(initialised.path) as connection:
        connection.execute("DROP TRIGGER policyd_rev_addresses_au")
    out = initialised.ok("migrate")
    assert "up to date" in out
    assert "change triggers made again" in out
    assert "policyd_rev_addresses_au on addresses" in out
    engine = create_engine(initialised.url)
    try:
        with engine.connect() as connection:
            assert engine_module.trigger_problem(connection) is None
    finally:
        engine.dispose()
    assert "made again" not in initialised.ok("migrate")


def test_init_demo_loads_once(run):
    """init --demo loads the demo data into an empty store, and not a second time."""
    out = run.ok("init", "--demo")
    assert "demo data: loaded" in out
    token = run.token()
    assert "not loaded, the store has lists already" in run.ok("init", "--demo")
    assert run.token() == token


def test_commands_on_a_missing_store_exit_5_and_create_nothing(run):
    """Without init, store commands say so (exit 5) and leave no file behind."""
    for argv in (("list", "ls"), ("migrate",), ("member", "add", LIST, "a@example.com"),
                 ("query", LIST, "a@example.com", "--offline"), ("status", "--offline")):
        code, out, err = run(*argv)
        assert code == 5, argv
        assert "policyctl init" in err
    assert not run.path.exists()


def test_unreachable_database_exits_5(run):
    """A store URL whose server does not answer is 'store unavailable'."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run.url = f"postgresql+psycopg2://postgres:pw@127.0.0.1:{port}/nothing"
    code, out, err = run("list", "ls")
    assert code == 5
    assert "pw@" not in err and "store" in err


def test_missing_configuration_is_bad_input(run):
    """Without --store, the configuration file must exist (exit 2, naming it)."""
    code, out, err = run("list", "ls", store=False)
    assert code == 2
    assert "no-such.conf" in err


def test_bad_store_url_is_bad_input(run):
    """A store URL SQLAlchemy cannot parse is bad input (exit 2)."""
    run.url = "nonsense://"
    code, out, err = run("list", "ls")
    assert code == 2


def test_no_command_prints_help_and_exits_2(run, capsys):
    """policyctl alone, or a group alone, prints help and exits 2."""
    assert ctl.main([]) == 2
    assert "usage: policyctl" in capsys.readouterr().err
    assert ctl.main(["member"]) == 2
    assert "policyctl member" in capsys.readouterr().err


# --- domains and lists -------------------------------------------------------------------


def test_domain_commands(initialised):
    """domain add/list/remove, with alias domains."""
    run = initialised
    assert "alias of lists.example.org" in run.ok(
        "domain", "add", "lists.example.net", "--alias-of", "lists.example.org")
    assert json.loads(run.ok("domain", "ls", "--json")) == [
        {"domain": "lists.example.org", "alias_of": None},
        {"domain": "lists.example.net", "alias_of": "lists.example.org"}]
    code, out, err = run("domain", "remove", "lists.example.org")
    assert code == 2 and "still has lists" in err
    code, out, err = run("domain", "add", "lists.example.net")
    assert code == 2 and "exists already" in err
    run.ok("domain", "remove", "lists.example.net")
    code, out, err = run("domain", "remove", "lists.example.net")
    assert code == 4


def test_list_lifecycle(initialised):
    """list add/show/set/ls/remove, with every setting."""
    run = initialised
    out = run.ok("list", "add", "Announce@Lists.Example.org", "--mode", "mailman2",
                 "--default-member-action", "accept", "--default-nonmember-action", "reject",
                 "--rejection-notice", "Editors only", "--display-name", "News",
                 "--emergency", "on")
    assert "added list announce@lists.example.org" in out
    info = json.loads(run.ok("list", "show", "announce.lists.example.org", "--json"))
    assert {k: info[k] for k in ("mode", "emergency", "default_member_action",
                                 "default_nonmember_action", "rejection_notice",
                                 "display_name")} == {
        "mode": "mailman2", "emergency": True, "default_member_action": "accept",
        "default_nonmember_action": "reject", "rejection_notice": "Editors only",
        "display_name": "News"}
    out = run.ok("list", "set", "announce@lists.example.org", "--emergency", "off",
                 "--rejection-notice", "", "--mode", "mailman3")
    assert "emergency = off" in out and "rejection notice = -" in out
    shown = run.ok("list", "show", "announce@lists.example.org")
    assert "mailman3" in shown and "Editors only" not in shown
    assert [entry["address"] for entry in json.loads(run.ok("list", "ls", "--json"))] == [
        "announce@lists.example.org", LIST]
    assert "announce@lists.example.org" in run.ok("list", "ls")
    assert "removed list announce@lists.example.org" in run.ok(
        "list", "remove", "announce@lists.example.org")
    code, out, err = run("list", "show", "announce@lists.example.org")
    assert code == 4 and "no list" in err


def test_list_errors_write_nothing(initialised):
    """Bad settings and duplicates exit 2, unknown lists 4, and the store is unchanged."""
    run = initialised
    token = run.token()
    for argv, code in (
        (("list", "add", LIST), 2),
        (("list", "add", "bad address"), 2),
        (("list", "add", "x@lists.example.org", "--mode", "mailman4"), 2),
        (("list", "add", "x@lists.example.org", "--default-member-action", "maybe"), 2),
        (("list", "set", LIST), 2),
        (("list", "set", LIST, "--emergency", "perhaps"), 2),
        (("list", "set", "nosuch@lists.example.org", "--emergency", "on"), 4),
        (("list", "remove", "nosuch@lists.example.org"), 4),
    ):
        assert run(*argv)[0] == code, argv
    assert run.token() == token


# --- members -----------------------------------------------------------------------------


def test_member_add_set_remove(initialised):
    """member add (with actions and roles), set, remove and ls."""
    run = initialised
    assert "added 2 members" in run.ok("member", "add", LIST, "A@Example.com",
                                       "b@example.com")
    run.ok("member", "add", LIST, "mod@example.com", "--action", "hold")
    run.ok("member", "add", LIST, "boss@example.com", "--role", "owner")
    assert "already 1 member" in run.ok("member", "add", LIST, "a@example.com",
                                        "--ignore-existing")
    members = run.members()
    assert [(m["address"], m["original"], m["action"]) for m in members] == [
        ("a@example.com", "A@Example.com", "list default"),
        ("b@example.com", "b@example.com", "list default"),
        ("mod@example.com", "mod@example.com", "hold")]
    assert [m["address"] for m in run.members(LIST, "--role", "owner")] == ["boss@example.com"]
    assert "to reject" in run.ok("member", "set", LIST, "a@example.com", "b@example.com",
                                 "--action", "reject")
    run.ok("member", "set", LIST, "b@example.com", "--action", "default")
    assert {m["address"]: m["action"] for m in run.members()}["a@example.com"] == "reject"
    assert {m["address"]: m["action"] for m in run.members()}["b@example.com"] == "list default"
    assert "removed 1 member" in run.ok("member", "remove", LIST, "B@EXAMPLE.COM")
    assert [m["address"] for m in run.members()] == ["a@example.com", "mod@example.com"]
    assert "a@example.com" in run.ok("member", "ls", LIST)


def test_member_errors_write_nothing(initialised):
    """A malformed address among good ones, a bad action, an unknown list or a missing
    member: non-zero exit, the right code, and nothing written."""
    run = initialised
    run.ok("member", "add", LIST, "keep@example.com")
    token = run.token()
    cases = (
        (("member", "add", LIST, "good@example.com", "not-an-address"), 2, "malformed"),
        (("member", "add", LIST, "good@example.com", "--action", "bogus"), 2, ""),
        (("member", "add", LIST, "good@example.com", "--role", "boss"), 2, ""),
        (("member", "add", "nosuch@lists.example.org", "good@example.com"), 4, "no list"),
        (("member", "add", LIST), 2, "no addresses"),
        (("member", "remove", LIST, "keep@example.com", "absent@example.com"), 4,
         "absent@example.com"),
        (("member", "set", LIST, "keep@example.com"), 2, "--action"),
        (("member", "set", LIST, "absent@example.com", "--action", "hold"), 4, "absent"),
    )
    for argv, code, message in cases:
        got, out, err = run(*argv)
        assert got == code, (argv, out, err)
        assert message in err
    assert run.token() == token
    assert [m["address"] for m in run.members()] == ["keep@example.com"]


def test_bulk_add_from_a_file(initialised, tmp_path):
    """Five thousand members from a file (some with their own action) in one command."""
    run = initialised
    lines = ["# exported from somewhere", ""]
    for i in range(5000):
        lines.append(f"user{i}@bulk.example" + (" hold" if i % 1000 == 0 else ""))
    path = tmp_path / "members.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert "added 5000 members" in run.ok("member", "add", LIST, "--file", str(path))
    members = run.members()
    assert len(members) == 5000
    assert sum(m["action"] == "hold" for m in members) == 5
    assert "already 5000 members" in run.ok("member", "add", LIST, "--file", str(path),
                                            "--ignore-existing")
    assert "removed 5000 members" in run.ok("member", "remove", LIST, "--file", str(path))


def test_bulk_input_from_stdin_and_its_errors(initialised):
    """--file - reads stdin; a bad line is reported with its number and nothing is
    written."""
    run = initialised
    token = run.token()
    code, out, err = run("member", "add", LIST, "--file", "-",
                         stdin="a@example.com\nb@example.com sometimes\nc@@\n")
    assert code == 2
    assert "stdin line 2" in err and "stdin line 3" in err
    assert run.token() == token
    run.ok("member", "add", LIST, "--file", "-", "--action", "reject",
           stdin="a@example.com\nb@example.com accept\n")
    assert {m["address"]: m["action"] for m in run.members()} == {
        "a@example.com": "reject", "b@example.com": "accept"}
    run.ok("member", "set", LIST, "--file", "-", stdin="a@example.com discard\n")
    assert run.members()[0]["action"] == "discard"


def test_missing_file_is_bad_input(initialised, tmp_path):
    """--file naming a file that does not exist is bad input (exit 2)."""
    code, out, err = initialised("member", "add", LIST, "--file", str(tmp_path / "none"))
    assert code == 2 and "cannot read" in err


def test_users_and_aliases(initialised):
    """member add --user links addresses; the user's other addresses then post as the
    member; a user can be subscribed through its preferred address."""
    run = initialised
    run.ok("list", "set", LIST, "--default-member-action", "accept")
    assert "created user ann" in run.ok("member", "add", LIST, "ann@work.example",
                                        "--user", "ann")
    run.ok("user", "link", "ann", "ann@home.example")
    result = json.loads(run.ok("query", LIST, "ann@home.example", "--offline", "--json"))
    assert result["decision"]["rule"] == "member-moderation"
    run.ok("user", "add", "bo", "bo@one.example", "bo@two.example")
    assert "through its preferred address" in run.ok("member", "add", LIST, "--user", "bo",
                                                     "--action", "reject")
    result = json.loads(run.ok("query", LIST, "bo@two.example", "--offline", "--json"))
    assert result["decision"]["verdict"] == "reject"
    run.ok("user", "prefer", "bo", "bo@two.example")
    info = json.loads(run.ok("user", "show", "bo", "--json"))
    assert info["preferred_address"] == "bo@two.example"
    assert info["subscriptions"] == [{"list": LIST, "role": "member", "action": "reject"}]
    assert "ann  2 addresses" in run.ok("user", "ls")
    code, out, err = run("user", "link", "bo", "ann@home.example")
    assert code == 2 and "another user" in err
    run.ok("user", "unlink", "ann@home.example")
    result = json.loads(run.ok("query", LIST, "ann@home.example", "--offline", "--json"))
    assert result["decision"]["rule"] == "nonmember-moderation"
    run.ok("user", "remove", "bo")
    assert run("user", "show", "bo")[0] == 4


def test_nonmember_commands(initialised):
    """nonmember add/set/remove with their own actions decide before the list default."""
    run = initialised
    run.ok("nonmember", "add", LIST, "friend@example.com", "--action", "accept")
    result = json.loads(run.ok("query", LIST, "friend@example.com", "--offline", "--json"))
    assert result["decision"]["verdict"] == "accept"
    run.ok("nonmember", "set", LIST, "friend@example.com", "--action", "discard")
    result = json.loads(run.ok("query", LIST, "friend@example.com", "--offline", "--json"))
    assert result["decision"]["verdict"] == "discard"
    assert json.loads(run.ok("nonmember", "ls", LIST, "--json"))[0]["action"] == "discard"
    run.ok("nonmember", "remove", LIST, "friend@example.com")
    assert run.members() == []
    assert json.loads(run.ok("nonmember", "ls", LIST, "--json")) == []


# --- patterns and bans -------------------------------------------------------------------


def test_pattern_commands(initialised):
    """pattern add/list/remove; a bad regex or kind is bad input."""
    run = initialised
    run.ok("pattern", "add", LIST, "reject", r"^.*@spam\.example$")
    run.ok("pattern", "add", LIST, "accept", r"^.*@partner\.example$")
    run.ok("pattern", "add", LIST, "accept", "vip@example.com", "--position", "1")
    assert json.loads(run.ok("pattern", "ls", LIST, "--json")) == [
        {"kind": "accept", "position": 1, "pattern": "vip@example.com"},
        {"kind": "accept", "position": 2, "pattern": r"^.*@partner\.example$"},
        {"kind": "reject", "position": 1, "pattern": r"^.*@spam\.example$"}]
    result = json.loads(run.ok("query", LIST, "x@spam.example", "--offline", "--json"))
    assert result["decision"]["verdict"] == "reject"
    token = run.token()
    assert run("pattern", "add", LIST, "reject", "^(")[0] == 2
    assert run("pattern", "add", LIST, "maybe", "x@example.com")[0] == 2
    assert run("pattern", "add", LIST, "reject", r"^.*@spam\.example$")[0] == 2
    assert run("pattern", "remove", LIST, "hold", "x@example.com")[0] == 4
    assert run.token() == token
    run.ok("pattern", "remove", LIST, "reject", r"^.*@spam\.example$")
    assert "spam" not in run.ok("pattern", "ls", LIST)
    code, out, err = run("pattern", "add", LIST, "hold", "@other@lists.example.org")
    assert code == 0 and "only in accept_these_nonmembers" in err


def test_ban_commands(initialised):
    """ban add/list/remove for a list and site-wide; a banned sender is discarded."""
    run = initialised
    run.ok("ban", "add", LIST, "troll@example.net", r"^.*@spam\.example$")
    run.ok("ban", "add", "--site", "^evil@")
    assert json.loads(run.ok("ban", "ls", "--json")) == {
        "site": ["^evil@"], LIST: ["troll@example.net", r"^.*@spam\.example$"]}
    assert json.loads(run.ok("ban", "ls", "--site", "--json")) == {"site": ["^evil@"]}
    for sender in ("troll@example.net", "evil@anywhere.example"):
        result = json.loads(run.ok("query", LIST, sender, "--offline", "--json"))
        assert (result["decision"]["verdict"], result["decision"]["rule"]) == (
            "discard", "banned-address")
    token = run.token()
    assert run("ban", "add", "--site", "^evil@")[0] == 2
    assert run("ban", "add", "--site")[0] == 2
    assert run("ban", "add")[0] == 2
    assert run("ban", "remove", LIST, "nobody@example.com")[0] == 4
    assert run("ban", "add", "nosuch@lists.example.org", "x@example.com")[0] == 4
    assert run.token() == token
    run.ok("ban", "remove", LIST, "TROLL@example.net")
    run.ok("ban", "remove", "--site", "^evil@")
    assert json.loads(run.ok("ban", "ls", LIST, "--json")) == {LIST: [r"^.*@spam\.example$"]}


# --- query, status, reload ---------------------------------------------------------------


def test_offline_query_human_output(with_demo):
    """The human output names the verdict, the SMTP reply, the rule, the reason, the
    sender, and the Exim and Postfix answers; --explain adds the trace."""
    out = with_demo.ok("query", "announce@lists.example.org", "stranger@example.com",
                       "--offline")
    assert "verdict:  reject" in out
    assert "reply:    550 5.7.1 Only the editors may post to announce@lists.example.org" in out
    assert "rule:     nonmember-moderation" in out
    assert "sender:   stranger@example.com" in out
    assert "exim:     REJECT 550 5.7.1 Only the editors" in out
    assert "postfix:  action=DUNNO" in out
    assert "trace:" not in out
    out = with_demo.ok("query", LIST, "dave@example.com", "--offline", "--explain")
    assert "verdict:  hold" in out
    assert "HIT   member-moderation" in out
    assert "miss  banned-address" in out


def test_offline_query_json_shape(with_demo):
    """--json prints the same dict shape the daemon's control socket answers."""
    result = json.loads(with_demo.ok(
        "query", LIST, "bounce@mailer.example", "--from", "=?utf-8?q?Alice?= <alice@example.com>",
        "--reply-to", "x@y.example", "--sender", "s@y.example", "--offline", "--json"))
    assert set(result) == {"decision", "reply", "exim", "postfix", "snapshot"}
    assert result["decision"]["verdict"] == "accept"
    assert result["decision"]["sender"] == "alice@example.com"
    assert result["decision"]["senders"][:2] == ["alice@example.com", "bounce@mailer.example"]
    assert set(result["reply"]) == {"outcome", "code", "status", "text"}
    assert result["exim"].startswith("ACCEPT 250 ")
    assert result["snapshot"]["version"] == with_demo.token()


@pytest.mark.parametrize("recipient,sender,from_header,expected", demo.EXAMPLES)
def test_offline_query_on_demo_data(with_demo, recipient, sender, from_header, expected):
    """Every documented demo example gives its verdict through policyctl."""
    argv = ["query", recipient, sender, "--offline", "--json"]
    if from_header:
        argv += ["--from", from_header]
    assert json.loads(with_demo.ok(*argv))["decision"]["verdict"] == expected


def test_null_sender_query(with_demo):
    """'<>' is the null sender: rejected at a posting address, accepted at -bounces."""
    result = json.loads(with_demo.ok("query", LIST, "<>", "--offline", "--json"))
    assert result["decision"]["rule"] == "null-sender"
    result = json.loads(with_demo.ok("query", "discuss-bounces@lists.example.org", "",
                                     "--offline", "--json"))
    assert result["decision"]["verdict"] == "accept"


_FIELDS = {"recipient": "LIST", "envelope_sender": "SENDER", "from_header": "--from",
           "reply_to_header": "--reply-to", "sender_header": "--sender",
           "client_address": "--client"}


def _too_long(field: str) -> tuple[list[str], dict]:
    """policyctl query's arguments with ``field`` one character past the control
    socket's limit (``FIELD_LIMITS``), and the same query's fields for
    ``control_client.query_message``."""
    from policyd.protocols.control import FIELD_LIMITS

    fields = {"recipient": LIST, "envelope_sender": "dave@example.com",
              field: "x" * (FIELD_LIMITS[field] + 1)}
    argv = ["query", fields.pop("recipient"), fields.pop("envelope_sender")]
    for key, value in fields.items():
        argv += [_FIELDS[key], value]
    return argv, {"recipient": argv[1], "envelope_sender": argv[2], **fields}


@pytest.mark.parametrize("field", _FIELDS)
def test_offline_query_refuses_a_field_the_control_socket_refuses(with_demo, field):
    """A field longer than the control socket takes (what an MTA can send) is refused by
    --offline too: exit 2 (bad input), naming the option and the limit."""
    from policyd import control_client
    from policyd.protocols import ProtocolError
    from policyd.protocols.control import FIELD_LIMITS, parse_request

    argv, fields = _too_long(field)
    with pytest.raises(ProtocolError, match=f"^{field} longer than"):
        parse_request(control_client.encode(control_client.query_message(**fields)))
    code, out, err = with_demo(*argv, "--offline")
    assert code == 2, (out, err)
    assert out == ""
    assert f"{_FIELDS[field]}: {field} longer than {FIELD_LIMITS[field]} characters" in err


def test_offline_query_takes_a_header_at_the_limit(with_demo):
    """The limit is the control socket's own: a header of exactly its length is decided."""
    from policyd.protocols.control import FIELD_LIMITS

    header = "x" * FIELD_LIMITS["from_header"]
    result = json.loads(with_demo.ok("query", LIST, "dave@example.com", "--from", header,
                                     "--offline", "--json"))
    assert result["decision"]["verdict"]


def test_offline_query_takes_every_header_at_its_limit_outside_the_bmp(with_demo):
    """Three headers at their limit of characters ``policyctl`` escapes as two
    ``\\uXXXX`` each: within the control socket's ``MAX_LINE``, so decided offline as
    the daemon would decide them."""
    from policyd import control_client
    from policyd.protocols.control import FIELD_LIMITS, MAX_LINE

    header = "\N{GRINNING FACE}" * FIELD_LIMITS["from_header"]
    line = control_client.encode(control_client.query_message(
        LIST, "dave@example.com", header, header, header))
    assert len(line) - 1 <= MAX_LINE
    result = json.loads(with_demo.ok("query", LIST, "dave@example.com", "--from", header,
                                     "--reply-to", header, "--sender", header, "--offline",
                                     "--json"))
    assert result["decision"]["verdict"]


def test_query_refuses_a_long_field_before_asking_the_daemon(with_demo, tmp_path):
    """Without --offline an over-long field is bad input too (exit 2), not a daemon that
    cannot decide: policyctl does not send what the daemon would refuse."""
    config = tmp_path / "policyd.conf"
    config.write_text(f"[store]\nurl = {with_demo.url}\n[daemon]\n"
                      f"control_socket = {tmp_path / 'control.sock'}\n")
    code, out, err = with_demo("--config", str(config), *_too_long("from_header")[0])
    assert code == 2, (out, err)
    assert "--from: from_header longer than" in err


def test_daemon_commands_without_a_daemon_exit_3(with_demo, tmp_path):
    """query, status and reload without a running daemon: exit 3 with a hint."""
    config = tmp_path / "policyd.conf"
    config.write_text(f"[store]\nurl = {with_demo.url}\n[daemon]\n"
                      f"control_socket = {tmp_path / 'control.sock'}\n")
    for argv, hint in ((("query", LIST, "a@example.com"), "--offline"),
                       (("status",), "--offline"), (("reload",), "")):
        code, out, err = with_demo("--config", str(config), *argv)
        assert code == 3, argv
        assert "control.sock" in err and hint in err


def test_config_file_names_the_store(with_demo, tmp_path, capsys):
    """Without --store the configuration's [store] url is used."""
    config = tmp_path / "policyd.conf"
    config.write_text(f"[store]\nurl = {with_demo.url}\n")
    assert ctl.main(["--config", str(config), "list", "ls"]) == 0
    assert "announce@lists.example.org" in capsys.readouterr().out
    config.write_text(f"[store]\nbackend = mailman3\nurl = {with_demo.url}\n")
    assert ctl.main(["--config", str(config), "list", "ls"]) == 2
    assert "policyctl writes only the native store" in capsys.readouterr().err


def test_status_offline(with_demo):
    """status --offline describes the store and counts its rows."""
    out = with_demo.ok("status", "--offline")
    assert "store: native sqlite:///" in out and "lists: 2" in out
    info = json.loads(with_demo.ok("status", "--offline", "--json"))
    assert info["change_token"] == with_demo.token()
    assert info["memberships"] > 0


def test_daemon_answers_are_printed_like_offline_ones(with_demo, tmp_path, monkeypatch):
    """Without --offline, policyctl prints the control socket's answer: the same lines
    (and the same JSON) as an offline decision."""
    from policyd import control_client

    offline = json.loads(with_demo.ok("query", LIST, "dave@example.com", "--offline", "--json"))
    calls = []

    def fake_query(socket_path, recipient, sender, from_header=None, reply_to_header=None,
                   sender_header=None, timeout=5.0, client_address=None, message_id=None):
        calls.append((str(socket_path), recipient, sender, from_header))
        return offline

    monkeypatch.setattr(control_client, "query", fake_query)
    config = tmp_path / "policyd.conf"
    config.write_text(f"[store]\nurl = {with_demo.url}\n[daemon]\n"
                      f"control_socket = {tmp_path / 'control.sock'}\n")
    live = with_demo.ok("--config", str(config), "query", LIST, "dave@example.com",
                        "--from", "Dave <dave@example.com>", "--explain")
    assert calls == [(str(tmp_path / "control.sock"), LIST, "dave@example.com",
                      "Dave <dave@example.com>")]
    offline_text = with_demo.ok("query", LIST, "dave@example.com", "--offline", "--explain")
    def without_age(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("snapshot:")]

    assert without_age(live) == without_age(offline_text)
    assert "HIT   member-moderation" in live
    assert json.loads(with_demo.ok("--config", str(config), "query", LIST,
                                   "dave@example.com", "--json")) == offline


def test_query_message_id_goes_to_the_daemon(with_demo, tmp_path, monkeypatch):
    """``--message-id`` (the post's Message-ID: header, for the Exim preview of
    SMTP-time moderation) reaches the control socket as the DATA ACL would send it,
    with ``--client``; it needs a header (Exim's question without one, at RCPT, is
    never moderated) and is bounded like the control socket's field (exit 2)."""
    from policyd import control_client

    offline = json.loads(with_demo.ok("query", LIST, "dave@example.com", "--offline", "--json"))
    calls = []

    def fake_query(socket_path, recipient, sender, from_header=None, reply_to_header=None,
                   sender_header=None, timeout=5.0, client_address=None, message_id=None):
        calls.append((from_header, client_address, message_id))
        return offline

    monkeypatch.setattr(control_client, "query", fake_query)
    config = tmp_path / "policyd.conf"
    config.write_text(f"[store]\nurl = {with_demo.url}\n[daemon]\n"
                      f"control_socket = {tmp_path / 'control.sock'}\n")
    with_demo.ok("--config", str(config), "query", LIST, "dave@example.com", "--from",
                 "Dave <dave@example.com>", "--client", "192.0.2.7",
                 "--message-id", " <p1@example.net> ")
    with_demo.ok("--config", str(config), "query", LIST, "dave@example.com", "--sender",
                 "dave@example.com")
    assert calls == [("Dave <dave@example.com>", "192.0.2.7", "<p1@example.net>"),
                     (None, None, None)]
    code, out, err = with_demo("--config", str(config), "query", LIST, "dave@example.com",
                               "--message-id", "<p1@example.net>")
    assert code == 2 and "--message-id needs --from, --reply-to or --sender" in err
    code, out, err = with_demo("--config", str(config), "query", LIST, "dave@example.com",
                               "--from", "d@example.com", "--message-id", "m" * 999)
    assert code == 2 and "longer than 998 characters" in err
    assert len(calls) == 2
