"""tandem proto package (namespace for versioned APIs)."""
