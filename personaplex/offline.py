"""`python -m personaplex.offline`: the command of the offline CLI (`personaplex.serve.offline`)."""

import sys

if __name__ == "__main__":
    from personaplex.serve.offline import main

    sys.exit(main())
