"""Kernel generators, schedules and machine models, one family per target."""

from bscompile.codegen import tvmscript as _tvmscript

_tvmscript.install()
