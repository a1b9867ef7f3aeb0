"""Where an agent's public address is, as evidence for its unit's declared location.

The lookup is offline: iptocc ships the five Regional Internet Registries' delegation tables in
its wheel (refreshed with each release), so no request leaves the server. RIR data gives the
country a block is registered to, which for a home connection is the country of its ISP; that
is all the evidence claims. Upgrading the package refreshes the data.
"""

import ipaddress

import iptocc
import pycountry


def address_normalise(address: str) -> str:
    """The canonical text of an IP address ("" if it is not one); IPv4-mapped IPv6 becomes IPv4."""
    try:
        parsed = ipaddress.ip_address(address.strip())
    except ValueError:
        return ""
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped:
        parsed = parsed.ipv4_mapped
    return str(parsed)


def country_of(address: str) -> str:
    """The ISO 3166-1 country of a public address, or "" when there is no evidence: a private,
    loopback, shared or reserved address, an unallocated block, or no address at all."""
    address = address_normalise(address)
    if not address or not ipaddress.ip_address(address).is_global:
        return ""
    country = iptocc.country_code(address) or ""
    # Registries also use non-ISO regions (EU, AP) for some old blocks: those prove nothing.
    return country if pycountry.countries.get(alpha_2=country) else ""
