"""What the tests and the tiny recipe build: never used by a run of a real recipe."""
