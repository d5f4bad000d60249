"""The benchmark store: 1,000 lists and 1,000,000 memberships, generated in SQL.

Deterministic: the same parameters give the same rows on SQLite and PostgreSQL, and the
request generator (``bench.requests``) knows from the same formulas who is a member of
what, without reading the store back.

Shape (chosen to look like a big Mailman site, not to flatter the daemon):

* 3 mail hosts plus one alias domain; 1,000 lists, 10 % of them in Mailman 2 mode, 1 %
  in emergency moderation; default nonmember action hold (70 %), reject (20 %), discard
  (5 %), accept (5 %);
* list sizes skewed (a few lists of tens of thousands, most of a few hundred), adding up
  to exactly ``memberships``;
* ``addresses`` distinct subscriber addresses (default 500,000: two lists per address on
  average), spread over 2,000 domains; member ``k`` of list ``i`` is address
  ``(offset(i) + k) % addresses``;
* 2.5 % of memberships carry their own moderation action (hold, some reject/discard);
* 1,000 users own two addresses each (Mailman 3 "another address of the same user");
* three ``*_these_nonmembers`` patterns per list (partner domain accepted by regex, an
  exact address held, a regex rejected), list bans on every 50th list, two site bans.

The rows go in with one ``INSERT ... SELECT`` over a recursive counter per table: the
schema itself comes from the store's own migrations (``policyd.store.Store.upgrade``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property

HOSTS = ("lists.example.org", "lists.example.net", "mail.example.com")
ALIAS_DOMAIN = ("lists.example.info", "lists.example.org")
SUBSCRIBER_DOMAINS = 2000
PARTNER_DOMAINS = 50
USERS = 1000


@dataclass(frozen=True)
class Dataset:
    lists: int = 1000
    memberships: int = 1_000_000
    addresses: int = 500_000

    # --- the formulas shared by the SQL and the request generator ---------------------

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """Members per list: Zipf-like (weight 1/(i+20)^0.9), summing to ``memberships``,
        every list at least 10 and none larger than ``addresses``."""
        weights = [1.0 / (i + 20) ** 0.9 for i in range(self.lists)]
        total = sum(weights)
        floor = min(10, self.memberships // max(1, self.lists))
        spare = self.memberships - floor * self.lists
        sizes = [floor + int(spare * w / total) for w in weights]
        sizes = [min(s, self.addresses) for s in sizes]
        i = 0
        while sum(sizes) < self.memberships:
            if sizes[i % self.lists] < self.addresses:
                sizes[i % self.lists] += 1
            i += 1
        return tuple(sizes)

    def offset(self, i: int) -> int:
        return (i * 104729) % self.addresses

    def member_address_id(self, i: int, k: int) -> int:
        """Address row id (1-based) of member ``k`` of list ``i``."""
        return (self.offset(i) + k) % self.addresses + 1

    @staticmethod
    def email(address_id: int) -> str:
        n = address_id
        return f"{_FIRST[n % len(_FIRST)]}.{_LAST[(n // 7) % len(_LAST)]}{n}@" \
               f"d{n % SUBSCRIBER_DOMAINS}.example.com"

    @staticmethod
    def member_action(k: int) -> int | None:
        """Mailman action integer of member ``k`` (same CASE as the SQL)."""
        if k % 40 == 7:
            return 0  # hold
        if k % 400 == 13:
            return 1  # reject
        if k % 400 == 17:
            return 2  # discard
        return None

    @staticmethod
    def host(i: int) -> str:
        return HOSTS[i % len(HOSTS)]

    @classmethod
    def posting_address(cls, i: int) -> str:
        return f"list{i:04d}@{cls.host(i)}"

    @staticmethod
    def mode(i: int) -> str:
        return "mailman2" if i % 10 == 3 else "mailman3"

    @staticmethod
    def emergency(i: int) -> bool:
        return i % 100 == 42

    @staticmethod
    def nonmember_action(i: int) -> int:
        r = i % 20
        if r < 14:
            return 0  # hold
        if r < 18:
            return 1  # reject
        if r == 18:
            return 2  # discard
        return 3      # accept

    @staticmethod
    def partner_domain(i: int) -> str:
        return f"partner{i % PARTNER_DOMAINS}.example.net"

    @staticmethod
    def held_address(i: int) -> str:
        return f"newsletter{i}@marketing.example"

    @staticmethod
    def rejected_domain(i: int) -> str:
        return f"spam{i % 7}.example"

    @staticmethod
    def list_banned(i: int) -> str | None:
        return f"troll{i}@trolls.example" if i % 50 == 0 else None

    SITE_BANS = ("^.*@banned\\.example$", "villain@evil.example")


# Name parts for subscriber addresses (ASCII, lower case, as Mailman stores them).
_FIRST = ("anna", "ben", "carla", "dmitri", "eva", "farid", "greta", "hiro", "ines", "jonas",
          "kim", "lars", "maria", "nils", "olga", "paul", "quinn", "rosa", "sven", "tara")
_LAST = ("schmidt", "martin", "rossi", "garcia", "novak", "kowalski", "jensen", "silva",
         "murphy", "dubois", "muller", "tanaka", "olsen", "petrov", "smith", "weber")


def _sql_email(n: str) -> str:
    """The SQL expression for ``Dataset.email`` (SQLite and PostgreSQL both have ``||``
    and integer ``%`` and ``/``)."""
    first = " ".join(f"WHEN {i} THEN '{v}'" for i, v in enumerate(_FIRST))
    last = " ".join(f"WHEN {i} THEN '{v}'" for i, v in enumerate(_LAST))
    return (f"(CASE ({n}) % {len(_FIRST)} {first} END) || '.' || "
            f"(CASE (({n}) / 7) % {len(_LAST)} {last} END) || CAST({n} AS TEXT) || "
            f"'@d' || CAST(({n}) % {SUBSCRIBER_DOMAINS} AS TEXT) || '.example.com'")


def _counter(name: str, upto: int, dialect: str) -> str:
    """A row source ``name(i)`` with i = 0 .. upto-1."""
    if dialect == "postgresql":
        return f"{name}(i) AS (SELECT generate_series(0, {upto - 1}))"
    return (f"{name}(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM {name} "
            f"WHERE i < {upto - 1})")


def populate(url: str, data: Dataset, log=print) -> dict:
    """Create the schema with the store's migrations, then fill it.  Returns timings."""
    from policyd.store import Store

    timings = {}
    started = time.perf_counter()
    store = Store(url)
    store.upgrade()
    timings["schema_s"] = time.perf_counter() - started
    dialect = store.engine.dialect.name
    raw = store.engine.raw_connection()
    try:
        cursor = raw.cursor()
        if dialect == "sqlite":
            cursor.execute("PRAGMA synchronous = OFF")
            cursor.execute("PRAGMA cache_size = -200000")
            cursor.execute("BEGIN")
        else:
            # The rows are generated consistent; skip the per-row foreign-key triggers
            # (the bench connects as the superuser postgres).
            cursor.execute("SET session_replication_role = replica")
        t = time.perf_counter()
        _fill(cursor, data, dialect)
        cursor.execute("UPDATE store_state SET generation = generation + 1 WHERE id = 1")
        raw.commit()
        timings["rows_s"] = time.perf_counter() - t
        cursor = raw.cursor()
        cursor.execute("ANALYZE")
        raw.commit()
        cursor.close()
    finally:
        raw.close()
        store.close()
    log(f"  store {dialect}: {data.lists} lists, {data.memberships} memberships "
        f"in {timings['rows_s']:.1f} s")
    return timings


