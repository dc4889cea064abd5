"""`Cancelled`: long work on a thread of its own (a download, a conversion) stops when its
request's cancel event is set. Not an RPC error: the method that started the work answers the
cancel itself (see methods/downloads.py)."""

from __future__ import annotations


class Cancelled(Exception):
    """The request was cancelled: the work stops; what a download fetched stays for a resume."""
