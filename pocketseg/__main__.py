import sys

from pocketseg.cli import main

sys.exit(main())
