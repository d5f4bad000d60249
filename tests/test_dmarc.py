"""The ``dmarc-mitigation`` rule (``policyd.core.dmarc``) on DNS answers given as data:
Mailman 3.3.10's ``rules/dmarc.py`` outcome for each policy, fallback and action."""

import pytest

from policyd.core.chain import SMTP_CHAIN, decide
from policyd.core.dmarc import (DmarcAction, DnsAnswer, LookupNeeded, PublicSuffixList,
                                NXDOMAIN, NOANSWER)
from policyd.core.message import parse_message
from policyd.core.snapshot import ListSpec, build
from policyd.core.verdict import Action, Mode, Query, Verdict

LIST = "test@lists.example.com"
PSL = PublicSuffixList([
    "// comment", "", "com", "uk", "co.uk", "*.ck", "!www.ck", "jp", "*.kawasaki.jp",
    "!city.kawasaki.jp", "example  // trailing words ignored",
])


def txt(name, *records, cnames=()):
    """An ``ok`` answer: ``cnames`` first, then one TXT RRset per record at ``name``
    (a second record at the same name is not read: only the first of an RRset is)."""
    rrsets = tuple((owner + ".", "CNAME", target + ".") for owner, target in cnames)
    if records:
        rrsets += ((name + ".", "TXT", records[0].encode()),)
    return DnsAnswer("ok", rrsets)


class Answers:
    """A fake lookup: known answers by name, and the names asked for."""

    suffixes = PSL

    def __init__(self, **by_name):
        self.by_name = {name.replace("__", ".").replace("_dmarc.", "_dmarc."): answer
                        for name, answer in by_name.items()}
        self.asked = []

    def known(self, name):
        self.asked.append(name)
        return self.by_name.get(name)


def answers(mapping):
    a = Answers()
    a.by_name = dict(mapping)
    return a


def snap(action=DmarcAction.REJECT, addresses=(), unconditionally=False):
    spec = ListSpec(LIST, mode=Mode.MAILMAN3, default_nonmember_action=Action.ACCEPT,
                    dmarc_mitigate_action=action, dmarc_addresses=addresses,
                    dmarc_mitigate_unconditionally=unconditionally)
    return build([spec], domains={"lists.example.com": "lists.example.com"})


def query(frm="Someone <someone@sub.example.com>"):
    headers = f"From: {frm}\nSubject: hi\n".encode()
    return Query(LIST, "bounce@elsewhere.example", message=parse_message(headers))


@pytest.mark.parametrize("domain, org", [
    ("example.com", "example.com"),
    ("a.b.example.com", "example.com"),
    ("example.co.uk", "example.co.uk"),
    ("mail.example.co.uk", "example.co.uk"),
    ("foo.bar.ck", "foo.bar.ck"),          # *.ck: bar.ck is a suffix
    ("a.www.ck", "www.ck"),                # !www.ck: an exception
    ("x.city.kawasaki.jp", "city.kawasaki.jp"),
    ("x.y.kawasaki.jp", "x.y.kawasaki.jp"),
    ("host.unknowntld", "host.unknowntld"),
    ("a.b.unknowntld", "b.unknowntld"),   # no rule: the last two labels
    ("COM", "com"),
])
def test_organizational_domain(domain, org):
    """Mailman's get_organizational_domain: longest rule wins, an exception drops a
    label, no rule at all means the last two labels."""
    assert PSL.organizational_domain(domain) == org


def test_the_psl_file_is_read_like_mailman(tmp_path):
    """Comment lines skipped, a rule ends at white space, lower-cased."""
    path = tmp_path / "psl.dat"
    path.write_text("// x\nCOM\n\n  \n*.Ck   extra\n")
    psl = PublicSuffixList.from_file(path)
    assert psl.rules == 2
    assert psl.organizational_domain("a.b.c.ck") == "b.c.ck"


REJECT = "v=DMARC1; p=reject; rua=mailto:d@example.com"


# (answers, outcome): True mitigates, "quarantine" mitigates where quarantine counts
# (Mailman 3 always, a Mailman 2 list with dmarc_quarantine_moderation_action), "defer"
# is the temporary failure.
OUTCOMES = [
    ({"_dmarc.sub.example.com": txt("_dmarc.sub.example.com", REJECT)}, True),
    ({"_dmarc.sub.example.com": txt("_dmarc.sub.example.com", "v=DMARC1; p=quarantine")},
     "quarantine"),
    ({"_dmarc.sub.example.com": txt("_dmarc.sub.example.com", "v=DMARC1; p=none")}, False),
    ({"_dmarc.sub.example.com": txt("_dmarc.sub.example.com", "v=DMARC1; P=Reject")}, True),
    # not "v=DMARC1;" exactly: no record here, the organizational domain's is read
    ({"_dmarc.sub.example.com": txt("_dmarc.sub.example.com", "v=DMARC1 p=reject"),
      "_dmarc.example.com": NXDOMAIN}, False),
    ({"_dmarc.sub.example.com": NXDOMAIN,
      "_dmarc.example.com": txt("_dmarc.example.com", REJECT)}, True),
    ({"_dmarc.sub.example.com": NOANSWER,
      "_dmarc.example.com": txt("_dmarc.example.com", "v=DMARC1; p=reject; sp=none")},
     False),
    ({"_dmarc.sub.example.com": NXDOMAIN,
      "_dmarc.example.com": txt("_dmarc.example.com", "v=DMARC1; p=none; sp=quarantine")},
     "quarantine"),
    ({"_dmarc.sub.example.com": NXDOMAIN, "_dmarc.example.com": NXDOMAIN}, False),
    # A domain that is no DNS name mitigates, as Mailman's rule does (DNSException).
    ({"_dmarc.sub.example.com": DnsAnswer("error", detail="not a DNS name")}, True),
    # A failed lookup (timeout, SERVFAIL): the temporary failure, not Mailman's mitigation.
    ({"_dmarc.sub.example.com": DnsAnswer("failed", detail="timeout")}, "defer"),
    ({"_dmarc.sub.example.com": NXDOMAIN,
      "_dmarc.example.com": DnsAnswer("failed", detail="SERVFAIL")}, "defer"),
    # Through a CNAME.
    ({"_dmarc.sub.example.com": txt("policy.example.net", REJECT,
                                    cnames=[("_dmarc.sub.example.com",
                                             "policy.example.net")])}, True),
]


