import sys

from maep_fast.cli import main

sys.exit(main())
