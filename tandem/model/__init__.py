"""The one transformer definition and everything that describes or stores it."""
