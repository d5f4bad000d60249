"""The Mailman 3 oracle: real GNU Mailman 3 decides the agreement cases.

Runs INSIDE Mailman's own virtualenv (standard library + ``mailman`` only; it never
imports policyd)::

    build/mailman-venv/bin/python tests/mailman/oracle.py scenario.json > verdicts.jsonl
    build/mailman-venv/bin/python tests/mailman/oracle.py --keep \\
        --database-url postgresql+psycopg2://postgres@127.0.0.1:5432/mm_agree < scenario.json

It initialises a throwaway Mailman (its own var dir and ``mailman.cfg``; the database is a
SQLite file in the var dir unless ``--database-url`` names another one, which must exist
and be empty; no runners, no REST, no LMTP server), creates the scenario through
Mailman's own API (domains with alias domains, lists and their moderation settings,
users with several addresses and a preferred one, memberships by address or by user,
nonmember rows, list and site bans) and commits it.  Then, for every case, it does what
the LMTP and incoming runners do with a message (resolve the recipient like
``LMTPHandler._handle_RCPT``, parse the message with ``email.message_from_bytes``, set the
envelope sender as unixfrom, register the senders' addresses) and runs the list's real
posting chain (``mailman.core.chains.process``), recording which terminal chain it
reached and the rule hits; then it rolls the transaction back, so that the nonmember rows
Mailman's rule creates and the held messages never leak into the next case.

Output: JSON lines on stdout (or ``--output``):

* ``{"kind": "database", ...}``: the database URL, var dir, Alembic revision, and
  whether it was kept (``--keep``) for a later reader (the mailman3 store backend);
* ``{"kind": "domain"|"user"|"list"|"site", ...}``: Mailman's own view of what was
  built, read back after the commit through Mailman's API: exactly the data a policyd
  snapshot needs (members with the address they are subscribed with and how, the user's
  addresses in the order Mailman iterates them, the four nonmember lists, bans);
* ``{"kind": "case", "id": ..., "outcome": ..., "rule_hits": [...], ...}``: one per case.
  ``outcome`` is the terminal posting chain (``accept``, ``hold``, ``reject``,
  ``discard``), ``lmtp-550`` for a recipient Mailman's LMTP server refuses, ``lmtp-501``
  for a message it refuses for defects, ``not-a-post:<subaddress>`` for a list's
  administrative address (the owner chain or a command/bounce queue takes it, no
  posting rules), or ``error`` with a traceback.
* ``{"kind": "done", "cases": N, "seconds": ...}`` last.
"""

from __future__ import annotations

import argparse
import email
import email.utils
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback

CONFIG_TEMPLATE = """\
[mailman]
site_owner: postmaster@oracle.invalid
layout: here

[paths.here]
var_dir: {var_dir}

[database]
class: {database_class}
url: {database_url}

[mta]
incoming: mailman.mta.null.NullMTA

[logging.root]
propagate: no
"""

DATABASE_CLASSES = {
    "sqlite": "mailman.database.sqlite.SQLiteDatabase",
    "postgresql": "mailman.database.postgresql.PostgreSQLDatabase",
    "postgres": "mailman.database.postgresql.PostgreSQLDatabase",
    "mysql": "mailman.database.mysql.MySQLDatabase",
}

TERMINAL_CHAINS = ("accept", "hold", "reject", "discard")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", nargs="?", default="-",
                        help="scenario JSON file ('-' or absent: standard input)")
    parser.add_argument("--database-url",
                        help="SQLAlchemy URL of an existing, empty database "
                             "(default: a SQLite file in the var dir)")
    parser.add_argument("--var-dir", help="Mailman's var dir (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the var dir and the database and print where they are")
    parser.add_argument("--build-only", action="store_true",
                        help="build the scenario and export it, decide no case")
    parser.add_argument("--output", default="-", help="JSON lines output (default stdout)")
    return parser.parse_args(argv)


def write_config(var_dir, database_url, extra=""):
    """Mailman's configuration file; ``extra`` (the scenario's ``mailman_cfg``) is
    appended as written, e.g. an ``[antispam]`` section."""
    if database_url is None:
        database_url = "sqlite:///{}".format(os.path.join(var_dir, "data", "mailman.db"))
    if database_url.startswith(("postgresql://", "postgres://")):
        # SQLAlchemy's default PostgreSQL driver may be psycopg 3; Mailman's virtualenv
        # has psycopg2 (make mailman-venv installs psycopg2-binary).
        try:
            import psycopg  # noqa: F401
        except ImportError:
            database_url = "postgresql+psycopg2://" + database_url.split("://", 1)[1]
    scheme = database_url.split(":", 1)[0].split("+", 1)[0].lower()
    try:
        database_class = DATABASE_CLASSES[scheme]
    except KeyError:
        raise SystemExit("oracle: unsupported database URL scheme {!r}".format(scheme))
    path = os.path.join(var_dir, "etc", "mailman.cfg")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fp:
        fp.write(CONFIG_TEMPLATE.format(var_dir=var_dir, database_class=database_class,
                                        database_url=database_url))
        if extra:
            fp.write("\n" + extra)
    return path, database_url


