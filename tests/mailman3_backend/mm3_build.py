"""Build or change a Mailman 3 core database through Mailman's own API.

Run with the Python of the Mailman 3.3.10 virtualenv (NOT policyd's):

    build/mailman-venv/bin/python tests/mailman3_backend/mm3_build.py \
        --url sqlite:////tmp/x/mailman.db --var-dir /tmp/x/var < operations.json

The standard input is a JSON list of operations, applied in order and committed at the end
(one transaction).  Every row is written by Mailman itself (``create_list``,
``IUserManager``, ``mlist.subscribe``, ``IBanManager``...), so the schema, the Alembic
stamp and the pickled ``*_these_nonmembers`` columns are exactly what a real site has.

Operations (``action`` values are Mailman action names: hold, reject, discard, accept,
defer, or null):

    {"op": "domain", "mail_host": "example.com", "alias_domain": "alias.example.com"}
    {"op": "list", "fqdn": "a@example.com", "settings": {"emergency": true, ...}}
    {"op": "set", "list": "a@example.com", "settings": {...}}
    {"op": "user", "emails": ["u@x", "u2@x"], "preferred": "u@x"}
    {"op": "subscribe", "list": "...", "email": "...", "role": "member", "action": null}
    {"op": "subscribe_user", "list": "...", "email": "<an address of the user>",
     "role": "member", "action": null}
    {"op": "set_action", "list": "...", "email": "...", "role": "member", "action": "hold"}
    {"op": "unsubscribe", "list": "...", "email": "...", "role": "member"}
    {"op": "ban", "email": "x@y or ^regex", "list": null}
    {"op": "delete_list", "list": "..."}

Settings understood: default_member_action, default_nonmember_action (action names),
emergency (bool), {accept,hold,reject,discard}_these_nonmembers (lists of strings),
nonmember_rejection_notice, display_name (strings).

It prints one JSON line: {"ok": true, "alembic": "<revision>"}.
"""

import argparse
import json
import os
import sys
import tempfile


def write_config(url: str, var_dir: str) -> str:
    database_class = {
        "sqlite": "mailman.database.sqlite.SQLiteDatabase",
        "postgresql": "mailman.database.postgresql.PostgreSQLDatabase",
        "mysql": "mailman.database.mysql.MySQLDatabase",
    }[url.split(":", 1)[0].split("+", 1)[0]]
    os.makedirs(var_dir, exist_ok=True)
    path = os.path.join(var_dir, "mailman.cfg")
    with open(path, "w", encoding="utf-8") as fp:
        fp.write(f"""\
[mailman]
site_owner: postmaster@example.com
layout: policyd

[paths.policyd]
var_dir: {var_dir}

[database]
class: {database_class}
url: {url}

[devmode]
enabled: yes
recipient: devnull@example.com

[mta]
incoming: mailman.mta.null.NullMTA
""")
    return path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--var-dir", default=None)
    args = parser.parse_args()
    operations = json.load(sys.stdin)
    var_dir = args.var_dir or tempfile.mkdtemp(prefix="mm3-build-")
    config_path = write_config(args.url, var_dir)

    from mailman.core.initialize import initialize
    initialize(config_path)

    from mailman.app.lifecycle import create_list, remove_list
    from mailman.config import config
    from mailman.interfaces.action import Action
    from mailman.interfaces.bans import IBanManager
    from mailman.interfaces.domain import IDomainManager
    from mailman.interfaces.listmanager import IListManager
    from mailman.interfaces.member import MemberRole
    from mailman.interfaces.usermanager import IUserManager
    from mailman.utilities.datetime import now
    from zope.component import getUtility

    domains = getUtility(IDomainManager)
    lists = getUtility(IListManager)
    users = getUtility(IUserManager)

    def action(name):
        return None if name is None else Action[name]

    def role(name):
        return MemberRole[name or "member"]

    def get_list(fqdn):
        mlist = lists.get(fqdn)
        if mlist is None:
            raise SystemExit(f"no such list {fqdn}")
        return mlist

    def apply_settings(mlist, settings):
        for key, value in settings.items():
            if key in ("default_member_action", "default_nonmember_action"):
                value = action(value)
            elif key.endswith("_these_nonmembers") or key == "dmarc_addresses":
                value = list(value)
            elif key == "dmarc_mitigate_action":
                from mailman.interfaces.mailinglist import DMARCMitigateAction
                value = DMARCMitigateAction[value]
            setattr(mlist, key, value)

    def address_of(email):
        address = users.get_address(email)
        if address is None:
            address = users.create_address(email)
        return address

    def member_of(mlist, email, role_name):
        roster = {
            "member": mlist.members,
            "nonmember": mlist.nonmembers,
            "owner": mlist.owners,
            "moderator": mlist.moderators,
        }[role_name or "member"]
        member = roster.get_member(email)
        if member is None:
            raise SystemExit(f"{email} is no {role_name} of {mlist.fqdn_listname}")
        return member

    for op in operations:
        kind = op["op"]
        if kind == "domain":
            domains.add(op["mail_host"], alias_domain=op.get("alias_domain"))
        elif kind == "list":
            mlist = create_list(op["fqdn"])
            apply_settings(mlist, op.get("settings", {}))
        elif kind == "set":
            apply_settings(get_list(op["list"]), op["settings"])
        elif kind == "user":
            emails = op["emails"]
            user = users.get_user(emails[0])
            if user is None:
                existing = users.get_address(emails[0])
                if existing is None:
                    user = users.create_user(emails[0])
                else:
                    user = users.create_user()
                    user.link(existing)
            for email in emails[1:]:
                address = users.get_address(email)
                if address is None:
                    user.register(email)
                else:
                    user.link(address)
            for address in user.addresses:
                address.verified_on = now()
            if op.get("preferred"):
                user.preferred_address = users.get_address(op["preferred"])
        elif kind == "subscribe":
            mlist = get_list(op["list"])
            member = mlist.subscribe(address_of(op["email"]), role(op.get("role")))
            member.moderation_action = action(op.get("action"))
        elif kind == "subscribe_user":
            mlist = get_list(op["list"])
            user = users.get_user(op["email"])
            member = mlist.subscribe(user, role(op.get("role")))
            member.moderation_action = action(op.get("action"))
        elif kind == "set_action":
            member = member_of(get_list(op["list"]), op["email"], op.get("role"))
            member.moderation_action = action(op.get("action"))
        elif kind == "unsubscribe":
            member_of(get_list(op["list"]), op["email"], op.get("role")).unsubscribe()
        elif kind == "ban":
            target = get_list(op["list"]) if op.get("list") else None
            IBanManager(target).ban(op["email"])
        elif kind == "delete_list":
            remove_list(get_list(op["list"]))
        else:
            raise SystemExit(f"unknown operation {kind!r}")
    config.db.commit()

    from alembic.runtime.migration import MigrationContext
    with config.db.engine.connect() as connection:
        revision = MigrationContext.configure(connection).get_current_revision()
    print(json.dumps({"ok": True, "alembic": revision}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
