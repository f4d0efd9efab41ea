"""Shared serving library bundled into every Truss package of this project.

Truss copies the contents of the project's `shared/` folder to `/packages`,
which is on `sys.path`, so this package imports as `embed_serving` both in a
deployment and locally (tests put `shared/` on the path).
"""
