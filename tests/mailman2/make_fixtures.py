# -*- coding: utf-8 -*-
"""Write the Mailman 2.1 fixtures with Python 2.7's own cPickle (run with Python 2.7).

    PYENV_VERSION=2.7.18 python2 tests/mailman2/make_fixtures.py   # or any python2.7

Provenance: every .pck under tests/mailman2/fixtures was written by this script under
CPython 2.7.18's ``cPickle.dump(dict, fp, protocol)``: exactly the call Mailman 2.1's
``MailList.__save`` makes (protocol 1), plus protocol 2 for a list some tools re-saved.
Python 2's ``str`` keys and values are byte strings (SHORT_BINSTRING), ``unicode`` values
are BINUNICODE, and ``bounce_info`` holds instances of an old-style class named
``Mailman.Bouncer._BounceInfo`` (a stand-in defined here with Mailman's attribute names,
registered as that module so cPickle writes the same GLOBAL/OBJ/BUILD opcodes Mailman's
own class produces).  The output is deterministic (Python 2's str hashing is not
randomised without -R), so re-running reproduces the files byte for byte; the script
refuses to run under Python 3, whose picklers (zodbpickle included) write different bytes
(e.g. str as BINUNICODE, memo ids from 0).

The data is made up; the keys are Mailman 2.1's (Mailman/MailList.py, Defaults.py).
"""

from __future__ import print_function

import os
import sys
import types

if sys.version_info[0] != 2:
    sys.exit("make_fixtures.py must run under Python 2.7 (real cPickle output)")

import cPickle  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures")
PWNED = "/tmp/policyd-mailman2-fixture-pwned"

# --- a stand-in for Mailman.Bouncer._BounceInfo (old-style class, as in Mailman 2.1) ---
mailman = types.ModuleType("Mailman")
bouncer = types.ModuleType("Mailman.Bouncer")
sys.modules["Mailman"] = mailman
sys.modules["Mailman.Bouncer"] = bouncer
mailman.Bouncer = bouncer


class _BounceInfo:
    def __init__(self, member, score, date, noticesleft):
        self.member = member
        self.cookie = None
        self.score = score
        self.date = date
        self.noticesleft = noticesleft
        self.lastnotice = (1970, 1, 1)


_BounceInfo.__module__ = "Mailman.Bouncer"
bouncer._BounceInfo = _BounceInfo


class Evil(object):
    def __init__(self, how):
        self.how = how

    def __reduce__(self):
        if self.how == "system":
            return (os.system, ("touch " + PWNED,))
        return (eval, ("__import__('os').system('touch %s')" % PWNED,))


def base(name, host, real_name):
    return {
        "_internal_name": name,
        "real_name": real_name,
        "host_name": host,
        "web_page_url": "http://%s/mailman/" % host,
        "preferred_language": "en",
        "owner": ["owner@example.org"],
        "moderator": [],
        "members": {},
        "digest_members": {},
        "user_options": {},
        "passwords": {},
        "language": {},
        "usernames": {},
        "topics_userinterest": {},
        "bounce_info": {},
        "delivery_status": {},
        "member_moderation_action": 0,
        "member_moderation_notice": "",
        "generic_nonmember_action": 1,
        "accept_these_nonmembers": [],
        "hold_these_nonmembers": [],
        "reject_these_nonmembers": [],
        "discard_these_nonmembers": [],
        "forward_auto_discards": 1,
        "nonmember_rejection_notice": "",
        "emergency": 0,
        "equivalent_domains": "",
        "ban_list": [],
        "topics": [],
        "hold_and_cmd_autoresponses": {},
        "new_member_options": 256,
        "data_version": 113,
        "last_post_time": 1714521600.5,
        "post_id": 1205,
        "private_roster": 1,
        # The Hold handler's settings, at Mailman 2.1's Defaults.py values.
        "max_message_size": 40,
        "max_num_recipients": 10,
        "require_explicit_destination": 1,
        "acceptable_aliases": "\n",
        "administrivia": 1,
        "bounce_matching_headers": "\n# Lines that *start* with a '#' are comments.\n"
                                   "to: friend@public.com\n"
                                   "message-id: relay.comanche.denmark.eu\n"
                                   "from: list@listme.com\nfrom: .*@uplinkpro.com\n",
        "header_filter_rules": [],
    }


