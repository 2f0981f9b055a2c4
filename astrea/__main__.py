import sys

from astrea.cli import main

sys.exit(main())
