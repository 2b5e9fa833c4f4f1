"""The task families; importing this package registers every module here (one family per module)."""
from forgelib.data.families import (algebra, arith, logic, modular, multistep, recall,  # noqa: F401
                                    sequence, sudoku, tool)