def announce():
    d = base("announce", "lists.example.org", "Announce")
    d["members"] = {"alice@example.org": 0, "bob@example.org": "Bob@Example.ORG",
                    "carol@example.com": 0}
    d["digest_members"] = {"dave@example.net": "Dave@Example.NET"}
    # Moderate = 128; other bits (DontReceiveOwnPosts 2, AcknowledgePosts 4, ...) are noise.
    d["user_options"] = {"alice@example.org": 0, "bob@example.org": 128 | 4,
                         "carol@example.com": 2, "dave@example.net": 128 | 256}
    d["member_moderation_action"] = 1          # reject
    d["generic_nonmember_action"] = 2          # reject
    d["accept_these_nonmembers"] = ["^.*@partner\\.example$", "Friend@Outside.Example",
                                    "@discuss", "@nosuchlist", "@announce"]
    d["hold_these_nonmembers"] = ["^hold-"]
    d["reject_these_nonmembers"] = ["troll@outside.example", "^bad[regex"]
    d["discard_these_nonmembers"] = ["^spam.*@"]
    d["nonmember_rejection_notice"] = "Membres seulement, d\xe9sol\xe9.\nVoir la page."
    d["bounce_info"] = {"dave@example.net": _BounceInfo("dave@example.net", 1.0,
                                                         (2024, 5, 1), 3)}
    d["delivery_status"] = {"carol@example.com": (2, 1714521600.0)}
    d["info"] = u"Caf\xe9 announcements \u2013 read only"
    d["passwords"] = {"alice@example.org": "secret"}
    d["topics"] = [("News", "^news", "news items", False)]
    # The Hold handler and SpamDetect settings (Mailman 3's importer converts them).
    d["max_message_size"] = 0                  # off
    d["max_num_recipients"] = 5
    d["require_explicit_destination"] = 1
    d["administrivia"] = 0
    d["acceptable_aliases"] = ("announce-alias@lists.example.org\n"
                               "  ^.*@announce\\.example\\.org$  \n\nnews\n")
    d["bounce_matching_headers"] = "X-Bounce: ^yes\n"
    d["header_filter_rules"] = [
        ("X-Spam-Flag: YES", 3, False),                       # discard
        ("^subject:.*viagra\n^x-mailer: evil", 2, False),      # reject, two lines
        ("from: .*@spam\\.example", 0, False),                # defer: jump_chain
        ("Subject:.*buy now", 7, False),                      # hold
        ("x-list-ok:", 6, False),                             # accept, any value
        ("x-approve-me: yes", 1, False),                      # approve: skipped
        ("no colon here", 2, False),                          # no header: skipped
        ("x-bad: [unclosed", 3, False),                       # bad regex: skipped
        ("X-Spam-Flag: YES", 2, False),                       # duplicate: skipped
    ]
    return d


def discuss(version=1):
    d = base("discuss", "lists.example.org", "Discuss")
    d["members"] = {"alice@example.org": 0, "erin@example.org": 0,
                    "frank@example.org": "Frank@Example.org"}
    d["digest_members"] = {"gina@example.com": 0}
    d["user_options"] = {"erin@example.org": 128, "gina@example.com": 128}
    d["member_moderation_action"] = 0          # hold
    d["generic_nonmember_action"] = 1          # hold
    d["accept_these_nonmembers"] = ["@announce"]
    d["reject_these_nonmembers"] = ["^.*@rejected\\.example$"]
    d["discard_these_nonmembers"] = ["discard-me@outside.example"]
    d["emergency"] = 1
    d["nonmember_rejection_notice"] = "Nur f\xc3\xbcr Mitglieder."
    d["description"] = u"Discussion \u00fcber alles"
    d["_policyd_fixture_set"] = set(["a", "b"])   # not a Mailman key: exercises set
    if version == 2:
        # frank left, gina's Moderate bit cleared, harry joined, emergency off,
        # the nonmember lists changed.
        del d["members"]["frank@example.org"]
        d["members"]["harry@example.org"] = "Harry@Example.org"
        d["user_options"] = {"erin@example.org": 128, "gina@example.com": 0}
        d["member_moderation_action"] = 2      # discard
        d["emergency"] = 0
        d["reject_these_nonmembers"] = []
        d["hold_these_nonmembers"] = ["^new-.*"]
    return d


def legacy():
    d = base("legacy", "old.example.net", "Legacy")
    # A list saved before these settings existed (data_version < 6x).
    for key in ("max_message_size", "max_num_recipients", "require_explicit_destination",
                "acceptable_aliases", "administrivia", "bounce_matching_headers",
                "header_filter_rules"):
        del d[key]
    d["members"] = {"ivan@example.net": 0}
    d["generic_nonmember_action"] = 3          # discard
    return d


def fallback():
    d = base("fallback", "lists.example.org", "Fallback")
    d["members"] = {"judy@example.org": 0}
    d["generic_nonmember_action"] = 0          # accept
    return d


def write(path, obj, protocol):
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory)
    with open(path, "wb") as fp:
        cPickle.dump(obj, fp, protocol)
    print("wrote %s (protocol %d)" % (os.path.relpath(path, HERE), protocol))


def main():
    lists = os.path.join(OUT, "mailman", "lists")
    write(os.path.join(lists, "announce", "config.pck"), announce(), 1)
    write(os.path.join(lists, "discuss", "config.pck"), discuss(), 2)
    write(os.path.join(lists, "legacy", "config.pck.last"), legacy(), 1)
    write(os.path.join(lists, "fallback", "config.pck.last"), fallback(), 1)
    # A config.pck cut short (a crash while saving): Mailman and policyd fall back.
    data = cPickle.dumps(fallback(), 1)
    with open(os.path.join(lists, "fallback", "config.pck"), "wb") as fp:
        fp.write(data[:len(data) // 2])
    write(os.path.join(OUT, "variants", "discuss-v2.pck"), discuss(2), 2)
    evil = os.path.join(OUT, "evil", "lists")
    good = legacy()
    good["_internal_name"] = "fine"
    write(os.path.join(evil, "fine", "config.pck"), good, 1)
    bad = base("evil", "lists.example.org", "Evil")
    bad["bounce_info"] = {"x@example.org": Evil("system")}
    write(os.path.join(evil, "evil", "config.pck"), bad, 1)
    bad2 = base("evil2", "lists.example.org", "Evil2")
    bad2["topics"] = [Evil("eval")]
    write(os.path.join(evil, "evil2", "config.pck"), bad2, 2)


if __name__ == "__main__":
    main()
