"""Allow ``python -m ilseg``."""

from ilseg.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
