"""One module per benchmark section: its measurements and its part of the markdown report."""
