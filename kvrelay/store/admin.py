"""`kvrelay store purge` and `kvrelay store keygen`: the store's operator commands (the daemon is `kvrelay store`).

Owns: their command lines and output.  Must not touch: what a purge does (purge.py, in the daemon) or the
key file's format (crypto.py).

    kvrelay store purge --tenant T --store tcp://127.0.0.1:5600 [--by NAME]   drop T's chunks everywhere
    kvrelay store keygen --at-rest-key FILE                                    add a key (the new current one)

Exit codes: 0 done, 1 the store refused or could not be reached, 2 a bad flag.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys


def _purge(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kvrelay store purge",
                                description="drop every chunk of a tenant (its cache_salt) from the store's memory "
                                            "and SSD, overwriting the bytes; recorded in the journal and audit log")
    p.add_argument("--tenant", required=True, help="the tenant: the cache_salt its requests carry")
    p.add_argument("--store", required=True, help="the store's control address, e.g. tcp://127.0.0.1:5600")
    p.add_argument("--by", default="", help="who purges, for the audit log (default: the user name)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer")
    args = p.parse_args(argv)
    if not args.tenant:
        print("kvrelay store purge: --tenant is empty; the unsalted chunks are not a tenant (use purge by prefix)",
              file=sys.stderr)
        return 2
    if not args.store.startswith("tcp://"):
        print(f"kvrelay store purge: --store {args.store!r} must look like tcp://127.0.0.1:5600", file=sys.stderr)
        return 2
    if not 0 < args.timeout < float("inf"):
        print(f"kvrelay store purge: --timeout {args.timeout} must be positive", file=sys.stderr)
        return 2
    by = args.by or getpass.getuser()
    from kvrelay.store.client import StoreClient, StoreError
    try:
        client = StoreClient(args.store, compat_hash="kvrelay-admin", name=f"kvrelay store purge ({by})",
                             timeout=min(args.timeout, 10.0), staging_bytes=1 << 20)
    except (StoreError, ValueError, OSError) as exc:
        print(f"kvrelay store purge: cannot reach the store at {args.store}: {exc}", file=sys.stderr)
        return 1
    try:
        out = client.purge_tenant(args.tenant, by=by, timeout=args.timeout)
    except StoreError as exc:
        print(f"kvrelay store purge: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(json.dumps({"tenant": args.tenant, "by": by, **out}))
    if out.get("skipped"):
        print(f"kvrelay store purge: {out['skipped']} chunks of tenant {args.tenant!r} were in use (pinned, "
              f"reserved or being written) and stay: purge again once they are released", file=sys.stderr)
    return 0


def _keygen(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kvrelay store keygen",
                                description="append a fresh AES-256 key to the store's at-rest key file (created "
                                            "with mode 0600); it becomes the key new SSD records are sealed with "
                                            "once the store restarts, and the older keys still open theirs")
    p.add_argument("--at-rest-key", required=True, help="the key file (the store's --at-rest-key)")
    args = p.parse_args(argv)
    from kvrelay.store.crypto import keygen
    try:
        kid = keygen(args.at_rest_key)
    except (ValueError, OSError) as exc:
        print(f"kvrelay store keygen: {exc}", file=sys.stderr)
        return 2
    print(f"key {kid} added to {args.at_rest_key}; restart the store to seal new records with it")
    return 0


COMMANDS = {"purge": _purge, "keygen": _keygen}


def main(argv: list[str]) -> int:
    return COMMANDS[argv[0]](argv[1:])
