"""``python -m fusedconvlstm``: see :mod:`fusedconvlstm.cli`."""

import sys

from fusedconvlstm.cli import main

sys.exit(main())
