"""Shared serving library bundled into every Truss package of this project.

Truss copies the contents of the project's `shared/` folder to `/packages`,
which is on `sys.path`, so this package imports as `embed_serving` both in a
deployment and locally (tests put `shared/` on the path).
"""

# Before anything imports torch: OpenMP reads OMP_WAIT_POLICY only when it is loaded (see
# threads.py). Our packages import this package before torch, so this is early enough.
from embed_serving.threads import set_process_defaults

set_process_defaults()
