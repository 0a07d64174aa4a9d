import sys

from cascade.app.cli import main

sys.exit(main())
