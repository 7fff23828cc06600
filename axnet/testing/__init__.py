"""Test doubles and test-host builders that tests and benchmarks share."""

from ._axnet import APPS as APPS
from ._axnet import AXNET as AXNET
from ._axnet import AxnetNode as AxnetNode
from ._axnet import cpu_ns as cpu_ns
from ._axnet import gossip_daemon_args as gossip_daemon_args
from ._axnet import stop_process as stop_process
from ._axnet import wait_until as wait_until
from ._hosts import CLUSTER_SUBNET as CLUSTER_SUBNET
from ._hosts import Cluster as Cluster
from ._hosts import HostError as HostError
from ._hosts import Leftovers as Leftovers
from ._hosts import NetnsHost as NetnsHost
from ._hosts import TestUser as TestUser
from ._hosts import become_subreaper as become_subreaper
from ._hosts import cleanup_stale as cleanup_stale
from ._hosts import find_leftovers as find_leftovers
from ._hosts import make_hosts as make_hosts
from ._hosts import make_runtime_dir as make_runtime_dir
from ._hosts import reap_zombie_children as reap_zombie_children
from ._hosts import remove_leftovers as remove_leftovers
from ._hosts import shared_tmp as shared_tmp
from ._hosts import unprivileged as unprivileged
from ._probe import can_make_netns as can_make_netns
from ._probe import can_run_as_nobody as can_run_as_nobody
from ._probe import has_program as has_program
