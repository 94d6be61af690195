import sys

from switchformer.cli import main

sys.exit(main())
