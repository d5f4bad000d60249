"""Configuration is validated at start-up with messages naming file, key and what is
allowed."""

import pytest

from policyd.config import SCHEMA, ConfigError, load, parse
from policyd.core.replies import Outcome


def test_defaults(tmp_path):
    conf = tmp_path / "policyd.conf"
    conf.write_text("[daemon]\nstate_dir = state\n")
    c = load(conf)
    assert c.store.backend == "native"
    assert c.store.url == f"sqlite:///{tmp_path / 'state' / 'policyd.sqlite'}"
    assert c.store.refresh_interval == 2.0
    assert (c.store.timeouts.connect, c.store.timeouts.statement, c.store.timeouts.lock,
            c.store.refresh_timeout) == (10.0, 60.0, 10.0, 30.0)
    assert c.postfix.mode == "safe" and c.postfix.idle_timeout > 300
    assert c.smtp.hold is Outcome.ACCEPT and c.smtp.discard is Outcome.DISCARD


def test_every_key_set(tmp_path):
    c = parse("""
[store]
backend = mailman3
url = postgresql://mailman@db/mailman
refresh_interval = 0.5
connect_timeout = 3
statement_timeout = 20
lock_timeout = 1.5
refresh_timeout = 45
[daemon]
state_dir = /var/lib/policyd
control_socket = /run/policyd/control.sock
control_socket_mode = 0600
log_file = /var/log/policyd.log
log_level = debug
shutdown_grace = 3
[exim]
listen = unix:/run/policyd/exim.sock:mode=666
         tcp:10041:interface=127.0.0.1
timeout = 4
max_request = 1000
[postfix]
listen = systemd:domain=UNIX:index=0
mode = envelope
accept_action = ok
idle_timeout = 900
max_line = 2000
max_attributes = 50
max_request = 20000
[smtp]
hold = hold
discard = reject
reject_code = 554
reject_status = 5.7.1
reject_text = Only members may post to {list}
defer_code = 450
defer_status = 4.7.1
error_code = 451
error_status = 4.3.5
""", "x.conf")
    assert c.exim.listen == ("unix:/run/policyd/exim.sock:mode=666",
                             "tcp:10041:interface=127.0.0.1")
    assert c.daemon.control_socket_mode == 0o600
    assert c.smtp.hold is Outcome.HOLD and c.smtp.reject_code == 554
    assert c.postfix.accept_action == "ok"
    assert (c.store.timeouts.connect, c.store.timeouts.statement, c.store.timeouts.lock,
            c.store.refresh_timeout) == (3.0, 20.0, 1.5, 45.0)


@pytest.mark.parametrize("text, words", [
    ("[store]\nbackend = ldap\n", ["x.conf", "[store] backend", "native, mailman3"]),
    ("[store]\nrefresh = 2\n", ["x.conf", "unknown key 'refresh'", "refresh_interval"]),
    ("[stroe]\n", ["x.conf", "unknown section [stroe]"]),
    ("[exim]\nlisten = udp:53\n", ["[exim] listen", "endpoint"]),
    ("[postfix]\nidle_timeout = 60\n", ["[postfix] idle_timeout", "300"]),
    ("[smtp]\nerror_code = 550\n", ["[smtp] error_code", "400 to 459"]),
    ("[smtp]\nhold = reject\n", ["[smtp] hold", "accept, hold"]),
    ("[daemon]\ncontrol_socket_mode = rw\n", ["control_socket_mode", "octal"]),
    ("[store]\nbackend = mailman3\n", ["[store] url", "mailman3"]),
    ("[store]\nlock_timeout = 0\n", ["x.conf", "[store] lock_timeout", "greater than 0"]),
    ("[store]\nstatement_timeout = soon\n", ["[store] statement_timeout", "seconds"]),
    ("[store]\nconnect_timeout = -1\n", ["[store] connect_timeout", "greater than 0"]),
    ("[store]\nrefresh_timeout = 0\n", ["[store] refresh_timeout", "greater than 0"]),
    ("[store]\nverify_interval = -1\n", ["[store] verify_interval", "0 to disable"]),
    ("not ini", ["x.conf"]),
])
def test_errors_name_file_key_and_allowed(text, words):
    with pytest.raises(ConfigError) as info:
        parse(text, "x.conf")
    for word in words:
        assert word in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "nope.conf")


def test_verify_interval_defaults_to_ten_minutes_and_zero_disables():
    """``[store] verify_interval``: the verification build period of both backends."""
    assert parse("", "x.conf").store.verify_interval == 600.0
    assert parse("[store]\nverify_interval = 0\n", "x.conf").store.verify_interval == 0.0


