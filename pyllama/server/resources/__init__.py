"""One module per endpoint family; resources parse with `protocol` and run with `generation`."""