@pytest.mark.parametrize("records, outcome", OUTCOMES)
@pytest.mark.parametrize("action", [DmarcAction.REJECT, DmarcAction.DISCARD])
def test_outcomes(records, outcome, action):
    """reject/discard lists: the policy (or a failure) decides, as in Mailman."""
    d = decide(snap(action), query(), dmarc=answers(records))
    if outcome == "defer":
        assert (d.verdict, d.rule) == (Verdict.DEFER, "dmarc-mitigation"), d.trace
    elif outcome:
        verdict = Verdict.REJECT if action == DmarcAction.REJECT else Verdict.DISCARD
        assert (d.verdict, d.rule) == (verdict, "dmarc-mitigation"), d.trace
        assert d.sender == "someone@sub.example.com"
    else:
        assert d.rule != "dmarc-mitigation"
        assert any(step.rule == "dmarc-mitigation" and not step.hit for step in d.trace)


@pytest.mark.parametrize("action", [DmarcAction.NO_MITIGATION, DmarcAction.MUNGE_FROM,
                                    DmarcAction.WRAP_MESSAGE])
@pytest.mark.parametrize("unconditionally", [False, True])
def test_other_actions_never_look_up(action, unconditionally):
    """no_mitigation, munge_from, wrap_message: accepted at SMTP time, no DNS."""
    a = answers({})
    d = decide(snap(action, unconditionally=unconditionally), query(), dmarc=a)
    assert d.verdict == Verdict.ACCEPT and a.asked == []


def test_unknown_names_raise_both_at_once():
    """The first lookup asks for the domain and its organizational domain together."""
    with pytest.raises(LookupNeeded) as raised:
        decide(snap(), query(), dmarc=answers({}))
    assert raised.value.names == ("_dmarc.sub.example.com", "_dmarc.example.com")
    with pytest.raises(LookupNeeded) as raised:
        decide(snap(), query("a@example.com"), dmarc=answers({}))
    assert raised.value.names == ("_dmarc.example.com",)


def test_dmarc_addresses_need_no_lookup():
    """A dmarc_addresses entry (exact, any case, or ^regex) mitigates without DNS, also
    without a lookup at all (policyctl --offline)."""
    for entry in ("Someone@Sub.Example.com", "^some.*@sub\\."):
        d = decide(snap(addresses=(entry,)), query(), dmarc=answers({}))
        assert (d.verdict, d.rule) == (Verdict.REJECT, "dmarc-mitigation")
        d = decide(snap(addresses=(entry,)), query())
        assert (d.verdict, d.rule) == (Verdict.REJECT, "dmarc-mitigation")


def test_without_lookup_or_message_the_rule_misses():
    """No DNS here, or no headers (Postfix): not evaluated, says the trace."""
    d = decide(snap(), query())
    assert d.trace[len(SMTP_CHAIN)].rule == "dmarc-mitigation"  # first of the list's chain
    step = next(s for s in d.trace if s.rule == "dmarc-mitigation")
    assert not step.hit and "not evaluated" in step.detail
    d = decide(snap(), Query(LIST, "x@example.com", "x@example.com"), dmarc=answers({}))
    step = next(s for s in d.trace if s.rule == "dmarc-mitigation")
    assert "not evaluated" in step.detail


@pytest.mark.parametrize("frm", ["", "undisclosed-recipients:;", "no-domain"])
def test_no_from_domain_misses(frm):
    """Mailman's rpartition('@'): no domain, no mitigation, no lookup."""
    a = answers({})
    d = decide(snap(), query(frm), dmarc=a)
    assert d.rule != "dmarc-mitigation" and a.asked == []


def test_first_from_header_only():
    """Mailman reads msg.get('from'): the first From: header."""
    headers = b"From: a@example.com\nFrom: b@other.com\n"
    q = Query(LIST, "x@y.example", message=parse_message(headers))
    a = answers({"_dmarc.example.com": txt("_dmarc.example.com", REJECT)})
    assert decide(snap(), q, dmarc=a).rule == "dmarc-mitigation"
    assert "_dmarc.other.com" not in a.asked


def test_action_names():
    """policyctl's names are Mailman's enum names (a dash allowed); others are refused
    with what is allowed."""
    assert DmarcAction.from_name("munge-from") is DmarcAction.MUNGE_FROM
    with pytest.raises(ValueError, match="allowed: no_mitigation"):
        DmarcAction.from_name("bounce")


# --- the lookup (policyd.dmarc_lookup): a fake resolver, a Clock, no socket ----------

from twisted.internet.defer import Deferred, fail, succeed  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.logger import LogLevel, globalLogPublisher  # noqa: E402
from twisted.names import dns  # noqa: E402
from twisted.names.error import DNSNameError, DNSServerError  # noqa: E402

from policyd.dmarc_lookup import (DmarcLookup, from_config,  # noqa: E402
                                  nameservers_from_resolv_conf, to_answer)


def rr_txt(name, *strings):
    return dns.RRHeader(name, dns.TXT, payload=dns.Record_TXT(*strings))


def rr_cname(name, target):
    return dns.RRHeader(name, dns.CNAME, payload=dns.Record_CNAME(target))


