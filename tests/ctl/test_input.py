"""What ``policyctl`` lets into the native store: addresses a sender could ever be (as
Mailman validates them), and duplicates refused the same way for every kind of object."""

from __future__ import annotations

import json

import pytest

from .test_ctl import LIST, Ctl

# Each can never be a sender: Mailman 3 refuses to subscribe it, drops it from
# msg.senders, or (x@y@z.example) keeps the only sender that could match it quoted.
MALFORMED = [
    ("x@y@z.example", "more than one '@'"),
    ("a b@example.com", "white space in the local part"),
    ("a;b@example.com", "';' is not allowed in the local part"),
    ("bad@@line", "more than one '@'"),
    ('"a b"@example.com', "white space in the local part"),
    ("a,b@example.com", "',' is not allowed in the local part"),
    ("a\u00a0b@example.com", "white space in the local part"),
    ("a@localhost", "not fully qualified"),
    ("a@[192.0.2.1]", "address literal"),
    ("a@-x.example", "starts with '-'"),
    ("a@x_y.example", "'_' is not allowed in the domain"),
]


@pytest.fixture
def run(capsys, tmp_path) -> Ctl:
    run = Ctl(capsys, tmp_path)
    run.ok("init")
    run.ok("list", "add", LIST)
    return run


def _refused(run: Ctl, *argv: str, stdin: str | None = None) -> str:
    """Runs a command that must fail with exit 2 and write nothing; returns stderr."""
    token = run.token()
    code, out, err = run(*argv, stdin=stdin)
    assert code == 2, (argv, out, err)
    assert run.token() == token, argv
    return err


# --- addresses -----------------------------------------------------------------------------


@pytest.mark.parametrize("address, reason", MALFORMED)
@pytest.mark.parametrize("command, options", [
    (("member", "add", LIST), ()),
    (("member", "add", LIST), ("--role", "owner")),
    (("nonmember", "add", LIST), ()),
    (("ban", "add", LIST), ()),
    (("ban", "add"), ("--site",)),
    (("pattern", "add", LIST, "accept"), ()),
    (("user", "add", "pat"), ()),
], ids=["member", "owner", "nonmember", "ban", "site-ban", "pattern", "user"])
def test_an_address_no_sender_can_be_is_refused(run, command, options, address, reason):
    """Members, nonmembers, owners, bans (site-wide too), nonmember entries and users:
    an address that can never be a sender is bad input (exit 2) naming why, and nothing
    is written."""
    err = _refused(run, *command, address, *options)
    assert "malformed address" in err and reason in err


def test_user_link_refuses_them_too(run):
    """Linking an address to a user stores it: checked like an added member."""
    run.ok("user", "add", "pat", "pat@example.com")
    err = _refused(run, "user", "link", "pat", "pat@example.com", "a b@example.com")
    assert "white space" in err


def test_bulk_file_names_every_bad_line(run, tmp_path):
    """In a --file (or stdin), each refused address is reported with its line number and
    the command writes nothing."""
    lines = ["ok@example.com", "x@y@z.example", "# comment", "a b@example.com hold",
             "a;b@example.com", "bad@@line", "fine@example.org reject"]
    err = _refused(run, "member", "add", LIST, "--file", "-", stdin="\n".join(lines))
    for number in (2, 4, 5, 6):
        assert f"stdin line {number}: malformed address" in err, err
    assert "line 1:" not in err and "line 7:" not in err
    path = tmp_path / "members.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    err = _refused(run, "nonmember", "add", LIST, "--file", str(path))
    assert f"{path} line 4: malformed address 'a b@example.com'" in err


@pytest.mark.parametrize("address, stored", [
    ("Bob@Example.COM", "bob@example.com"),
    ("<bob@example.com>", "bob@example.com"),
    ("bob@example.com.", "bob@example.com"),
    ('"o.brien"@example.com', "o.brien@example.com"),
    ("o'brien+lists@example.com", "o'brien+lists@example.com"),
    ("u@b\u00fccher.example", "u@xn--bcher-kva.example"),
    ("x-@1.example", "x-@1.example"),
])
def test_addresses_mailman_takes_are_stored(run, address, stored):
    """What Mailman 3 accepts (once normalised as the senders are) is stored as before."""
    run.ok("member", "add", LIST, address)
    assert [m["address"] for m in run.members()] == [stored]


def test_a_non_ascii_local_part_is_stored_with_a_warning_for_mailman3(run):
    """A UTF-8 local part (SMTPUTF8) can be a sender of a mailman2 list; Mailman 3 keeps
    no such sender, so adding one to a mailman3 list says it will never match."""
    code, out, err = run("member", "add", LIST, "J\u00f6rg@B\u00fccher.example")
    assert code == 0, err
    assert "never match: j\u00f6rg@xn--bcher-kva.example" in err
    run.ok("list", "add", "old@lists.example.org", "--mode", "mailman2")
    code, out, err = run("member", "add", "old@lists.example.org", "j\u00f6rg@example.com")
    assert (code, err) == (0, "")


