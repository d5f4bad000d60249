"""Runtime tuning: everything that reaches into the interpreter or into Twisted's private
attributes, in one place (see ``policyd.runtime.tuning``).

The core and the protocols never import this package; the daemon's construction path
(``policyd.tap``) switches each part on, and each part checks at start-up that the code
it depends on is the one it was written against, else it steps aside and says so.
"""
