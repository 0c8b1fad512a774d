"""The benchmark harness: `make bench` (CPU), `make bench-gpu` and scripts/gpu_check.sh.

Run its commands from the repository root as ``python -m bench.MODULE`` (the
package polar_xtuner is installed editable by ``make setup``; bench/ is not
installed, so the working directory puts it on the path). The modules:

* commands (:data:`COMMANDS`): ``cpu_suite`` (``make bench``), ``gpu_suite``
  (``make bench-gpu``), ``gpu_check`` (scripts/gpu_check.sh), and the sections
  or studies that also run alone: ``shared_prefix``, ``convert_memory``,
  ``activation_memory``, ``demo_seeds``, ``objectives``;
* libraries: ``workloads`` (the data and models the timed sections share),
  ``report`` (machine, results files, the check every section makes before it
  records), ``cpu_sections`` and ``remote`` (``make bench``'s other sections),
  ``gpu_sections`` (ZeRO training, packing and scoring on a GPU), ``gpu_variants``
  (each speed setting of the recipes), ``gpu_steps`` (the GPU check's steps) and
  ``recipe_gradients`` (one step of a config as shipped).

Figures go to bench/results/. ``python -m`` on a library module is refused in one
line, as the package's own are (:func:`polar_xtuner.refuse_module_without_command_line`).
"""

import os

from polar_xtuner import refuse_module_without_command_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")

# The modules `python -m` runs; tests/integration/test_bench_shared_prefix.py checks that these
# are exactly bench's modules with a main-guard block.
COMMANDS = ("bench.activation_memory", "bench.convert_memory", "bench.cpu_suite", "bench.demo_seeds",
            "bench.gpu_check", "bench.gpu_suite", "bench.objectives", "bench.shared_prefix")

refuse_module_without_command_line("bench", COMMANDS)
