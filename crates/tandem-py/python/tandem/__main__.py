"""``python -m tandem ...`` (and the ``tandem`` console script): the same command as the binary."""

import signal
import sys
from typing import List, Optional

from tandem import _native


def main(argv: Optional[List[str]] = None) -> int:
    """Runs ``tandem`` with ``argv`` (default: the process arguments) and returns its exit code."""
    # Ctrl-C ends the command as it ends the native binary (the server installs its own handler).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    args = ["tandem", *(sys.argv[1:] if argv is None else argv)]
    return _native.cli_main(args, [sys.executable, "-m", "tandem"])


if __name__ == "__main__":
    sys.exit(main())