class FakeResolver:
    """``lookupText`` answers from a dict: a list of RRs, an exception, or ``None``
    (a Deferred the test fires)."""

    def __init__(self, answers):
        self.answers = answers
        self.asked = []
        self.waiting = {}

    def lookupText(self, name, timeout=None):
        self.asked.append((name, timeout))
        found = self.answers.get(name)
        if isinstance(found, Exception):
            return fail(found)
        if found is None:
            d = self.waiting[name] = Deferred()
            return d
        return succeed((found, [], []))


def test_to_answer_groups_like_dnspython():
    """First record of each (owner, type), CNAME chain followed, names lower-cased;
    no TXT at the end of the chain is 'noanswer'."""
    answer = to_answer("_dmarc.a.com", [
        rr_cname("_DMARC.A.com", "T.b.com"),
        rr_txt("t.b.com", b"v=DMARC1; ", b"p=reject"),
        rr_txt("t.b.com", b"v=DMARC1; p=none"),
    ])
    assert answer.status == "ok"
    assert answer.rrsets == (("_dmarc.a.com.", "CNAME", "T.b.com."),
                             ("t.b.com.", "TXT", b"v=DMARC1; p=reject"))
    # Mailman's own walk compares the target as sent: no match, no mitigation.
    from policyd.core.dmarc import policy_of
    assert policy_of(answer, "_dmarc.a.com")[0] is False
    assert to_answer("_dmarc.a.com", []).status == "noanswer"
    assert to_answer("_dmarc.a.com", [rr_cname("_dmarc.a.com", "x.com")]).status == \
        "noanswer"


def test_lookup_caches_and_expires():
    """Answers are cached ttl seconds (failures failure_ttl), a name in flight is asked
    once, and lookup() fires only when every name is known."""
    clock = Clock()
    resolver = FakeResolver({
        "_dmarc.a.com": [rr_txt("_dmarc.a.com", b"v=DMARC1; p=reject")],
        "_dmarc.gone.com": DNSNameError("nx"),
        "_dmarc.bad.com": DNSServerError("servfail"),
    })
    lookup = DmarcLookup(clock, PSL, resolver=resolver, ttl=100, failure_ttl=10,
                         timeout=2)
    fired = []
    lookup.lookup(["_dmarc.a.com", "_dmarc.gone.com", "_dmarc.bad.com"]).addCallback(
        fired.append)
    assert fired == [None]
    assert lookup.known("_dmarc.a.com").status == "ok"
    assert lookup.known("_dmarc.gone.com").status == "nxdomain"
    assert lookup.known("_dmarc.bad.com").status == "failed"
    assert resolver.asked[0] == ("_dmarc.a.com", (1.0, 1.0))
    clock.advance(11)
    assert lookup.known("_dmarc.bad.com") is None
    assert lookup.known("_dmarc.a.com") is not None
    clock.advance(90)
    assert lookup.known("_dmarc.a.com") is None
    # In flight: two waiters, one query.
    first, second = [], []
    lookup.lookup(["_dmarc.slow.com"]).addCallback(first.append)
    lookup.lookup(["_dmarc.slow.com"]).addCallback(second.append)
    assert [n for n, _ in resolver.asked].count("_dmarc.slow.com") == 1
    assert first == second == []
    resolver.waiting["_dmarc.slow.com"].callback(([], [], []))
    assert first == second == [None]
    assert lookup.known("_dmarc.slow.com").status == "noanswer"


def test_cache_is_bounded():
    """At most max_entries names, the least recently used out first."""
    resolver = FakeResolver({f"_dmarc.{i}.com": [] for i in range(5)})
    lookup = DmarcLookup(Clock(), PSL, resolver=resolver, max_entries=3)
    lookup.lookup([f"_dmarc.{i}.com" for i in range(5)])
    assert [lookup.known(f"_dmarc.{i}.com") is None for i in range(5)] == \
        [True, True, False, False, False]


def test_a_cache_hit_keeps_its_name_from_being_evicted():
    """The cache evicts the least recently used name, as documented: a hit (``known``,
    also asked by ``lookup`` for every name) makes a name the most recent.  It evicted
    the oldest stored name whatever had been used since, so a domain asked about all
    day was looked up again every ``max_entries`` new names."""
    resolver = FakeResolver({f"_dmarc.{i}.com": [] for i in range(5)})
    lookup = DmarcLookup(Clock(), PSL, resolver=resolver, max_entries=3)
    lookup.lookup([f"_dmarc.{i}.com" for i in range(3)])
    assert lookup.known("_dmarc.0.com") is not None  # 0 is now the most recent
    lookup.lookup(["_dmarc.3.com"])                   # evicts 1, not 0
    lookup.lookup(["_dmarc.0.com"])                   # a hit through lookup(): no query
    lookup.lookup(["_dmarc.4.com"])                   # evicts 2
    assert [lookup.known(f"_dmarc.{i}.com") is None for i in range(5)] == \
        [False, True, True, False, False]
    assert [n for n, _ in resolver.asked].count("_dmarc.0.com") == 1


def test_failures_logged_once_per_incident():
    """The first failure warns; later ones are counted until a lookup succeeds after
    ``QUIET`` seconds without a failure, which says so once."""
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock = Clock()
        resolver = FakeResolver({f"_dmarc.{i}.com": TimeoutError() for i in range(3)})
        resolver.answers["_dmarc.ok.com"] = []
        resolver.answers["_dmarc.ok2.com"] = []
        lookup = DmarcLookup(clock, PSL, resolver=resolver)
        lookup.lookup([f"_dmarc.{i}.com" for i in range(3)])
        lookup.lookup(["_dmarc.ok.com"])  # too soon: the incident goes on
        clock.advance(DmarcLookup.QUIET)
        lookup.lookup(["_dmarc.ok2.com"])
    finally:
        globalLogPublisher.removeObserver(events.append)
    mine = [e for e in events if e.get("log_namespace") == "policyd.dmarc"]
    # the warning, the minute's summary of the other two, the end of the incident
    assert [e["log_level"] for e in mine] == [LogLevel.warn, LogLevel.warn, LogLevel.info]
    assert mine[1]["count"] == 2 and mine[2]["count"] == 3


