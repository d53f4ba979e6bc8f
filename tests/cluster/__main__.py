import sys

from tests.cluster.launcher import main

sys.exit(main())
