"""The one exception type whose message is shown to users as is."""


class DinofeatError(Exception):
    """Bad input or an unreachable peer: the message is one sentence saying what is wrong and what to do."""
