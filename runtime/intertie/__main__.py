import sys

from intertie.cli import main

sys.exit(main())