def dmarc_events(run):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        run()
    finally:
        globalLogPublisher.removeObserver(events.append)
    return [e for e in events if e.get("log_namespace") == "policyd.dmarc"]


def test_a_sender_alternating_failing_and_working_domains_does_not_toggle_the_incident():
    """SERVFAIL, NXDOMAIN, SERVFAIL, ...: one warning for the incident (and one summary a
    minute), never a warning and an "answer again" line per pair of requests."""
    clock = Clock()
    resolver = FakeResolver({})
    for i in range(50):
        resolver.answers[f"_dmarc.fail{i}.com"] = DNSServerError("servfail")
        resolver.answers[f"_dmarc.nx{i}.com"] = DNSNameError("nx")
    lookup = DmarcLookup(clock, PSL, resolver=resolver)

    def run():
        for i in range(50):
            lookup.lookup([f"_dmarc.fail{i}.com"])
            lookup.lookup([f"_dmarc.nx{i}.com"])
            clock.advance(1)
    mine = dmarc_events(run)
    assert [e["log_level"] for e in mine] == [LogLevel.warn]
    assert lookup.known("_dmarc.nx3.com").status == "nxdomain"
    assert lookup.known("_dmarc.fail49.com").status == "failed"


def test_a_cname_target_with_bytes_that_are_not_ascii_is_read_as_mailman_reads_it():
    """``_dmarc.bad.example CNAME \\xff\\xfe.evil.example`` (anyone can publish it):
    names are written as dnspython writes them (``\\255``), as Mailman reads them:
    without TXT at the end of the chain, no answer; with one there, its policy."""
    from policyd.core.dmarc import policy_of

    target = b"\xff\xfe.evil.example"
    assert to_answer("_dmarc.bad.example",
                     [rr_cname("_dmarc.bad.example", target)]).status == "noanswer"
    answer = to_answer("_dmarc.bad.example", [
        rr_cname("_dmarc.bad.example", target),
        rr_txt(target, b"v=DMARC1; p=reject")])
    assert answer.rrsets[0] == ("_dmarc.bad.example.", "CNAME", "\\255\\254.evil.example.")
    assert policy_of(answer, "_dmarc.bad.example")[0] is True
    from policyd.dmarc_lookup import name_text
    assert name_text(dns.Name(target)) == "\\255\\254.evil.example."
    assert name_text(dns.Name(b'a"b.c;d.example')) == 'a\\"b.c\\;d.example.'


class Broken:
    """An answer nobody foresaw: reading it raises."""

    def __iter__(self):
        raise RuntimeError("unforeseen")


def test_an_exception_reading_an_answer_gives_back_its_slot_and_fires_the_waiters():
    """Whatever raises while an answer is read, the lookup ends: the name is a failure
    (the temporary failure: doubt), every waiter fires, nothing stays in flight, the
    decider's slots come back, and the traceback is logged once per incident."""
    from policyd.core.replies import ReplyPolicy
    from policyd.decider import Decider, FixedSnapshot

    names = [f"_dmarc.bad{i}.example" for i in range(Decider.MAX_WAITING + 5)]
    resolver = FakeResolver({name: None for name in names})
    lookup = DmarcLookup(Clock(), PSL, resolver=resolver)
    decider = Decider(FixedSnapshot(snap()), ReplyPolicy(), run_in_thread=lambda *a: None)
    decider.use_dmarc(lookup)
    fired = []

    def run():
        for name in names:
            waiting = decider.verify([LookupNeeded((name,))])
            assert waiting is not None
            waiting.addCallback(fired.append)
            resolver.waiting[name].callback((Broken(), [], []))
    mine = dmarc_events(run)
    assert len(fired) == len(names) and decider._waiting == 0 and not lookup._flight
    assert lookup.known(names[0]).status == "failed"
    assert [e["log_level"] for e in mine] == [LogLevel.critical]
    assert "RuntimeError" in mine[0]["where"]
    # the daemon still looks names up
    resolver.answers["_dmarc.ok.example"] = []
    assert decider.verify([LookupNeeded(("_dmarc.ok.example",))]) is not None


