import sys

from intertie_gateway.cli import main

sys.exit(main())
