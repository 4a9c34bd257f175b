import sys

from fastrm.cli import main

sys.exit(main())
