import sys

from layerfs.cli import main

sys.exit(main())