def _fill(cursor, data: Dataset, dialect: str) -> None:
    ph = "?" if dialect == "sqlite" else "%s"
    # Domains: the mail hosts, one alias, the subscriber domains need no rows.
    for n, name in enumerate(HOSTS, start=1):
        cursor.execute(f"INSERT INTO domains (id, name, alias_of_id) VALUES ({ph}, {ph}, NULL)",
                       (n, name))
    cursor.execute(f"INSERT INTO domains (id, name, alias_of_id) VALUES ({ph}, {ph}, {ph})",
                   (len(HOSTS) + 1, ALIAS_DOMAIN[0], HOSTS.index(ALIAS_DOMAIN[1]) + 1))
    rows = []
    for i in range(data.lists):
        host = data.host(i)
        rows.append((i + 1, HOSTS.index(host) + 1, f"list{i:04d}", data.posting_address(i),
                     f"list{i:04d}.{host}", f"List {i:04d}", data.mode(i),
                     data.emergency(i), 4, data.nonmember_action(i), None))
    cursor.executemany(
        "INSERT INTO lists (id, domain_id, list_name, posting_address, list_id, display_name,"
        " mode, emergency, default_member_action, default_nonmember_action, rejection_notice)"
        f" VALUES ({', '.join([ph] * 11)})", rows)

    # Users first (addresses reference them), with their preferred address set after.
    cursor.execute(
        f"INSERT INTO users (id, name, display_name, preferred_address_id) "
        f"WITH RECURSIVE {_counter('u', USERS, dialect)} "
        f"SELECT i + 1, 'user' || CAST(i + 1 AS TEXT), NULL, NULL FROM u")
    # Addresses 1..N; addresses 2u-1 and 2u belong to user u (u <= USERS).
    email = _sql_email("i + 1")
    cursor.execute(
        f"INSERT INTO addresses (id, email, original, user_id) "
        f"WITH RECURSIVE {_counter('a', data.addresses, dialect)} "
        f"SELECT i + 1, {email}, {email}, "
        f"CASE WHEN i < {2 * USERS} THEN i / 2 + 1 ELSE NULL END FROM a")
    cursor.execute(f"UPDATE users SET preferred_address_id = 2 * id - 1")

    # Memberships: list i, k < size(i), address (offset(i) + k) % N + 1.
    cursor.execute("CREATE TEMPORARY TABLE bench_sizes (list_id INTEGER, size INTEGER, "
                   "off INTEGER)")
    cursor.executemany(f"INSERT INTO bench_sizes VALUES ({ph}, {ph}, {ph})",
                       [(i + 1, data.sizes[i], data.offset(i)) for i in range(data.lists)])
    cursor.execute(
        f"INSERT INTO memberships (list_id, address_id, user_id, role, moderation_action) "
        f"WITH RECURSIVE {_counter('k', max(data.sizes), dialect)} "
        f"SELECT s.list_id, (s.off + k.i) % {data.addresses} + 1, NULL, 1, "
        f"CASE WHEN k.i % 40 = 7 THEN 0 WHEN k.i % 400 = 13 THEN 1 "
        f"WHEN k.i % 400 = 17 THEN 2 ELSE NULL END "
        f"FROM bench_sizes s JOIN k ON k.i < s.size ORDER BY s.list_id, k.i")
    cursor.execute("DROP TABLE bench_sizes")

    patterns = []
    bans = []
    for i in range(data.lists):
        partner = data.partner_domain(i).replace(".", "\\.")
        patterns.append((i + 1, 3, 0, f"^.*@{partner}$"))
        patterns.append((i + 1, 0, 0, data.held_address(i)))
        patterns.append((i + 1, 1, 0, f"^.*@{data.rejected_domain(i).replace('.', '[.]')}$"))
        banned = data.list_banned(i)
        if banned:
            bans.append((i + 1, banned))
    cursor.executemany(
        f"INSERT INTO nonmember_patterns (list_id, kind, position, pattern) "
        f"VALUES ({ph}, {ph}, {ph}, {ph})", patterns)
    cursor.executemany(f"INSERT INTO bans (list_id, pattern) VALUES ({ph}, {ph})", bans)
    cursor.executemany(f"INSERT INTO bans (list_id, pattern) VALUES (NULL, {ph})",
                       [(b,) for b in Dataset.SITE_BANS])


# --- PostgreSQL: a throwaway database ---------------------------------------------------

PG_ADMIN = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


def pg_create(name: str) -> str:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres",
                            connect_timeout=5)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cursor.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"


def pg_drop(name: str) -> None:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres",
                            connect_timeout=5)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()
