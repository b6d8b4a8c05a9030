"""What the benchmark's modules share: the setup error."""

from __future__ import annotations


class BenchError(Exception):
    """A run could not be set up or measured (a node did not start, too few file
    descriptors, a client process died): the message goes to stderr and the exit status is 1."""