def test_moderation_section_defaults_and_checks():
    """``[moderation]``: the defaults of issue 17 (5 min, 24 h, 30 days, 3 days), values
    read, and a min_delay not below max_age refused naming both."""
    d = parse("").moderation
    assert (d.min_delay, d.max_age, d.remember, d.decide_within, d.max_entries,
            d.max_tickets, d.sync_interval) == (300, 86400, 2592000, 259200, 100000,
                                                10000, 5)
    m = parse("[moderation]\nmin_delay = 1\nmax_tickets = 5\n").moderation
    assert (m.min_delay, m.max_tickets) == (1, 5)
    with pytest.raises(ConfigError, match=r"\[moderation\] min_delay = 90000 .*max_age"):
        parse("[moderation]\nmin_delay = 90000\n")


def test_store_watch_interval_defaults_zero_and_a_floor():
    """``[store] watch_interval``: 0.25 s by default, 0 turns the SQLite watch off, and a
    value below the floor (a thread spinning on the file) is refused naming the key."""
    assert parse("").store.watch_interval == 0.25
    assert parse("[store]\nwatch_interval = 0\n").store.watch_interval == 0
    assert parse("[store]\nwatch_interval = 1.5\n").store.watch_interval == 1.5
    for bad in ("0.001", "-1", "soon"):
        with pytest.raises(ConfigError, match=r"\[store\] watch_interval"):
            parse(f"[store]\nwatch_interval = {bad}\n")


def test_a_configuration_file_that_is_not_utf8_is_a_configuration_error(tmp_path):
    """A Latin-1 comment: a clear error naming the file and the line (it was a
    UnicodeDecodeError traceback and exit 1)."""
    path = tmp_path / "policyd.conf"
    path.write_bytes(b"[store]\n# caf\xe9\n")
    with pytest.raises(ConfigError) as error:
        load(path)
    assert str(path) in str(error.value) and "line 2" in str(error.value)
    assert "UTF-8" in str(error.value)


@pytest.mark.parametrize("value", ["inf", "1e999", "nan", "-inf"])
def test_timeouts_must_be_finite(value):
    """``inf`` passed as a number of seconds and crashed start-up (OverflowError in the
    database driver): it names the key instead."""
    with pytest.raises(ConfigError) as error:
        parse(f"[store]\nconnect_timeout = {value}\n")
    assert "connect_timeout" in str(error.value)


@pytest.mark.parametrize("value", ["[::1]junk", "[::1]53", "[]:53", "host:0"])
def test_a_name_server_with_trailing_junk_is_refused(value):
    """``[::1]junk`` was read as ``[::1]``, the rest dropped without a word."""
    with pytest.raises(ConfigError) as error:
        parse(f"[dmarc]\nnameservers = {value}\n")
    assert "nameservers" in str(error.value)
    assert parse("[dmarc]\nnameservers = [::1]\n").dmarc.nameservers == (("::1", 53),)


def test_role_addresses_default_and_validation():
    """``[rules] role_addresses``: postmaster and abuse by default, read lower-cased,
    comma- or space-separated, empty for none; anything that is not a plain local part
    (an address, a +tag, a quote) is refused at start-up naming the key."""
    assert parse("", "x.conf").rules.role_addresses == frozenset({"postmaster", "abuse"})
    c = parse("[rules]\nrole_addresses = Postmaster, abuse hostmaster,\n")
    assert c.rules.role_addresses == frozenset({"postmaster", "abuse", "hostmaster"})
    assert parse("[rules]\nrole_addresses =\n").rules.role_addresses == frozenset()
    for bad in ("abuse@example.com", "postmaster+x", '"post master"', "a..b"):
        with pytest.raises(ConfigError, match=r"x\.conf.*\[rules\] role_addresses"):
            parse(f"[rules]\nrole_addresses = postmaster, {bad}\n", "x.conf")


def test_store_max_stale_defaults_fifteen_minutes_and_zero_disables():
    """``[store] max_stale``: 900 s by default, 0 turns it off, another value is read."""
    assert parse("").store.max_stale == 900.0
    assert parse("[store]\nmax_stale = 0\n").store.max_stale == 0.0
    assert parse("[store]\nmax_stale = 300\n").store.max_stale == 300.0


def test_store_max_stale_default_follows_slow_refreshes():
    """A site that gives its refreshes longer (``refresh_timeout``) and leaves
    ``max_stale`` unset still starts: the default leaves as much past the slowest
    confirmation a healthy store gives (``refresh_interval + 2 x refresh_timeout``) as it
    does with the default refresh settings."""
    config = parse("[store]\nrefresh_timeout = 600\n").store
    assert config.max_stale == 900 - 62 + 2 + 2 * 600


