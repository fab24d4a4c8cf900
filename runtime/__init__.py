"""bscompile."""
