"""The pure core: what a query is, how senders are read, the snapshot, the rules, the
chain that applies them, and the SMTP replies a verdict maps to.

Nothing here does I/O or imports Twisted or SQLAlchemy: every decision is a function of
a snapshot and a query, with a rule trace.
"""
