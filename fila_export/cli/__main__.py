import sys

from fila_export.cli.main import main

sys.exit(main())
