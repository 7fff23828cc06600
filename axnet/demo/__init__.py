"""``axnet demo``: two web servers on port 80 at two virtual IPs, and a client."""

from ._run import run_demo as run_demo
