"""`kvrelay keys DIR`: write a cluster's key directory (CURVE keypairs, shared secret, bearer token).

Owns: the command line.  Must not touch: the files' format (keyfiles.py).
"""

from __future__ import annotations

import argparse
import sys

from kvrelay.security.keyfiles import KeysError, write_keys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvrelay keys", description=__doc__.split("\n\n")[0])
    p.add_argument("directory", help="where to write the keys (created mode 0700; files mode 0600)")
    p.add_argument("--force", action="store_true", help="replace keys already there")
    args = p.parse_args(argv)
    try:
        d = write_keys(args.directory, force=args.force)
    except KeysError as exc:
        print(f"kvrelay keys: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"kvrelay keys: cannot write {args.directory}: {exc}", file=sys.stderr)
        return 2
    print(f"kvrelay keys: wrote {d}; copy it to every host of the cluster (keep it private) and start each "
          f"process with --keys {d} (or KVRELAY_KEYS={d})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
