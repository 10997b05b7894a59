import sys

from scaleseg.cli import main

sys.exit(main())
