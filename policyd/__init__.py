"""policyd: SMTP-time posting policy for mailing lists."""

__version__ = "0.1.0"
