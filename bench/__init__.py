"""flysticky's benchmark: ``python -m bench`` (``--smoke``: a quick run that checks it works)."""
