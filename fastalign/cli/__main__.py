import sys

from fastalign.cli import main

sys.exit(main())
