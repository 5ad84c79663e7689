"""`kvrelay keys DIR`: write a cluster's key directory (CURVE keypairs, shared secret, bearer token).

``--etcd-host ADDR`` (repeatable) also writes DIR/etcd: a CA, etcd's server certificate for ADDR and the
client certificate kvrelay processes reach an ``https://`` etcd with (etcdcerts.py).  On a key directory
that already exists, it adds (``--force``: replaces) only the etcd certificates and keeps the other keys.

Owns: the command line.  Must not touch: the files' format (keyfiles.py, etcdcerts.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvrelay.membership.tls import SUBDIR, server_flags
from kvrelay.security.etcdcerts import check_hosts, write_etcd_certs
from kvrelay.security.keyfiles import FILES, KeysError, write_keys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvrelay keys", description=__doc__.split("\n\n")[0])
    p.add_argument("directory", help="where to write the keys (created mode 0700; files mode 0600)")
    p.add_argument("--force", action="store_true", help="replace keys already there")
    p.add_argument("--etcd-host", action="append", default=[], metavar="ADDR",
                   help="also write etcd TLS certificates (DIR/etcd) for an etcd serving on ADDR (IP or DNS name; "
                        "repeat for more); on an existing key directory only these are added")
    args = p.parse_args(argv)
    existing = Path(args.directory).expanduser()
    keep = bool(args.etcd_host) and all((existing / n).is_file() for n in FILES)
    try:
        if args.etcd_host:
            check_hosts(args.etcd_host)
        if args.etcd_host and (existing / SUBDIR / "ca.crt").exists() and not args.force:
            raise KeysError(f"{existing / SUBDIR}: etcd certificates already exist; pass --force to replace them "
                            f"(etcd and every kvrelay process must then get the new ones)")
        d = existing if keep else write_keys(args.directory, force=args.force)
        if args.etcd_host:
            write_etcd_certs(d, args.etcd_host)
    except (KeysError, ValueError) as exc:
        print(f"kvrelay keys: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"kvrelay keys: cannot write {args.directory}: {exc}", file=sys.stderr)
        return 2
    if args.etcd_host:
        print(f"kvrelay keys: wrote etcd certificates in {d / SUBDIR} for {', '.join(args.etcd_host)}; start etcd "
              f"with --listen-client-urls https://{args.etcd_host[0]}:2379 --advertise-client-urls "
              f"https://{args.etcd_host[0]}:2379 {' '.join(server_flags(d))}")
    print(f"kvrelay keys: wrote {d}; copy it to every host of the cluster (keep it private) and start each "
          f"process with --keys {d} (or KVRELAY_KEYS={d})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
