"""axnet: container networking for unprivileged applications, at the socket API."""

from ._version import __version__ as __version__