@pytest.mark.parametrize("text, words", [
    ("[store]\nmax_stale = soon\n", ["x.conf", "[store] max_stale", "0 to disable"]),
    ("[store]\nmax_stale = -1\n", ["[store] max_stale", "0 to disable"]),
    # Two refreshes within refresh_timeout and the interval between them: 62 s.
    ("[store]\nmax_stale = 62\n", ["x.conf", "[store] max_stale = 62 is not valid",
                                   "refresh_interval + 2 x refresh_timeout = 62 s"]),
    ("[store]\nrefresh_timeout = 600\nmax_stale = 900\n",
     ["[store] max_stale = 900 is not valid", "= 1202 s"]),
])
def test_store_max_stale_errors_name_the_key_and_what_is_allowed(text, words):
    """A max_stale a healthy store's refreshes could reach (each within refresh_timeout)
    would turn its answers into 4xx: refused at start-up, naming the bound."""
    with pytest.raises(ConfigError) as info:
        parse(text, "x.conf")
    for word in words:
        assert word in str(info.value)
    assert parse("[store]\nmax_stale = 63\n").store.max_stale == 63.0
    assert parse("[store]\nrefresh_timeout = 600\nmax_stale = 0\n").store.max_stale == 0


def _duration_keys():
    return [(section, key) for section, keys in SCHEMA.items()
            for key, (convert, _) in keys.items()
            if convert.__qualname__.split(".")[0] in ("_positive_float", "_seconds_or_zero")]


@pytest.mark.parametrize("section, key", _duration_keys())
def test_every_duration_has_an_upper_bound_named_at_start_up(section, key):
    """A duration had no upper bound: ``[store] statement_timeout = 2147484`` started and
    then every store connection failed (PostgreSQL's maximum is 2147483647 ms), and
    ``watch_interval = 1e10`` ended the SQLite watcher's thread (OverflowError past
    ``threading.TIMEOUT_MAX``).  Every duration key now refuses 1e10 at start-up, naming
    the key and its maximum, and still reads its default."""
    with pytest.raises(ConfigError) as error:
        parse(f"[{section}]\n{key} = 1e10\n", "x.conf")
    message = str(error.value)
    assert f"x.conf: [{section}] {key} = '1e10' is not valid" in message
    assert "at most " in message
    convert, default = SCHEMA[section][key]
    assert convert(default) == float(default)


def test_the_store_timeouts_fit_what_the_databases_accept():
    """The largest ``statement_timeout`` and ``lock_timeout`` accepted (a day) are sent
    within PostgreSQL's 2147483647 ms and MariaDB's limits; one past PostgreSQL's is
    refused naming the key and the maximum."""
    from policyd.store.engine import connect_args_for, parse_url
    with pytest.raises(ConfigError, match=r"\[store\] statement_timeout = '2147484' .*"
                                          r"at most 86400"):
        parse("[store]\nstatement_timeout = 2147484\n")
    with pytest.raises(ConfigError, match=r"\[store\] lock_timeout .*at most 86400"):
        parse("[store]\nlock_timeout = 3000000\n")
    c = parse("[store]\nbackend = mailman3\nurl = postgresql://u@localhost/mailman\n"
              "statement_timeout = 86400\nlock_timeout = 86400\nconnect_timeout = 86400\n")
    options = connect_args_for(parse_url(c.store.url), c.store.timeouts)["options"]
    values = dict(word.split("=") for word in options.split() if "=" in word)
    assert 0 < int(values["statement_timeout"]) <= 2147483647
    assert 0 < int(values["lock_timeout"]) <= 2147483647
    # MariaDB: max_statement_time and lock_wait_timeout at most 31536000 s,
    # innodb_lock_wait_timeout 1073741824 s; MySQL max_execution_time 4294967295 ms.
    assert c.store.timeouts.statement <= 31536000 and c.store.timeouts.lock <= 31536000
    assert c.store.timeouts.statement * 1000 <= 4294967295


def test_the_longest_watch_interval_is_one_a_thread_can_wait():
    """``[store] watch_interval = 1e10`` is refused at start-up; the longest accepted
    (a day) is a wait ``threading.Event.wait`` can do."""
    import threading
    with pytest.raises(ConfigError, match=r"\[store\] watch_interval .*at most 86400"):
        parse("[store]\nwatch_interval = 1e10\n")
    longest = parse("[store]\nwatch_interval = 86400\n").store.watch_interval
    assert longest == 86400 <= threading.TIMEOUT_MAX
