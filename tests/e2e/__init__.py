"""End-to-end tests: a live server driven over HTTP."""
