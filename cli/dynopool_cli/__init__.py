"""The ``dynopool`` command line (Typer front end over ``dynopool_convert``)."""