class Oracle:
    """Builds a scenario in a fresh Mailman and decides cases with Mailman's chains."""

    def __init__(self, emit):
        self.emit = emit
        self.record = None
        # Imported here: only after initialize() is Mailman's configuration usable.
        from mailman.config import config
        from mailman.interfaces.bans import IBanManager
        from mailman.interfaces.domain import IDomainManager
        from mailman.interfaces.listmanager import IListManager
        from mailman.interfaces.usermanager import IUserManager
        from zope.component import getUtility

        self.config = config
        self.IBanManager = IBanManager
        self.domains = getUtility(IDomainManager)
        self.lists = getUtility(IListManager)
        self.users = getUtility(IUserManager)
        self._instrument_terminal_chains()

    # -- recording the terminal chain ----------------------------------------------

    def _instrument_terminal_chains(self):
        """Record which terminal chain a case reaches, before the chain's side effects
        (bounces, owner notifications, held-message storage) run; an exception in those
        side effects is recorded but cannot lose the verdict."""
        import zope.event
        from mailman.interfaces.chain import ChainEvent

        for name in TERMINAL_CHAINS:
            chain = self.config.chains[name]
            real = chain._process

            def recording(mlist, msg, msgdata, _name=name, _real=real):
                if self.record is not None:
                    self.record["outcome"] = _name
                try:
                    _real(mlist, msg, msgdata)
                except Exception:
                    if self.record is not None:
                        self.record["side_effect_error"] = traceback.format_exc(limit=3)

            chain._process = recording

        def on_event(event):
            if isinstance(event, ChainEvent) and self.record is not None:
                self.record.setdefault("events", []).append(type(event).__name__)

        zope.event.subscribers.append(on_event)

    # -- building -------------------------------------------------------------------

    def build(self, scenario):
        from mailman.app.lifecycle import create_list
        from mailman.interfaces.action import Action
        from mailman.interfaces.member import MemberRole
        from mailman.utilities.datetime import now

        for spec in scenario.get("domains", ()):
            self.domains.add(spec["mail_host"], alias_domain=spec.get("alias_domain"))
        users = {}
        for spec in scenario.get("users", ()):
            addresses = spec["addresses"]
            user = self.users.create_user(addresses[0], spec.get("display_name"))
            for other in addresses[1:]:
                user.register(other)
            for address in user.addresses:
                address.verified_on = now()
            preferred = spec.get("preferred")
            if preferred is not None:
                user.preferred_address = self.users.get_address(preferred)
            users[spec["key"]] = user
        for email_address in scenario.get("addresses", ()):
            if self.users.get_address(email_address) is None:
                self.users.create_address(email_address)

        def address_of(text):
            found = self.users.get_address(text)
            return found if found is not None else self.users.create_address(text)

        def action(name):
            return None if name is None else Action[name]

        for spec in scenario.get("lists", ()):
            mlist = create_list(spec["fqdn"], owners=spec.get("owners") or None)
            for setting in ("default_member_action", "default_nonmember_action"):
                if setting in spec:
                    setattr(mlist, setting, Action[spec[setting]])
            mlist.emergency = bool(spec.get("emergency", False))
            for setting in ("accept_these_nonmembers", "hold_these_nonmembers",
                            "reject_these_nonmembers", "discard_these_nonmembers"):
                setattr(mlist, setting, list(spec.get(setting, ())))
            for entry in spec.get("moderators", ()):
                mlist.subscribe(address_of(entry), MemberRole.moderator,
                                send_welcome_message=False)
            for entry in spec.get("members", ()):
                subscriber = (users[entry["user"]] if "user" in entry
                              else address_of(entry["address"]))
                member = mlist.subscribe(subscriber, MemberRole.member,
                                         send_welcome_message=False)
                member.moderation_action = action(entry.get("action"))
            for entry in spec.get("nonmembers", ()):
                member = mlist.subscribe(address_of(entry["address"]), MemberRole.nonmember,
                                         send_welcome_message=False)
                member.moderation_action = action(entry.get("action"))
            bans = self.IBanManager(mlist)
            for entry in spec.get("bans", ()):
                bans.ban(entry)
            self._content_settings(mlist, spec.get("content") or {})
        site_bans = self.IBanManager(None)
        for entry in scenario.get("site_bans", ()):
            site_bans.ban(entry)
        self.config.db.commit()

    def _content_settings(self, mlist, content):
        """The settings of the rules that read the message, set as Mailman's REST API
        sets them (the moderator password hashed with Mailman's password context)."""
        from mailman.interfaces.mailinglist import IAcceptableAliasSet, IHeaderMatchList
        from mailman.interfaces.nntp import NewsgroupModeration

        if "moderator_password" in content:
            mlist.moderator_password = self.config.password_context.encrypt(
                content["moderator_password"]).encode("utf-8")
        for setting in ("max_message_size", "max_num_recipients",
                        "require_explicit_destination", "administrivia",
                        "bounce_matching_headers"):
            if setting in content:
                setattr(mlist, setting, content[setting])
        if "newsgroup_moderation" in content:
            mlist.newsgroup_moderation = NewsgroupModeration[content["newsgroup_moderation"]]
        if "dmarc_mitigate_action" in content:
            from mailman.interfaces.mailinglist import DMARCMitigateAction
            mlist.dmarc_mitigate_action = DMARCMitigateAction[
                content["dmarc_mitigate_action"]]
        if "dmarc_mitigate_unconditionally" in content:
            mlist.dmarc_mitigate_unconditionally = bool(
                content["dmarc_mitigate_unconditionally"])
        if "dmarc_addresses" in content:
            mlist.dmarc_addresses = list(content["dmarc_addresses"])
        aliases = IAcceptableAliasSet(mlist)
        for alias in content.get("acceptable_aliases", ()):
            aliases.add(alias)
        matches = IHeaderMatchList(mlist)
        for header, pattern, chain in content.get("header_matches", ()):
            matches.append(header, pattern, chain)

    @staticmethod
    def _content_export(mlist):
        from mailman.interfaces.mailinglist import IAcceptableAliasSet

        password = mlist.moderator_password
        if isinstance(password, bytes):
            password = password.decode("utf-8")
        return {
            "moderator_password": password,
            "max_message_size": mlist.max_message_size,
            "max_num_recipients": mlist.max_num_recipients,
            "require_explicit_destination": bool(mlist.require_explicit_destination),
            "acceptable_aliases": sorted(IAcceptableAliasSet(mlist).aliases),
            "administrivia": bool(mlist.administrivia),
            "bounce_matching_headers": mlist.bounce_matching_headers or "",
            "newsgroup_moderation": mlist.newsgroup_moderation.name,
            "header_matches": [[entry.header, entry.pattern, entry.chain]
                               for entry in mlist.header_matches],
            "dmarc_mitigate_action": mlist.dmarc_mitigate_action.name,
            "dmarc_mitigate_unconditionally": bool(mlist.dmarc_mitigate_unconditionally),
            "dmarc_addresses": list(mlist.dmarc_addresses or ()),
        }

    # -- exporting Mailman's view ---------------------------------------------------

    def export(self):
        """Read back, through Mailman's API in a fresh transaction, what a snapshot of
        this Mailman needs."""
        from mailman.interfaces.member import MemberRole

        self.config.db.abort()
        for domain in self.domains:
            self.emit({"kind": "domain", "mail_host": domain.mail_host,
                       "alias_domain": domain.alias_domain})
        for user in self.users.users:
            preferred = user.preferred_address
            self.emit({
                "kind": "user",
                "user_id": str(user.user_id),
                # The order Mailman's member-moderation rule walks them in.
                "addresses": [address.email for address in user.addresses],
                "address_ids": [address.id for address in user.addresses],
                "preferred": preferred.email if preferred is not None else None,
            })
        for mlist in self.lists.mailing_lists:
            def rows(role):
                out = []
                for member in mlist.get_roster(role).members:
                    out.append({
                        "email": member.address.email,
                        "via": "address" if member._address is not None else "user",
                        "user_id": (str(member.user.user_id)
                                    if member.user is not None else None),
                        "action": (member.moderation_action.name
                                   if member.moderation_action is not None else None),
                    })
                return out

            self.emit({
                "kind": "list",
                "fqdn": mlist.fqdn_listname,
                "posting_address": mlist.posting_address,
                "list_id": mlist.list_id,
                "mail_host": mlist.mail_host,
                "display_name": mlist.display_name,
                "default_member_action": mlist.default_member_action.name,
                "default_nonmember_action": mlist.default_nonmember_action.name,
                "emergency": bool(mlist.emergency),
                "accept_these_nonmembers": list(mlist.accept_these_nonmembers),
                "hold_these_nonmembers": list(mlist.hold_these_nonmembers),
                "reject_these_nonmembers": list(mlist.reject_these_nonmembers),
                "discard_these_nonmembers": list(mlist.discard_these_nonmembers),
                "members": rows(MemberRole.member),
                "nonmembers": rows(MemberRole.nonmember),
                "moderators": [row["email"] for row in rows(MemberRole.moderator)],
                "owners": [row["email"] for row in rows(MemberRole.owner)],
                "bans": [ban.email for ban in self.IBanManager(mlist)],
                "content": self._content_export(mlist),
            })
        self.emit({"kind": "site", "site_bans": [ban.email for ban in self.IBanManager(None)]})
        self.config.db.abort()

    # -- deciding -------------------------------------------------------------------

    def resolve(self, recipient):
        """``LMTPHandler._handle_RCPT``: (mlist, subaddress) or (None, None) for 550."""
        from email.utils import parseaddr
        from mailman.runners.lmtp import SUBADDRESS_NAMES, split_recipient

        listnames = set(self.lists.names)
        to = parseaddr(recipient)[1].lower()
        if "@" not in to:
            return None, None
        local, subaddress, domain = split_recipient(to)
        if subaddress is not None:
            listname = "{}-{}@{}".format(local, subaddress, domain)
            if listname in listnames:
                local = "{}-{}".format(local, subaddress)
                subaddress = None
        listname = "{}@{}".format(local, domain)
        if listname not in listnames:
            return None, None
        if subaddress is not None and subaddress not in SUBADDRESS_NAMES:
            return None, None
        return self.lists.get_by_fqdn(listname), subaddress

    def decide(self, case):
        from contextlib import suppress
        from mailman.core.chains import process
        from mailman.email.message import Message
        from mailman.interfaces.address import ExistingAddressError
        from mailman.utilities.email import add_message_hash

        record = {"kind": "case", "id": case["id"], "outcome": None, "rule_hits": [],
                  "rule_misses": [], "senders": None}
        self.record = record
        try:
            mlist, subaddress = self.resolve(case["recipient"])
            if mlist is None:
                record["outcome"] = "lmtp-550"
                return record
            record["list"] = mlist.fqdn_listname
            raw = (case["raw"].encode("utf-8", "surrogateescape") if "raw" in case
                   else build_message(case, mlist.posting_address))
            msg = email.message_from_bytes(raw, Message)
            msg.set_unixfrom(case.get("envelope_sender", ""))
            # LMTPHandler._handle_DATA: a Message-ID made when missing, a bogus one
            # fixed, then (after the defects check) the hash fields and X-MailFrom.
            message_id = msg.get("message-id")
            if message_id is None:
                message_id = email.utils.make_msgid()
                msg["Message-ID"] = message_id
            new_mid = re.sub(r"^<?\[(.*)\]>?", r"<\1>", message_id)
            if new_mid != message_id:
                msg.replace_header("Message-ID", new_mid)
            if msg.defects:
                record["outcome"] = "lmtp-501"
                record["defects"] = [repr(defect) for defect in msg.defects]
                return record
            msg.original_size = len(raw)
            add_message_hash(msg)
            msg["X-MailFrom"] = mail_from(case.get("envelope_sender", ""))
            record["senders"] = list(msg.senders)
            if subaddress is not None:
                record["outcome"] = "not-a-post:{}".format(subaddress)
                return record
            msgdata = {"listid": mlist.list_id, "original_size": len(raw),
                       "to_list": True, "envsender": mlist.no_reply_address}
            # The incoming runner registers every sender address before the chain.
            for sender in msg.senders:
                with suppress(ExistingAddressError):
                    self.users.create_address(sender)
            process(mlist, msg, msgdata, mlist.posting_chain)
            record["rule_hits"] = list(msgdata.get("rule_hits", ()))
            record["rule_misses"] = list(msgdata.get("rule_misses", ()))
            record["moderation_sender"] = msgdata.get("moderation_sender")
            if record["outcome"] is None:
                record["outcome"] = "error"
                record["error"] = "the posting chain reached no terminal chain"
        except Exception:
            record["outcome"] = "error"
            record["error"] = traceback.format_exc()
        finally:
            self.record = None
            self.config.db.abort()
        return record


