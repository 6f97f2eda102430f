"""tandem.v1: the Generation service (generate.proto) and its generated Python modules."""
