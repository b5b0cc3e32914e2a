"""``python -m fastmid``: the ``fastmid`` command, so that ``torchrun -m fastmid train ...`` works."""

from fastmid.cli import main

if __name__ == "__main__":
    main()
