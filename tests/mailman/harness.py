"""Run the Mailman oracle and put policyd beside it.

* ``mailman_python()`` finds the interpreter of Mailman's own virtualenv;
* ``run_oracle(scenario, ...)`` runs ``oracle.py`` there and parses its JSON lines;
* ``list_specs(result)`` turns Mailman's exported view of the lists into policyd
  ``ListSpec`` values, expanding user memberships the way Mailman's member-moderation
  rule finds them, and ``snapshot(result)`` builds the ``Snapshot``;
* ``query(case)``, ``mailman_verdict(record)`` and ``compare(...)`` line the two up.

Mailman's semantics that ``list_specs`` encodes (mailman 3.3.10 ``model/roster.py``
``get_member`` and ``rules/moderation.py`` ``_find_sender_member``):

* a list's members are the ``role=member`` rows; one subscribed by address is that
  address, one subscribed as a user is the user's preferred address; when an address is
  both, the direct membership (and its moderation action) wins;
* a sender that is no member but is an address of a user counts as the member found at
  the first of that user's addresses (in the order Mailman iterates ``user.addresses``)
  that is a member: ``user_aliases`` maps every other address of the user to it.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from policyd.core.chain import decide
from policyd.core.dmarc import DmarcAction
from policyd.core.snapshot import ListSpec, MemberSpec, Snapshot, build
from policyd.core.verdict import Action, Decision, Query
from policyd.protocols.exim import parse_request

HERE = Path(__file__).resolve().parent
ORACLE = HERE / "oracle.py"
REPO = HERE.parent.parent


def mailman_python() -> Path | None:
    """The Mailman virtualenv's python: ``$POLICYD_MAILMAN_PYTHON``, else
    ``build/mailman-venv/bin/python``; ``None`` when it is missing or has no Mailman."""
    configured = os.environ.get("POLICYD_MAILMAN_PYTHON")
    path = Path(configured) if configured else REPO / "build" / "mailman-venv" / "bin" / "python"
    if not path.exists():
        return None
    probe = subprocess.run([str(path), "-c", "import mailman.version"],
                           capture_output=True, timeout=60)
    return path if probe.returncode == 0 else None


@dataclass
class OracleResult:
    database: dict
    domains: list[dict] = field(default_factory=list)
    users: list[dict] = field(default_factory=list)
    lists: list[dict] = field(default_factory=list)
    site_bans: list[str] = field(default_factory=list)
    cases: dict[str, dict] = field(default_factory=dict)
    done: dict | None = None


def run_oracle(python: Path, scenario: dict, *, database_url: str | None = None,
               keep: bool = False, build_only: bool = False,
               timeout: float = 600) -> OracleResult:
    """Run the oracle on ``scenario`` in Mailman's virtualenv and parse what it says."""
    args = [str(python), str(ORACLE)]
    if database_url:
        args += ["--database-url", database_url]
    if keep:
        args.append("--keep")
    if build_only:
        args.append("--build-only")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILMAN_")}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(args, input=json.dumps(scenario), capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(HERE))
    if proc.returncode != 0:
        raise RuntimeError(f"oracle failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = None
    for line in proc.stdout.splitlines():
        record = json.loads(line)
        kind = record.pop("kind")
        if kind == "database":
            result = OracleResult(database=record)
        elif kind == "domain":
            result.domains.append(record)
        elif kind == "user":
            result.users.append(record)
        elif kind == "list":
            result.lists.append(record)
        elif kind == "site":
            result.site_bans = record["site_bans"]
        elif kind == "case":
            result.cases[record["id"]] = record
        elif kind == "done":
            result.done = record
    if result is None or result.done is None:
        raise RuntimeError("oracle output incomplete:\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return result


def _action(name: str | None) -> Action | None:
    return None if name is None else Action.from_name(name)


def list_specs(result: OracleResult) -> list[ListSpec]:
    """policyd's loader output for the lists Mailman exported."""
    specs = []
    for lst in result.lists:
        rows = sorted(lst["members"], key=lambda row: row["via"] != "address")
        members = tuple(MemberSpec(row["email"], _action(row["action"])) for row in rows)
        member_emails = {row["email"] for row in rows}
        aliases: dict[str, str] = {}
        for user in result.users:
            first = next((a for a in user["addresses"] if a in member_emails), None)
            if first is None:
                continue
            for address in user["addresses"]:
                if address not in member_emails:
                    aliases[address] = first
        specs.append(ListSpec(
            posting_address=lst["posting_address"],
            list_id=lst["list_id"],
            display_name=lst["display_name"],
            emergency=lst["emergency"],
            default_member_action=Action.from_name(lst["default_member_action"]),
            default_nonmember_action=Action.from_name(lst["default_nonmember_action"]),
            members=members,
            user_aliases=aliases,
            nonmembers=tuple(MemberSpec(row["email"], _action(row["action"]))
                             for row in lst["nonmembers"]),
            accept_these_nonmembers=tuple(lst["accept_these_nonmembers"]),
            hold_these_nonmembers=tuple(lst["hold_these_nonmembers"]),
            reject_these_nonmembers=tuple(lst["reject_these_nonmembers"]),
            discard_these_nonmembers=tuple(lst["discard_these_nonmembers"]),
            bans=tuple(lst["bans"]),
            **content_settings(lst.get("content")),
        ))
    return specs


def content_settings(content: dict | None) -> dict:
    """The ``ListSpec`` keywords of the message rules' settings Mailman exported."""
    if not content:
        return {}
    return {
        "moderator_password": content["moderator_password"],
        "header_matches": tuple(
            (header, pattern, None if chain is None else Action.from_name(chain))
            for header, pattern, chain in content["header_matches"]),
        "max_message_size": content["max_message_size"] or 0,
        "max_num_recipients": content["max_num_recipients"] or 0,
        "require_explicit_destination": content["require_explicit_destination"],
        "acceptable_aliases": tuple(content["acceptable_aliases"]),
        "administrivia": content["administrivia"],
        "bounce_matching_headers": content["bounce_matching_headers"],
        "newsgroup_moderated": content["newsgroup_moderation"] == "moderated",
        "dmarc_mitigate_action": DmarcAction.from_name(
            content.get("dmarc_mitigate_action", "no_mitigation")),
        "dmarc_mitigate_unconditionally": content.get("dmarc_mitigate_unconditionally",
                                                      False),
        "dmarc_addresses": tuple(content.get("dmarc_addresses", ())),
    }


def domain_map(result: OracleResult) -> dict[str, str]:
    out = {}
    for domain in result.domains:
        out[domain["mail_host"]] = domain["mail_host"]
        if domain.get("alias_domain"):
            out[domain["alias_domain"]] = domain["mail_host"]
    return out


def snapshot(result: OracleResult, site_header_checks=None) -> Snapshot:
    """``site_header_checks``: what policyd read from the ``mailman_cfg`` the oracle's
    Mailman was given (``policyd.mailman_site``)."""
    extra = {} if site_header_checks is None else {"site_header_checks": site_header_checks}
    return build(list_specs(result), domains=domain_map(result), site_bans=result.site_bans,
                 version="mailman-oracle", **extra)


def _header(value) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else "\n".join(value)


def exim_line(case: dict) -> bytes:
    """The POLICYD/1 request the documented Exim DATA ACL sends for a case with a whole
    message (``raw``): envelope sender, header block, body and size, all base64."""
    raw = case["raw"].encode("utf-8", "surrogateescape")
    head, _, body = raw.partition(b"\n\n")
    b64 = lambda data: base64.b64encode(data).decode("ascii")  # noqa: E731
    sender = b64(case.get("envelope_sender", "").encode("utf-8", "surrogateescape"))
    headers = b64(head + b"\n")
    return (f"POLICYD/1 list={case['recipient']} sender={sender} headers={headers} "
            f"body={b64(body)} size={len(raw)} id=agreement").encode("ascii")


def query(case: dict) -> Query:
    """The query an MTA would send for the case's message: through the Exim codec for a
    case with a whole message, Postfix's (envelope only) for a ``postfix`` case, else
    the raw header values."""
    if "raw" in case:
        (only,) = parse_request(exim_line(case)).queries()
        return only
    if case.get("postfix"):
        # The Postfix path: no header is sent (Mailman still sees the case's From:).
        return Query(case["recipient"], case.get("envelope_sender", ""))
    return Query(case["recipient"], case.get("envelope_sender", ""),
                 _header(case.get("from")), _header(case.get("reply_to")),
                 _header(case.get("sender")))


def mailman_verdict(record: dict) -> str | None:
    """Mailman's outcome as a policyd verdict value: the terminal posting chain; the LMTP
    server's 550 is a reject; an administrative address (owner chain, command or bounce
    queue) takes the message without posting rules: accept.  ``None`` for errors."""
    outcome = record["outcome"]
    if outcome in ("accept", "hold", "reject", "discard"):
        return outcome
    if outcome == "lmtp-550":
        return "reject"
    if outcome and outcome.startswith("not-a-post:"):
        return "accept"
    return None


@dataclass(frozen=True)
class Row:
    case: dict
    record: dict
    decision: Decision

    @property
    def mailman(self) -> str | None:
        return mailman_verdict(self.record)

    @property
    def policyd(self) -> str:
        return self.decision.verdict.value


def decide_all(snap: Snapshot, cases: list[dict], result: OracleResult) -> list[Row]:
    return [Row(case, result.cases[case["id"]], decide(snap, query(case))) for case in cases]


def _short(value, width):
    text = "-" if value is None else (value if isinstance(value, str) else " | ".join(value))
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "~"


def table(rows: list[Row]) -> str:
    """A readable table of (dis)agreements: the case, both verdicts, Mailman's rule hits
    and senders, policyd's deciding rule and trace."""
    lines = []
    for row in rows:
        case, record, decision = row.case, row.record, row.decision
        lines.append(
            f"{case['id']}: mailman={record['outcome']} policyd={decision.verdict.value} "
            f"[{decision.rule}]  rcpt={case['recipient']} env={case.get('envelope_sender')!r} "
            f"from={_short(case.get('from'), 70)!r} reply-to={_short(case.get('reply_to'), 40)!r} "
            f"sender={_short(case.get('sender'), 40)!r}")
        lines.append(f"    mailman senders={record.get('senders')} hits={record['rule_hits']} "
                     f"moderation_sender={record.get('moderation_sender')}")
        if record.get("error"):
            lines.append("    mailman error: " + record["error"].strip().splitlines()[-1])
        lines.append(f"    policyd senders={list(decision.senders)} reason={decision.reason}")
        for step in decision.trace:
            lines.append(f"      {'HIT ' if step.hit else 'miss'} {step.rule}: {step.detail}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - a developer's tool
    # python -m tests.mailman.harness  -> prints the disagreement table.
    from tests.mailman.cases import intended_differences, scenario

    python = mailman_python()
    if python is None:
        sys.exit("no Mailman virtualenv (set POLICYD_MAILMAN_PYTHON)")
    data = scenario()
    data["cases"] = data["cases"] + intended_differences()
    result = run_oracle(python, data)
    rows = decide_all(snapshot(result), data["cases"], result)
    bad = [r for r in rows if r.mailman != r.policyd and "difference" not in r.case]
    print(table(bad))
    print(f"{len(result.lists)} lists, {len(rows)} cases, {len(bad)} disagreements, "
          f"oracle {result.done['seconds']} s")
