"""``python -m polar_xtuner.convert``: the converter's command line (polar_xtuner/convert/export.py)."""

from polar_xtuner.cli.entry import start_tool

start_tool()

from polar_xtuner.cli.entry import cli  # noqa: E402
from polar_xtuner.convert.export import main, return_freed_memory  # noqa: E402

return_freed_memory()  # a process-wide malloc setting: only for the tool's own process
cli(main)