def mail_from(envelope_sender):
    """``envelope.mail_from`` as Mailman's LMTP server (aiosmtpd) makes it of
    ``MAIL FROM:<sender>`` (``<>`` for the null sender); a sender it would refuse with
    553 is kept as given (the oracle runs the chain all the same)."""
    from email._header_value_parser import get_angle_addr
    from email.errors import HeaderParseError
    try:
        return get_angle_addr("<{}>".format(envelope_sender))[0].addr_spec
    except (HeaderParseError, IndexError, ValueError):
        return envelope_sender


def build_message(case, posting_address):
    """The message of a case, as bytes an LMTP client would send: no content that would
    trip a rule other than the ones under test (Subject present, small, no Approved:,
    no X-BeenThere:, a Message-ID, To: the list)."""
    lines = []

    def add(name, value):
        if value is None:
            return
        for item in ([value] if isinstance(value, str) else value):
            lines.append("{}: {}".format(name, item))

    add("From", case.get("from"))
    add("Reply-To", case.get("reply_to"))
    add("Sender", case.get("sender"))
    lines.append("To: {}".format(posting_address))
    lines.append("Subject: Agreement case {}".format(case["id"]))
    lines.append("Message-ID: <{}@agreement.oracle.invalid>".format(
        "".join(ch if ch.isalnum() else "." for ch in case["id"])))
    lines.append("Date: Mon, 01 Jan 2024 00:00:00 +0000")
    lines.append("MIME-Version: 1.0")
    lines.append("Content-Type: text/plain; charset=us-ascii")
    text = "\n".join(lines) + "\n\nHello from the agreement suite.\n"
    return text.encode("utf-8", "surrogateescape")


