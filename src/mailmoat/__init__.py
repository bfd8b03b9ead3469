"""mailmoat: an application firewall in front of mail servers and webmail.

The package is laid out in three tiers (see docs/ARCHITECTURE.md):

1. ``mailmoat.protocols`` -- pure codecs, bytes to typed events and back;
2. ``mailmoat.session`` -- pure decisions, events in, commands out;
3. ``mailmoat.net``, ``mailmoat.events``, ``mailmoat.app`` -- the I/O that drives them.
"""

__version__ = "0.1.0"
