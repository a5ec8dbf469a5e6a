"""Errors that cross the wire's two sides: the library raises them, the server catches them."""


class InvalidReply(ValueError):
    """Why a reply was rejected, one line, starting with the offending key."""