def use_test_dns(scenario):
    """DMARC cases: rules/dmarc.py asks the test's DNS server (``scenario["dns"]``:
    dnspython's ``Resolver`` pointed at it, no resolv.conf, no search domains) and reads
    the test's public suffix list (no download)."""
    server = scenario.get("dns")
    if server:
        import dns.resolver

        class TestResolver(dns.resolver.Resolver):
            def __init__(self, *args, **kwargs):
                super().__init__(configure=False)
                self.nameservers = [server["host"]]
                self.port = server["port"]

        dns.resolver.Resolver = TestResolver
    suffixes = scenario.get("public_suffix_list")
    if suffixes:
        from mailman.rules import dmarc

        dmarc.suffix_cache.clear()
        dmarc.parse_suffix_list(suffixes)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.scenario == "-":
        scenario = json.load(sys.stdin)
    else:
        with open(args.scenario, encoding="utf-8") as fp:
            scenario = json.load(fp)
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")

    def emit(obj):
        out.write(json.dumps(obj, sort_keys=True) + "\n")

    # Nothing from the caller's environment may redirect Mailman elsewhere.
    for name in ("MAILMAN_CONFIG_FILE", "MAILMAN_VAR_DIR", "MAILMAN_EXTRA_TESTING_CFG"):
        os.environ.pop(name, None)
    var_dir = os.path.abspath(args.var_dir) if args.var_dir else tempfile.mkdtemp(
        prefix="policyd-mailman-oracle-")
    os.makedirs(var_dir, exist_ok=True)
    started = time.monotonic()
    try:
        config_path, database_url = write_config(var_dir, args.database_url,
                                                 scenario.get("mailman_cfg", ""))
        from mailman.core.initialize import initialize
        initialize(config_path, propagate_logs=False)
        use_test_dns(scenario)
        from mailman.config import config
        revision = config.db.store.execute(
            __import__("sqlalchemy").text("SELECT version_num FROM alembic_version")
        ).scalar()
        config.db.abort()
        emit({"kind": "database", "url": database_url, "var_dir": var_dir,
              "config": config_path, "alembic_revision": revision, "kept": args.keep,
              "mailman_version": __import__("mailman.version").version.VERSION})
        oracle = Oracle(emit)
        oracle.build(scenario)
        oracle.export()
        built = time.monotonic()
        count = 0
        if not args.build_only:
            for case in scenario.get("cases", ()):
                emit(oracle.decide(case))
                count += 1
        emit({"kind": "done", "cases": count,
              "build_seconds": round(built - started, 3),
              "seconds": round(time.monotonic() - started, 3)})
        out.flush()
        config.db.abort()
        config.db.engine.dispose()
    finally:
        if out is not sys.stdout:
            out.close()
        if not args.keep and not args.var_dir:
            shutil.rmtree(var_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