def test_a_regex_ban_or_entry_is_not_an_address(run):
    """^regex bans and entries are checked by compiling them, not as addresses."""
    run.ok("ban", "add", LIST, r"^a b@.*")
    run.ok("pattern", "add", LIST, "hold", r"^.*;.*@example\.com$")


def test_stored_before_can_still_be_removed(run):
    """An address stored before this check (or by another tool) can still be found and
    removed: lookups only normalise."""
    from policyd.store import Store
    from policyd.store import queries as q

    store = Store(run.url)
    try:
        with store.write() as session:
            mlist = q.find_list(session, LIST)
            q.add_members(session, mlist, q.entries_from(["a b@example.com"], None,
                                                         strict=False))
            q.add_members(session, mlist, q.entries_from(["x@y@z.example"], None,
                                                         strict=False))
    finally:
        store.close()
    run.ok("member", "set", LIST, "a b@example.com", "--action", "hold")
    assert "removed 2 members" in run.ok("member", "remove", LIST, "A B@example.com",
                                         "x@y@z.example")
    assert run.members() == []


# --- duplicates ----------------------------------------------------------------------------

# (what to add once, the same again, what the error names)
DUPLICATES = [
    (("domain", "add", "lists.example.net"), None, "domain lists.example.net exists already"),
    (("list", "add", "other@lists.example.org"), None,
     "list other@lists.example.org exists already"),
    (("member", "add", LIST, "a@example.com"), ("member", "add", LIST, "A@Example.com"),
     f"member a@example.com of {LIST} exists already"),
    (("member", "add", LIST, "a@example.com", "b@example.com"), None,
     f"2 members of {LIST} exist already: a@example.com, b@example.com"),
    (("member", "add", LIST, "boss@example.com", "--role", "owner"), None,
     f"owner boss@example.com of {LIST} exists already"),
    (("nonmember", "add", LIST, "n@example.com"), None,
     f"nonmember n@example.com of {LIST} exists already"),
    (("user", "add", "pat", "pat@example.com"), ("user", "add", "pat"),
     "user pat exists already"),
    (("pattern", "add", LIST, "accept", "v@example.com"), None,
     f"entry 'v@example.com' in accept_these_nonmembers of {LIST} exists already"),
    (("ban", "add", LIST, "troll@example.net"), ("ban", "add", LIST, "Troll@example.net"),
     f"ban 'troll@example.net' on {LIST} exists already"),
    (("ban", "add", "--site", "^spam@"), None, "ban '^spam@' site-wide exists already"),
]


@pytest.mark.parametrize("first, again, message", DUPLICATES, ids=[
    "domain", "list", "member", "members", "owner", "nonmember", "user", "pattern", "ban",
    "site-ban"])
def test_a_duplicate_is_exit_2_for_every_kind(run, first, again, message):
    """Adding what exists already: exit 2, "<what> exists already", nothing written, for
    domains, lists, members, owners, nonmembers, users, entries and bans alike; with
    --ignore-existing exit 0, it is left as it is and said so."""
    run.ok(*first)
    again = again or first
    err = _refused(run, *again)
    assert f"policyctl: error: {message}" in err
    assert "--ignore-existing" in err
    token = run.token()
    out = run.ok(*again, "--ignore-existing")
    assert "already" in out
    assert run.token() == token


def test_a_duplicate_among_new_members_writes_nothing(run):
    """One member that exists among new ones fails the whole command: the new ones are
    not added either; --ignore-existing adds them and leaves the existing one alone."""
    run.ok("member", "add", LIST, "keep@example.com", "--action", "hold")
    err = _refused(run, "member", "add", LIST, "new@example.com", "keep@example.com",
                   "--action", "reject")
    assert "member keep@example.com" in err and "new@example.com" not in err
    assert [m["address"] for m in run.members()] == ["keep@example.com"]
    out = run.ok("member", "add", LIST, "new@example.com", "keep@example.com",
                 "--action", "reject", "--ignore-existing")
    assert "added 1 member" in out and "already 1 member, left unchanged" in out
    assert {m["address"]: m["action"] for m in run.members()} == {
        "keep@example.com": "hold", "new@example.com": "reject"}


def test_subscribing_a_user_twice_is_a_duplicate(run):
    """member add --user NAME (through the preferred address) twice: exit 2 as well."""
    run.ok("user", "add", "bo", "bo@example.com")
    run.ok("member", "add", LIST, "--user", "bo")
    err = _refused(run, "member", "add", LIST, "--user", "bo")
    assert f"member bo@example.com of {LIST} exists already" in err
    assert "already 1 member" in run.ok("member", "add", LIST, "--user", "bo",
                                        "--ignore-existing")


def test_ignore_existing_bans_the_new_ones(run):
    """ban add --ignore-existing with old and new patterns bans the new ones."""
    run.ok("ban", "add", LIST, "old@example.net")
    out = run.ok("ban", "add", LIST, "old@example.net", "new@example.net",
                 "--ignore-existing")
    assert f"banned on {LIST}: new@example.net" in out
    assert f"ban 'old@example.net' on {LIST} exists already, left as it is" in out
    assert json.loads(run.ok("ban", "ls", LIST, "--json")) == {
        LIST: ["old@example.net", "new@example.net"]}
