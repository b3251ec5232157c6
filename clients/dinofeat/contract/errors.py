"""The one exception type whose message is shown to users as is."""


class DinofeatError(Exception):
    """Bad input or an unreachable peer: the message is one sentence saying what is wrong and what to do."""


class ServerUnavailable(DinofeatError):
    """The server could not be reached or the connection broke; worth trying again after a pause."""