def test_the_whole_lookup_obeys_the_timeout():
    """A resolver that never answers (Twisted's TCP retry after a truncated answer waits
    10 s of its own): the lookup is a failure after ``timeout`` seconds all the same."""
    clock = Clock()
    resolver = FakeResolver({"_dmarc.slow.example": None})
    lookup = DmarcLookup(clock, PSL, resolver=resolver, timeout=2)
    fired = []
    lookup.lookup(["_dmarc.slow.example"]).addCallback(fired.append)
    clock.advance(1.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [None]
    assert lookup.known("_dmarc.slow.example") == DnsAnswer("failed", detail="TimeoutError")
    assert not lookup._flight


from twisted.internet.testing import MemoryReactorClock  # noqa: E402


class UDPReactor(MemoryReactorClock):
    """``listenUDP`` for the resolver: the datagrams it writes are kept, with the port
    asked for and whether it was closed; ``refuse`` holds errors to raise first."""

    def __init__(self):
        super().__init__()
        self.udp = []
        self.refuse = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        if self.refuse:
            raise self.refuse.pop(0)

        class Transport:
            def __init__(self):
                self.written = []
                self.port = port
                self.stopped = False

            def write(self, data, addr=None):
                self.written.append((data, addr))

            def stopListening(self):
                self.stopped = True

        transport = Transport()
        protocol.makeConnection(transport)
        self.udp.append(protocol)
        return transport


def dns_reply(query, ancount, records, flags=0x8180):
    import struct
    return query[:2] + struct.pack(">HHHHH", flags, 1, ancount, 0, 0) + query[12:] + \
        records


def daemon_lookup(reactor):
    from policyd.config import parse
    return from_config(parse("[dmarc]\nnameservers = 192.0.2.53:53\ntimeout = 2\n").dmarc,
                       reactor)


def test_an_answer_holding_fewer_records_than_its_header_counts_is_a_failure():
    """Header: 3 answers; then 4 bytes.  Twisted stops reading silently (no record: the
    post was accepted); dnspython raises on it and Mailman mitigates: here the temporary
    failure.  A well-formed answer through the same path is read."""
    import struct

    reactor = UDPReactor()
    lookup = daemon_lookup(reactor)
    lookup.lookup(["_dmarc.short.example"])
    protocol = reactor.udp[-1]
    query, addr = protocol.transport.written[0]
    assert addr == ("192.0.2.53", 53)
    short = dns_reply(query, 3, b"\xc0\x0c\x00\x10")
    protocol.datagramReceived(short, addr)
    answer = lookup.known("_dmarc.short.example")
    assert answer.status == "failed" and answer.detail == "DNSFormatError"
    from policyd.dmarc_lookup import malformed
    assert malformed(short)

    lookup.lookup(["_dmarc.fine.example"])
    protocol = reactor.udp[-1]
    query, addr = protocol.transport.written[0]
    txt = b"v=DMARC1; p=reject"
    rdata = bytes([len(txt)]) + txt
    good = dns_reply(query, 1, b"\xc0\x0c" + struct.pack(">HHIH", 16, 1, 60, len(rdata))
                     + rdata)
    assert malformed(good) is None and malformed(good + b"junk")
    protocol.datagramReceived(good, addr)
    assert lookup.known("_dmarc.fine.example").status == "ok"


def test_a_truncated_answer_retried_over_tcp_within_the_timeout():
    """TC set: Twisted asks again over TCP, with ``[dmarc] timeout`` (not its 10 s), and
    the lookup fails at the timeout even if the server holds the connection."""
    reactor = UDPReactor()
    lookup = daemon_lookup(reactor)
    fired = []
    lookup.lookup(["_dmarc.tc.example"]).addCallback(fired.append)
    protocol = reactor.udp[-1]
    query, addr = protocol.transport.written[0]
    protocol.datagramReceived(dns_reply(query, 0, b"", flags=0x8380), addr)
    assert reactor.tcpClients and reactor.tcpClients[-1][:2] == ("192.0.2.53", 53)
    assert [timeout for _, _, timeout in lookup.resolver.pending] == [2]
    assert fired == []
    reactor.advance(2)
    assert fired == [None]
    assert lookup.known("_dmarc.tc.example").status == "failed"


def test_twisted_sends_lookups_through_the_resolvers_public_query_methods():
    """Pins the Twisted behaviour policyd's ``Resolver`` hangs on: ``client.Resolver``'s
    lookups send the query through ``queryUDP`` (policyd's, which reads every answer
    through ``malformed``) and a truncated answer's retry through ``queryTCP`` (policyd's
    timeout).  A Twisted that bypassed either would read answers unchecked, or wait its
    own 10 s: this test fails instead."""
    from policyd.dmarc_lookup import Resolver

    calls = []

    class Recording(Resolver):
        def queryUDP(self, queries, timeout=None):
            calls.append(("udp", [str(q.name) for q in queries], timeout))
            return super().queryUDP(queries, timeout)

        def queryTCP(self, queries, timeout=None):
            calls.append(("tcp", [str(q.name) for q in queries], timeout))
            return super().queryTCP(queries, timeout)

    reactor = UDPReactor()
    resolver = Recording(servers=[("192.0.2.53", 53)], reactor=reactor, tcp_timeout=2)
    resolver.lookupText("_dmarc.tc.example", timeout=(1, 1))
    assert calls == [("udp", ["_dmarc.tc.example"], (1, 1))]
    query, addr = reactor.udp[-1].transport.written[0]
    reactor.udp[-1].datagramReceived(dns_reply(query, 0, b"", flags=0x8380), addr)
    assert calls[1:] == [("tcp", ["_dmarc.tc.example"], None)]
    assert [timeout for _, _, timeout in resolver.pending] == [2]


def test_udp_tries_are_twisteds_each_from_a_random_port_closed_after_it():
    """Each server in turn with the first timeout, then with the next, the query's id
    kept; each try from a socket of its own on a port from ``dns.randomSource`` (source
    port randomisation), closed when the try ends; all timed out: ``TimeoutError``."""
    from twisted.internet import defer

    from policyd.dmarc_lookup import Resolver

    reactor = UDPReactor()
    resolver = Resolver(servers=[("192.0.2.1", 53), ("192.0.2.2", 53)], reactor=reactor)
    failed = []
    resolver.queryUDP([dns.Query("_dmarc.slow.example", dns.TXT)], timeout=(1, 3)) \
        .addErrback(failed.append)
    tries = []
    for seconds in (1, 1, 3, 3):
        protocol = reactor.udp[-1]
        assert len(reactor.udp) == len(tries) + 1
        assert not protocol.transport.stopped
        data, addr = protocol.transport.written[0]
        message = dns.Message()
        message.fromStr(data)
        tries.append((addr, message.id))
        reactor.advance(seconds)
        assert protocol.transport.stopped
    assert [addr for addr, _ in tries] == [("192.0.2.1", 53), ("192.0.2.2", 53)] * 2
    assert len({id for _, id in tries}) == 1
    assert len({protocol.transport.port for protocol in reactor.udp}) > 1
    assert len(failed) == 1 and failed[0].check(defer.TimeoutError)


def test_a_busy_port_is_tried_again_and_no_descriptor_left_is_a_failed_lookup():
    """A random port that cannot be bound (in use, privileged) is replaced by another; no
    descriptor left (EMFILE) fails the lookup at once: the temporary failure, counted
    as the resolver's failure, not a name that is no DNS name."""
    import errno

    from twisted.internet.error import CannotListenError

    reactor = UDPReactor()
    lookup = daemon_lookup(reactor)
    reactor.refuse = [CannotListenError("", 80, OSError(errno.EACCES, "denied")),
                      CannotListenError("", 5353, OSError(errno.EADDRINUSE, "in use"))]
    lookup.lookup(["_dmarc.busy.example"])
    assert len(reactor.udp) == 1 and reactor.refuse == []

    reactor.refuse = [CannotListenError("", 4000, OSError(errno.EMFILE, "too many"))]
    fired = []
    lookup.lookup(["_dmarc.full.example"]).addCallback(fired.append)
    assert fired == [None]
    answer = lookup.known("_dmarc.full.example")
    assert (answer.status, answer.detail) == ("failed", "CannotListenError")
    assert lookup.counts["failures"] == 1


def test_resolv_conf_and_config(tmp_path):
    """Name servers from [dmarc] nameservers, else resolv.conf, else 127.0.0.1."""
    from policyd.config import parse

    conf = tmp_path / "resolv.conf"
    conf.write_text("search x.example\nnameserver 192.0.2.1\nnameserver fe80::1%eth0\n")
    assert nameservers_from_resolv_conf(conf) == [("192.0.2.1", 53), ("fe80::1", 53)]
    config = parse("[dmarc]\nnameservers = 127.0.0.1:5300, [::1]:53\ntimeout = 1\n")
    assert config.dmarc.nameservers == (("127.0.0.1", 5300), ("::1", 53))
    lookup = from_config(config.dmarc, Clock(), resolv_conf=conf)
    assert lookup.resolver.servers == [("127.0.0.1", 5300), ("::1", 53)]
    assert lookup.timeout == (0.5, 0.5)
    lookup = from_config(parse("").dmarc, Clock(), resolv_conf=tmp_path / "none")
    assert lookup.resolver.servers == [("127.0.0.1", 53)]
    with pytest.raises(Exception, match="nameservers"):
        parse("[dmarc]\nnameservers = host:99999\n")


def test_public_suffix_list_read_at_first_use(tmp_path):
    """The file is read when the rule first needs it; a missing one is empty (warned)."""
    path = tmp_path / "psl.dat"
    path.write_text("uk\nco.uk\n")
    lookup = DmarcLookup(Clock(), path, resolver=FakeResolver({}))
    assert lookup._suffixes == path
    assert lookup.suffixes.organizational_domain("a.b.co.uk") == "b.co.uk"
    missing = DmarcLookup(Clock(), tmp_path / "nope", resolver=FakeResolver({}))
    assert missing.suffixes.rules == 0


# --- the decider: a pending lookup, then the decision ----------------------------------

def test_decider_waits_for_the_lookup():
    """A list that rejects: the first decision is pending (the temporary failure) with
    the names to look up; after Decider.verify the same query is rejected."""
    from policyd.core.replies import ReplyPolicy
    from policyd.decider import Decider, FixedSnapshot

    resolver = FakeResolver({"_dmarc.sub.example.com": DNSNameError("nx"),
                             "_dmarc.example.com": [rr_txt("_dmarc.example.com",
                                                           b"v=DMARC1; p=quarantine")]})
    decider = Decider(FixedSnapshot(snap()), ReplyPolicy(), run_in_thread=lambda *a: None)
    decider.use_dmarc(DmarcLookup(Clock(), PSL, resolver=resolver))
    answer = decider.decide(query(), "exim")
    assert answer.decision is None and isinstance(answer.pending, LookupNeeded)
    done = []
    decider.verify([answer.pending]).addCallback(done.append)
    assert done
    answer = decider.decide(query(), "exim")
    assert (answer.decision.verdict, answer.decision.rule) == (Verdict.REJECT,
                                                               "dmarc-mitigation")
    # A list without mitigation never waits.
    plain = Decider(FixedSnapshot(snap(DmarcAction.MUNGE_FROM)), ReplyPolicy(),
                    run_in_thread=lambda *a: None)
    plain.use_dmarc(DmarcLookup(Clock(), PSL, resolver=FakeResolver({})))
    assert plain.decide(query(), "exim").decision.verdict == Verdict.ACCEPT


# --- settings: the native store and policyctl ------------------------------------------

def test_policyctl_sets_the_dmarc_settings(tmp_path, capsys):
    """policyctl list set --dmarc-mitigate-action/--dmarc-mitigate-unconditionally/
    --dmarc-address reach the native store's snapshot; bad values are refused."""
    import io

    from policyd import ctl
    from policyd.store import NativeBackend

    url = f"sqlite:///{tmp_path / 'policyd.sqlite'}"
    env = {"POLICYD_CONFIG": str(tmp_path / "none.conf")}

    def run(*argv):
        code = ctl.main(["--store", url, *argv], environ=env, stdin=io.StringIO(""))
        return code, capsys.readouterr()

    assert run("init")[0] == 0
    assert run("list", "add", LIST)[0] == 0
    code, out = run("list", "set", LIST, "--dmarc-mitigate-action", "discard",
                    "--dmarc-mitigate-unconditionally", "on",
                    "--dmarc-address", "a@b.example", "--dmarc-address", "^x.*@y\\.example")
    assert code == 0, out
    backend = NativeBackend(url)
    try:
        content = backend.load_snapshot().lists[LIST].content
    finally:
        backend.close()
    assert content.dmarc_mitigate_action == DmarcAction.DISCARD
    assert content.dmarc_mitigate_unconditionally is True
    assert content.dmarc_addresses == ("a@b.example", "^x.*@y\\.example")
    code, out = run("list", "show", LIST)
    assert "dmarc mitigate action:" in out.out and "discard (unconditionally)" in out.out
    assert run("list", "set", LIST, "--dmarc-address", "^(")[0] != 0
    assert run("list", "set", LIST, "--dmarc-mitigate-action", "bounce")[0] != 0
    assert run("list", "set", LIST, "--dmarc-address", "")[0] == 0


# --- the Exim protocol: the request waits for the lookup, never the reactor ------------

def test_exim_request_waits_for_the_lookup_then_rejects():
    """Exim's DATA request for a list that rejects: the answer is a Deferred while the
    names are looked up (nothing blocks), then REJECT; a second post From: the same
    domain is answered at once from the cache."""
    import base64

    from policyd.config import EximConfig
    from policyd.core.replies import ReplyPolicy
    from policyd.decider import Decider, FixedSnapshot
    from policyd.protocols.exim import EximFactory

    def b64(data):
        return base64.b64encode(data).decode()

    def request(frm):
        headers = f"From: {frm}\nTo: {LIST}\nSubject: hi\n".encode()
        return (f"POLICYD/1 list={LIST} sender={b64(b'bounce@x.example')} "
                f"headers={b64(headers)} body={b64(b'hello')} size=100").encode()

    resolver = FakeResolver({"_dmarc.example.com": None})
    decider = Decider(FixedSnapshot(snap()), ReplyPolicy(), run_in_thread=lambda *a: None)
    decider.use_dmarc(DmarcLookup(Clock(), PSL, resolver=resolver))
    factory = EximFactory(decider, EximConfig(listen=(), timeout=10.0, max_request=65536),
                          Clock())
    answer = factory.answer(request("a@example.com"), None)
    assert isinstance(answer, Deferred)
    results = []
    answer.addCallback(results.append)
    assert results == [] and [n for n, _ in resolver.asked] == ["_dmarc.example.com"]
    resolver.waiting["_dmarc.example.com"].callback(
        ([rr_txt("_dmarc.example.com", b"v=DMARC1; p=reject")], [], []))
    assert results[0].startswith(b"REJECT")
    assert factory.answer(request("b@example.com"), None).startswith(b"REJECT")
    # No From: domain: no lookup, the list's chain goes on (nonmembers accepted).
    assert factory.answer(request("undisclosed-recipients:;"), None).startswith(b"ACCEPT")
    assert len(resolver.asked) == 1


def test_a_name_that_is_no_dns_name_is_an_error_not_an_incident():
    """lookupText refusing the name at once (not ASCII): an error answer (Mailman's
    IDNAException mitigates), no warning about the resolver."""
    class Refusing(FakeResolver):
        def lookupText(self, name, timeout=None):
            raise UnicodeError("label")

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        lookup = DmarcLookup(Clock(), PSL, resolver=Refusing({}))
        fired = []
        lookup.lookup(["_dmarc.r\ufffdject.test"]).addCallback(fired.append)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert fired == [None]
    assert lookup.known("_dmarc.r\ufffdject.test").status == "error"
    assert not [e for e in events if e.get("log_namespace") == "policyd.dmarc"]


def test_a_from_too_large_to_read_is_deferred_before_any_lookup():
    """DMARC's own parse of From: is bounded too: too large a From: is deferred by
    ``address-headers`` before the rule reads it (no DNS asked)."""
    a = answers({})
    d = decide(snap(), query("@" * 2000 + " <someone@sub.example.com>"), dmarc=a)
    assert (d.verdict, d.rule) == (Verdict.DEFER, "address-headers") and a.asked == []


def test_a_from_nested_too_deep_for_dmarc_alone_is_deferred():
    """A From: the senders skip (an encoded word in an unknown charset: Mailman's decoding
    raises) but DMARC's ``parseaddr`` reads raw: groups nested too deep for it give the
    temporary failure, not an error."""
    from policyd.core.rules import TOO_DEEP
    frm = "=?x-unknown?q?a?= " + "g:" * 40 + "<someone@sub.example.com>"
    a = answers({})
    d = decide(snap(), query(frm), dmarc=a)
    assert (d.verdict, d.rule) == (Verdict.DEFER, "dmarc-mitigation"), d.trace
    assert TOO_DEEP in d.reason and a.asked == []


# --- the limit on checks waiting, and an answer that comes too late --------------------

def exim_setup():
    import base64

    from policyd.config import EximConfig
    from policyd.core.replies import ReplyPolicy
    from policyd.decider import Decider, FixedSnapshot
    from policyd.protocols.exim import EximFactory

    def request(frm):
        b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
        headers = f"From: {frm}\nTo: {LIST}\nSubject: hi\n".encode()
        return (f"POLICYD/1 list={LIST} sender={b64(b'bounce@x.example')} "
                f"headers={b64(headers)} body={b64(b'hello')} size=100").encode()

    clock = Clock()
    resolver = FakeResolver({})
    decider = Decider(FixedSnapshot(snap()), ReplyPolicy(), run_in_thread=lambda *a: None,
                      clock=clock)
    decider.use_dmarc(DmarcLookup(clock, PSL, resolver=resolver, timeout=60))
    factory = EximFactory(decider, EximConfig(listen=(), timeout=10.0, max_request=65536),
                          clock)
    return factory, decider, resolver, request


def test_queries_turned_away_at_the_waiting_limit_are_counted_busy_and_logged_once():
    """MAX_WAITING lookups waiting: the next queries get the temporary failure, counted
    as ``busy`` (policyd_requests_total, policyctl status) with a reason that says so,
    and one warning for the incident, not one per query and not silence."""
    from policyd.decider import Decider

    factory, decider, resolver, request = exim_setup()
    for i in range(Decider.MAX_WAITING):
        assert isinstance(factory.answer(request(f"a@d{i}.com"), None), Deferred)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        over = [factory.answer(request(f"a@over{i}.com"), None) for i in range(3)]
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert all(reply.startswith(b"DEFER 451") for reply in over)
    counts = decider.counters()
    assert counts["by_protocol"]["exim"] == {"busy": 3}
    assert counts["answers"]["exim"] == {"DEFER": 3}
    mine = [e for e in events if e.get("log_namespace") == "policyd.decision"]
    assert [e["log_level"] for e in mine if e["log_level"] is not LogLevel.info] == \
        [LogLevel.warn]
    lines = [str(e) for e in mine if e["log_level"] is LogLevel.info]
    assert len(lines) == 3 and all(decider.busy_reason(True) in line for line in lines)
    assert "looked up" not in decider.busy_reason(True)


def test_an_answer_that_comes_after_the_deadline_is_never_decided_logged_or_counted():
    """The request's deadline answers the temporary failure (counted busy) while its
    lookup goes on; when the lookup ends, nothing is written, decided or counted: the
    decision line of a reply never sent is not logged.  Same when Exim goes away."""
    from twisted.internet.testing import StringTransport

    factory, decider, resolver, request = exim_setup()
    resolver.answers["_dmarc.example.com"] = None
    resolver.answers["_dmarc.other.com"] = None
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(request("a@example.com") + b"\n")
    assert transport.value() == b"" and protocol.waiting
    protocol.timeoutConnection()  # the factory's sweep at the deadline
    assert transport.value().startswith(b"DEFER 451") and transport.disconnecting
    resolver.waiting["_dmarc.example.com"].callback(
        ([rr_txt("_dmarc.example.com", b"v=DMARC1; p=reject")], [], []))
    assert transport.value().count(b"DEFER") == 1 and b"REJECT" not in transport.value()
    counts = decider.counters()
    assert counts["by_protocol"]["exim"] == {"busy": 1}
    assert counts["answers"]["exim"] == {"DEFER": 1}
    protocol.connectionLost(None)

    # Exim closes the connection while the lookup runs.
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(request("a@other.com") + b"\n")
    protocol.connectionLost(None)
    resolver.waiting["_dmarc.other.com"].callback(
        ([rr_txt("_dmarc.other.com", b"v=DMARC1; p=reject")], [], []))
    assert transport.value() == b""
    assert decider.counters()["by_protocol"]["exim"] == {"busy": 1}
    assert decider._waiting == 0


# --- Mailman 2.1 (dmarc-moderation) ---------------------------------------------------------


def snap2(action=DmarcAction.REJECT, addresses=(), quarantine=True):
    spec = ListSpec(LIST, mode=Mode.MAILMAN2, default_nonmember_action=Action.ACCEPT,
                    dmarc_mitigate_action=action, dmarc_addresses=addresses,
                    dmarc_quarantine=quarantine)
    return build([spec], domains={"lists.example.com": "lists.example.com"})


@pytest.mark.parametrize("records, outcome", OUTCOMES)
@pytest.mark.parametrize("action", [DmarcAction.REJECT, DmarcAction.DISCARD])
@pytest.mark.parametrize("quarantine", [True, False])
def test_mailman2_outcomes(records, outcome, action, quarantine):
    """Mailman 2.1's IsDMARCProhibited on the same answers: as Mailman 3's rule, except
    that quarantine counts only with dmarc_quarantine_moderation_action; a failed
    lookup is the temporary failure here too (Mailman 2 would moderate)."""
    d = decide(snap2(action, quarantine=quarantine), query(), dmarc=answers(records))
    if outcome == "quarantine":
        outcome = quarantine
    if outcome == "defer":
        assert (d.verdict, d.rule) == (Verdict.DEFER, "dmarc-moderation"), d.trace
    elif outcome:
        verdict = Verdict.REJECT if action == DmarcAction.REJECT else Verdict.DISCARD
        assert (d.verdict, d.rule) == (verdict, "dmarc-moderation"), d.trace
        assert d.sender == "someone@sub.example.com"
    else:
        assert d.rule != "dmarc-moderation", d.trace
        assert any(step.rule == "dmarc-moderation" and not step.hit for step in d.trace)
    # The MTA path (no trace) decides the same.
    quiet = decide(snap2(action, quarantine=quarantine), query(), dmarc=answers(records),
                   explain=False)
    assert (quiet.verdict, quiet.rule) == (d.verdict, d.rule)


def test_mailman2_lookups_and_what_needs_none():
    """The first lookup asks for both names at once; munge and wrap never look up; an
    address in dmarc_moderation_addresses needs no lookup; without a message (Postfix)
    or without a lookup (policyctl --offline) the DNS half is not evaluated, and says
    so; an address whose @ comes first has no domain to look up (Mailman 2's
    ``at_sign < 1``)."""
    with pytest.raises(LookupNeeded) as raised:
        decide(snap2(), query(), dmarc=answers({}))
    assert raised.value.names == ("_dmarc.sub.example.com", "_dmarc.example.com")
    for action in (DmarcAction.MUNGE_FROM, DmarcAction.WRAP_MESSAGE,
                   DmarcAction.NO_MITIGATION):
        a = answers({})
        assert decide(snap2(action), query(), dmarc=a).verdict is Verdict.ACCEPT
        assert a.asked == []
    a = answers({})
    d = decide(snap2(addresses=("someone@sub.example.com",)), query(), dmarc=a)
    assert (d.verdict, d.rule) == (Verdict.REJECT, "dmarc-moderation") and a.asked == []
    d = decide(snap2(), query())
    step = next(s for s in d.trace if s.rule == "dmarc-moderation")
    assert not step.hit and "not evaluated" in step.detail
    d = decide(snap2(), Query(LIST, "x@example.com", "someone@sub.example.com"),
               dmarc=answers({}))
    step = next(s for s in d.trace if s.rule == "dmarc-moderation")
    assert not step.hit and "not evaluated" in step.detail
    a = answers({})
    d = decide(snap2(), query("<@sub.example.com>"), dmarc=a)
    assert d.rule != "dmarc-moderation" and a.asked == []
