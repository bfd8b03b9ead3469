"""Detectors: facts about a session for the rules (DESIGN.md §5 ``login.*``, ``client.*``).

Each detector turns an observation (a login outcome, a client address) into
rule context fields, keeping what it must remember in a
:class:`~mailmoat.state.Store` (or, for GeoIP, reading MaxMind databases).
No sockets and no trio here.
"""

from .login import LoginDetector as LoginDetector
from .login import LoginFacts as LoginFacts
from .login import password_fingerprint as password_fingerprint
from .login import prefix_of as prefix_of
