"""TLS ClientHello parsing and JA3/JA4 fingerprints (tier 1): bytes in, values out.

Contract:

* :func:`parse_client_hello` takes the first bytes a TLS server receives (one
  or more handshake records carrying a ClientHello, possibly fragmented) and
  returns a frozen :class:`ClientHello`.  Whatever the bytes, it raises only
  :class:`HelloError` (a :class:`~mailmoat.errors.RemoteProtocolError`):
  :class:`HelloIncomplete` while the bytes are a proper prefix of a possible
  ClientHello (read more), plain :class:`HelloError` when no continuation can
  make one.  Work is linear in the input; a declared message longer than
  ``max_length`` (:data:`MAX_HELLO_LENGTH`) is refused from its header.
  SSLv2-compatible hellos are refused.
* Lists keep the order sent and their GREASE values (:func:`is_grease`);
  ALPN names are latin-1 strings (one character per byte, lossless).
* :func:`fingerprint` computes JA3 (salesforce/ja3) and JA4, JA4_r, JA4_o,
  JA4_ro (FoxIO JA4.md).  For an ALPN value that does not start and end with
  an ASCII letter or digit mailmoat follows the specification (hex of the
  first and last byte, :data:`ALPN_SPEC`), not FoxIO's tools (``99``,
  :data:`ALPN_FOXIO`); ``alpn_convention`` selects.  See docs/tls.md.

No I/O, no clock, no logging: the caller peeks the bytes and decides.
"""

from ._fingerprint import ALPN_FOXIO as ALPN_FOXIO
from ._fingerprint import ALPN_SPEC as ALPN_SPEC
from ._fingerprint import DEFAULT_ALPN_CONVENTION as DEFAULT_ALPN_CONVENTION
from ._fingerprint import AlpnConvention as AlpnConvention
from ._fingerprint import Fingerprints as Fingerprints
from ._fingerprint import Transport as Transport
from ._fingerprint import fingerprint as fingerprint
from ._fingerprint import ja4_alpn as ja4_alpn
from ._hello import MAX_HELLO_LENGTH as MAX_HELLO_LENGTH
from ._hello import MAX_RECORD_LENGTH as MAX_RECORD_LENGTH
from ._hello import TLS_FALLBACK_SCSV as TLS_FALLBACK_SCSV
from ._hello import VERSION_NAMES as VERSION_NAMES
from ._hello import ClientHello as ClientHello
from ._hello import HelloError as HelloError
from ._hello import HelloIncomplete as HelloIncomplete
from ._hello import is_grease as is_grease
from ._hello import parse_client_hello as parse_client_hello
