"""Which hosts an OME-Zarr URL may be read from: an allowlist the operator sets, checked at every connection.

A volume named by an http(s) URL is read by this process and by every Dask worker. A URL someone else wrote
(or a redirect its server answers) could point the readers at services they reach but the user never meant
to read: a metadata service on a link-local address, an admin page on loopback, a host on the lab's network.
So each reader connects only to hosts that `HostAllowance` passes:

- `DINOFEAT_HTTP_HOSTS` (read where the command runs; the allowance then travels with the volume to the
  workers): comma-separated entries, each `public` (every globally routable address), a host name
  (`data.lab.example`: whatever it resolves to), an address (`127.0.0.1`) or a network (`10.0.0.0/8`).
- Unset: `public` alone, so loopback, link-local, private, shared, reserved and multicast addresses are refused.

A host name passes when it is listed or when every address it resolves to passes; the redirects a server
answers are followed only to hosts that pass too, because the check sits in the connection itself (the
resolver and the socket factory of the aiohttp session that fsspec reads through), not in the first request.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from dinofeat.contract.errors import DinofeatError

HOSTS_VARIABLE = "DINOFEAT_HTTP_HOSTS"
PUBLIC = "public"
HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class RefusedHost(DinofeatError):
    """A connection to a host that the allowance does not pass (raised inside the HTTP client, shown as is)."""


def is_http(url: str) -> bool:
    return urlsplit(url).scheme.lower() in ("http", "https")


@dataclass(frozen=True)
class HostAllowance:
    """The hosts an http(s) volume may be read from: `public`, host names, addresses and networks (see the module)."""

    entries: tuple[str, ...] = (PUBLIC,)

    @classmethod
    def from_environment(cls) -> HostAllowance:
        """The allowance of $DINOFEAT_HTTP_HOSTS (unset or empty: public addresses only); a malformed entry is one sentence."""
        text = os.environ.get(HOSTS_VARIABLE, "").strip()
        allowance = cls(tuple(entry.strip().lower() for entry in text.split(",") if entry.strip()) or (PUBLIC,))
        allowance.networks  # parse now: a typo is refused before any work, not in a worker
        return allowance

    @functools.cached_property
    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """The entries that are addresses or networks (the others are `public` and host names)."""
        networks = []
        for entry in self.entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if entry != PUBLIC and not HOST_NAME.fullmatch(entry):
                    raise DinofeatError(f"{HOSTS_VARIABLE} holds {entry!r}, which is no host name, address or network; "
                                        "give entries such as public, data.lab.example, 127.0.0.1 or 10.0.0.0/8.") from None
        return tuple(networks)

    def passes_name(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.entries

    def passes_address(self, address: str) -> bool:
        """Whether an address (as the resolver or the socket gives it; IPv4 mapped into IPv6 read as IPv4) passes."""
        parsed: Address = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
            parsed = parsed.ipv4_mapped
        if PUBLIC in self.entries and parsed.is_global and not parsed.is_multicast:
            return True
        return any(parsed in network for network in self.networks)

    def refusal(self, host: str, address: str) -> RefusedHost:
        shown = host if host == address else f"{host} ({address})"
        return RefusedHost(f"reading the volume would connect to {shown} (its URL's host or a redirect's), which is not "
                           f"among the hosts http volumes may be read from ({', '.join(self.entries)}); if you trust it, "
                           f"add it to {HOSTS_VARIABLE} (e.g. "
                           f"{HOSTS_VARIABLE}={','.join([*self.entries, host])}).")

    def check_host(self, host: str, addresses: list[str]) -> None:
        """Refuse a host unless it is listed by name or every one of its addresses passes."""
        if self.passes_name(host):
            return
        for address in addresses:
            if not self.passes_address(address):
                raise self.refusal(host, address)

    def check_url(self, url: str) -> None:
        """Refuse an http(s) URL whose host does not pass (its name resolved here; every address checked)."""
        host = urlsplit(url).hostname
        if not host:
            raise DinofeatError(f"cannot read {url}: the URL names no host.")
        try:
            port = urlsplit(url).port
            found = socket.getaddrinfo(host, port or 80, proto=socket.IPPROTO_TCP)
        except (OSError, ValueError) as error:
            raise DinofeatError(f"cannot read {url}: its host {host} cannot be resolved ({type(error).__name__}).") from None
        self.check_host(host, [info[4][0] for info in found])

    def storage_options(self, url: str) -> dict:
        """fsspec storage options reading `url` through a session bound to this allowance (none for other schemes)."""
        return {"get_client": functools.partial(guarded_session, self)} if is_http(url) else {}


async def guarded_session(allowance: HostAllowance, **client_kwargs):
    """An aiohttp session (fsspec's `get_client`) whose every connection, redirects included, goes to allowed hosts:
    names are checked when resolved (every address), and each socket's address before it connects (IP literals,
    which skip the resolver, and a name's answer changing between the check and the connection)."""
    import aiohttp
    from aiohttp.resolver import DefaultResolver

    approved: set[str] = set()  # addresses of hosts allowed by name: the socket factory passes those too

    class CheckedResolver(DefaultResolver):
        async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
            found = await super().resolve(host, port, family)
            allowance.check_host(host, [entry["host"] for entry in found])
            if allowance.passes_name(host):
                approved.update(entry["host"] for entry in found)
            return found

    def checked_socket(addr_info) -> socket.socket:
        family, kind, proto, _, sockaddr = addr_info
        if sockaddr[0] not in approved and not allowance.passes_address(sockaddr[0]):
            raise allowance.refusal(sockaddr[0], sockaddr[0])
        return socket.socket(family=family, type=kind, proto=proto)

    connector = aiohttp.TCPConnector(resolver=CheckedResolver(), socket_factory=checked_socket)
    return aiohttp.ClientSession(connector=connector, trust_env=False, **client_kwargs)
