import sys

from jlserve.cli import main

if __name__ == "__main__":
    sys.exit(main())
