"""Cluster membership on etcd: members (stores, engines, routers) register under a lease, and processes that
need to find them (the router, `kvrelay status`) list and watch them.

A real etcd serves it (Debian's ``etcd-server``; scripts/install-etcd.sh), reached through its v3 JSON
gateway (etcd.py says why).  Layer: base (it imports nothing of kvrelay beyond this package); engines,
the router and the command line use it.

Reading order: member.py (the keys), etcd.py (the client), registration.py (one member's lease),
view.py (the members as a process sees them), tls.py (etcd
off loopback: https with the key directory's client certificate).
"""

from kvrelay.membership.etcd import EtcdClient, EtcdError, check_endpoint
from kvrelay.membership.member import KINDS, Member, check_cluster
from kvrelay.membership.tls import EtcdTLS, server_flags
from kvrelay.membership.registration import Registration, RegistrationThread, register_when_bound
from kvrelay.membership.view import MembershipView

__all__ = ["KINDS", "EtcdClient", "EtcdError", "EtcdTLS", "Member", "MembershipView", "Registration", "RegistrationThread",
           "check_cluster", "check_endpoint", "register_when_bound", "server_flags"]
