"""What dinofeat's client and server share: the generated gRPC code (`dinofeat.v1`) and the contract both sides
keep (`dinofeat.contract`: the description of a feature computation, the wire format, user-facing errors, image
rules, output rules and the local server's files). Neither side's own code lives here."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dinofeat")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"
